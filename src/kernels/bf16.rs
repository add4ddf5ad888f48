//! Matrix products with bf16 operands and f32 accumulation: the operands are rounded to bf16
//! (round to nearest even) and multiplied with AVX-512 BF16 (`vdpbf16ps`, two products per f32
//! lane per instruction, twice the multiply-adds of an f32 FMA). Which products use it is the
//! calling thread's [`ProductPrecision`]; CPUs without AVX-512 BF16 keep f32.
//!
//! Layout: the left operand becomes rows of bf16 pairs along `k` (`[m, k/2]` u32, each the two
//! bf16 values `k = 2p` (low half) and `2p + 1`); the right operand becomes column panels of 64
//! columns, each `[k/2, 64]` u32 pairs of the same two `k`. A tile of 6 rows by 64 columns keeps
//! its 24 accumulators in registers over the whole of `k`. On CPUs with Intel AMX the same packed
//! operands go to the tile kernel of `amx.rs` instead (blocks of 32 rows by 32 columns).

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Tensor, TensorId};

use super::operands::with_values;

/// How the kernels' matrix products treat their operands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProductPrecision {
    /// f32 operands and accumulation (the reference; parity with diffusers).
    #[default]
    F32,
    /// Operands rounded to bf16 (8 significant bits), accumulated in f32, on CPUs with AVX-512
    /// BF16; elsewhere products stay f32. Every product is rounded, whatever its size: a row's
    /// result must not depend on how many rows share its product (a CFG batch, an edit's source
    /// and edited rows, a piece of rows given to one core).
    Bf16,
}

impl ProductPrecision {
    /// Whether products of this precision use the bf16 kernel on this CPU.
    pub fn uses_bf16_here(self) -> bool {
        self == Self::Bf16 && bf16_supported()
    }
}

thread_local! {
    static PRECISION: Cell<ProductPrecision> = const { Cell::new(ProductPrecision::F32) };
}

/// Runs `work` with the kernels' matrix products at `precision` on this thread and on the kernel
/// threads it starts; the previous precision comes back afterwards (also on a panic).
pub fn with_product_precision<R>(precision: ProductPrecision, work: impl FnOnce() -> R) -> R {
    struct Restore(ProductPrecision);
    impl Drop for Restore {
        fn drop(&mut self) {
            PRECISION.set(self.0);
        }
    }
    let _restore = Restore(PRECISION.replace(precision));
    work()
}

/// The calling thread's product precision.
pub fn product_precision() -> ProductPrecision {
    PRECISION.get()
}

/// Whether this CPU has AVX-512 BF16 (and the AVX-512 foundation it builds on).
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SUPPORTED.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

thread_local! {
    /// The packed operands' buffers, kept per thread between products (the packing writes every
    /// element it uses, so they are never cleared; kernel threads live as long as the process).
    static LHS_PAIRS: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
    static RHS_PANELS: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// The first `len` elements of `buffer`, grown (with zeros) when shorter.
fn scratch(buffer: &mut Vec<u32>, len: usize) -> &mut [u32] {
    if buffer.len() < len {
        buffer.resize(len, 0);
    }
    &mut buffer[..len]
}

/// Columns per panel of the right operand (four 16-lane vectors).
pub(super) const PANEL_COLUMNS: usize = 64;
/// Rows per register tile.
const TILE_ROWS: usize = 6;

/// How a product's results reach its destination.
#[derive(Clone, Copy)]
pub(in crate::kernels) enum Store<'a> {
    /// Written over whatever was there.
    Replace,
    /// Added to the destination's values.
    Accumulate,
    /// Written with `bias[j]` added to column `j` (one f32 sum, as bias-then-accumulate gives).
    AddBias(&'a [f32]),
}

/// A product in bf16: `dst[dst_offset + i * dst_row_stride + j] (+)= sum_k lhs[i, k] rhs[k, j]`
/// for `i < m`, `j < n`, where `lhs` is `m x k` at `lhs_offset` (row stride `lhs_row_stride`)
/// and `rhs` is `k x n` at `rhs_offset` (row stride `rhs_row_stride`), all with unit column
/// stride. With `accumulate` the product is added to what `dst` holds, else it replaces it.
/// Returns `false` (and touches nothing) when this CPU lacks AVX-512 BF16 or a matrix does not
/// lie inside its buffer (`dst` holds `dst_len` elements).
///
/// # Safety
/// `dst` is valid for writes of `dst_len` f32 values (and for reads when `accumulate`: then the
/// product's elements are initialised) and aliases neither operand.
#[allow(unsafe_code, clippy::too_many_arguments)]
pub(super) unsafe fn gemm_bf16(
    (dst, dst_len): (*mut f32, usize),
    (dst_offset, dst_row_stride): (usize, usize),
    lhs: &[f32],
    (lhs_offset, lhs_row_stride): (usize, usize),
    rhs: &[f32],
    (rhs_offset, rhs_row_stride): (usize, usize),
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
) -> bool {
    let fits = |len: usize, offset: usize, rows: usize, cols: usize, stride: usize| {
        rows == 0 || cols == 0 || offset + (rows - 1) * stride + cols - 1 < len
    };
    if !bf16_supported()
        || !fits(dst_len, dst_offset, m, n, dst_row_stride)
        || !fits(lhs.len(), lhs_offset, m, k, lhs_row_stride)
        || !fits(rhs.len(), rhs_offset, k, n, rhs_row_stride)
    {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let pairs = k.div_ceil(2);
        let mut lhs_scratch = LHS_PAIRS.take();
        let mut rhs_scratch = RHS_PANELS.take();
        let lhs_pairs = scratch(&mut lhs_scratch, m * pairs);
        let rhs_panels = scratch(&mut rhs_scratch, pairs * n.div_ceil(16) * 16);
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 F/BW/BF16 are present (`bf16_supported`), and every matrix lies inside
        // its buffer (checked above; `dst` as the caller promises); the packed buffers have
        // exactly the sizes the kernels index.
        unsafe {
            x86::pack_lhs(lhs, lhs_offset, lhs_row_stride, m, k, lhs_pairs);
            x86::pack_rhs(rhs, rhs_offset, rhs_row_stride, k, n, rhs_panels);
            x86::multiply(
                lhs_pairs,
                rhs_panels,
                (m, pairs, n),
                dst,
                dst_offset,
                dst_row_stride,
                if accumulate {
                    Store::Accumulate
                } else {
                    Store::Replace
                },
            );
        }
        LHS_PAIRS.set(lhs_scratch);
        RHS_PANELS.set(rhs_scratch);
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = accumulate;
        false
    }
}

/// A right operand `k x n` rounded to bf16 and packed for [`gemm_bf16_packed`] (the layout
/// `gemm_bf16` packs into on every call), for operands that several products share.
pub(super) struct PackedRhs {
    k: usize,
    n: usize,
    panels: Vec<u32>,
}

impl PackedRhs {
    /// `rhs` (`k x n` at `offset`, rows `stride` apart) packed; `None` without AVX-512 BF16 or
    /// when the matrix does not lie inside `rhs`.
    pub(super) fn new(
        rhs: &[f32],
        (offset, stride): (usize, usize),
        (k, n): (usize, usize),
    ) -> Option<Self> {
        let fits = k == 0 || n == 0 || offset + (k - 1) * stride + n - 1 < rhs.len();
        if !bf16_supported() || !fits {
            return None;
        }
        let mut panels = vec![0u32; k.div_ceil(2) * n.div_ceil(16) * 16];
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 BF16 is present, the matrix lies inside `rhs` (both checked above) and
        // `panels` has the packed length `pack_rhs` writes.
        unsafe {
            x86::pack_rhs(rhs, offset, stride, k, n, &mut panels);
        }
        Some(Self { k, n, panels })
    }

    /// The inner dimension `k`.
    pub(super) fn k(&self) -> usize {
        self.k
    }

    /// Pairs of `k` per row of the left operand.
    pub(super) fn pairs(&self) -> usize {
        self.k.div_ceil(2)
    }
}

/// Columns `first..first + n` of a [`PackedRhs`] (whole panels), itself a packed operand: one of
/// the query, key and value groups of a weight packed side by side.
#[derive(Clone, Copy)]
pub(super) struct PackedColumns<'a> {
    k: usize,
    n: usize,
    panels: &'a [u32],
}

impl PackedRhs {
    /// All columns.
    pub(super) fn all_columns(&self) -> PackedColumns<'_> {
        PackedColumns {
            k: self.k,
            n: self.n,
            panels: &self.panels,
        }
    }

    /// Columns `first..first + count`, when they are whole panels (`first` a multiple of 64, and
    /// `count` too unless the range ends at the last column).
    pub(super) fn columns(&self, first: usize, count: usize) -> Option<PackedColumns<'_>> {
        let whole_panels = first.is_multiple_of(PANEL_COLUMNS)
            && (count.is_multiple_of(PANEL_COLUMNS) || first + count == self.n);
        (whole_panels && first + count <= self.n).then(|| PackedColumns {
            k: self.k,
            n: count,
            panels: &self.panels[self.pairs() * first..],
        })
    }
}

/// A layer weight's bf16 packing, made on the weight's first product with bf16 products and kept
/// (a layer's weights do not change); clones share it.
#[derive(Clone, Default)]
pub struct WeightPacking(Arc<OnceLock<Option<(TensorId, PackedRhs)>>>);

impl std::fmt::Debug for WeightPacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let packed = self.0.get().and_then(Option::as_ref);
        f.debug_struct("WeightPacking")
            .field("k_n", &packed.map(|(_, packed)| (packed.k, packed.n)))
            .finish()
    }
}

impl WeightPacking {
    /// The packing of `weight` (`[k, n]`) when the calling thread's products are bf16 on this
    /// CPU; `None` otherwise, when the weight is not contiguous f32 values on the CPU (a
    /// shape-checking placeholder), or when it is not the weight this packing was made from.
    pub(super) fn packed_for(&self, weight: &Tensor) -> Option<&PackedRhs> {
        if !product_precision().uses_bf16_here() {
            return None;
        }
        let (id, packed) = self
            .0
            .get_or_init(|| pack_weight(weight).map(|packed| (weight.id(), packed)))
            .as_ref()?;
        (*id == weight.id()).then_some(packed)
    }
}

/// `weight` `[k, n]` packed, when it is contiguous f32 values on the CPU.
fn pack_weight(weight: &Tensor) -> Option<PackedRhs> {
    if weight.dtype() != DType::F32 || !weight.is_contiguous() || !weight.device().is_cpu() {
        return None;
    }
    let (k, n) = weight.dims2().ok()?;
    with_values(weight, |values| Ok(PackedRhs::new(values, (0, n), (k, n))))
        .ok()
        .flatten()
}

/// Whether an f32 left operand (`m x rhs.k` at `offset` in `lhs`, rows `stride` apart), the packed
/// right operand and a bias (`[rhs.n]`) fit a product on this CPU (see [`multiply_f32_lhs`]).
fn f32_lhs_product_fits(
    lhs: &[f32],
    (offset, stride): (usize, usize),
    m: usize,
    rhs: PackedColumns<'_>,
    bias: Option<&[f32]>,
) -> bool {
    let (k, n) = (rhs.k, rhs.n);
    let lhs_fits = m == 0 || k == 0 || offset + (m - 1) * stride + k - 1 < lhs.len();
    let rhs_fits = rhs.panels.len() >= k.div_ceil(2) * n.div_ceil(16) * 16;
    let bias_fits = bias.is_none_or(|bias| bias.len() == n);
    bf16_supported() && lhs_fits && rhs_fits && bias_fits
}

/// `dst = lhs * rhs` (`m x rhs.n`, rows adjacent), stored as `store` says, for an f32 left
/// operand rounded to bf16 on the way (into the thread's scratch pairs).
///
/// # Safety
/// [`f32_lhs_product_fits`] holds for the operands (and the bias of `store`); `dst` is valid for
/// writes of `m * rhs.n` values and aliases neither operand.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
unsafe fn multiply_f32_lhs(
    dst: *mut f32,
    lhs: &[f32],
    (offset, stride): (usize, usize),
    m: usize,
    rhs: PackedColumns<'_>,
    store: Store<'_>,
) {
    let (k, n, pairs) = (rhs.k, rhs.n, rhs.k.div_ceil(2));
    if m == 0 || n == 0 {
        return;
    }
    let mut lhs_scratch = LHS_PAIRS.take();
    let lhs_pairs = scratch(&mut lhs_scratch, m * pairs);
    // SAFETY: the CPU features and the operands' bounds are the caller's; `lhs_pairs` has the
    // packed length `pack_lhs` writes and `multiply` reads.
    unsafe {
        x86::pack_lhs(lhs, offset, stride, m, k, lhs_pairs);
        x86::multiply(lhs_pairs, rhs.panels, (m, pairs, n), dst, 0, n, store);
    }
    LHS_PAIRS.set(lhs_scratch);
}

/// `dst` (exactly `m x rhs.n` slots, rows adjacent) `= lhs * rhs`, plus `bias` (`[rhs.n]`) on
/// every row when given, for an f32 left operand (`m x k` at `lhs_offset`, rows `lhs_row_stride`
/// apart) rounded to bf16 on the way: every slot is written and handed back initialised. `None`
/// (nothing written) when an operand does not fit or the CPU has no AVX-512 BF16.
pub(super) fn gemm_bf16_packed_into<'d>(
    dst: &'d mut [MaybeUninit<f32>],
    lhs: &[f32],
    lhs_layout: (usize, usize),
    m: usize,
    rhs: PackedColumns<'_>,
    bias: Option<&[f32]>,
) -> Option<&'d mut [f32]> {
    if !f32_lhs_product_fits(lhs, lhs_layout, m, rhs, bias) || dst.len() != m * rhs.n {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: the operands fit (checked above) and the `m x n` result is exactly `dst`, borrowed
    // mutably. `multiply` writes every one of its slots (its tiles cover all rows and its panels
    // all columns), so they are initialised afterwards; `MaybeUninit<f32>` has the layout of `f32`.
    unsafe {
        let store = bias.map_or(Store::Replace, Store::AddBias);
        multiply_f32_lhs(
            dst.as_mut_ptr().cast::<f32>(),
            lhs,
            lhs_layout,
            m,
            rhs,
            store,
        );
        Some(&mut *(std::ptr::from_mut(dst) as *mut [f32]))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// `dst[dst_offset + i * dst_row_stride + j] = sum_k lhs[i, k] rhs[k, j]` for `i < m`, `j < n`,
/// with the left operand already as bf16 pairs (`lhs_pairs`, `[m, rhs.pairs()]`: each row the
/// bf16 values of `k` in order, an odd `k` padded with zero) and the right one packed. Returns
/// `false` (touching nothing) when an operand or the result does not fit its buffer.
pub(super) fn gemm_bf16_packed(
    dst: &mut [f32],
    (dst_offset, dst_row_stride): (usize, usize),
    lhs_pairs: &[u32],
    m: usize,
    rhs: &PackedRhs,
) -> bool {
    let pairs = rhs.pairs();
    let n = rhs.n;
    let dst_fits = m == 0 || n == 0 || dst_offset + (m - 1) * dst_row_stride + n - 1 < dst.len();
    if !bf16_supported() || lhs_pairs.len() < m * pairs || !dst_fits {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: AVX-512 BF16 is present; the packed operands have the layouts `multiply` reads (the
    // left one at least `m * pairs` pairs, checked above) and the `m x n` result lies inside
    // `dst`, which is borrowed mutably.
    unsafe {
        x86::multiply(
            &lhs_pairs[..m * pairs],
            &rhs.panels,
            (m, pairs, n),
            dst.as_mut_ptr(),
            dst_offset,
            dst_row_stride,
            Store::Replace,
        );
    }
    true
}

/// `dst[i * rhs.n + j] = sum_k lhs[i, k] rhs[k, j]` (`dst` exactly `m x n`) for an f32 left
/// operand (`m x k` at `lhs_offset`, rows `lhs_row_stride` apart), rounded to bf16 on the way, and
/// a packed right one. Returns `false` (touching nothing) when a matrix does not fit its buffer.
pub(super) fn gemm_bf16_f32_lhs(
    dst: &mut [f32],
    lhs: &[f32],
    lhs_layout: (usize, usize),
    m: usize,
    rhs: &PackedRhs,
) -> bool {
    let rhs = rhs.all_columns();
    if !f32_lhs_product_fits(lhs, lhs_layout, m, rhs, None) || dst.len() != m * rhs.n {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: the operands fit (checked above) and the `m x n` result is exactly `dst`.
    unsafe {
        multiply_f32_lhs(dst.as_mut_ptr(), lhs, lhs_layout, m, rhs, Store::Replace);
    }
    true
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod x86 {
    //! The AVX-512 BF16 packing and register-tile kernels. Callers guarantee the CPU features
    //! and the bounds (see `gemm_bf16`); each function states what it reads and writes.

    use super::{Store, PANEL_COLUMNS, TILE_ROWS};
    use std::arch::x86_64::*;

    /// A mask of the first `count` (<= 16) lanes (16 for any larger count).
    pub(in crate::kernels) fn lanes(count: usize) -> u16 {
        if count >= 16 {
            u16::MAX
        } else {
            (1u16 << count) - 1
        }
    }

    /// Rounds `lhs` (`m x k` at `offset`, rows `stride` apart) to bf16 into `out` (`[m,
    /// k.div_ceil(2)]` u32 pairs; an odd `k` pads its last pair with zero).
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16 present; the matrix lies inside `lhs`; `out.len() == m * k.div_ceil(2)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(in crate::kernels) unsafe fn pack_lhs(
        lhs: &[f32],
        offset: usize,
        stride: usize,
        m: usize,
        k: usize,
        out: &mut [u32],
    ) {
        let pairs = k.div_ceil(2);
        debug_assert_eq!(out.len(), m * pairs);
        for row in 0..m {
            let src = lhs.as_ptr().add(offset + row * stride);
            let dst = out.as_mut_ptr().add(row * pairs).cast::<u16>();
            let mut col = 0;
            while col < k {
                let low_count = (k - col).min(16);
                let high_count = (k - col).saturating_sub(16).min(16);
                let low = _mm512_maskz_loadu_ps(lanes(low_count), src.add(col));
                let high = if high_count > 0 {
                    _mm512_maskz_loadu_ps(lanes(high_count), src.add(col + 16))
                } else {
                    _mm512_setzero_ps()
                };
                let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
                // `k - col` bf16 values (rounded up to a whole pair) of this row are left.
                let values = (low_count + high_count).next_multiple_of(2);
                let mask: u32 = if values >= 32 {
                    u32::MAX
                } else {
                    (1u32 << values) - 1
                };
                _mm512_mask_storeu_epi16(dst.add(col).cast(), mask, packed);
                col += 32;
            }
        }
    }

    /// Rounds `rhs` (`k x n` at `offset`, rows `stride` apart) to bf16 into `out`: column panels
    /// of [`PANEL_COLUMNS`] (the last one as wide as its columns rounded up to 16), each `[k/2,
    /// width]` u32 pairs (rows `2p` low, `2p + 1` high; padding zero). `out.len()` is
    /// `k.div_ceil(2) * n.div_ceil(16) * 16`.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16 present; the matrix lies inside `rhs`; `out` has the length above.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(in crate::kernels) unsafe fn pack_rhs(
        rhs: &[f32],
        offset: usize,
        stride: usize,
        k: usize,
        n: usize,
        out: &mut [u32],
    ) {
        let pairs = k.div_ceil(2);
        let padded = n.div_ceil(16) * 16;
        debug_assert_eq!(out.len(), pairs * padded);
        let mut panel_start = 0;
        while panel_start < n {
            let width = (n - panel_start).min(PANEL_COLUMNS).div_ceil(16) * 16;
            let panel = out.as_mut_ptr().add(pairs * panel_start);
            for pair in 0..pairs {
                for vector in 0..width / 16 {
                    let col = panel_start + vector * 16;
                    let mask = lanes(n - col);
                    let even = rhs.as_ptr().add(offset + 2 * pair * stride + col);
                    let low = _mm512_maskz_loadu_ps(mask, even);
                    let high = if 2 * pair + 1 < k {
                        _mm512_maskz_loadu_ps(mask, even.add(stride))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let low: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(low));
                    let high: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(high));
                    let joined = _mm512_or_si512(
                        _mm512_cvtepu16_epi32(low),
                        _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(high)),
                    );
                    _mm512_storeu_si512(panel.add(pair * width + vector * 16).cast(), joined);
                }
            }
            panel_start += PANEL_COLUMNS;
        }
    }

    /// `dst (+)= lhs_pairs * rhs_panels` for the packed operands of an `m x n` product over
    /// `pairs` pairs of `k`, stored as `store` says; every element of the result is written.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16 present; the packed operands have the layouts of [`pack_lhs`] and
    /// [`pack_rhs`]; the `m x n` result at `dst_offset` (rows `dst_stride` apart) lies inside
    /// the buffer at `dst`, writable (and readable with [`Store::Accumulate`]); a bias holds at
    /// least `n` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(in crate::kernels) unsafe fn multiply(
        lhs_pairs: &[u32],
        rhs_panels: &[u32],
        (m, pairs, n): (usize, usize, usize),
        dst: *mut f32,
        dst_offset: usize,
        dst_stride: usize,
        store: Store<'_>,
    ) {
        if crate::kernels::amx::amx_ready() {
            // SAFETY: AMX is ready; the operands and the destination are the caller's promise,
            // the same as this function's.
            crate::kernels::amx::x86::multiply(
                lhs_pairs,
                rhs_panels,
                (m, pairs, n),
                PANEL_COLUMNS,
                dst,
                dst_offset,
                dst_stride,
                store,
            );
            return;
        }
        multiply_register_tiles(
            lhs_pairs,
            rhs_panels,
            (m, pairs, n),
            dst,
            dst_offset,
            dst_stride,
            store,
        );
    }

    /// [`multiply`] on AVX-512 register tiles (the kernel of CPUs without AMX).
    ///
    /// # Safety
    /// As for [`multiply`].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(in crate::kernels) unsafe fn multiply_register_tiles(
        lhs_pairs: &[u32],
        rhs_panels: &[u32],
        (m, pairs, n): (usize, usize, usize),
        dst: *mut f32,
        dst_offset: usize,
        dst_stride: usize,
        store: Store<'_>,
    ) {
        let accumulate = matches!(store, Store::Accumulate);
        let mut panel_start = 0;
        while panel_start < n {
            let columns = (n - panel_start).min(PANEL_COLUMNS);
            let width = columns.div_ceil(16) * 16;
            let vectors = width / 16;
            let last_mask = lanes(columns - (vectors - 1) * 16);
            let panel = rhs_panels.as_ptr().add(pairs * panel_start);
            let bias = match store {
                Store::AddBias(bias) => bias.as_ptr().add(panel_start),
                Store::Replace | Store::Accumulate => std::ptr::null(),
            };
            let mut row = 0;
            while row < m {
                let rows = (m - row).min(TILE_ROWS);
                let tile = Tile {
                    lhs: lhs_pairs.as_ptr().add(row * pairs),
                    pairs,
                    panel,
                    width,
                    dst: dst.add(dst_offset + row * dst_stride + panel_start),
                    dst_stride,
                    last_mask,
                    accumulate,
                    bias,
                };
                dispatch_tile(rows, vectors, &tile);
                row += rows;
            }
            panel_start += PANEL_COLUMNS;
        }
    }

    /// One register tile's operands and destination.
    struct Tile {
        /// The tile's first row of pairs (rows `pairs` apart).
        lhs: *const u32,
        pairs: usize,
        /// The panel's first pair (`[pairs, width]`).
        panel: *const u32,
        width: usize,
        /// The tile's first output element (rows `dst_stride` apart).
        dst: *mut f32,
        dst_stride: usize,
        /// Lanes of the last vector that are inside the product.
        last_mask: u16,
        accumulate: bool,
        /// The panel's first bias value (added to each row when not accumulating), or null.
        bias: *const f32,
    }

    /// Calls the `ROWS x VECTORS` kernel for `rows` (1..=6) and `vectors` (1..=4).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn dispatch_tile(rows: usize, vectors: usize, tile: &Tile) {
        macro_rules! by_vectors {
            ($rows:literal) => {
                match vectors {
                    1 => tile_kernel::<$rows, 1>(tile),
                    2 => tile_kernel::<$rows, 2>(tile),
                    3 => tile_kernel::<$rows, 3>(tile),
                    _ => tile_kernel::<$rows, 4>(tile),
                }
            };
        }
        match rows {
            1 => by_vectors!(1),
            2 => by_vectors!(2),
            3 => by_vectors!(3),
            4 => by_vectors!(4),
            5 => by_vectors!(5),
            _ => by_vectors!(6),
        }
    }

    /// `ROWS` rows by `VECTORS * 16` columns, accumulated in registers over every pair.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn tile_kernel<const ROWS: usize, const VECTORS: usize>(tile: &Tile) {
        let mut acc = [[_mm512_setzero_ps(); VECTORS]; ROWS];
        for pair in 0..tile.pairs {
            let rhs_row = tile.panel.add(pair * tile.width);
            let mut rhs = [_mm512_setzero_si512(); VECTORS];
            for (vector, value) in rhs.iter_mut().enumerate() {
                *value = _mm512_loadu_si512(rhs_row.add(vector * 16).cast());
            }
            for (row, acc_row) in acc.iter_mut().enumerate() {
                let lhs = _mm512_set1_epi32(*tile.lhs.add(row * tile.pairs + pair) as i32);
                let lhs: __m512bh = std::mem::transmute(lhs);
                for (vector, acc_value) in acc_row.iter_mut().enumerate() {
                    let rhs: __m512bh = std::mem::transmute(rhs[vector]);
                    *acc_value = _mm512_dpbf16_ps(*acc_value, lhs, rhs);
                }
            }
        }
        for (row, acc_row) in acc.iter().enumerate() {
            let out = tile.dst.add(row * tile.dst_stride);
            for (vector, &value) in acc_row.iter().enumerate() {
                let mask = if vector + 1 == VECTORS {
                    tile.last_mask
                } else {
                    u16::MAX
                };
                let at = out.add(vector * 16);
                let value = if tile.accumulate {
                    _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, at))
                } else if tile.bias.is_null() {
                    value
                } else {
                    _mm512_add_ps(
                        value,
                        _mm512_maskz_loadu_ps(mask, tile.bias.add(vector * 16)),
                    )
                };
                _mm512_mask_storeu_ps(at, mask, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::values;

    /// [`gemm_bf16`] into a slice.
    #[allow(clippy::too_many_arguments)]
    fn gemm_into(
        dst: &mut [f32],
        dst_layout: (usize, usize),
        lhs: &[f32],
        lhs_layout: (usize, usize),
        rhs: &[f32],
        rhs_layout: (usize, usize),
        shape: (usize, usize, usize),
        accumulate: bool,
    ) -> bool {
        #[allow(unsafe_code)]
        // SAFETY: `dst` is an initialised slice of `dst.len()` values, borrowed mutably.
        unsafe {
            gemm_bf16(
                (dst.as_mut_ptr(), dst.len()),
                dst_layout,
                lhs,
                lhs_layout,
                rhs,
                rhs_layout,
                shape,
                accumulate,
            )
        }
    }

    /// The `m x n` product of contiguous `lhs` (`m x k`) and `rhs` (`k x n`), written over a
    /// fresh destination.
    fn contiguous_product(lhs: &[f32], rhs: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
        let mut dst = vec![f32::NAN; m * n];
        let shape = (m, k, n);
        assert!(gemm_into(
            &mut dst,
            (0, n),
            lhs,
            (0, k),
            rhs,
            (0, n),
            shape,
            false
        ));
        dst
    }

    /// The f32 product of the bf16-rounded operands, accumulated in f64 (what the kernel computes
    /// up to f32 accumulation order).
    fn reference(lhs: &[f32], rhs: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
        let round = |x: f32| half::bf16::from_f32(x).to_f32() as f64;
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let sum: f64 = (0..k)
                    .map(|p| round(lhs[i * k + p]) * round(rhs[p * n + j]))
                    .sum();
                out[i * n + j] = sum as f32;
            }
        }
        out
    }

    #[test]
    fn bf16_products_match_the_rounded_operands_product_for_every_tail() {
        if !bf16_supported() {
            return;
        }
        for (m, k, n) in [
            (1, 1, 1),
            (7, 3, 17),
            (6, 32, 64),
            (13, 33, 65),
            (20, 128, 130),
            (5, 1024, 32),
            (45, 100, 200),
            (64, 64, 48),
        ] {
            let lhs = values(m * k, 1);
            let rhs = values(k * n, 2);
            let expected = reference(&lhs, &rhs, (m, k, n));
            let dst = contiguous_product(&lhs, &rhs, (m, k, n));
            for (index, (&got, &want)) in dst.iter().zip(&expected).enumerate() {
                let bound = 1e-5 * (k as f32).sqrt().max(1.0);
                assert!(
                    (got - want).abs() <= bound,
                    "{m}x{k}x{n} [{index}]: {got} vs {want}"
                );
            }
            // Accumulating onto a strided destination leaves the gaps alone.
            let stride = n + 3;
            let mut wide = vec![1.0f32; m * stride];
            assert!(gemm_into(
                &mut wide,
                (0, stride),
                &lhs,
                (0, k),
                &rhs,
                (0, n),
                (m, k, n),
                true
            ));
            for i in 0..m {
                for j in 0..stride {
                    let got = wide[i * stride + j];
                    if j < n {
                        let want = expected[i * n + j] + 1.0;
                        assert!((got - want).abs() <= 1e-4, "{m}x{k}x{n} acc [{i},{j}]");
                    } else {
                        assert_eq!(got, 1.0, "{m}x{k}x{n} gap [{i},{j}]");
                    }
                }
            }
        }
    }

    #[test]
    fn a_rows_product_does_not_depend_on_the_rows_beside_it() {
        // The kernel (AMX tiles where the CPU has them) computes rows in blocks; a row's bits must
        // be the same whichever block, and whichever call, it comes in.
        if !bf16_supported() {
            return;
        }
        let (m, k, n) = (70, 50, 100);
        let lhs = values(m * k, 3);
        let rhs = values(k * n, 4);
        let whole = contiguous_product(&lhs, &rhs, (m, k, n));
        for split in [1, 17, 31, 33, 69] {
            let mut pieces = vec![f32::NAN; m * n];
            for (first, rows) in [(0, split), (split, m - split)] {
                assert!(gemm_into(
                    &mut pieces,
                    (first * n, n),
                    &lhs,
                    (first * k, k),
                    &rhs,
                    (0, n),
                    (rows, k, n),
                    false
                ));
            }
            let same = whole
                .iter()
                .zip(&pieces)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "rows split at {split} changed the product's bits");
        }
    }

    #[test]
    fn out_of_bounds_operands_are_refused() {
        let mut dst = vec![0f32; 4];
        let lhs = vec![0f32; 4];
        let rhs = vec![0f32; 3];
        let done = gemm_into(
            &mut dst,
            (0, 2),
            &lhs,
            (0, 2),
            &rhs,
            (0, 2),
            (2, 2, 2),
            false,
        );
        assert!(!done);
    }

    #[test]
    fn precision_is_scoped_to_the_call() {
        assert_eq!(product_precision(), ProductPrecision::F32);
        let inner = with_product_precision(ProductPrecision::Bf16, product_precision);
        assert_eq!(inner, ProductPrecision::Bf16);
        assert_eq!(product_precision(), ProductPrecision::F32);
    }
}
