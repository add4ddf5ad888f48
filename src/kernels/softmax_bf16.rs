//! The softmax rows of the fused attention, written with AVX-512 intrinsics. With bf16 products:
//! each row's maximum, its exponentials (by [`exp2_for_bf16`]'s polynomial) with their sum, the
//! exponentials rounded to bf16 as the value product's packed left operand and, for an observed
//! row, its normalised probabilities added to the head mean. Tails of rows (a 77-key row has 13
//! values after its 64-value chunk) go through masked loads and stores instead of scalar code.
//!
//! The values are those of the portable kernels in `softmax.rs` (`ExpRowsToBf16`,
//! `UnnormalisedSoftmaxRowsForBf16` with `ExpsToMeanAndBf16`) bit for bit: the same polynomial
//! with the same fused multiply-adds, the same rounding to bf16, and sums over the same 64 lanes
//! folded in the same order. (With f32 products the fused attention runs the rows of
//! `attention_f32.rs`.)
//!
//! [`exp2_for_bf16`]: super::simd::exp2_for_bf16

use super::bf16::bf16_supported;
use super::simd::REDUCTION_LANES;

/// A block of score rows for [`exp_rows_to_bf16`].
pub(super) struct ScoreRows<'a> {
    /// `[rows, row_len]` scores; with `mean` they become the unnormalised exponentials.
    pub(super) scores: &'a mut [f32],
    pub(super) row_len: usize,
    /// The softmax's scale of the scores.
    pub(super) scale: f32,
    /// `[rows]`: each row's sum of its (unrounded) exponentials.
    pub(super) sums: &'a mut [f32],
    /// `[rows, half_stride]`: the exponentials as bf16 bits, each row padded with zeros.
    pub(super) halves: &'a mut [u16],
    pub(super) half_stride: usize,
    /// `[rows, row_len]`: where the normalised probabilities, times `mean_weight`, are added,
    /// for an observed block.
    pub(super) mean: Option<&'a mut [f32]>,
    /// The weight of a row's probabilities in `mean` (one over the heads for a head mean).
    pub(super) mean_weight: f32,
}

/// Runs the block's rows (see the module notes); `false` (nothing written) when this CPU has no
/// AVX-512 BF16 or the buffers do not have the block's sizes, and the caller then runs the
/// portable kernels.
pub(super) fn exp_rows_to_bf16(block: ScoreRows<'_>) -> bool {
    let ScoreRows {
        scores,
        row_len,
        scale,
        sums,
        halves,
        half_stride,
        mean,
        mean_weight,
    } = block;
    let rows = sums.len();
    let fits = row_len > 0
        && scores.len() == rows * row_len
        && half_stride >= row_len
        && halves.len() == rows * half_stride
        && mean
            .as_ref()
            .is_none_or(|mean| mean.len() == rows * row_len);
    if !bf16_supported() || !fits {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let slope = scale * std::f32::consts::LOG2_E;
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 F/BW/BF16 are present (`bf16_supported`) and the buffers have the
        // block's sizes (checked above); the loops touch only the slices they are given (full
        // chunks, then masked tails).
        unsafe {
            x86::rows(
                scores,
                row_len,
                slope,
                sums,
                (halves, half_stride),
                mean.map(|mean| (mean, mean_weight)),
            );
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (scores, scale, halves, mean, mean_weight);
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod x86 {
    //! The AVX-512 row loops. Callers guarantee the CPU features; each function touches only the
    //! slices it is given.

    use super::REDUCTION_LANES;
    use crate::kernels::bf16::x86::lanes;
    use std::arch::x86_64::*;

    /// Vectors per 64-lane chunk.
    const VECTORS: usize = REDUCTION_LANES / 16;

    /// The 64 lanes of four accumulators folded pairwise, half of them at a time, as
    /// `simd::halve_lanes` folds them: lane `i` with lane `i + 32`, then `i + 16`, `i + 8`, ...
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn fold(
        acc: [__m512; VECTORS],
        wide: impl Fn(__m512, __m512) -> __m512,
        narrow: impl Fn(__m128, __m128) -> __m128,
    ) -> f32 {
        let v = wide(wide(acc[0], acc[2]), wide(acc[1], acc[3]));
        let low = _mm512_castps512_ps256(v);
        let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let (low_low, low_high) = (_mm256_castps256_ps128(low), _mm256_extractf128_ps::<1>(low));
        let (high_low, high_high) = (
            _mm256_castps256_ps128(high),
            _mm256_extractf128_ps::<1>(high),
        );
        // 16 -> 8 lanes: (lanes 0..4, 4..8) with (8..12, 12..16); then 8 -> 4.
        let four = narrow(narrow(low_low, high_low), narrow(low_high, high_high));
        let two = narrow(four, _mm_movehl_ps(four, four));
        let one = narrow(two, _mm_movehdup_ps(two));
        _mm_cvtss_f32(one)
    }

    /// The largest value of `row` (non-empty): whole 64-value chunks unmasked, then the tail.
    ///
    /// # Safety
    /// AVX-512 F present.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(in crate::kernels) unsafe fn row_max(row: &[f32]) -> f32 {
        let mut acc = [_mm512_set1_ps(f32::NEG_INFINITY); VECTORS];
        let at = row.as_ptr();
        let full = row.len() / REDUCTION_LANES * REDUCTION_LANES;
        let mut start = 0;
        while start < full {
            for (vector, value) in acc.iter_mut().enumerate() {
                *value = _mm512_max_ps(_mm512_loadu_ps(at.add(start + vector * 16)), *value);
            }
            start += REDUCTION_LANES;
        }
        if start < row.len() {
            for (vector, value) in acc.iter_mut().enumerate() {
                let first = start + vector * 16;
                let count = row.len().saturating_sub(first).min(16);
                let loaded = _mm512_mask_loadu_ps(
                    _mm512_set1_ps(f32::NEG_INFINITY),
                    lanes(count),
                    at.add(first.min(row.len())),
                );
                *value = _mm512_max_ps(loaded, *value);
            }
        }
        // `b > a ? b : a`, as the portable fold (`_mm512_max_ps(b, a)` returns `a` when they
        // are unordered).
        fold(acc, |a, b| _mm512_max_ps(b, a), |a, b| _mm_max_ps(b, a))
    }

    /// `2^t` as `simd::exp2_for_bf16` computes it, sixteen at a time.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn exp2_for_bf16(t: __m512) -> __m512 {
        let round = _mm512_set1_ps(12_582_912.0);
        let t = _mm512_max_ps(t, _mm512_set1_ps(-125.0));
        let shifted = _mm512_add_ps(t, round);
        let n = _mm512_sub_ps(shifted, round);
        let f = _mm512_sub_ps(t, n);
        let p = _mm512_fmadd_ps(
            f,
            _mm512_set1_ps(0.055_171_67),
            _mm512_set1_ps(0.242_611_14),
        );
        let p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693_260_97));
        let p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.999_928_06));
        let exponent = _mm512_slli_epi32::<23>(_mm512_castps_si512(shifted));
        _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), exponent))
    }

    /// Each value `v` of `row` -> `e = 2^(v * slope + offset)`: rounded to bf16 bits into `out`
    /// (as `softmax::bf16_bits` rounds), written back over `v` when `keep`; returns the sum of
    /// the `e` over 64 lanes, folded. Whole 64-value chunks run unmasked, their bf16 halves
    /// gathered 32 at a time into full stores; the tail runs masked.
    ///
    /// # Safety
    /// AVX-512 F/BW present; `out` is as long as `row`.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn exp_row(
        row: &mut [f32],
        out: &mut [u16],
        slope: f32,
        offset: f32,
        keep: bool,
    ) -> f32 {
        debug_assert_eq!(row.len(), out.len());
        let (slope, offset) = (_mm512_set1_ps(slope), _mm512_set1_ps(offset));
        let half = _mm512_set1_epi32(0x8000);
        // Word `j` of the gathered vector is word `2j + 1` (the high half of value `j`) of the
        // pair of vectors (index bit 5 picks the second).
        let high_halves = _mm512_set_epi16(
            63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21,
            19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
        );
        let mut acc = [_mm512_setzero_ps(); VECTORS];
        let (at, out_at) = (row.as_mut_ptr(), out.as_mut_ptr());
        let full = row.len() / REDUCTION_LANES * REDUCTION_LANES;
        let mut start = 0;
        while start < full {
            let mut e = [_mm512_setzero_ps(); VECTORS];
            for (vector, (value, sum)) in e.iter_mut().zip(acc.iter_mut()).enumerate() {
                let values = _mm512_loadu_ps(at.add(start + vector * 16));
                *value = exp2_for_bf16(_mm512_fmadd_ps(values, slope, offset));
                *sum = _mm512_add_ps(*sum, *value);
                if keep {
                    _mm512_storeu_ps(at.add(start + vector * 16), *value);
                }
            }
            for (pair, values) in e.chunks_exact(2).enumerate() {
                let low = _mm512_add_epi32(_mm512_castps_si512(values[0]), half);
                let high = _mm512_add_epi32(_mm512_castps_si512(values[1]), half);
                let bits = _mm512_permutex2var_epi16(low, high_halves, high);
                _mm512_storeu_si512(out_at.add(start + pair * 32).cast(), bits);
            }
            start += REDUCTION_LANES;
        }
        if start < row.len() {
            for (vector, sum) in acc.iter_mut().enumerate() {
                let first = start + vector * 16;
                let count = row.len().saturating_sub(first).min(16);
                if count == 0 {
                    break;
                }
                let mask = lanes(count);
                let values = _mm512_maskz_loadu_ps(mask, at.add(first));
                let e = exp2_for_bf16(_mm512_fmadd_ps(values, slope, offset));
                *sum = _mm512_mask_add_ps(*sum, mask, *sum, e);
                let bits = _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_castps_si512(e), half));
                _mm512_mask_cvtepi32_storeu_epi16(out_at.add(first).cast(), mask, bits);
                if keep {
                    _mm512_mask_storeu_ps(at.add(first), mask, e);
                }
            }
        }
        fold(acc, |a, b| _mm512_add_ps(a, b), |a, b| _mm_add_ps(a, b))
    }

    /// `mean[i] += values[i] * inverse` (a product, then a sum); whole vectors unmasked.
    ///
    /// # Safety
    /// AVX-512 F present; `mean` is as long as `values`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(in crate::kernels) unsafe fn add_scaled(mean: &mut [f32], values: &[f32], inverse: f32) {
        debug_assert_eq!(mean.len(), values.len());
        let inverse = _mm512_set1_ps(inverse);
        let (mean_at, at) = (mean.as_mut_ptr(), values.as_ptr());
        let full = values.len() / 16 * 16;
        let mut first = 0;
        while first < full {
            let scaled = _mm512_mul_ps(_mm512_loadu_ps(at.add(first)), inverse);
            let total = _mm512_add_ps(_mm512_loadu_ps(mean_at.add(first)), scaled);
            _mm512_storeu_ps(mean_at.add(first), total);
            first += 16;
        }
        if first < values.len() {
            let mask = lanes(values.len() - first);
            let scaled = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, at.add(first)), inverse);
            let total = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, mean_at.add(first)), scaled);
            _mm512_mask_storeu_ps(mean_at.add(first), mask, total);
        }
    }

    /// Every row of a block (see [`super::exp_rows_to_bf16`]): `scores` `[rows, row_len]`,
    /// `sums` `[rows]`, `halves` `[rows, half_stride]`, `mean` `[rows, row_len]` with its weight.
    ///
    /// # Safety
    /// AVX-512 F/BW present; the buffers have those sizes, `half_stride >= row_len > 0`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn rows(
        scores: &mut [f32],
        row_len: usize,
        slope: f32,
        sums: &mut [f32],
        (halves, half_stride): (&mut [u16], usize),
        mut mean: Option<(&mut [f32], f32)>,
    ) {
        let keep = mean.is_some();
        let rows = scores
            .chunks_exact_mut(row_len)
            .zip(halves.chunks_exact_mut(half_stride));
        for (row, ((values, out), sum)) in rows.zip(sums.iter_mut()).enumerate() {
            let (out, padding) = out.split_at_mut(row_len);
            let offset = -row_max(values) * slope;
            *sum = exp_row(values, out, slope, offset, keep);
            if let Some((mean, weight)) = mean.as_mut() {
                add_scaled(
                    &mut mean[row * row_len..][..row_len],
                    values,
                    *weight / *sum,
                );
            }
            padding.fill(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::softmax::{
        ExpRowsToBf16, ExpsToMeanAndBf16, UnnormalisedSoftmaxRowsForBf16,
    };

    /// The portable kernels' results for a block: (scores after, sums, halves, mean).
    fn portable(
        scores: &[f32],
        row_len: usize,
        half_stride: usize,
        observed: bool,
    ) -> (Vec<f32>, Vec<f32>, Vec<u16>, Vec<f32>) {
        let rows = scores.len() / row_len;
        let mut scores = scores.to_vec();
        let mut sums = vec![0f32; rows];
        let mut halves = vec![7u16; rows * half_stride];
        let mut mean = vec![0.5f32; scores.len()];
        let arch = pulp::Arch::new();
        if observed {
            arch.dispatch(UnnormalisedSoftmaxRowsForBf16 {
                piece: &mut scores,
                row_len,
                scale: 0.3,
                sums: &mut sums,
            });
            arch.dispatch(ExpsToMeanAndBf16 {
                exps: &scores,
                row_len,
                sums: &sums,
                mean: &mut mean,
                mean_weight: 0.25,
                halves: &mut halves,
                half_stride,
            });
        } else {
            arch.dispatch(ExpRowsToBf16 {
                scores: &scores,
                row_len,
                scale: 0.3,
                sums: &mut sums,
                halves: &mut halves,
                half_stride,
            });
        }
        (scores, sums, halves, mean)
    }

    #[test]
    fn intrinsic_rows_give_the_portable_kernels_values() {
        if !bf16_supported() {
            return;
        }
        // Row lengths below, at and between whole 64-value chunks (77: text keys).
        for row_len in [1usize, 13, 64, 77, 130, 1024] {
            let rows = 5;
            let half_stride = row_len + row_len % 2;
            let scores: Vec<f32> = (0..rows * row_len)
                .map(|index| ((index * 7919) % 1000) as f32 * 0.037 - 18.0)
                .collect();
            for observed in [false, true] {
                let expected = portable(&scores, row_len, half_stride, observed);
                let mut actual = (
                    scores.clone(),
                    vec![0f32; rows],
                    vec![7u16; rows * half_stride],
                    vec![0.5f32; rows * row_len],
                );
                let done = exp_rows_to_bf16(ScoreRows {
                    scores: &mut actual.0,
                    row_len,
                    scale: 0.3,
                    sums: &mut actual.1,
                    halves: &mut actual.2,
                    half_stride,
                    mean: observed.then_some(&mut actual.3[..]),
                    mean_weight: 0.25,
                });
                assert!(done);
                let bits = |values: &[f32]| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&actual.0), bits(&expected.0), "scores, {row_len} keys");
                assert_eq!(bits(&actual.1), bits(&expected.1), "sums, {row_len} keys");
                assert_eq!(actual.2, expected.2, "bf16 weights, {row_len} keys");
                assert_eq!(bits(&actual.3), bits(&expected.3), "mean, {row_len} keys");
            }
        }
        // Buffers of the wrong size are refused, untouched.
        let mut scores = vec![1f32; 10];
        let mut sums = vec![0f32; 2];
        let mut halves = vec![0u16; 9];
        let refused = !exp_rows_to_bf16(ScoreRows {
            scores: &mut scores,
            row_len: 5,
            scale: 1.0,
            sums: &mut sums,
            halves: &mut halves,
            half_stride: 5,
            mean: None,
            mean_weight: 1.0,
        });
        assert!(refused && sums == [0.0, 0.0]);
    }
}
