//! Matrix products on `gemm`: read-only matrix views, the bounds-checked single-threaded GEMM
//! (which may write uninitialised output), and products split over the cores by columns, by rows
//! or by batch items.

use std::mem::MaybeUninit;

use candle_core::{Result, Tensor};

use super::bf16::{
    gemm_bf16, gemm_bf16_f32_lhs, gemm_bf16_packed_into, product_precision, PackedColumns,
    PackedRhs, ProductPrecision, WeightPacking,
};
use super::buffers::{parallel_filled, parallel_initialised, parallel_pieces};
use super::operands::with_f32_pair;
use super::panel_product::panel_product;
use super::threads::{piece_count, worker_count};

/// A read-only f32 matrix inside a slice, rows `row_stride` apart, columns adjacent (for
/// [`gemm_single_thread`]).
#[derive(Clone, Copy)]
pub(super) struct MatrixView<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a> MatrixView<'a> {
    /// `rows x cols` starting at `data[offset]`, rows `row_stride` apart.
    pub(super) fn new(
        data: &'a [f32],
        offset: usize,
        (rows, cols): (usize, usize),
        row_stride: usize,
    ) -> Self {
        Self {
            data,
            offset,
            rows,
            cols,
            row_stride,
        }
    }

    /// `(data, offset, (rows, cols), row_stride)`.
    pub(super) fn parts(&self) -> (&'a [f32], usize, (usize, usize), usize) {
        (
            self.data,
            self.offset,
            (self.rows, self.cols),
            self.row_stride,
        )
    }

    /// Whether every element lies inside `data`.
    pub(super) fn in_bounds(&self) -> bool {
        matrix_fits(
            self.data.len(),
            self.offset,
            (self.rows, self.cols),
            self.row_stride,
        )
    }
}

/// Whether a `rows x cols` matrix at `offset`, rows `row_stride` apart, lies inside `len` elements
/// (its last element is `offset + (rows-1) * row_stride + cols - 1`).
fn matrix_fits(len: usize, offset: usize, (rows, cols): (usize, usize), row_stride: usize) -> bool {
    rows == 0 || cols == 0 || offset + (rows - 1) * row_stride + cols - 1 < len
}

/// Where [`gemm_single_thread`] may write its f32 results: values or uninitialised slots (the
/// GEMM only writes them).
pub(super) trait GemmDestination {
    /// The first element and the number of elements.
    fn raw_parts(&mut self) -> (*mut f32, usize);

    /// Sets `rows` rows of `values.len()` elements, the first at `offset`, rows `row_stride`
    /// apart, to `values` (panics outside the slice; callers check first).
    fn fill_rows(&mut self, offset: usize, rows: usize, row_stride: usize, values: &[f32]);
}

impl GemmDestination for [f32] {
    fn raw_parts(&mut self) -> (*mut f32, usize) {
        (self.as_mut_ptr(), self.len())
    }

    fn fill_rows(&mut self, offset: usize, rows: usize, row_stride: usize, values: &[f32]) {
        for row in 0..rows {
            self[offset + row * row_stride..][..values.len()].copy_from_slice(values);
        }
    }
}

impl GemmDestination for [MaybeUninit<f32>] {
    fn raw_parts(&mut self) -> (*mut f32, usize) {
        (self.as_mut_ptr().cast(), self.len())
    }

    fn fill_rows(&mut self, offset: usize, rows: usize, row_stride: usize, values: &[f32]) {
        for row in 0..rows {
            let slots = &mut self[offset + row * row_stride..][..values.len()];
            for (slot, &value) in slots.iter_mut().zip(values) {
                slot.write(value);
            }
        }
    }
}

/// Products of fewer multiply-adds than this run on the calling thread: about 20-40 us of work
/// on one core, where handing pieces to another thread costs a good part of the gain.
pub(super) const PRODUCT_PARALLEL_MIN_MACS: usize = 1 << 20;

/// gemm copies the weight side of our row-major products into its panel layout when the block
/// of activation rows is longer than this many times its 6-column tile (its default is 8, so
/// products of 32 rows read the weight unpacked). Measured with single-threaded pieces (best of
/// 7): 32x1280 times 1280x10240 6.1-6.4 ms at 4 against 10.9-12.3 ms at 8, 32x11520 times
/// 11520x1280 6.3-6.5 against 7.3-9.4 ms; larger products pack either way.
const LHS_PACKING_THRESHOLD: usize = 4;

/// `dst[offset..]` (row stride `dst_row_stride`, unit column stride) `= lhs * rhs` on the calling
/// thread only (the callers already spread their blocks over the cores). The product's elements
/// of `dst` are written, never read, so `dst` may be uninitialised.
pub(super) fn gemm_single_thread<D: GemmDestination + ?Sized>(
    dst: &mut D,
    dst_offset: usize,
    dst_row_stride: usize,
    lhs: MatrixView<'_>,
    rhs: MatrixView<'_>,
) -> Result<()> {
    gemm_with_bias(dst, dst_offset, dst_row_stride, lhs, rhs, None)
}

/// Sets gemm's weight-side packing threshold to [`LHS_PACKING_THRESHOLD`], once per process.
fn configure_weight_packing() {
    static PACKING: std::sync::Once = std::sync::Once::new();
    PACKING.call_once(|| gemm::set_lhs_packing_threshold_single_thread(LHS_PACKING_THRESHOLD));
}

/// Products over [`ColumnPanels`] in flight. While there are any, gemm reads the weight side where
/// it lies instead of packing it (its threshold raised to the most it takes, 256 tiles of 6
/// rows). The threshold only decides whether gemm copies that side first: a product running
/// meanwhile on another thread gives the same values either way, at its own speed.
static PANEL_PRODUCTS: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

/// Largest row count of one product over a panel: below [`PANEL_PRODUCTS`]' raised threshold
/// (with AVX-512's tiles of 6 rows), so that gemm never packs the panel.
const PANEL_PRODUCT_MAX_ROWS: usize = 255 * 6;

/// While alive, gemm reads panels in place (see [`PANEL_PRODUCTS`]).
struct PanelsReadInPlace;

impl PanelsReadInPlace {
    fn begin() -> Self {
        configure_weight_packing();
        let mut running = PANEL_PRODUCTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *running == 0 {
            gemm::set_lhs_packing_threshold_single_thread(256);
        }
        *running += 1;
        Self
    }
}

impl Drop for PanelsReadInPlace {
    fn drop(&mut self) {
        let mut running = PANEL_PRODUCTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *running -= 1;
        if *running == 0 {
            gemm::set_lhs_packing_threshold_single_thread(LHS_PACKING_THRESHOLD);
        }
    }
}

/// Most rows of a product over a panel that goes through [`panel_product`] (which fetches the
/// panel ahead of its use) rather than gemm: where reading the weight takes as long as its
/// multiply-adds. SD 1.5 at 512 px, alternating runs: the wide Winograd layers at 8x8 (32 tiles)
/// 103.7-109.6 -> 81.0-84.3 ms per call (11 layers) and 56.2-58.0 -> 45.7-47.1 ms (3 layers);
/// with 128 rows (16x16) no change, with 512 (32x32) 94-95 -> 108 ms.
const FETCHING_PANEL_MAX_ROWS: usize = 64;

/// Columns per panel of [`ColumnPanels`]: gemm's f32 tile height on AVX-512 (4 vectors of 16),
/// so a panel is laid out exactly as gemm packs the weight side of a row-major product there.
/// Elsewhere the products give the same values; only their speed may differ.
pub const PANEL_COLUMNS: usize = 64;

/// A batch of `k x n` f32 right-hand factors kept as panels of [`PANEL_COLUMNS`] columns,
/// `[batch, n / 64, k, 64]` (contiguous): each panel's rows lie one after another, as gemm would
/// pack them, so [`batched_matmul_panels`] reads them in place rather than copying each factor on
/// every call. For factors used many times, such as a convolution's stored Winograd filter.
#[derive(Clone, Debug)]
pub struct ColumnPanels {
    /// `[batch, n / 64, k, 64]`.
    panels: Tensor,
    batch: usize,
    k: usize,
    n: usize,
}

impl ColumnPanels {
    /// `matrices` `[batch, k, n]` as panels; `None` where `n` is not a multiple of
    /// [`PANEL_COLUMNS`] or the values are not f32 on the CPU.
    pub fn new(matrices: &Tensor) -> Result<Option<Self>> {
        let (batch, k, n) = matrices.dims3()?;
        if !n.is_multiple_of(PANEL_COLUMNS)
            || matrices.dtype() != candle_core::DType::F32
            || !matrices.device().is_cpu()
        {
            return Ok(None);
        }
        let panels = matrices
            .reshape((batch, k, n / PANEL_COLUMNS, PANEL_COLUMNS))?
            .permute((0, 2, 1, 3))?
            .contiguous()?;
        Ok(Some(Self {
            panels,
            batch,
            k,
            n,
        }))
    }

    /// The factors as `[batch, k, n]` again (a new tensor).
    pub fn matrices(&self) -> Result<Tensor> {
        self.panels
            .permute((0, 2, 1, 3))?
            .contiguous()?
            .reshape((self.batch, self.k, self.n))
    }

    /// Factors in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }
}

/// [`batched_matmul_parallel`] with the right-hand factors as [`ColumnPanels`]: `a` `[batch, m,
/// k]` -> `[batch, m, n]` (f32), one product per panel and block of at most
/// [`PANEL_PRODUCT_MAX_ROWS`] rows, each reading its panel in place (blocks of at most
/// [`FETCHING_PANEL_MAX_ROWS`] rows through [`panel_product`], which also fetches the next panel
/// while it works). With bf16 products the factors go back to matrices and through
/// [`batched_matmul_parallel`].
pub fn batched_matmul_panels(a: &Tensor, b: &ColumnPanels) -> Result<Tensor> {
    if product_precision() == ProductPrecision::Bf16 {
        return batched_matmul_parallel(a, &b.matrices()?);
    }
    let (batch, m, k) = a.dims3()?;
    let (b_batch, n) = (b.batch, b.n);
    if (b_batch, b.k) != (batch, k) {
        candle_core::bail!(
            "batched matmul: {:?} times panels of {b_batch} x {} x {n}",
            a.dims(),
            b.k
        );
    }
    let _in_place = PanelsReadInPlace::begin();
    let out = with_f32_pair(a, &b.panels, |a_values, panel_values| {
        parallel_pieces(batch * m * n, m * n, k, |item, slots| {
            if slots.len() != m * n {
                candle_core::bail!("gemm: {} output slots for a {m}x{n} product", slots.len());
            }
            for first_row in (0..m).step_by(PANEL_PRODUCT_MAX_ROWS) {
                let rows = PANEL_PRODUCT_MAX_ROWS.min(m - first_row);
                let lhs = MatrixView::new(a_values, (item * m + first_row) * k, (rows, k), k);
                for panel in 0..n / PANEL_COLUMNS {
                    let offset = item * k * n + panel * k * PANEL_COLUMNS;
                    let dst_offset = first_row * n + panel * PANEL_COLUMNS;
                    // Few rows: the kernel that fetches the weight ahead of its use.
                    if rows <= FETCHING_PANEL_MAX_ROWS {
                        let this = &panel_values[offset..][..k * PANEL_COLUMNS];
                        let next = panel_values.get(offset + k * PANEL_COLUMNS..);
                        let target = (&mut *slots, dst_offset, n);
                        if panel_product(target, lhs, this, next) {
                            continue;
                        }
                    }
                    let rhs =
                        MatrixView::new(panel_values, offset, (k, PANEL_COLUMNS), PANEL_COLUMNS);
                    gemm_with_bias(slots, dst_offset, n, lhs, rhs, None)?;
                }
            }
            #[allow(unsafe_code)]
            // SAFETY: the products above wrote every one of the `m * n` slots (all row blocks,
            // all `n / 64` panels, rows `n` apart; each returned without error);
            // `MaybeUninit<f32>` has the layout of `f32`.
            unsafe {
                Ok(&mut *(std::ptr::from_mut(slots) as *mut [f32]))
            }
        })
    })?;
    Tensor::from_vec(out, (batch, m, n), a.device())
}

/// [`gemm_single_thread`] plus `bias` (`[n]`, added to every row of the product) when given: the
/// product's rows are set to the bias first and the GEMM accumulates onto them, so no second pass
/// over the output is needed.
pub(super) fn gemm_with_bias<D: GemmDestination + ?Sized>(
    dst: &mut D,
    dst_offset: usize,
    dst_row_stride: usize,
    lhs: MatrixView<'_>,
    rhs: MatrixView<'_>,
    bias: Option<&[f32]>,
) -> Result<()> {
    configure_weight_packing();
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let dst_fits = matrix_fits(dst.raw_parts().1, dst_offset, (m, n), dst_row_stride);
    let bias_fits = bias.is_none_or(|bias| bias.len() == n);
    if rhs.rows != k || !lhs.in_bounds() || !rhs.in_bounds() || !dst_fits || !bias_fits {
        candle_core::bail!(
            "gemm: operands out of bounds or mismatched ({m}x{k} * {}x{n}, bias {:?})",
            rhs.rows,
            bias.map(<[f32]>::len)
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if let Some(bias) = bias {
        dst.fill_rows(dst_offset, m, dst_row_stride, bias);
    }
    let read_dst = bias.is_some();
    let (dst_ptr, dst_len) = dst.raw_parts();
    if product_precision() == ProductPrecision::Bf16 {
        #[allow(unsafe_code)]
        // SAFETY: `dst_ptr` is `dst`'s first element and `dst_len` its length; `dst` is borrowed
        // mutably (no aliasing of the inputs) and, with `read_dst`, the product's elements were
        // set to the bias just above.
        let done = unsafe {
            gemm_bf16(
                (dst_ptr, dst_len),
                (dst_offset, dst_row_stride),
                lhs.data,
                (lhs.offset, lhs.row_stride),
                rhs.data,
                (rhs.offset, rhs.row_stride),
                (m, k, n),
                read_dst,
            )
        };
        // `false`: no AVX-512 BF16 here (bounds were checked above), so f32 below.
        if done {
            return Ok(());
        }
    }
    #[allow(unsafe_code)]
    // SAFETY: every element the GEMM reads or writes lies inside its slice (checked above), the
    // destination is borrowed mutably so it cannot alias the inputs. Without a bias `read_dst` is
    // false, so the destination's previous values are never read (gemm then sets its `alpha` to
    // zero and every path skips reading `dst`; gemm-common 0.19); with a bias every element of
    // the product's rows was written just above, so what the GEMM reads is initialised.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst_ptr.add(dst_offset),
            1,
            dst_row_stride as isize,
            read_dst,
            lhs.data.as_ptr().add(lhs.offset),
            1,
            lhs.row_stride as isize,
            rhs.data.as_ptr().add(rhs.offset),
            1,
            rhs.row_stride as isize,
            if read_dst { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

/// `dst` `[m, n]` (contiguous, exactly `m * n` values) `= lhs * rhs` with bf16 products, the right
/// operand packed once for several products (see [`PackedRhs`]). `false` (nothing written) when
/// the shapes do not fit or the CPU has no AVX-512 BF16.
pub(super) fn gemm_bf16_packed_rhs(dst: &mut [f32], lhs: MatrixView<'_>, rhs: &PackedRhs) -> bool {
    lhs.in_bounds()
        && lhs.cols == rhs.k()
        && gemm_bf16_f32_lhs(dst, lhs.data, (lhs.offset, lhs.row_stride), lhs.rows, rhs)
}

/// `dst` `[m, n]` (contiguous, exactly `m * n` slots) `= lhs * rhs` on the calling thread,
/// handed back initialised.
pub(super) fn gemm_uninit<'d>(
    dst: &'d mut [MaybeUninit<f32>],
    lhs: MatrixView<'_>,
    rhs: MatrixView<'_>,
) -> Result<&'d mut [f32]> {
    gemm_uninit_with_bias(dst, lhs, rhs, None)
}

/// [`gemm_uninit`] plus `bias` (`[n]`) added to every row (see [`gemm_with_bias`]).
pub(super) fn gemm_uninit_with_bias<'d>(
    dst: &'d mut [MaybeUninit<f32>],
    lhs: MatrixView<'_>,
    rhs: MatrixView<'_>,
    bias: Option<&[f32]>,
) -> Result<&'d mut [f32]> {
    let (m, n) = (lhs.rows, rhs.cols);
    if dst.len() != m * n {
        candle_core::bail!("gemm: {} output slots for a {m}x{n} product", dst.len());
    }
    gemm_with_bias(dst, 0, n, lhs, rhs, bias)?;
    #[allow(unsafe_code)]
    // SAFETY: the product covers all `m * n` slots (row stride `n`, offset 0), and the GEMM wrote
    // each one (it returned without error); `MaybeUninit<f32>` has the layout of `f32`.
    unsafe {
        Ok(&mut *(std::ptr::from_mut(dst) as *mut [f32]))
    }
}

/// `dst` `[products.len(), m, n]` (contiguous, exactly that many slots) `= lhs * rhs` for each
/// `(lhs, rhs)` of `products` (all `m x k` times `k x n`) on the calling thread, handed back
/// initialised.
pub(super) fn gemm_uninit_batched<'d>(
    dst: &'d mut [MaybeUninit<f32>],
    products: &[(MatrixView<'_>, MatrixView<'_>)],
) -> Result<&'d mut [f32]> {
    let Some(&(first_lhs, first_rhs)) = products.first() else {
        candle_core::bail!("gemm: a batch of no products");
    };
    let (m, n) = (first_lhs.rows, first_rhs.cols);
    if dst.len() != products.len() * m * n {
        candle_core::bail!(
            "gemm: {} output slots for {} products of {m}x{n}",
            dst.len(),
            products.len()
        );
    }
    for (item, &(lhs, rhs)) in products.iter().enumerate() {
        if (lhs.rows, rhs.cols) != (m, n) {
            candle_core::bail!(
                "gemm: a {}x{} product in a batch of {m}x{n}",
                lhs.rows,
                rhs.cols
            );
        }
        gemm_with_bias(dst, item * m * n, n, lhs, rhs, None)?;
    }
    #[allow(unsafe_code)]
    // SAFETY: the products, `m * n` values each at offsets `item * m * n` with row stride `n`,
    // cover all `products.len() * m * n` slots, and the GEMM wrote each one (every call returned
    // without error); `MaybeUninit<f32>` has the layout of `f32`.
    unsafe {
        Ok(&mut *(std::ptr::from_mut(dst) as *mut [f32]))
    }
}

/// [`gemm_uninit_with_bias`] with, when given, the right operand's bf16 packing (`rhs`'s
/// columns, packed; see [`WeightPacking`]) instead of packing `rhs` for this product.
pub(super) fn product_piece<'d>(
    dst: &'d mut [MaybeUninit<f32>],
    lhs: MatrixView<'_>,
    rhs: MatrixView<'_>,
    packed: Option<PackedColumns<'_>>,
    bias: Option<&[f32]>,
) -> Result<&'d mut [f32]> {
    let Some(packed) = packed else {
        return gemm_uninit_with_bias(dst, lhs, rhs, bias);
    };
    if !lhs.in_bounds() || lhs.cols != rhs.rows {
        candle_core::bail!(
            "gemm: a {}x{} left operand out of bounds",
            lhs.rows,
            lhs.cols
        );
    }
    let (m, n) = (lhs.rows, rhs.cols);
    gemm_bf16_packed_into(dst, lhs.data, (lhs.offset, lhs.row_stride), m, packed, bias).ok_or_else(
        || candle_core::Error::Msg(format!("gemm: a packed {m}x{n} product does not fit")),
    )
}

/// The f32 values of an optional bias `[n]` (an error when it has another length).
fn bias_values(bias: Option<&Tensor>, n: usize) -> Result<Option<Vec<f32>>> {
    let Some(bias) = bias else {
        return Ok(None);
    };
    if bias.elem_count() != n {
        candle_core::bail!("matmul: a bias of {:?} for {n} columns", bias.dims());
    }
    Ok(Some(
        bias.to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?,
    ))
}

/// `a` `[m, k]` times `b` `[k, n]` (f32 results), plus `bias` `[n]` on every row when given, with
/// the columns of `b` split over the cores, each part one single-threaded product: for products
/// with few rows (`m` up to a few hundred), where reading `b` is most of the work, each core then
/// reads only its share of `b`. Products too small to split run whole on the calling thread.
pub fn matmul_split_columns(a: &Tensor, b: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (m, k) = a.dims2()?;
    let (b_rows, n) = b.dims2()?;
    if b_rows != k {
        candle_core::bail!("matmul: {:?} times {:?}", a.dims(), b.dims());
    }
    let bias = bias_values(bias, n)?;
    if m.saturating_mul(n).saturating_mul(k) < PRODUCT_PARALLEL_MIN_MACS || worker_count() <= 1 {
        return matmul_split_rows_values(a, b, bias.as_deref(), None);
    }
    // Column parts of whole 16-lane vectors, two per core for balance.
    let parts = (2 * worker_count()).min(n.div_ceil(16)).max(1);
    let part_columns = n.div_ceil(parts).div_ceil(16) * 16;
    // Part `p`'s `[m, columns]` product is the `p`-th piece of `by_part`.
    let by_part = with_f32_pair(a, b, |a_values, b_values| {
        parallel_pieces(m * n, m * part_columns, k, |part, slots| {
            let start = part * part_columns;
            let columns = part_columns.min(n - start);
            let lhs = MatrixView::new(a_values, 0, (m, k), k);
            let rhs = MatrixView::new(b_values, start, (k, columns), n);
            let part_bias = bias.as_deref().map(|bias| &bias[start..start + columns]);
            gemm_uninit_with_bias(slots, lhs, rhs, part_bias)
        })
    })?;
    let out = parallel_filled(m * n, m, |first_row, piece| {
        for (offset, dst) in piece.chunks_exact_mut(n).enumerate() {
            let row = first_row + offset;
            for (part, src) in by_part.chunks((m * part_columns).max(1)).enumerate() {
                let start = part * part_columns;
                let columns = part_columns.min(n - start);
                dst[start..start + columns].copy_from_slice(&src[row * columns..][..columns]);
            }
        }
    });
    Tensor::from_vec(out, (m, n), a.device())
}

/// `a` `[m, k]` times `b` `[k, n]` (f32 results), plus `bias` `[n]` on every row when given, with
/// the rows of `a` split over the cores, each part one single-threaded product writing its rows of
/// the result in place. With bf16 products, `packing` (kept with the layer that owns `b`) holds
/// `b` packed once for all calls.
pub fn matmul_split_rows(
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    packing: Option<&WeightPacking>,
) -> Result<Tensor> {
    let n = b.dim(1)?;
    let bias = bias_values(bias, n)?;
    let packed = packing.and_then(|packing| packing.packed_for(b));
    matmul_split_rows_values(a, b, bias.as_deref(), packed)
}

/// [`matmul_split_rows`] with the bias as values.
fn matmul_split_rows_values(
    a: &Tensor,
    b: &Tensor,
    bias: Option<&[f32]>,
    packed: Option<&PackedRhs>,
) -> Result<Tensor> {
    let (m, k) = a.dims2()?;
    let (b_rows, n) = b.dims2()?;
    if b_rows != k {
        candle_core::bail!("matmul: {:?} times {:?}", a.dims(), b.dims());
    }
    let pieces = if m.saturating_mul(n).saturating_mul(k) < PRODUCT_PARALLEL_MIN_MACS {
        1
    } else {
        piece_count(m, n)
    };
    let piece_rows = m.div_ceil(pieces).max(1);
    let out = with_f32_pair(a, b, |a_values, b_values| {
        parallel_pieces(m * n, piece_rows * n, k, |index, slots| {
            let rows = slots.len() / n.max(1);
            let lhs = MatrixView::new(a_values, index * piece_rows * k, (rows, k), k);
            let rhs = MatrixView::new(b_values, 0, (k, n), n);
            product_piece(slots, lhs, rhs, packed.map(PackedRhs::all_columns), bias)
        })
    })?;
    Tensor::from_vec(out, (m, n), a.device())
}

/// `a` `[m, k]` times each of `groups` equal column groups of `b` `[k, groups * g]`, as `groups`
/// contiguous `[m, g]` tensors (for instance a layer's queries, keys and values from one weight
/// holding `to_q`, `to_k` and `to_v` side by side): one parallel product for all of them, `a`
/// read once per block of rows, and no copies to split the result. With bf16 products, `packing`
/// holds `b` packed once for all calls (see [`matmul_split_rows`]).
pub fn matmul_column_groups(
    a: &Tensor,
    b: &Tensor,
    groups: usize,
    packing: Option<&WeightPacking>,
) -> Result<Vec<Tensor>> {
    let (m, k) = a.dims2()?;
    let (b_rows, n) = b.dims2()?;
    if b_rows != k || groups == 0 || !n.is_multiple_of(groups) {
        candle_core::bail!(
            "matmul in {groups} column groups: {:?} times {:?}",
            a.dims(),
            b.dims()
        );
    }
    let group_columns = n / groups;
    let row_pieces = if m.saturating_mul(n).saturating_mul(k) < PRODUCT_PARALLEL_MIN_MACS {
        1
    } else {
        piece_count(m, n).div_ceil(groups).max(1)
    };
    let piece_rows = m.div_ceil(row_pieces).max(1);
    let row_pieces = m.div_ceil(piece_rows);
    // Group-major output `[groups, m, g]`; piece `group * row_pieces + r` is rows
    // `r * piece_rows..` of `group`.
    let pieces: Vec<(usize, usize)> = (0..groups * row_pieces)
        .map(|index| {
            let first_row = (index % row_pieces) * piece_rows;
            (index, piece_rows.min(m - first_row) * group_columns)
        })
        .collect();
    let parallel = pieces.len() > 1;
    let packed = packing.and_then(|packing| packing.packed_for(b));
    let out = with_f32_pair(a, b, |a_values, b_values| {
        parallel_initialised(
            groups * m * group_columns,
            &pieces,
            parallel,
            |index, slots| {
                let (group, first_row) = (index / row_pieces, (index % row_pieces) * piece_rows);
                let rows = slots.len() / group_columns.max(1);
                let lhs = MatrixView::new(a_values, first_row * k, (rows, k), k);
                let rhs = MatrixView::new(b_values, group * group_columns, (k, group_columns), n);
                let packed =
                    packed.and_then(|packed| packed.columns(group * group_columns, group_columns));
                product_piece(slots, lhs, rhs, packed, None)
            },
        )
    })?;
    let stacked = Tensor::from_vec(out, (groups, m, group_columns), a.device())?;
    (0..groups).map(|group| stacked.get(group)).collect()
}

/// Batched product `a` `[batch, m, k]` times `b` `[batch, k, n]` (f32 results) with the batch
/// items spread over the cores, each one single-threaded product (for many equal, mid-sized
/// products such as Winograd's sixteen, where splitting each product costs more than it gains).
pub fn batched_matmul_parallel(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (batch, m, k) = a.dims3()?;
    let (b_batch, b_rows, n) = b.dims3()?;
    if (b_batch, b_rows) != (batch, k) {
        candle_core::bail!("batched matmul: {:?} times {:?}", a.dims(), b.dims());
    }
    let out = with_f32_pair(a, b, |a_values, b_values| {
        parallel_pieces(batch * m * n, m * n, k, |item, slots| {
            let lhs = MatrixView::new(a_values, item * m * k, (m, k), k);
            let rhs = MatrixView::new(b_values, item * k * n, (k, n), n);
            gemm_uninit(slots, lhs, rhs)
        })
    })?;
    Tensor::from_vec(out, (batch, m, n), a.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::{max_abs_diff, same_bits, values};
    use candle_core::{DType, Device};

    #[test]
    fn split_column_product_matches_matmul() {
        let device = Device::Cpu;
        // Column counts that split evenly, unevenly, and not at all.
        for (m, k, n) in [(5, 33, 100), (1, 7, 16), (32, 64, 1280), (3, 2, 5)] {
            let a = Tensor::randn(0f32, 1.0, (m, k), &device).unwrap();
            let b = Tensor::randn(0f32, 1.0, (k, n), &device).unwrap();
            let expected = a.matmul(&b).unwrap();
            let actual = matmul_split_columns(&a, &b, None).unwrap();
            assert_eq!(actual.dims(), &[m, n]);
            assert!(max_abs_diff(&actual, &expected) < 1e-4, "{m}x{k}x{n}");
            let bias = Tensor::randn(0f32, 1.0, n, &device).unwrap();
            let with_bias = matmul_split_columns(&a, &b, Some(&bias)).unwrap();
            let expected = expected.broadcast_add(&bias).unwrap();
            assert!(
                max_abs_diff(&with_bias, &expected) < 1e-4,
                "{m}x{k}x{n} + bias"
            );
        }
        let a = Tensor::zeros((2, 3), DType::F32, &device).unwrap();
        let b = Tensor::zeros((4, 5), DType::F32, &device).unwrap();
        assert!(matmul_split_columns(&a, &b, None).is_err());
        let b = Tensor::zeros((3, 5), DType::F32, &device).unwrap();
        let wrong_bias = Tensor::zeros(4, DType::F32, &device).unwrap();
        assert!(matmul_split_columns(&a, &b, Some(&wrong_bias)).is_err());
        assert!(matmul_split_rows(&a, &b, Some(&wrong_bias), None).is_err());
    }

    #[test]
    fn panel_products_match_matmul() {
        let device = Device::Cpu;
        // One panel, several, the most rows of the fetching kernel over several blocks of depth,
        // and more rows than one product over a panel takes.
        let shapes = [
            (2, 5, 7, 64),
            (3, 40, 33, 320),
            (2, FETCHING_PANEL_MAX_ROWS, 130, 128),
            (1, 1600, 9, 128),
        ];
        for (batch, m, k, n) in shapes {
            let a = Tensor::from_vec(values(batch * m * k, 1), (batch, m, k), &device).unwrap();
            let b = Tensor::from_vec(values(batch * k * n, 2), (batch, k, n), &device).unwrap();
            let panels = ColumnPanels::new(&b).unwrap().unwrap();
            assert!(same_bits(&panels.matrices().unwrap(), &b));
            let actual = batched_matmul_panels(&a, &panels).unwrap();
            let expected = a.matmul(&b).unwrap();
            assert_eq!(actual.dims(), &[batch, m, n]);
            let diff = max_abs_diff(&actual, &expected);
            assert!(diff < 1e-4, "{batch}x{m}x{k}x{n}: {diff}");
        }
        // Columns that are not whole panels keep their matrices; mismatched factors are refused.
        let b = Tensor::zeros((2, 3, 100), DType::F32, &device).unwrap();
        assert!(ColumnPanels::new(&b).unwrap().is_none());
        let b = Tensor::zeros((2, 3, 64), DType::F32, &device).unwrap();
        let panels = ColumnPanels::new(&b).unwrap().unwrap();
        let a = Tensor::zeros((2, 5, 4), DType::F32, &device).unwrap();
        assert!(batched_matmul_panels(&a, &panels).is_err());
    }

    #[test]
    fn split_row_and_batched_products_match_matmul() {
        let device = Device::Cpu;
        for (m, k, n) in [(300, 33, 17), (1, 7, 16), (2048, 40, 64)] {
            let a = Tensor::randn(0f32, 1.0, (m, k), &device).unwrap();
            let b = Tensor::randn(0f32, 1.0, (k, n), &device).unwrap();
            let expected = a.matmul(&b).unwrap();
            let plain = matmul_split_rows(&a, &b, None, None).unwrap();
            assert!(max_abs_diff(&plain, &expected) < 1e-4);
            let bias = Tensor::randn(0f32, 1.0, n, &device).unwrap();
            let with_bias = matmul_split_rows(&a, &b, Some(&bias), None).unwrap();
            let expected = expected.broadcast_add(&bias).unwrap();
            assert!(max_abs_diff(&with_bias, &expected) < 1e-4);
        }
        let a = Tensor::randn(0f32, 1.0, (16, 37, 20), &device).unwrap();
        let b = Tensor::randn(0f32, 1.0, (16, 20, 9), &device).unwrap();
        let expected = a.matmul(&b).unwrap();
        assert!(max_abs_diff(&batched_matmul_parallel(&a, &b).unwrap(), &expected) < 1e-4);
        let wrong = Tensor::zeros((15, 20, 9), DType::F32, &device).unwrap();
        assert!(batched_matmul_parallel(&a, &wrong).is_err());
        assert!(matmul_split_rows(
            &a.get(0).unwrap(),
            &wrong.get(0).unwrap().t().unwrap(),
            None,
            None
        )
        .is_err());
    }

    #[test]
    fn column_group_products_match_matmul() {
        let device = Device::Cpu;
        // Small (one piece), split into row pieces, and rows that do not divide evenly.
        for (m, k, groups, g) in [(3, 5, 3, 4), (2048, 64, 3, 64), (301, 96, 2, 48)] {
            let a = Tensor::randn(0f32, 1.0, (m, k), &device).unwrap();
            let b = Tensor::randn(0f32, 1.0, (k, groups * g), &device).unwrap();
            let expected = a.matmul(&b).unwrap();
            let parts = matmul_column_groups(&a, &b, groups, None).unwrap();
            assert_eq!(parts.len(), groups);
            for (group, part) in parts.iter().enumerate() {
                assert!(part.is_contiguous());
                let expected = expected.narrow(1, group * g, g).unwrap();
                assert!(
                    max_abs_diff(part, &expected) < 1e-4,
                    "{m}x{k} group {group}"
                );
            }
        }
        let a = Tensor::zeros((2, 3), DType::F32, &device).unwrap();
        let b = Tensor::zeros((3, 7), DType::F32, &device).unwrap();
        assert!(matmul_column_groups(&a, &b, 3, None).is_err());
        assert!(matmul_column_groups(&a, &b, 0, None).is_err());
    }

    #[test]
    fn packed_weights_give_the_values_of_the_bf16_products() {
        if !crate::kernels::bf16_supported() {
            return;
        }
        let device = Device::Cpu;
        let bf16 = crate::kernels::ProductPrecision::Bf16;
        // Rows split over pieces; an odd inner dimension; columns that are not whole panels.
        for (m, k, n) in [(2048, 128, 192), (37, 33, 100), (5, 2, 16)] {
            let a = Tensor::randn(0f32, 1.0, (m, k), &device).unwrap();
            let b = Tensor::randn(0f32, 1.0, (k, n), &device).unwrap();
            let bias = Tensor::randn(0f32, 1.0, n, &device).unwrap();
            let packing = WeightPacking::default();
            crate::kernels::with_product_precision(bf16, || {
                for bias in [None, Some(&bias)] {
                    let unpacked = matmul_split_rows(&a, &b, bias, None).unwrap();
                    let packed = matmul_split_rows(&a, &b, bias, Some(&packing)).unwrap();
                    assert!(same_bits(&unpacked, &packed), "{m}x{k}x{n}");
                    // The bf16 products are not the f32 ones.
                    let f32_values = a.matmul(&b).unwrap();
                    assert!(bias.is_some() || !same_bits(&f32_values, &packed));
                }
                // Column groups: whole panels (3 x 64) use the packing, others (2 x 96) not.
                let groups = if n % 64 == 0 { n / 64 } else { 2 };
                let unpacked = matmul_column_groups(&a, &b, groups, None).unwrap();
                let packed = matmul_column_groups(&a, &b, groups, Some(&packing)).unwrap();
                for (unpacked, packed) in unpacked.iter().zip(&packed) {
                    assert!(
                        same_bits(unpacked, packed),
                        "{m}x{k}x{n} in {groups} groups"
                    );
                }
                // A packing is only used for the weight it was made from.
                let other = (&b * 2.0).unwrap();
                let expected = matmul_split_rows(&a, &other, None, None).unwrap();
                let actual = matmul_split_rows(&a, &other, None, Some(&packing)).unwrap();
                assert!(same_bits(&expected, &actual));
            });
        }
    }
}
