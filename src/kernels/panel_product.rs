//! The product of a block of activation rows with one column panel of a stored weight (`[k, 64]`,
//! its rows one after another, see `gemm::ColumnPanels`), in AVX-512 register tiles, fetching the
//! weight ahead of its use.
//!
//! With few rows (a wide Winograd layer's 32 tiles at 8x8), a panel's multiply-adds take about as
//! long as reading the panel from memory, and gemm does one after the other: the first row tile
//! over a block of depth waits for the weight, the others find it in the cache. Here the panel goes
//! in blocks of [`DEPTH_BLOCK`] rows of depth (16 KiB, kept in the L1 cache while all row tiles
//! pass over it), and while one block is multiplied the next one (or the next panel's first) is
//! requested, one cache line per step of depth, so the memory works while the FMA units do.
//!
//! Register tiles of up to 6 rows by the panel's 64 columns (4 vectors): a step of depth loads the
//! panel's 4 vectors once and broadcasts each row's value. Each output is the sum over depth in
//! order (partial sums stored to the output between blocks of depth, which is exact), so it is
//! within f32 rounding of gemm's.

use std::mem::MaybeUninit;

use super::gemm::{MatrixView, PANEL_COLUMNS};

/// Rows of depth per block of a panel: `64 x 64` values (16 KiB) stay in the L1 cache while every
/// row tile passes over them.
const DEPTH_BLOCK: usize = 64;

/// Activation rows per register tile (4 vectors each: 24 accumulators).
const TILE_ROWS: usize = 6;

/// Whether this CPU runs [`panel_product`].
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::winograd::x86::supported()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst[dst_offset + r * dst_row_stride..][..64] = lhs[r] * panel` for the `lhs.rows` rows of
/// `lhs` (`[rows, k]`) and a panel `[k, 64]`; the first block of depth of `next` (the values
/// after this panel, when they hold one) is fetched into the cache during the last block of depth.
/// `false` (nothing written) where [`available`] is not or a view does not fit its slice;
/// otherwise every one of those `rows x 64` slots is written.
pub(super) fn panel_product(
    (dst, dst_offset, dst_row_stride): (&mut [MaybeUninit<f32>], usize, usize),
    lhs: MatrixView<'_>,
    panel: &[f32],
    next: Option<&[f32]>,
) -> bool {
    let (data, offset, (rows, k), row_stride) = lhs.parts();
    let dst_fits = rows == 0
        || (dst_row_stride >= PANEL_COLUMNS
            && dst_offset + (rows - 1) * dst_row_stride + PANEL_COLUMNS <= dst.len());
    if !available() || k == 0 || !lhs.in_bounds() || panel.len() != k * PANEL_COLUMNS || !dst_fits {
        return false;
    }
    // A next panel too short for a block of depth (the last one's `next` is empty) is not fetched.
    let next = next.filter(|next| next.len() >= DEPTH_BLOCK.min(k) * PANEL_COLUMNS);
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 F is present (`available`); `lhs` lies inside its slice
        // (`in_bounds`), the panel holds `k x 64` values, `next` at least its first block of
        // depth (filtered above), and the output rows (64 slots each, `dst_row_stride` apart, no two rows
        // overlapping) lie inside `dst`, as checked above. Slots are written before any is read.
        unsafe {
            x86::panel_product(
                (dst.as_mut_ptr().add(dst_offset).cast(), dst_row_stride),
                (data.as_ptr().add(offset), row_stride),
                panel.as_ptr(),
                next.map(<[f32]>::as_ptr),
                (rows, k),
            );
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dst, data, offset, row_stride, panel, next);
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    //! The register tiles. Callers guarantee AVX-512 F and that every pointer covers the matrix
    //! it is given.

    use super::{DEPTH_BLOCK, PANEL_COLUMNS, TILE_ROWS};
    use std::arch::x86_64::*;

    /// Values per cache line.
    const LINE: usize = 16;

    /// See [`super::panel_product`].
    ///
    /// # Safety
    /// AVX-512 F present; `dst` covers `rows` rows of 64 values `dst_stride` apart, `lhs` `rows`
    /// rows of `k` values `lhs_stride` apart, `panel` `k x 64` values and `next`, when given, at
    /// least `min(k, DEPTH_BLOCK) x 64`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn panel_product(
        (dst, dst_stride): (*mut f32, usize),
        (lhs, lhs_stride): (*const f32, usize),
        panel: *const f32,
        next: Option<*const f32>,
        (rows, k): (usize, usize),
    ) {
        let mut first = 0;
        while first < k {
            let depth = DEPTH_BLOCK.min(k - first);
            // What to fetch while this block is multiplied: the panel's next block, or the next
            // panel's first.
            let ahead = if first + depth < k {
                Some((
                    panel.add((first + depth) * PANEL_COLUMNS),
                    DEPTH_BLOCK.min(k - first - depth),
                ))
            } else {
                next.map(|next| (next, DEPTH_BLOCK.min(k)))
            };
            let mut fetch =
                ahead.map_or((panel, 0), |(at, depth)| (at, depth * PANEL_COLUMNS / LINE));
            let block = panel.add(first * PANEL_COLUMNS);
            let mut row = 0;
            while row < rows {
                let count = TILE_ROWS.min(rows - row);
                let tile = (dst.add(row * dst_stride), lhs.add(row * lhs_stride + first));
                let strides = (dst_stride, lhs_stride);
                // Blocks after the first add to the partial sums they find in the output.
                let work = (depth, first > 0);
                // The tile's row count as a const generic.
                macro_rules! tile {
                    ($($rows:literal)*) => {
                        match count {
                            $($rows => tile_rows::<$rows>(tile, strides, block, work, &mut fetch),)*
                            _ => tile_rows::<1>(tile, strides, block, work, &mut fetch),
                        }
                    };
                }
                tile!(6 5 4 3 2);
                row += count;
            }
            first += depth;
        }
    }

    /// `R` rows of the output (`dst`, rows `dst_stride` apart) `=` (or `+=` with `accumulate`)
    /// the `R` rows of `lhs` (`depth` values each, rows `lhs_stride` apart) times a block of
    /// `depth` panel rows; one cache line of `fetch` (`(start, lines left)`) requested per step.
    ///
    /// # Safety
    /// AVX-512 F present; the pointers cover what the sums read and write, `fetch` its lines.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile_rows<const R: usize>(
        (dst, lhs): (*mut f32, *const f32),
        (dst_stride, lhs_stride): (usize, usize),
        block: *const f32,
        (depth, accumulate): (usize, bool),
        fetch: &mut (*const f32, usize),
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        if accumulate {
            for (row, acc) in acc.iter_mut().enumerate() {
                for (vector, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_loadu_ps(dst.add(row * dst_stride + vector * 16));
                }
            }
        }
        for step in 0..depth {
            let at = block.add(step * PANEL_COLUMNS);
            let weights = [
                _mm512_loadu_ps(at),
                _mm512_loadu_ps(at.add(16)),
                _mm512_loadu_ps(at.add(32)),
                _mm512_loadu_ps(at.add(48)),
            ];
            for (row, acc) in acc.iter_mut().enumerate() {
                let value = _mm512_set1_ps(*lhs.add(row * lhs_stride + step));
                for (acc, &weight) in acc.iter_mut().zip(&weights) {
                    *acc = _mm512_fmadd_ps(value, weight, *acc);
                }
            }
            if fetch.1 > 0 {
                _mm_prefetch::<_MM_HINT_T0>(fetch.0.cast());
                *fetch = (fetch.0.add(LINE), fetch.1 - 1);
            }
        }
        for (row, acc) in acc.iter().enumerate() {
            for (vector, &acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(dst.add(row * dst_stride + vector * 16), acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::values;

    /// `rows x k` times `k x 64` in f64, row-major.
    fn reference(lhs: &[f32], panel: &[f32], (rows, k): (usize, usize)) -> Vec<f64> {
        let mut out = vec![0f64; rows * PANEL_COLUMNS];
        for row in 0..rows {
            for depth in 0..k {
                let value = f64::from(lhs[row * k + depth]);
                for column in 0..PANEL_COLUMNS {
                    out[row * PANEL_COLUMNS + column] +=
                        value * f64::from(panel[depth * PANEL_COLUMNS + column]);
                }
            }
        }
        out
    }

    #[test]
    fn panel_products_match_f64_sums() {
        if !available() {
            return;
        }
        // Row counts around the tile height, depths around the block of depth.
        for (rows, k) in [(1, 1), (5, 63), (6, 64), (7, 65), (32, 1280), (13, 200)] {
            let lhs = values(rows * k, 1);
            let panel = values(k * PANEL_COLUMNS, 2);
            let next = values(k * PANEL_COLUMNS, 3);
            // Output rows 70 apart, a few slots before the first: the others stay untouched.
            let (stride, offset) = (70, 3);
            let mut dst = vec![MaybeUninit::new(7f32); offset + rows * stride];
            let view = MatrixView::new(&lhs, 0, (rows, k), k);
            assert!(panel_product(
                (&mut dst, offset, stride),
                view,
                &panel,
                Some(&next)
            ));
            let expected = reference(&lhs, &panel, (rows, k));
            for row in 0..rows {
                for column in 0..stride {
                    #[allow(unsafe_code)]
                    // SAFETY: every slot was initialised above.
                    let got = unsafe { dst[offset + row * stride + column].assume_init() };
                    if column < PANEL_COLUMNS {
                        let want = expected[row * PANEL_COLUMNS + column];
                        let bound = 1e-6 * k as f64;
                        assert!(
                            (f64::from(got) - want).abs() < bound,
                            "{rows}x{k}: {got} {want}"
                        );
                    } else {
                        assert_eq!(got, 7.0, "{rows}x{k}: a slot outside the product");
                    }
                }
            }
        }
        // A next panel too short to fetch from (the last panel's) is passed over, not refused.
        let (lhs, panel) = (values(7 * 70, 4), values(70 * PANEL_COLUMNS, 5));
        let view = MatrixView::new(&lhs, 0, (7, 70), 70);
        let mut dst = vec![MaybeUninit::new(0f32); 7 * PANEL_COLUMNS];
        assert!(panel_product(
            (&mut dst, 0, PANEL_COLUMNS),
            view,
            &panel,
            Some(&[])
        ));
        // Views that do not fit are refused and write nothing.
        let (lhs, panel) = (values(6 * 8, 1), values(8 * PANEL_COLUMNS, 2));
        let view = MatrixView::new(&lhs, 0, (6, 8), 8);
        let mut short = vec![MaybeUninit::new(0f32); 5 * PANEL_COLUMNS];
        assert!(!panel_product(
            (&mut short, 0, PANEL_COLUMNS),
            view,
            &panel,
            None
        ));
        let mut dst = vec![MaybeUninit::new(0f32); 6 * PANEL_COLUMNS];
        assert!(!panel_product(
            (&mut dst, 0, PANEL_COLUMNS),
            view,
            &panel[1..],
            None
        ));
        assert!(!panel_product((&mut dst, 0, 32), view, &panel, None));
    }
}
