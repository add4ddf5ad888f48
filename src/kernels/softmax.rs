//! Row softmax kernels: `softmax(scale * x)` in place over the last dimension, and the
//! unnormalised form (exponentials and row sums) whose division the fused attention applies later.

use candle_core::{CpuStorage, InplaceOp1, Layout, Result, Tensor};

use super::simd::{exp2_for_bf16, fast_exp, lane_max, simd_kernel, sum_lanes, REDUCTION_LANES};
use super::threads::parallel_chunks_mut;

simd_kernel!(
    /// `softmax(scale * row)` in place for each `row_len` row of `piece`.
    pub(super) SoftmaxRows<'data> { piece: &'data mut [f32], row_len: usize, scale: f32 } => {
        softmax_rows(piece, row_len, scale);
    }
);

simd_kernel!(
    /// `exp(scale * (row - max(row)))` in place for each `row_len` row of `piece`, each row's sum
    /// written to `sums` (the softmax without its division, which the caller applies later to
    /// fewer values).
    pub(super) UnnormalisedSoftmaxRows<'data> {
        piece: &'data mut [f32], row_len: usize, scale: f32, sums: &'data mut [f32]
    } => {
        for (row, sum) in piece.chunks_exact_mut(row_len).zip(sums.iter_mut()) {
            let max = lane_max(row);
            *sum = exp_and_sum(row, max, scale);
        }
    }
);

simd_kernel!(
    /// For bf16 products: each `row_len` row of `scores` -> `exp(scale * (row - max(row)))` (by
    /// [`exp2_for_bf16`]) rounded to bf16 (`halves`, rows `half_stride >= row_len` apart, the rest of each row set
    /// to zero), each row's sum of the unrounded exponentials written to `sums`. The scores stay
    /// as they are; the bf16 rows are the product's packed left operand.
    pub(super) ExpRowsToBf16<'data> {
        scores: &'data [f32],
        row_len: usize,
        scale: f32,
        sums: &'data mut [f32],
        halves: &'data mut [u16],
        half_stride: usize,
    } => {
        let rows = scores.chunks_exact(row_len).zip(halves.chunks_exact_mut(half_stride));
        for ((row, out), sum) in rows.zip(sums.iter_mut()) {
            let max = lane_max(row);
            let (values, padding) = out.split_at_mut(row_len);
            *sum = exp_sum_to_bf16(row, max, scale, values);
            padding.fill(0);
        }
    }
);

simd_kernel!(
    /// The observed rows of the fused attention with bf16 products: `exps` (unnormalised, see
    /// [`UnnormalisedSoftmaxRows`]) divided by their row's sum and times `mean_weight` are added
    /// to `mean`, and rounded to bf16 as they are into `halves` (rows `half_stride` apart, padded
    /// with zero).
    pub(super) ExpsToMeanAndBf16<'data> {
        exps: &'data [f32],
        row_len: usize,
        sums: &'data [f32],
        mean: &'data mut [f32],
        mean_weight: f32,
        halves: &'data mut [u16],
        half_stride: usize,
    } => {
        let rows = exps
            .chunks_exact(row_len)
            .zip(mean.chunks_exact_mut(row_len))
            .zip(halves.chunks_exact_mut(half_stride));
        for (((row, mean_row), out), &sum) in rows.zip(sums.iter()) {
            let inverse = mean_weight / sum;
            let (values, padding) = out.split_at_mut(row_len);
            for ((&value, total), half) in row.iter().zip(mean_row.iter_mut()).zip(values.iter_mut()) {
                *total += value * inverse;
                *half = bf16_bits(value);
            }
            padding.fill(0);
        }
    }
);

simd_kernel!(
    /// [`UnnormalisedSoftmaxRows`] with the exponential of [`exp2_for_bf16`], for the rows of a
    /// fused attention with bf16 products whose head mean is also kept.
    pub(super) UnnormalisedSoftmaxRowsForBf16<'data> {
        piece: &'data mut [f32], row_len: usize, scale: f32, sums: &'data mut [f32]
    } => {
        for (row, sum) in piece.chunks_exact_mut(row_len).zip(sums.iter_mut()) {
            let (slope, offset) = exp2_line(lane_max(row), scale);
            *sum = map_and_sum(row, |value| exp2_for_bf16(value.mul_add(slope, offset)));
        }
    }
);

/// `exp(scale * (v - max)) = 2^(v * slope + offset)`: the slope and offset.
#[inline(always)]
fn exp2_line(max: f32, scale: f32) -> (f32, f32) {
    let slope = scale * std::f32::consts::LOG2_E;
    (slope, -max * slope)
}

/// The bits of a finite `x` rounded to bf16, to nearest with ties away from zero (ties are too
/// rare among exponentials to bias them; two operations fewer than ties to even).
#[inline(always)]
pub(super) fn bf16_bits(x: f32) -> u16 {
    ((x.to_bits() + 0x8000) >> 16) as u16
}

/// `exp(scale * (v - max))` (by [`exp2_for_bf16`]) of each value of `row` rounded to bf16 into
/// `out` (as long as `row`); returns the sum of the unrounded exponentials (in
/// [`REDUCTION_LANES`] lanes).
#[inline(always)]
fn exp_sum_to_bf16(row: &[f32], max: f32, scale: f32, out: &mut [u16]) -> f32 {
    let (slope, offset) = exp2_line(max, scale);
    let mut lanes = [0f32; REDUCTION_LANES];
    let mut chunks = row.chunks_exact(REDUCTION_LANES);
    let mut out_chunks = out.chunks_exact_mut(REDUCTION_LANES);
    for (chunk, out_chunk) in (&mut chunks).zip(&mut out_chunks) {
        for ((lane, &value), half) in lanes.iter_mut().zip(chunk).zip(out_chunk.iter_mut()) {
            let e = exp2_for_bf16(value.mul_add(slope, offset));
            *lane += e;
            *half = bf16_bits(e);
        }
    }
    // The tail padded to a whole chunk (with its own first value), so that it vectorises too; the
    // padding's exponentials are left out of the sum.
    let (rest, rest_out) = (chunks.remainder(), out_chunks.into_remainder());
    if let Some(&first) = rest.first() {
        let mut padded = [first; REDUCTION_LANES];
        padded[..rest.len()].copy_from_slice(rest);
        let mut halves = [0u16; REDUCTION_LANES];
        let lanes_in = lanes.iter_mut().zip(&padded).zip(halves.iter_mut());
        for (index, ((lane, &value), half)) in lanes_in.enumerate() {
            let e = exp2_for_bf16(value.mul_add(slope, offset));
            *lane += if index < rest.len() { e } else { 0.0 };
            *half = bf16_bits(e);
        }
        rest_out.copy_from_slice(&halves[..rest.len()]);
    }
    sum_lanes(lanes)
}

/// Replaces each value `v` of `row` by `exp(scale * (v - max))` and returns their sum.
#[inline(always)]
fn exp_and_sum(row: &mut [f32], max: f32, scale: f32) -> f32 {
    map_and_sum(row, |value| fast_exp((value - max) * scale))
}

/// Replaces each value `v` of `row` by `f(v)` and returns their sum (in [`REDUCTION_LANES`] lanes,
/// so the loop vectorises).
#[inline(always)]
fn map_and_sum(row: &mut [f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; REDUCTION_LANES];
    let mut chunks = row.chunks_exact_mut(REDUCTION_LANES);
    for chunk in &mut chunks {
        for (lane, value) in lanes.iter_mut().zip(chunk.iter_mut()) {
            *value = f(*value);
            *lane += *value;
        }
    }
    // The tail padded to a whole chunk (with its own first value), so that it vectorises too; the
    // padding's results are left out of the sum.
    let rest = chunks.into_remainder();
    if let Some(&first) = rest.first() {
        let mut padded = [first; REDUCTION_LANES];
        padded[..rest.len()].copy_from_slice(rest);
        for (index, (lane, value)) in lanes.iter_mut().zip(padded.iter_mut()).enumerate() {
            *value = f(*value);
            *lane += if index < rest.len() { *value } else { 0.0 };
        }
        rest.copy_from_slice(&padded[..rest.len()]);
    }
    sum_lanes(lanes)
}

/// `softmax(scale * row)` in place for each `row_len` row of `piece`.
#[inline(always)]
fn softmax_rows(piece: &mut [f32], row_len: usize, scale: f32) {
    for row in piece.chunks_exact_mut(row_len) {
        let max = lane_max(row);
        let inv = 1.0 / exp_and_sum(row, max, scale);
        for value in row.iter_mut() {
            *value *= inv;
        }
    }
}

/// In-place `softmax(scale * x)` over the last dimension of an f32 tensor.
struct ScaledSoftmaxInPlace {
    scale: f32,
}

impl InplaceOp1 for ScaledSoftmaxInPlace {
    fn name(&self) -> &'static str {
        "attend-scaled-softmax"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("scaled softmax: input must be contiguous");
        };
        let row_len = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("scaled softmax: only f32 is supported");
        };
        let data = &mut data[start..end];
        let rows = data.len() / row_len;
        let scale = self.scale;
        parallel_chunks_mut(data, rows, |_, piece| {
            pulp::Arch::new().dispatch(SoftmaxRows {
                piece,
                row_len,
                scale,
            });
        });
        Ok(())
    }
}

/// Replaces the f32 tensor `scores` (contiguous, owned by the caller) with
/// `softmax(scale * scores)` along its last dimension.
pub fn scaled_softmax_in_place(scores: &Tensor, scale: f32) -> Result<()> {
    if scores.dtype() != candle_core::DType::F32 || !scores.is_contiguous() {
        candle_core::bail!("scaled softmax: needs a contiguous f32 tensor");
    }
    scores.inplace_op1(&ScaledSoftmaxInPlace { scale })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn scaled_softmax_matches_candle() {
        let device = Device::Cpu;
        let scores = Tensor::randn(0f32, 4.0, (3, 5, 77), &device).unwrap();
        let expected = candle_nn::ops::softmax_last_dim(&(&scores * 0.3).unwrap()).unwrap();
        let actual = scores.copy().unwrap();
        scaled_softmax_in_place(&actual, 0.3).unwrap();
        assert!(max_abs_diff(&actual, &expected) < 1e-6);
    }
}
