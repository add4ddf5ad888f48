//! Matrix products on `gemm`: read-only matrix views, the bounds-checked single-threaded GEMM
//! (which may write uninitialised output), and products split over the cores by columns, by rows
//! or by batch items.

use std::mem::MaybeUninit;

use candle_core::{Result, Tensor};

use super::buffers::{parallel_filled, parallel_pieces};
use super::operands::with_f32_pair;
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

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
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
}

impl GemmDestination for [f32] {
    fn raw_parts(&mut self) -> (*mut f32, usize) {
        (self.as_mut_ptr(), self.len())
    }
}

impl GemmDestination for [MaybeUninit<f32>] {
    fn raw_parts(&mut self) -> (*mut f32, usize) {
        (self.as_mut_ptr().cast(), self.len())
    }
}

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
    static PACKING: std::sync::Once = std::sync::Once::new();
    PACKING.call_once(|| gemm::set_lhs_packing_threshold_single_thread(LHS_PACKING_THRESHOLD));
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let (dst_ptr, dst_len) = dst.raw_parts();
    let dst_fits = matrix_fits(dst_len, dst_offset, (m, n), dst_row_stride);
    if rhs.rows != k || !lhs.in_bounds() || !rhs.in_bounds() || !dst_fits {
        candle_core::bail!(
            "gemm: operands out of bounds or mismatched ({m}x{k} * {}x{n})",
            rhs.rows
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    #[allow(unsafe_code)]
    // SAFETY: every element the GEMM reads or writes lies inside its slice (checked above), the
    // destination is borrowed mutably so it cannot alias the inputs, and `read_dst` is false, so
    // the destination's previous values are never read (gemm then sets its `alpha` to zero and
    // every path skips reading `dst`; gemm-common 0.19).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst_ptr.add(dst_offset),
            1,
            dst_row_stride as isize,
            false,
            lhs.data.as_ptr().add(lhs.offset),
            1,
            lhs.row_stride as isize,
            rhs.data.as_ptr().add(rhs.offset),
            1,
            rhs.row_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

/// `dst` `[m, n]` (contiguous, exactly `m * n` slots) `= lhs * rhs` on the calling thread,
/// handed back initialised.
pub(super) fn gemm_uninit<'d>(
    dst: &'d mut [MaybeUninit<f32>],
    lhs: MatrixView<'_>,
    rhs: MatrixView<'_>,
) -> Result<&'d mut [f32]> {
    let (m, n) = (lhs.rows, rhs.cols);
    if dst.len() != m * n {
        candle_core::bail!("gemm: {} output slots for a {m}x{n} product", dst.len());
    }
    gemm_single_thread(dst, 0, n, lhs, rhs)?;
    #[allow(unsafe_code)]
    // SAFETY: the product covers all `m * n` slots (row stride `n`, offset 0), and the GEMM wrote
    // each one (it returned without error); `MaybeUninit<f32>` has the layout of `f32`.
    unsafe {
        Ok(&mut *(std::ptr::from_mut(dst) as *mut [f32]))
    }
}

/// `a` `[m, k]` times `b` `[k, n]` (f32 results) with the columns of `b` split over the cores,
/// each part one single-threaded product: for products with few rows (`m` up to a few hundred),
/// where reading `b` is most of the work, each core then reads only its share of `b`.
pub fn matmul_split_columns(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k) = a.dims2()?;
    let (b_rows, n) = b.dims2()?;
    if b_rows != k {
        candle_core::bail!("matmul: {:?} times {:?}", a.dims(), b.dims());
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
            gemm_uninit(slots, lhs, rhs)
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

/// `a` `[m, k]` times `b` `[k, n]` (f32 results) with the rows of `a` split over the cores, each
/// part one single-threaded product writing its rows of the result in place.
pub fn matmul_split_rows(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k) = a.dims2()?;
    let (b_rows, n) = b.dims2()?;
    if b_rows != k {
        candle_core::bail!("matmul: {:?} times {:?}", a.dims(), b.dims());
    }
    let piece_rows = m.div_ceil(piece_count(m, n));
    let out = with_f32_pair(a, b, |a_values, b_values| {
        parallel_pieces(m * n, piece_rows * n, k, |index, slots| {
            let rows = slots.len() / n.max(1);
            let lhs = MatrixView::new(a_values, index * piece_rows * k, (rows, k), k);
            let rhs = MatrixView::new(b_values, 0, (k, n), n);
            gemm_uninit(slots, lhs, rhs)
        })
    })?;
    Tensor::from_vec(out, (m, n), a.device())
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
    use crate::kernels::test_support::max_abs_diff;
    use candle_core::{DType, Device};

    #[test]
    fn split_column_product_matches_matmul() {
        let device = Device::Cpu;
        // Column counts that split evenly, unevenly, and not at all.
        for (m, k, n) in [(5, 33, 100), (1, 7, 16), (32, 64, 1280), (3, 2, 5)] {
            let a = Tensor::randn(0f32, 1.0, (m, k), &device).unwrap();
            let b = Tensor::randn(0f32, 1.0, (k, n), &device).unwrap();
            let expected = a.matmul(&b).unwrap();
            let actual = matmul_split_columns(&a, &b).unwrap();
            assert_eq!(actual.dims(), &[m, n]);
            assert!(max_abs_diff(&actual, &expected) < 1e-4, "{m}x{k}x{n}");
        }
        let a = Tensor::zeros((2, 3), DType::F32, &device).unwrap();
        let b = Tensor::zeros((4, 5), DType::F32, &device).unwrap();
        assert!(matmul_split_columns(&a, &b).is_err());
    }

    #[test]
    fn split_row_and_batched_products_match_matmul() {
        let device = Device::Cpu;
        for (m, k, n) in [(300, 33, 17), (1, 7, 16), (2048, 40, 64)] {
            let a = Tensor::randn(0f32, 1.0, (m, k), &device).unwrap();
            let b = Tensor::randn(0f32, 1.0, (k, n), &device).unwrap();
            let expected = a.matmul(&b).unwrap();
            assert!(max_abs_diff(&matmul_split_rows(&a, &b).unwrap(), &expected) < 1e-4);
        }
        let a = Tensor::randn(0f32, 1.0, (16, 37, 20), &device).unwrap();
        let b = Tensor::randn(0f32, 1.0, (16, 20, 9), &device).unwrap();
        let expected = a.matmul(&b).unwrap();
        assert!(max_abs_diff(&batched_matmul_parallel(&a, &b).unwrap(), &expected) < 1e-4);
        let wrong = Tensor::zeros((15, 20, 9), DType::F32, &device).unwrap();
        assert!(batched_matmul_parallel(&a, &wrong).is_err());
        assert!(
            matmul_split_rows(&a.get(0).unwrap(), &wrong.get(0).unwrap().t().unwrap()).is_err()
        );
    }
}
