//! CPU kernels for the channels-last (`[batch, h, w, channels]`) UNet and VAE: im2col for
//! convolutions, group norm (+ SiLU), nearest upsampling, an in-place scaled softmax and GEGLU.
//!
//! They are candle custom ops over `CpuStorage`, so they run on the CPU device only. Large
//! tensors are split over the machine's cores with scoped (named) threads; small ones run inline.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, InplaceOp1, Layout, Result, Shape, Tensor, WithDType};

/// Below this many elements of work a kernel runs on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

fn worker_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    // The same count candle's own CPU kernels use (`RAYON_NUM_THREADS`, else the available cores).
    *COUNT.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// Runs `work` on every item of `items`, spread over up to `worker_count()` threads (the calling
/// thread included) that take items from a shared queue; if a thread cannot be started, the others
/// simply take its share.
fn run_queue<I: Send>(items: Vec<I>, work: impl Fn(I) + Sync) {
    let workers = worker_count().min(items.len());
    if workers <= 1 {
        items.into_iter().for_each(work);
        return;
    }
    let queue = std::sync::Mutex::new(items);
    let next = || {
        queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
    };
    let drain = || {
        while let Some(item) = next() {
            work(item);
        }
    };
    std::thread::scope(|scope| {
        let drain = &drain;
        let handles: Vec<_> = (1..workers)
            .filter_map(|_| {
                std::thread::Builder::new()
                    .name("attend-kernel".to_string())
                    .spawn_scoped(scope, drain)
                    .ok()
            })
            .collect();
        drain();
        for handle in handles {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
}

/// How many pieces to cut `units` of `unit_cost` elements into (1 = run inline).
fn piece_count(units: usize, unit_cost: usize) -> usize {
    if worker_count() <= 1 || units.saturating_mul(unit_cost) < PARALLEL_MIN_ELEMENTS {
        1
    } else {
        (2 * worker_count()).min(units).max(1)
    }
}

/// Splits `0..units` into contiguous ranges, runs `job` on each (in parallel when `units *
/// unit_cost` is large enough) and returns the results in range order.
fn parallel_ranges<R: Send>(
    units: usize,
    unit_cost: usize,
    job: impl Fn(Range<usize>) -> R + Sync,
) -> Vec<R> {
    let pieces = piece_count(units, unit_cost);
    if pieces <= 1 {
        return vec![job(0..units)];
    }
    let per_piece = units.div_ceil(pieces);
    parallel_map(pieces, true, |index| {
        job((index * per_piece).min(units)..((index + 1) * per_piece).min(units))
    })
}

/// Runs `job(index)` for every index in `0..count`, on up to `worker_count()` threads when
/// `parallel`, and returns the results in index order.
pub fn parallel_map<R: Send>(
    count: usize,
    parallel: bool,
    job: impl Fn(usize) -> R + Sync,
) -> Vec<R> {
    if !parallel || count <= 1 || worker_count() <= 1 {
        return (0..count).map(job).collect();
    }
    let slots: Vec<std::sync::Mutex<Option<R>>> =
        (0..count).map(|_| std::sync::Mutex::new(None)).collect();
    // Reversed so that the queue (popped from the back) hands out low indices first.
    run_queue((0..count).rev().collect(), |index| {
        let result = job(index);
        *slots[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(result);
    });
    slots
        .into_iter()
        .filter_map(|slot| {
            slot.into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        })
        .collect()
}

/// Declares an element-wise kernel whose loops are compiled once per vector instruction level
/// (AVX-512, AVX2+FMA, ...), the level picked at run time: `simd_kernel!(Name<'a> { field: Type, ..
/// } => body)` makes a struct; `pulp::Arch::new().dispatch(Name { .. })` runs `body` (with the
/// fields bound by name) inside a function with the level's target features. Everything `body`
/// calls must be `#[inline(always)]` to be vectorised for the level. (A closure would not do: its
/// body is compiled on its own, for the baseline instruction set.)
macro_rules! simd_kernel {
    ($(#[$meta:meta])* $name:ident<$lt:lifetime> { $($field:ident: $ty:ty),* $(,)? } => $body:block) => {
        $(#[$meta])*
        struct $name<$lt> {
            $($field: $ty),*
        }

        impl<$lt> pulp::WithSimd for $name<$lt> {
            type Output = ();

            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, _simd: S) {
                let Self { $($field),* } = self;
                $body
            }
        }
    };
}

simd_kernel!(
    /// `softmax(scale * row)` in place for each `row_len` row of `piece`.
    SoftmaxRows<'data> { piece: &'data mut [f32], row_len: usize, scale: f32 } => {
        softmax_rows(piece, row_len, scale);
    }
);

simd_kernel!(
    /// `exp(scale * (row - max(row)))` in place for each `row_len` row of `piece`, each row's sum
    /// written to `sums` (the softmax without its division, which the caller applies later to
    /// fewer values).
    UnnormalisedSoftmaxRows<'data> {
        piece: &'data mut [f32], row_len: usize, scale: f32, sums: &'data mut [f32]
    } => {
        for (row, sum) in piece.chunks_exact_mut(row_len).zip(sums.iter_mut()) {
            let max = lane_max(row);
            *sum = exp_and_sum(row, max, scale);
        }
    }
);

simd_kernel!(
    /// GEGLU rows: `dst[r] = hidden * gelu(gate)` for `src` rows `first..` (`[hidden | gate]`).
    GegluRows<'data> { dst: &'data mut [f32], src: &'data [f32], first: usize, inner: usize } => {
        let width = 2 * inner;
        for (offset, dst_row) in dst.chunks_exact_mut(inner).enumerate() {
            let row = &src[(first + offset) * width..(first + offset + 1) * width];
            let (hidden, gate) = row.split_at(inner);
            for ((d, &h), &g) in dst_row.iter_mut().zip(hidden).zip(gate) {
                *d = h * gelu(g);
            }
        }
    }
);

simd_kernel!(
    /// Group norm's affine step per pixel, `y = x * scale + shift`, then SiLU when `silu_after`.
    NormalizePixels<'data> {
        dst: &'data mut [f32],
        src: &'data [f32],
        scale: &'data [f32],
        shift: &'data [f32],
        silu_after: bool,
    } => {
        let channels = scale.len();
        for (dst_pixel, src_pixel) in dst.chunks_exact_mut(channels).zip(src.chunks_exact(channels)) {
            for (((d, &v), &s), &t) in dst_pixel.iter_mut().zip(src_pixel).zip(scale).zip(shift) {
                let y = v * s + t;
                *d = if silu_after { silu(y) } else { y };
            }
        }
    }
);

/// Splits `data` (made of `units` equal units) into pieces and runs `job(first_unit, piece)` on
/// each, in parallel when `data` is large enough.
fn parallel_chunks_mut<T: Send>(
    data: &mut [T],
    units: usize,
    job: impl Fn(usize, &mut [T]) + Sync,
) {
    let unit_len = data.len().checked_div(units).unwrap_or(0);
    let pieces = piece_count(units, unit_len);
    if pieces <= 1 || unit_len == 0 {
        job(0, data);
        return;
    }
    let per_piece = units.div_ceil(pieces);
    let items: Vec<(usize, &mut [T])> = data
        .chunks_mut(per_piece * unit_len)
        .enumerate()
        .map(|(index, piece)| (index * per_piece, piece))
        .collect();
    run_queue(items, |(first_unit, piece)| job(first_unit, piece));
}

/// `e^x` for f32 (Cephes' `expf` polynomial, about 2 ulp), written branch-free so loops vectorise.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let x = x.clamp(-87.0, 88.0);
    // `shifted`'s low mantissa bits hold round(x * log2 e) + 2^22 (no float -> int cast, whose
    // saturating semantics would keep the loop scalar).
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    // (2^22 + n + 127) << 23 keeps just the biased exponent n + 127 (1..=254 after the clamp).
    let bits = shifted.to_bits().wrapping_add(127) << 23;
    y * f32::from_bits(bits)
}

/// `erf(x)` to within 1.5e-7 (Abramowitz & Stegun 7.1.26), branch-free.
#[inline(always)]
pub fn fast_erf(x: f32) -> f32 {
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    sign * (1.0 - poly * fast_exp(-a * a))
}

/// `x * sigmoid(x)`.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + fast_exp(-x))
}

/// `x * Phi(x)` with the exact (erf) normal CDF, as `torch.nn.functional.gelu`.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

fn contiguous_slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// im2col for a channels-last image: each output pixel's `k x k x c` patch as one row, in
/// `(kh, kw, c)` order, for output rows `rows` of every batch item flattened as `batch * out_h`.
struct Im2Col {
    kernel: usize,
    stride: usize,
    pad_before: usize,
    pad_after: usize,
    /// Range over `batch * out_h` (row `r` is batch `r / out_h`, output row `r % out_h`).
    rows: Range<usize>,
}

impl Im2Col {
    fn output_size(&self, size: usize) -> usize {
        (size + self.pad_before + self.pad_after - self.kernel) / self.stride + 1
    }

    fn run<T: WithDType>(&self, src: &[T], dims: (usize, usize, usize, usize)) -> Vec<T> {
        let (_, height, width, channels) = dims;
        let (out_h, out_w) = (self.output_size(height), self.output_size(width));
        let patch = self.kernel * self.kernel * channels;
        let row_len = out_w * patch;
        let row_count = self.rows.len();
        let first_row = self.rows.start;
        let fill = |first: usize, piece: &mut [T]| {
            for (offset, dst_row) in piece.chunks_mut(row_len).enumerate() {
                let flat_row = first_row + first + offset;
                let (batch, out_y) = (flat_row / out_h, flat_row % out_h);
                let image = &src
                    [batch * height * width * channels..(batch + 1) * height * width * channels];
                for (out_x, dst_patch) in dst_row.chunks_mut(patch).enumerate() {
                    for kh in 0..self.kernel {
                        let in_y = (out_y * self.stride + kh) as isize - self.pad_before as isize;
                        for kw in 0..self.kernel {
                            let in_x =
                                (out_x * self.stride + kw) as isize - self.pad_before as isize;
                            let dst =
                                &mut dst_patch[(kh * self.kernel + kw) * channels..][..channels];
                            if in_y >= 0
                                && (in_y as usize) < height
                                && in_x >= 0
                                && (in_x as usize) < width
                            {
                                let start = (in_y as usize * width + in_x as usize) * channels;
                                dst.copy_from_slice(&image[start..start + channels]);
                            }
                        }
                    }
                }
            }
        };
        // Zeroed pieces: padding positions are skipped below and stay zero.
        parallel_filled(row_count * row_len, row_count, fill)
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "attend-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims4()?;
        let (_, height, width, channels) = dims;
        let out_w = self.output_size(width);
        let _ = height;
        let shape = Shape::from_dims(&[
            self.rows.len() * out_w,
            self.kernel * self.kernel * channels,
        ]);
        let out = match storage {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.run(contiguous_slice::<f32>(storage, layout, "im2col")?, dims))
            }
            CpuStorage::F16(_) => {
                CpuStorage::F16(self.run(contiguous_slice(storage, layout, "im2col")?, dims))
            }
            CpuStorage::BF16(_) => {
                CpuStorage::BF16(self.run(contiguous_slice(storage, layout, "im2col")?, dims))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.run(contiguous_slice(storage, layout, "im2col")?, dims))
            }
            _ => candle_core::bail!("im2col: unsupported dtype {:?}", layout.shape()),
        };
        Ok((out, shape))
    }
}

/// Geometry of a channels-last convolution's patch extraction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchGeometry {
    /// Square kernel side.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding before (top, left).
    pub pad_before: usize,
    /// Zero padding after (bottom, right).
    pub pad_after: usize,
}

impl PatchGeometry {
    /// Output side for an input side.
    pub fn output_size(&self, size: usize) -> usize {
        (size + self.pad_before + self.pad_after).saturating_sub(self.kernel) / self.stride + 1
    }
}

/// Patches of `xs` `[batch, h, w, c]` for flattened output rows `rows` (over `batch * out_h`):
/// `[rows.len() * out_w, k * k * c]`, columns in `(kh, kw, c)` order.
pub fn im2col(xs: &Tensor, geometry: PatchGeometry, rows: Range<usize>) -> Result<Tensor> {
    let (_, height, width, _) = xs.dims4()?;
    if height + geometry.pad_before + geometry.pad_after < geometry.kernel
        || width + geometry.pad_before + geometry.pad_after < geometry.kernel
    {
        candle_core::bail!(
            "im2col: {height}x{width} input is smaller than the {} kernel",
            geometry.kernel
        );
    }
    let xs = xs.contiguous()?;
    xs.apply_op1_no_bwd(&Im2Col {
        kernel: geometry.kernel,
        stride: geometry.stride,
        pad_before: geometry.pad_before,
        pad_after: geometry.pad_after,
        rows,
    })
}

/// Group norm over channels-last data with per-channel affine, optionally followed by SiLU.
struct GroupNormOp {
    groups: usize,
    eps: f64,
    weight: Vec<f32>,
    bias: Vec<f32>,
    silu: bool,
}

impl GroupNormOp {
    fn run(&self, src: &[f32], batch: usize) -> Vec<f32> {
        let channels = self.weight.len();
        let per_group = channels / self.groups;
        let pixels = src.len() / (batch * channels);
        // Per item: the affine step's per-channel scale and shift.
        let mut affine = Vec::with_capacity(batch);
        for item in 0..batch {
            let image = &src[item * pixels * channels..(item + 1) * pixels * channels];
            // Per-channel sums in f64 over pixel ranges, merged afterwards.
            let partials = parallel_ranges(pixels, channels, |range| {
                let mut sum = vec![0f64; channels];
                let mut sum_sq = vec![0f64; channels];
                for pixel in
                    image[range.start * channels..range.end * channels].chunks_exact(channels)
                {
                    for ((s, q), &v) in sum.iter_mut().zip(sum_sq.iter_mut()).zip(pixel) {
                        let v = f64::from(v);
                        *s += v;
                        *q += v * v;
                    }
                }
                (sum, sum_sq)
            });
            let mut scale = vec![0f32; channels];
            let mut shift = vec![0f32; channels];
            let count = (pixels * per_group) as f64;
            for group in 0..self.groups {
                let channel_range = group * per_group..(group + 1) * per_group;
                let (mut total, mut total_sq) = (0f64, 0f64);
                for (sum, sum_sq) in &partials {
                    total += sum[channel_range.clone()].iter().sum::<f64>();
                    total_sq += sum_sq[channel_range.clone()].iter().sum::<f64>();
                }
                let mean = total / count;
                let variance = (total_sq / count - mean * mean).max(0.0);
                let inv_std = 1.0 / (variance + self.eps).sqrt();
                for channel in channel_range {
                    let s = inv_std * f64::from(self.weight[channel]);
                    scale[channel] = s as f32;
                    shift[channel] = (f64::from(self.bias[channel]) - mean * s) as f32;
                }
            }
            affine.push((scale, shift));
        }
        parallel_filled(src.len(), batch * pixels, |first_pixel, piece| {
            // A piece may span items: normalise each item's part with its own statistics.
            let mut pixel = first_pixel;
            let mut rest = piece;
            while !rest.is_empty() {
                let item = pixel / pixels.max(1);
                let count = (pixels - pixel % pixels).min(rest.len() / channels);
                let (part, tail) = std::mem::take(&mut rest).split_at_mut(count * channels);
                let (scale, shift) = &affine[item];
                let source = &src[pixel * channels..][..part.len()];
                pulp::Arch::new().dispatch(NormalizePixels {
                    dst: part,
                    src: source,
                    scale,
                    shift,
                    silu_after: self.silu,
                });
                pixel += count;
                rest = tail;
            }
        })
    }
}

impl CustomOp1 for GroupNormOp {
    fn name(&self) -> &'static str {
        "attend-group-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let batch = dims.first().copied().unwrap_or(1);
        let src = contiguous_slice::<f32>(storage, layout, "group norm")?;
        Ok((
            CpuStorage::F32(self.run(src, batch)),
            layout.shape().clone(),
        ))
    }
}

/// Group norm of channels-last `xs` `[batch, ..., channels]` with `weight`/`bias` `[channels]`,
/// then SiLU when `silu`. Statistics in f64; computed in f32 and returned in `xs`' dtype.
pub fn group_norm(
    xs: &Tensor,
    groups: usize,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
    silu: bool,
) -> Result<Tensor> {
    let channels = xs.dim(xs.rank() - 1)?;
    if groups == 0 || channels % groups != 0 {
        candle_core::bail!("group norm: {channels} channels do not split into {groups} groups");
    }
    let dtype = xs.dtype();
    let op = GroupNormOp {
        groups,
        eps,
        weight: weight.to_dtype(candle_core::DType::F32)?.to_vec1()?,
        bias: bias.to_dtype(candle_core::DType::F32)?.to_vec1()?,
        silu,
    };
    xs.to_dtype(candle_core::DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&op)?
        .to_dtype(dtype)
}

simd_kernel!(
    /// Layer norm of each `weight.len()`-wide row of `src` into `dst`: two passes in f32 lanes
    /// (mean, then the mean squared deviation), then `(v - mean) / sqrt(var + eps) * w + b`.
    LayerNormRows<'data> {
        dst: &'data mut [f32],
        src: &'data [f32],
        weight: &'data [f32],
        bias: &'data [f32],
        eps: f32,
    } => {
        let width = weight.len();
        let inverse_width = 1.0 / width as f32;
        for (dst_row, row) in dst.chunks_exact_mut(width).zip(src.chunks_exact(width)) {
            let mean = lane_sum(row, |v| v) * inverse_width;
            let variance = lane_sum(row, |v| (v - mean) * (v - mean)) * inverse_width;
            let inverse_std = 1.0 / (variance + eps).sqrt();
            for (((d, &v), &w), &b) in dst_row.iter_mut().zip(row).zip(weight).zip(bias) {
                *d = (v - mean) * inverse_std * w + b;
            }
        }
    }
);

/// Layer norm over rows of channels-last f32 data with per-channel affine.
struct LayerNormOp {
    eps: f32,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl CustomOp1 for LayerNormOp {
    fn name(&self) -> &'static str {
        "attend-layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let width = self.weight.len();
        let src = contiguous_slice::<f32>(storage, layout, "layer norm")?;
        if width == 0 || src.len() % width != 0 || self.bias.len() != width {
            candle_core::bail!(
                "layer norm: {:?} does not end in the {width} channels of the weight",
                layout.shape().dims()
            );
        }
        let rows = src.len() / width;
        let out = parallel_filled(src.len(), rows, |first, piece| {
            let source = &src[first * width..][..piece.len()];
            pulp::Arch::new().dispatch(LayerNormRows {
                dst: piece,
                src: source,
                weight: &self.weight,
                bias: &self.bias,
                eps: self.eps,
            });
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Layer norm of `xs` `[..., channels]` over its last dimension, with `weight`/`bias`
/// `[channels]` (statistics in f32, as torch computes them for f32 input); returned in `xs`' dtype.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let op = LayerNormOp {
        eps: eps as f32,
        weight: weight.to_dtype(candle_core::DType::F32)?.to_vec1()?,
        bias: bias.to_dtype(candle_core::DType::F32)?.to_vec1()?,
    };
    xs.to_dtype(candle_core::DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&op)?
        .to_dtype(xs.dtype())
}

/// Nearest-neighbour resize of channels-last data (torch `interpolate(mode="nearest")`:
/// source index `floor(dst * in / out)`).
struct UpsampleNearest {
    height: usize,
    width: usize,
}

impl UpsampleNearest {
    fn run<T: WithDType>(&self, src: &[T], dims: (usize, usize, usize, usize)) -> Vec<T> {
        let (batch, in_h, in_w, channels) = dims;
        let (out_h, out_w) = (self.height, self.width);
        let row_len = out_w * channels;
        parallel_filled(batch * out_h * row_len, batch * out_h, |first, piece| {
            for (offset, dst_row) in piece.chunks_mut(row_len).enumerate() {
                let flat = first + offset;
                let (item, y) = (flat / out_h, flat % out_h);
                let src_y = (y * in_h / out_h).min(in_h - 1);
                let src_row = &src[(item * in_h + src_y) * in_w * channels..][..in_w * channels];
                for (x, dst) in dst_row.chunks_mut(channels).enumerate() {
                    let src_x = (x * in_w / out_w).min(in_w - 1);
                    dst.copy_from_slice(&src_row[src_x * channels..(src_x + 1) * channels]);
                }
            }
        })
    }
}

impl CustomOp1 for UpsampleNearest {
    fn name(&self) -> &'static str {
        "attend-upsample-nearest"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims4()?;
        let shape = Shape::from_dims(&[dims.0, self.height, self.width, dims.3]);
        let out = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(
                self.run(contiguous_slice::<f32>(storage, layout, "upsample")?, dims),
            ),
            CpuStorage::F16(_) => {
                CpuStorage::F16(self.run(contiguous_slice(storage, layout, "upsample")?, dims))
            }
            CpuStorage::BF16(_) => {
                CpuStorage::BF16(self.run(contiguous_slice(storage, layout, "upsample")?, dims))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.run(contiguous_slice(storage, layout, "upsample")?, dims))
            }
            _ => candle_core::bail!("upsample: unsupported dtype"),
        };
        Ok((out, shape))
    }
}

/// Nearest upsampling of `xs` `[batch, h, w, c]` to `[batch, height, width, c]`.
pub fn upsample_nearest(xs: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (_, in_h, in_w, _) = xs.dims4()?;
    if in_h == 0 || in_w == 0 {
        candle_core::bail!("upsample: empty input");
    }
    xs.contiguous()?
        .apply_op1_no_bwd(&UpsampleNearest { height, width })
}

/// Maximum of a slice, in 8 independent lanes so the loop vectorises.
#[inline(always)]
fn lane_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; REDUCTION_LANES];
    let mut chunks = values.chunks_exact(REDUCTION_LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    lanes.iter().copied().fold(tail, f32::max)
}

/// The sum of `f(v)` over `values`, in [`REDUCTION_LANES`] lanes so the loop vectorises.
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; REDUCTION_LANES];
    let mut chunks = values.chunks_exact(REDUCTION_LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Independent accumulators of the row reductions: four AVX-512 registers, so the loops are not
/// bound by the latency of one register's chain of adds.
const REDUCTION_LANES: usize = 64;

/// Replaces each value `v` of `row` by `exp(scale * (v - max))` and returns their sum (in
/// [`REDUCTION_LANES`] lanes, so the loop vectorises).
#[inline(always)]
fn exp_and_sum(row: &mut [f32], max: f32, scale: f32) -> f32 {
    let mut lanes = [0f32; REDUCTION_LANES];
    let mut chunks = row.chunks_exact_mut(REDUCTION_LANES);
    for chunk in &mut chunks {
        for (lane, value) in lanes.iter_mut().zip(chunk.iter_mut()) {
            *value = fast_exp((*value - max) * scale);
            *lane += *value;
        }
    }
    let mut tail = 0.0;
    for value in chunks.into_remainder() {
        *value = fast_exp((*value - max) * scale);
        tail += *value;
    }
    lanes.iter().sum::<f32>() + tail
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

/// A read-only f32 matrix inside a slice, rows `row_stride` apart, columns adjacent (for
/// [`gemm_single_thread`]).
#[derive(Clone, Copy)]
struct MatrixView<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a> MatrixView<'a> {
    /// `rows x cols` starting at `data[offset]`, rows `row_stride` apart.
    fn new(
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
trait GemmDestination {
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
fn gemm_single_thread<D: GemmDestination + ?Sized>(
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
fn gemm_uninit<'d>(
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

/// Score elements (`queries x keys`) one attention block keeps at once (2 MiB, about one core's
/// L2 cache; 128 queries at 4096 keys). Measured on the SD 1.5 64x64 self-attention: 64 Ki
/// elements 311 ms, 256 Ki 241 ms, 512 Ki 221 ms, 1 Mi 218 ms per layer.
const ATTENTION_BLOCK_SCORES: usize = 512 * 1024;

/// Query rows per attention block: [`ATTENTION_BLOCK_SCORES`] scores, at least 8 rows.
fn attention_block_rows(queries: usize, keys: usize) -> usize {
    (ATTENTION_BLOCK_SCORES / keys.max(1)).clamp(8, queries.max(8))
}

/// Fused multi-head attention `softmax(scale * q k^T) v` for f32 activations, without head
/// split/merge copies: blocks of queries (with all their heads) are spread over the cores and each
/// block runs its two products single-threaded on strided head views, with the block's scores
/// kept cache-sized.
struct FusedAttention<'a> {
    /// `[batch, queries, heads * d]`.
    query: &'a [f32],
    /// `[batch * heads, d, keys]`.
    key_t: &'a [f32],
    /// `[batch, keys, heads * d]`.
    value: &'a [f32],
    batch: usize,
    queries: usize,
    keys: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
}

impl FusedAttention<'_> {
    fn inner(&self) -> usize {
        self.heads * self.head_dim
    }

    /// `[batch, queries, heads * d]`.
    fn run(&self) -> Result<Vec<f32>> {
        let (batch, queries, keys, inner) = (self.batch, self.queries, self.keys, self.inner());
        if self.key_t.len() != batch * inner * keys
            || self.value.len() != batch * keys * inner
            || self.query.len() != batch * queries * inner
        {
            candle_core::bail!("fused attention: inconsistent shapes");
        }
        let block_rows = attention_block_rows(queries, keys);
        let head_dim = self.head_dim;
        // One unit per (item, head): its keys and values stay in the core's cache while all its
        // query blocks pass; each unit returns its `[queries, d]` result.
        let units = parallel_map(batch * self.heads, batch * queries * keys >= 4096, |unit| {
            let mut scores = vec![0f32; block_rows.min(queries) * keys];
            let mut sums = vec![0f32; block_rows.min(queries)];
            let mut local = vec![0f32; queries * head_dim];
            let (item, head) = (unit / self.heads, unit % self.heads);
            // The head's values as a contiguous `[keys, d]` (read once per query block).
            let value: Vec<f32> = self.value[item * keys * inner..][..keys * inner]
                .chunks_exact(inner)
                .flat_map(|row| &row[head * head_dim..][..head_dim])
                .copied()
                .collect();
            for_each_block(0, queries, queries, block_rows, |first, rows, _| {
                let block = Block {
                    first,
                    rows,
                    scores: &mut scores[..rows * keys],
                    sums: &mut sums[..rows],
                };
                self.block(item, head, &value, block, &mut local)
            })?;
            Ok::<_, candle_core::Error>(local)
        });
        let units = units.into_iter().collect::<Result<Vec<_>>>()?;
        // Rows `(item, query)` gather each head's `d` outputs from its unit.
        Ok(parallel_filled(
            batch * queries * inner,
            batch * queries,
            |first, piece| {
                for (offset, dst) in piece.chunks_exact_mut(inner).enumerate() {
                    let (item, query) = ((first + offset) / queries, (first + offset) % queries);
                    for (head, dst_head) in dst.chunks_exact_mut(head_dim).enumerate() {
                        let local = &units[item * self.heads + head];
                        dst_head.copy_from_slice(&local[query * head_dim..][..head_dim]);
                    }
                }
            },
        ))
    }

    /// Queries `block.first..block.first + block.rows` of batch item `item`, head `head`, whose
    /// values are `value` (`[keys, d]`): written to the same rows of `local` (`[queries, d]`).
    fn block(
        &self,
        item: usize,
        head: usize,
        value: &[f32],
        block: Block<'_>,
        local: &mut [f32],
    ) -> Result<()> {
        let (keys, inner, head_dim) = (self.keys, self.inner(), self.head_dim);
        let Block {
            first,
            rows,
            scores,
            sums,
        } = block;
        let query = MatrixView::new(
            self.query,
            (item * self.queries + first) * inner + head * head_dim,
            (rows, head_dim),
            inner,
        );
        let key_t = MatrixView::new(
            self.key_t,
            (item * self.heads + head) * head_dim * keys,
            (head_dim, keys),
            keys,
        );
        gemm_single_thread(scores, 0, keys, query, key_t)?;
        pulp::Arch::new().dispatch(UnnormalisedSoftmaxRows {
            piece: scores,
            row_len: keys,
            scale: self.scale,
            sums,
        });
        let weights = MatrixView::new(scores, 0, (rows, keys), keys);
        let value = MatrixView::new(value, 0, (keys, head_dim), head_dim);
        gemm_single_thread(local, first * head_dim, head_dim, weights, value)?;
        // The softmax's division, applied to the `d` outputs of a row instead of its `keys` weights.
        let outputs = local[first * head_dim..(first + rows) * head_dim].chunks_exact_mut(head_dim);
        for (row, &sum) in outputs.zip(sums.iter()) {
            let inverse = 1.0 / sum;
            for value in row {
                *value *= inverse;
            }
        }
        Ok(())
    }
}

/// One block of queries of [`FusedAttention`] with its scratch space.
struct Block<'a> {
    first: usize,
    rows: usize,
    /// `[rows, keys]`.
    scores: &'a mut [f32],
    /// `[rows]`: the softmax denominators.
    sums: &'a mut [f32],
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

/// The f32 values of `xs` (contiguous), for the kernels below.
fn f32_operand(xs: &Tensor) -> Result<Tensor> {
    if !xs.device().is_cpu() {
        candle_core::bail!("attention kernels: CPU tensors only");
    }
    xs.to_dtype(candle_core::DType::F32)?.contiguous()
}

/// Runs `job` on the contiguous f32 values of `xs` (see [`f32_operand`]).
fn with_values<R>(xs: &Tensor, job: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = xs.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*storage else {
        candle_core::bail!("attention kernels: CPU tensors only");
    };
    job(contiguous_slice(storage, layout, "attention")?)
}

/// Runs `job` on the contiguous f32 values of `a` and `b` (converted as [`f32_operand`] does).
fn with_f32_pair<R>(
    a: &Tensor,
    b: &Tensor,
    job: impl FnOnce(&[f32], &[f32]) -> Result<R>,
) -> Result<R> {
    let (a, b) = (f32_operand(a)?, f32_operand(b)?);
    with_values(&a, |a| with_values(&b, |b| job(a, b)))
}

/// Splits `rows` rows of a `[groups * group_rows, ...]` output into blocks of at most
/// `block_rows` that stay inside one group, calling `job(first_row_global, rows, row_in_piece)`.
fn for_each_block(
    first_row: usize,
    rows_here: usize,
    group_rows: usize,
    block_rows: usize,
    mut job: impl FnMut(usize, usize, usize) -> Result<()>,
) -> Result<()> {
    let mut row = 0;
    while row < rows_here {
        let within = (first_row + row) % group_rows.max(1);
        let rows = block_rows.min(rows_here - row).min(group_rows - within);
        job(first_row + row, rows, row)?;
        row += rows;
    }
    Ok(())
}

/// Collects the first error of jobs that run on several threads.
#[derive(Default)]
struct FirstError(std::sync::Mutex<Option<candle_core::Error>>);

impl FirstError {
    fn record(&self, result: Result<()>) {
        if let Err(error) = result {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_or_insert(error);
        }
    }

    fn into_result(self) -> Result<()> {
        match self
            .0
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// `slots` set to zero and handed back as values.
fn zeroed<T: WithDType>(slots: &mut [MaybeUninit<T>]) -> &mut [T] {
    slots.fill(MaybeUninit::new(T::zero()));
    #[allow(unsafe_code)]
    // SAFETY: every slot was initialised on the line above, and `MaybeUninit<T>` has the size,
    // alignment and layout of `T`.
    unsafe {
        &mut *(std::ptr::from_mut(slots) as *mut [T])
    }
}

/// A vector of `len` values whose slots `fill` hands out, cut into pieces, to the workers, each
/// piece passed through [`zeroed`] before a kernel writes it. `vec![zero; len]` would zero the
/// whole buffer on the calling thread while the other cores wait (about 5% of a UNet call at
/// 256 px); here each core zeroes the piece it is about to write, while it is in its cache.
///
/// # Safety
/// `fill` must pass every slot through [`zeroed`] (or otherwise initialise it) before it
/// returns, unless it panics.
#[allow(unsafe_code)]
unsafe fn filled_in_pieces<T: WithDType>(
    len: usize,
    fill: impl FnOnce(&mut [MaybeUninit<T>]),
) -> Vec<T> {
    let mut buffer = Vec::with_capacity(len);
    fill(&mut buffer.spare_capacity_mut()[..len]);
    // SAFETY: `fill` initialised all `len` slots (the caller's contract); a panic in it unwinds
    // past this line and drops the vector empty.
    unsafe {
        buffer.set_len(len);
    }
    buffer
}

/// A vector of `len` values (`units` equal units) made by `job(first_unit, piece)` over pieces of
/// whole units, as [`parallel_chunks_mut`] cuts them, each piece zeroed first by its worker (so
/// values a kernel skips, such as padding, are zero).
fn parallel_filled<T: WithDType>(
    len: usize,
    units: usize,
    job: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    #[allow(unsafe_code)]
    // SAFETY: `parallel_chunks_mut` hands every slot to exactly one job (its pieces cover the
    // slice, or the whole slice goes to one job), and each job zeroes its piece first.
    unsafe {
        filled_in_pieces(len, |slots| {
            parallel_chunks_mut(slots, units, |first, piece| job(first, zeroed(piece)));
        })
    }
}

/// Runs `job` on `slots`, which must hand all of them back initialised (for instance through
/// [`gemm_uninit`]); the returned slice is checked against `slots` by address and length. When
/// the job fails or hands back less, `slots` are zeroed and an error returned, so that `slots`
/// are initialised whatever happens.
fn initialise_piece(
    slots: &mut [MaybeUninit<f32>],
    job: impl for<'a> FnOnce(&'a mut [MaybeUninit<f32>]) -> Result<&'a mut [f32]>,
) -> Result<()> {
    let (start, len) = (slots.as_ptr().cast::<f32>(), slots.len());
    let result = job(&mut *slots).and_then(|values| {
        if std::ptr::eq(values.as_ptr(), start) && values.len() == len {
            Ok(())
        } else {
            candle_core::bail!(
                "kernel output: a piece of {len} values came back with {} initialised",
                values.len()
            )
        }
    });
    if result.is_err() {
        zeroed(slots);
    }
    result
}

/// A vector of `len` values cut into consecutive pieces `(tag, length)`, each made by
/// `job(tag, piece)`, which hands its piece back initialised (see [`initialise_piece`]), so nothing
/// is zeroed first. Slots past the last piece are zeroed. The pieces go to the cores from a queue
/// when `parallel`; returns the first error any piece met.
fn parallel_initialised(
    len: usize,
    pieces: &[(usize, usize)],
    parallel: bool,
    job: impl for<'a> Fn(usize, &'a mut [MaybeUninit<f32>]) -> Result<&'a mut [f32]> + Sync,
) -> Result<Vec<f32>> {
    let failure = FirstError::default();
    #[allow(unsafe_code)]
    // SAFETY: the pieces are consecutive cuts of the slots and whatever is left after the last one
    // is zeroed; `initialise_piece` leaves every piece initialised.
    let out = unsafe {
        filled_in_pieces(len, |slots| {
            let mut cut = Vec::with_capacity(pieces.len());
            let mut rest = slots;
            for &(tag, length) in pieces {
                let length = length.min(rest.len());
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut(length);
                cut.push((tag, piece));
                rest = tail;
            }
            zeroed(rest);
            let run = |(tag, piece): (usize, &mut [MaybeUninit<f32>])| {
                failure.record(initialise_piece(piece, |piece| job(tag, piece)));
            };
            if parallel && cut.len() > 1 {
                // Reversed: the queue hands out its last item first.
                cut.reverse();
                run_queue(cut, run);
            } else {
                cut.into_iter().for_each(run);
            }
        })
    };
    failure.into_result().map(|()| out)
}

/// A vector of `len` values made by `job(index, piece)` over consecutive pieces of `piece_len`
/// values (the last one shorter), queued to the cores when `len * cost_per_value` is large
/// enough: for products, whose GEMM writes every value (cost: the inner dimension).
fn parallel_pieces(
    len: usize,
    piece_len: usize,
    cost_per_value: usize,
    job: impl for<'a> Fn(usize, &'a mut [MaybeUninit<f32>]) -> Result<&'a mut [f32]> + Sync,
) -> Result<Vec<f32>> {
    let piece_len = piece_len.max(1);
    let pieces: Vec<_> = (0..len.div_ceil(piece_len))
        .map(|index| (index, piece_len.min(len - index * piece_len)))
        .collect();
    let parallel = len.saturating_mul(cost_per_value) >= PARALLEL_MIN_ELEMENTS;
    parallel_initialised(len, &pieces, parallel, job)
}

/// `planes` planes of `plane_len` values made by `job(first, pieces)`, where `pieces` holds the
/// same range of every plane (`first..first + piece_len`, the last range shorter), the ranges
/// spread over the cores and zeroed first by their worker.
fn parallel_filled_planes(
    planes: usize,
    plane_len: usize,
    piece_len: usize,
    job: impl Fn(usize, Vec<&mut [f32]>) + Sync,
) -> Vec<f32> {
    let piece_len = piece_len.max(1);
    #[allow(unsafe_code)]
    // SAFETY: the pieces, `piece_len` chunks of every `plane_len` chunk of the slots, cover all of
    // them, and each worker zeroes all of its pieces before its job sees them.
    unsafe {
        filled_in_pieces(planes * plane_len, |slots| {
            let mut items: Vec<(usize, Vec<&mut [MaybeUninit<f32>]>)> = (0..plane_len
                .div_ceil(piece_len))
                .map(|index| (index * piece_len, Vec::with_capacity(planes)))
                .collect();
            for plane in slots.chunks_mut(plane_len.max(1)) {
                for (item, piece) in items.iter_mut().zip(plane.chunks_mut(piece_len)) {
                    item.1.push(piece);
                }
            }
            run_queue(items, |(first, pieces)| {
                job(first, pieces.into_iter().map(zeroed).collect());
            });
        })
    }
}

/// A `[rows, row_len]` output made by `job(first_row, block)` over blocks of at most
/// `block_rows` rows that stay inside one group of `group_rows` rows, queued to the cores; each
/// job hands its block back initialised (see [`parallel_initialised`]).
fn parallel_row_blocks(
    rows: usize,
    row_len: usize,
    group_rows: usize,
    block_rows: usize,
    job: impl for<'a> Fn(usize, &'a mut [MaybeUninit<f32>]) -> Result<&'a mut [f32]> + Sync,
) -> Result<Vec<f32>> {
    let mut blocks = Vec::new();
    for_each_block(0, rows, group_rows, block_rows, |first, count, _| {
        blocks.push((first, count * row_len));
        Ok(())
    })?;
    let len = rows * row_len;
    parallel_initialised(len, &blocks, len >= PARALLEL_MIN_ELEMENTS, job)
}

/// Attention probabilities `softmax(scale * q k^T)` per head (f32): `query` `[batch, queries,
/// heads * d]`, `key_t` `[batch * heads, d, keys]` -> `[batch * heads, queries, keys]`. The
/// products run in cache-sized blocks spread over the cores (no head split copy of `query`).
pub fn attention_probabilities(
    query: &Tensor,
    key_t: &Tensor,
    heads: usize,
    scale: f32,
) -> Result<Tensor> {
    let (batch, queries, inner) = query.dims3()?;
    let (batch_heads, head_dim, keys) = key_t.dims3()?;
    check_heads(inner, heads)?;
    if batch_heads != batch * heads || head_dim * heads != inner {
        candle_core::bail!(
            "attention probabilities: query {:?} and key_t {:?} do not match {heads} heads",
            query.dims(),
            key_t.dims()
        );
    }
    let block_rows = attention_block_rows(queries, keys);
    let out = with_f32_pair(query, key_t, |query, key_t| {
        parallel_row_blocks(
            batch_heads * queries,
            keys,
            queries,
            block_rows,
            |global, slots| {
                let rows = slots.len() / keys.max(1);
                let (batch_head, query_index) = (global / queries, global % queries);
                let (item, head) = (batch_head / heads, batch_head % heads);
                let lhs = MatrixView::new(
                    query,
                    (item * queries + query_index) * inner + head * head_dim,
                    (rows, head_dim),
                    inner,
                );
                let rhs =
                    MatrixView::new(key_t, batch_head * head_dim * keys, (head_dim, keys), keys);
                let scores = gemm_uninit(slots, lhs, rhs)?;
                pulp::Arch::new().dispatch(SoftmaxRows {
                    piece: &mut *scores,
                    row_len: keys,
                    scale,
                });
                Ok(scores)
            },
        )
    })?;
    Tensor::from_vec(out, (batch_heads, queries, keys), query.device())
}

/// `probabilities v` per head, heads merged (f32 in, `value`'s dtype out): `probabilities`
/// `[batch * heads, queries, keys]`, `value` `[batch, keys, heads * d]` -> `[batch, queries,
/// heads * d]`, in blocks of queries spread over the cores (no head split/merge copies).
pub fn attend_probabilities(
    probabilities: &Tensor,
    value: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    let (batch_heads, queries, keys) = probabilities.dims3()?;
    let (batch, value_keys, inner) = value.dims3()?;
    check_heads(inner, heads)?;
    if batch_heads != batch * heads || value_keys != keys {
        candle_core::bail!(
            "attend probabilities: probabilities {:?} and value {:?} do not match {heads} heads",
            probabilities.dims(),
            value.dims()
        );
    }
    let head_dim = inner / heads;
    let block_rows = attention_block_rows(queries, keys);
    let out = with_f32_pair(probabilities, value, |probabilities, value| {
        parallel_row_blocks(
            batch * queries,
            inner,
            queries,
            block_rows,
            |global, slots| {
                let rows = slots.len() / inner.max(1);
                // Each head writes its own columns of the block.
                let block = zeroed(slots);
                let (item, query_index) = (global / queries, global % queries);
                for head in 0..heads {
                    let lhs = MatrixView::new(
                        probabilities,
                        ((item * heads + head) * queries + query_index) * keys,
                        (rows, keys),
                        keys,
                    );
                    let rhs = MatrixView::new(
                        value,
                        item * keys * inner + head * head_dim,
                        (keys, head_dim),
                        inner,
                    );
                    gemm_single_thread(&mut *block, head * head_dim, inner, lhs, rhs)?;
                }
                Ok(block)
            },
        )
    })?;
    Tensor::from_vec(out, (batch, queries, inner), value.device())?.to_dtype(value.dtype())
}

/// `softmax(scale * q k^T) v` over `heads` heads for f32 tensors: `query` `[batch, queries,
/// heads * d]`, `key_t` `[batch * heads, d, keys]` (see [`split_heads_transposed`]), `value`
/// `[batch, keys, heads * d]` -> `[batch, queries, heads * d]`. Scores are never materialised
/// beyond one cache-sized block per core.
pub fn fused_attention(
    query: &Tensor,
    key_t: &Tensor,
    value: &Tensor,
    heads: usize,
    scale: f32,
) -> Result<Tensor> {
    let (batch, queries, inner) = query.dims3()?;
    let (batch_heads, head_dim, keys) = key_t.dims3()?;
    check_heads(inner, heads)?;
    if batch_heads != batch * heads
        || head_dim * heads != inner
        || value.dims3()? != (batch, keys, inner)
    {
        candle_core::bail!(
            "fused attention: query {:?}, key_t {:?}, value {:?} do not match {heads} heads",
            query.dims(),
            key_t.dims(),
            value.dims()
        );
    }
    let (query_f32, key_t_f32, value_f32) = (
        f32_operand(query)?,
        f32_operand(key_t)?,
        f32_operand(value)?,
    );
    let out = with_values(&query_f32, |query| {
        with_values(&key_t_f32, |key_t| {
            with_values(&value_f32, |value| {
                FusedAttention {
                    query,
                    key_t,
                    value,
                    batch,
                    queries,
                    keys,
                    heads,
                    head_dim,
                    scale,
                }
                .run()
            })
        })
    })?;
    Tensor::from_vec(out, (batch, queries, inner), query.device())?.to_dtype(query.dtype())
}

/// The mean over the first dimension of an f32-convertible tensor: `[planes, ...]` -> `[...]`
/// (e.g. the head mean of attention probabilities), summed plane by plane in order with
/// contiguous, vectorised loops spread over the cores.
pub fn mean_of_planes(xs: &Tensor) -> Result<Tensor> {
    let dims = xs.dims();
    let Some((&planes, rest)) = dims.split_first() else {
        candle_core::bail!("mean of planes: a scalar has no planes");
    };
    if planes == 0 || !xs.device().is_cpu() {
        return xs.to_dtype(candle_core::DType::F32)?.mean(0);
    }
    let plane: usize = rest.iter().product();
    let values = f32_operand(xs)?;
    let inverse = 1.0 / planes as f32;
    let out = with_values(&values, |values| {
        Ok(parallel_filled(plane, plane, |first, piece: &mut [f32]| {
            for index in 0..planes {
                let src = &values[index * plane + first..][..piece.len()];
                for (sum, &v) in piece.iter_mut().zip(src) {
                    *sum += v;
                }
            }
            for sum in piece.iter_mut() {
                *sum *= inverse;
            }
        }))
    })?;
    Tensor::from_vec(out, rest, xs.device())
}

/// GEGLU: `[rows, 2 * inner]` -> `[rows, inner]`, `hidden * gelu(gate)` with `hidden` the first half.
struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "attend-geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let width = dims.last().copied().unwrap_or(0);
        if width % 2 != 0 {
            candle_core::bail!("geglu: odd last dimension {width}");
        }
        let inner = width / 2;
        let src = contiguous_slice::<f32>(storage, layout, "geglu")?;
        let rows = src.len() / width.max(1);
        let out = parallel_filled(rows * inner, rows, |first, piece| {
            pulp::Arch::new().dispatch(GegluRows {
                dst: piece,
                src,
                first,
                inner,
            });
        });
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = inner;
        }
        Ok((CpuStorage::F32(out), Shape::from_dims(&out_dims)))
    }
}

/// `[..., 2 * inner]` -> `[..., inner]`: first half times exact GELU of the second half (f32).
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    let dtype = projected.dtype();
    projected
        .to_dtype(candle_core::DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&Geglu)?
        .to_dtype(dtype)
}

/// Winograd F(2x2, 3x3) filter transform `U = G g G^T` of a 3x3 convolution weight given as the
/// im2col matrix `[3 * 3 * in, out]` (rows in `(kh, kw, in)` order): returns `[16, in, out]` (f32,
/// contiguous), one `in x out` right-hand factor per transform position.
///
/// Both layouts keep `out` innermost, so the transform streams nine `in x out` planes into sixteen
/// and the products read the result with contiguous rows (a transposed view would make the GEMM
/// gather it element by element).
pub fn winograd_filter(matrix: &Tensor) -> Result<Tensor> {
    let (rows, out_channels) = matrix.dims2()?;
    if rows % 9 != 0 {
        candle_core::bail!("winograd: a 3x3 weight matrix has 9 * in rows, got {rows}");
    }
    let in_channels = rows / 9;
    let plane = in_channels * out_channels;
    let matrix = matrix.to_dtype(candle_core::DType::F32)?.contiguous()?;
    let (storage, layout) = matrix.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*storage else {
        candle_core::bail!("winograd: CPU tensors only");
    };
    let values: &[f32] = contiguous_slice(storage, layout, "winograd filter")?;
    // Each piece is one range of plane elements, written at all 16 positions.
    let pieces = piece_count(plane, 25).max(1);
    let per_piece = plane.div_ceil(pieces).max(1);
    let transformed = parallel_filled_planes(16, plane, per_piece, |first, outputs| {
        let Ok(outputs) = <[&mut [f32]; 16]>::try_from(outputs) else {
            return;
        };
        let len = outputs[0].len();
        let inputs: [&[f32]; 9] =
            std::array::from_fn(|index| &values[index * plane + first..][..len]);
        pulp::Arch::new().dispatch(WinogradFilterPiece { inputs, outputs });
    });
    Tensor::from_vec(
        transformed,
        (16, in_channels, out_channels),
        matrix.device(),
    )
}

simd_kernel!(
    /// One range of the Winograd filter transform: the nine `(kh, kw)` planes' elements `inputs`
    /// -> the sixteen transform positions' elements `outputs` (all the same length).
    WinogradFilterPiece<'data> { inputs: [&'data [f32]; 9], outputs: [&'data mut [f32]; 16] } => {
        let len = outputs[0].len();
        const BLOCK: usize = 512;
        let mut rows = [[0f32; BLOCK]; 3];
        for start in (0..len).step_by(BLOCK) {
            let block = BLOCK.min(len - start);
            for r in 0..4 {
                // Row r of G g, for each kernel column j: rows[j] = sum_i G[r][i] g[i][j].
                for (j, row) in rows.iter_mut().enumerate() {
                    let [a, b, c] = [0, 1, 2].map(|i| &inputs[i * 3 + j][start..start + block]);
                    winograd_g_rows(r, &mut row[..block], a, b, c);
                }
                // (G g) G^T: column `column` of row r.
                let [a, b, c] = [&rows[0][..block], &rows[1][..block], &rows[2][..block]];
                for column in 0..4 {
                    let dst = &mut outputs[r * 4 + column][start..start + block];
                    winograd_g_rows(column, dst, a, b, c);
                }
            }
        }
    }
);

/// `dst = G[r] . (a, b, c)` element-wise (see [`winograd_g`]), with `r` fixed per loop.
#[inline(always)]
fn winograd_g_rows(r: usize, dst: &mut [f32], a: &[f32], b: &[f32], c: &[f32]) {
    #[inline(always)]
    fn rows<const R: usize>(dst: &mut [f32], a: &[f32], b: &[f32], c: &[f32]) {
        for (((d, &a), &b), &c) in dst.iter_mut().zip(a).zip(b).zip(c) {
            *d = winograd_g(R, a, b, c);
        }
    }
    match r {
        0 => rows::<0>(dst, a, b, c),
        1 => rows::<1>(dst, a, b, c),
        2 => rows::<2>(dst, a, b, c),
        _ => rows::<3>(dst, a, b, c),
    }
}

/// Row `r` of Winograd's `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]` applied to
/// `(a, b, c)`.
#[inline(always)]
fn winograd_g(r: usize, a: f32, b: f32, c: f32) -> f32 {
    match r {
        0 => a,
        1 => 0.5 * (a + b + c),
        2 => 0.5 * (a - b + c),
        _ => c,
    }
}

/// Winograd F(2x2, 3x3) input transform `V = B^T d B` of the 4x4 tiles (stride 2, padding 1)
/// covering tile rows `tile_rows`, counted over the whole batch (row `r` is batch item
/// `r / tiles_h`, tile row `r % tiles_h`): `[16, tile_rows.len() * tiles_w, c]`.
struct WinogradInput {
    tile_rows: Range<usize>,
}

impl WinogradInput {
    fn run(
        &self,
        src: &[f32],
        (_, height, width, channels): (usize, usize, usize, usize),
    ) -> Vec<f32> {
        let tiles_w = width.div_ceil(2);
        let tiles = self.tile_rows.len() * tiles_w;
        let plane = tiles * channels;
        if plane == 0 {
            return Vec::new();
        }
        // Pieces of whole tiles; each writes its tiles' rows of all 16 position planes.
        let pieces = piece_count(tiles, 16 * channels);
        let per_piece = tiles.div_ceil(pieces).max(1);
        parallel_filled_planes(16, plane, per_piece * channels, |first, outputs| {
            let Ok(outputs) = <[&mut [f32]; 16]>::try_from(outputs) else {
                return;
            };
            pulp::Arch::new().dispatch(WinogradInputTiles {
                src,
                geometry: [height, width, channels],
                first_tile: self.tile_rows.start * tiles_w + first / channels,
                outputs,
            });
        })
    }
}

simd_kernel!(
    /// Winograd input transform of consecutive tiles, counted over the batch from `first_tile`
    /// (`tile = batch_row * tiles_w + column`), written to the 16 position planes `outputs`
    /// (`[tiles, channels]` each). `src` is `[batch, height, width, channels]`.
    WinogradInputTiles<'data> {
        src: &'data [f32],
        geometry: [usize; 3],
        first_tile: usize,
        outputs: [&'data mut [f32]; 16],
    } => {
        let [height, width, channels] = geometry;
        let (tiles_h, tiles_w) = (height.div_ceil(2), width.div_ceil(2));
        let image_len = height * width * channels;
        let count = outputs[0].len() / channels.max(1);
        let zeros = vec![0f32; channels];
        let mut t = vec![0f32; 4 * channels];
        for local in 0..count {
            let tile = first_tile + local;
            let (batch_row, tile_col) = (tile / tiles_w, tile % tiles_w);
            let (item, tile_row) = (batch_row / tiles_h, batch_row % tiles_h);
            let image = &src[item * image_len..][..image_len];
            let pixel = |dy: usize, dx: usize| -> &[f32] {
                let (y, x) = (2 * tile_row + dy, 2 * tile_col + dx);
                if y == 0 || x == 0 || y > height || x > width {
                    &zeros
                } else {
                    &image[((y - 1) * width + x - 1) * channels..][..channels]
                }
            };
            for i in 0..4 {
                // Row i of B^T d, per tile column j: t[j] over channels.
                for (j, tj) in t.chunks_exact_mut(channels).enumerate() {
                    let (d0, d1, d2, d3) = (pixel(0, j), pixel(1, j), pixel(2, j), pixel(3, j));
                    winograd_b_rows(i, tj, d0, d1, d2, d3);
                }
                // (B^T d) B: column j of row i.
                let (t0, rest) = t.split_at(channels);
                let (t1, rest) = rest.split_at(channels);
                let (t2, t3) = rest.split_at(channels);
                for j in 0..4 {
                    let dst = &mut outputs[i * 4 + j][local * channels..][..channels];
                    winograd_b_rows(j, dst, t0, t1, t2, t3);
                }
            }
        }
    }
);

/// Row `r` of Winograd's `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`
/// applied element-wise: `dst = B^T[r] . (a, b, c, d)`, with `r` fixed per loop.
#[inline(always)]
fn winograd_b_rows(r: usize, dst: &mut [f32], a: &[f32], b: &[f32], c: &[f32], d: &[f32]) {
    #[inline(always)]
    fn rows<const R: usize>(dst: &mut [f32], a: &[f32], b: &[f32], c: &[f32], d: &[f32]) {
        for ((((out, &a), &b), &c), &d) in dst.iter_mut().zip(a).zip(b).zip(c).zip(d) {
            *out = match R {
                0 => a - c,
                1 => b + c,
                2 => c - b,
                _ => b - d,
            };
        }
    }
    match r {
        0 => rows::<0>(dst, a, b, c, d),
        1 => rows::<1>(dst, a, b, c, d),
        2 => rows::<2>(dst, a, b, c, d),
        _ => rows::<3>(dst, a, b, c, d),
    }
}

impl CustomOp1 for WinogradInput {
    fn name(&self) -> &'static str {
        "attend-winograd-input"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims4()?;
        let tiles = self.tile_rows.len() * dims.2.div_ceil(2);
        let src = contiguous_slice::<f32>(storage, layout, "winograd input")?;
        Ok((
            CpuStorage::F32(self.run(src, dims)),
            Shape::from_dims(&[16, tiles, dims.3]),
        ))
    }
}

/// Winograd F(2x2, 3x3) output transform `Y = A^T m A` plus bias: `[16, tiles, k]` for tile rows
/// `tile_rows` (counted over the batch, as in [`WinogradInput`]) -> their output rows in order,
/// `[rows, width, k]` (two per tile row, one for the last of an odd height).
struct WinogradOutput {
    tile_rows: Range<usize>,
    height: usize,
    width: usize,
    /// `[1, k]` (every item) or `[batch, k]` (one row per batch item).
    biases: Vec<f32>,
}

impl WinogradOutput {
    /// Per output row: (tile row within the chunk, row within the tile, batch item).
    fn out_rows(&self) -> Vec<(usize, usize, usize)> {
        let tiles_h = self.height.div_ceil(2);
        let mut rows = Vec::with_capacity(2 * self.tile_rows.len());
        for (local, batch_row) in self.tile_rows.clone().enumerate() {
            let (item, tile_row) = (batch_row / tiles_h, batch_row % tiles_h);
            for within in 0..2 {
                if 2 * tile_row + within < self.height {
                    rows.push((local, within, item));
                }
            }
        }
        rows
    }

    fn run(&self, src: &[f32], tiles: usize, channels: usize) -> Vec<f32> {
        let tiles_w = self.width.div_ceil(2);
        let rows = self.out_rows();
        let row_len = self.width * channels;
        let plane = tiles * channels;
        let bias_rows = self.biases.len() / channels.max(1);
        // Workers take whole output rows; each output row belongs to one tile row.
        let out = parallel_filled(rows.len() * row_len, rows.len(), |first, piece| {
            for (offset, dst_row) in piece.chunks_exact_mut(row_len).enumerate() {
                let (tile_row, within, item) = rows[first + offset];
                let bias =
                    &self.biases[if bias_rows > 1 { item } else { 0 } * channels..][..channels];
                for tile_col in 0..tiles_w {
                    let tile = tile_row * tiles_w + tile_col;
                    let m =
                        |position: usize| &src[position * plane + tile * channels..][..channels];
                    let planes: [&[f32]; 16] = std::array::from_fn(m);
                    for x_within in 0..2 {
                        let x = 2 * tile_col + x_within;
                        if x >= self.width {
                            continue;
                        }
                        let dst = &mut dst_row[x * channels..][..channels];
                        for (k, value) in dst.iter_mut().enumerate() {
                            let p = |i: usize, j: usize| planes[i * 4 + j][k];
                            // Row `within` of A^T m: [m0+m1+m2, m1-m2-m3] per column.
                            let row = |j: usize| {
                                if within == 0 {
                                    p(0, j) + p(1, j) + p(2, j)
                                } else {
                                    p(1, j) - p(2, j) - p(3, j)
                                }
                            };
                            let result = if x_within == 0 {
                                row(0) + row(1) + row(2)
                            } else {
                                row(1) - row(2) - row(3)
                            };
                            *value = result + bias[k];
                        }
                    }
                }
            }
        });
        out
    }
}

impl CustomOp1 for WinogradOutput {
    fn name(&self) -> &'static str {
        "attend-winograd-output"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (positions, tiles, channels) = layout.shape().dims3()?;
        if positions != 16 || channels == 0 || !self.biases.len().is_multiple_of(channels) {
            candle_core::bail!("winograd output: unexpected shape {:?}", layout.shape());
        }
        let src = contiguous_slice::<f32>(storage, layout, "winograd output")?;
        Ok((
            CpuStorage::F32(self.run(src, tiles, channels)),
            Shape::from_dims(&[self.out_rows().len(), self.width, channels]),
        ))
    }
}

/// Winograd tiles of tile rows `tile_rows` of `xs` `[batch, h, w, c]` (f32), the rows counted over
/// the whole batch (`batch * ceil(h / 2)` of them; one chunk may span items): `[16, tiles, c]`.
pub fn winograd_input(xs: &Tensor, tile_rows: Range<usize>) -> Result<Tensor> {
    xs.contiguous()?
        .apply_op1_no_bwd(&WinogradInput { tile_rows })
}

/// Output rows of tile rows `tile_rows` (counted as in [`winograd_input`]) from the transformed
/// products `m` `[16, tiles, k]` (f32): `[rows, width, k]` with `biases` added, given as `k`
/// values for every item or `batch * k` values (one row per item).
pub fn winograd_output(
    m: &Tensor,
    tile_rows: Range<usize>,
    height: usize,
    width: usize,
    biases: Vec<f32>,
) -> Result<Tensor> {
    m.contiguous()?.apply_op1_no_bwd(&WinogradOutput {
        tile_rows,
        height,
        width,
        biases,
    })
}

/// Rearranges attention heads between `[batch, n, heads * head_dim]` and per-head layouts.
#[derive(Clone, Copy)]
enum HeadLayout {
    /// `[batch, n, heads * head_dim]` -> `[batch * heads, n, head_dim]`.
    Split,
    /// `[batch, n, heads * head_dim]` -> `[batch * heads, head_dim, n]`.
    SplitTransposed,
    /// `[batch * heads, n, head_dim]` -> `[batch, n, heads * head_dim]`.
    Merge,
}

struct Heads {
    heads: usize,
    layout: HeadLayout,
}

impl Heads {
    fn run<T: WithDType>(&self, src: &[T], dims: (usize, usize, usize)) -> (Vec<T>, Vec<usize>) {
        let heads = self.heads;
        match self.layout {
            HeadLayout::Split => {
                let (batch, tokens, inner) = dims;
                let head_dim = inner / heads;
                // Output rows are (batch, head, token); each copies one head_dim run.
                let out = parallel_filled(src.len(), batch * heads * tokens, |first, piece| {
                    for (offset, dst) in piece.chunks_exact_mut(head_dim).enumerate() {
                        let row = first + offset;
                        let (item_head, token) = (row / tokens, row % tokens);
                        let (item, head) = (item_head / heads, item_head % heads);
                        dst.copy_from_slice(
                            &src[(item * tokens + token) * inner + head * head_dim..][..head_dim],
                        );
                    }
                });
                (out, vec![batch * heads, tokens, head_dim])
            }
            HeadLayout::SplitTransposed => {
                let (batch, tokens, inner) = dims;
                let head_dim = inner / heads;
                // Output rows are (batch, head, j); each gathers one value per token.
                let out = parallel_filled(src.len(), batch * heads * head_dim, |first, piece| {
                    for (offset, dst) in piece.chunks_exact_mut(tokens).enumerate() {
                        let row = first + offset;
                        let (item_head, j) = (row / head_dim, row % head_dim);
                        let (item, head) = (item_head / heads, item_head % heads);
                        let base = item * tokens * inner + head * head_dim + j;
                        for (token, d) in dst.iter_mut().enumerate() {
                            *d = src[base + token * inner];
                        }
                    }
                });
                (out, vec![batch * heads, head_dim, tokens])
            }
            HeadLayout::Merge => {
                let (batch_heads, tokens, head_dim) = dims;
                let batch = batch_heads / heads;
                let inner = heads * head_dim;
                // Output rows are (batch, token); each gathers `heads` runs.
                let out = parallel_filled(src.len(), batch * tokens, |first, piece| {
                    for (offset, dst) in piece.chunks_exact_mut(inner).enumerate() {
                        let row = first + offset;
                        let (item, token) = (row / tokens, row % tokens);
                        for (head, dst_head) in dst.chunks_exact_mut(head_dim).enumerate() {
                            let start = ((item * heads + head) * tokens + token) * head_dim;
                            dst_head.copy_from_slice(&src[start..start + head_dim]);
                        }
                    }
                });
                (out, vec![batch, tokens, inner])
            }
        }
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "attend-heads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims3()?;
        let (out, shape) = match storage {
            CpuStorage::F32(_) => {
                let (v, s) = self.run(contiguous_slice::<f32>(storage, layout, "heads")?, dims);
                (CpuStorage::F32(v), s)
            }
            CpuStorage::F16(_) => {
                let (v, s) = self.run(contiguous_slice(storage, layout, "heads")?, dims);
                (CpuStorage::F16(v), s)
            }
            CpuStorage::BF16(_) => {
                let (v, s) = self.run(contiguous_slice(storage, layout, "heads")?, dims);
                (CpuStorage::BF16(v), s)
            }
            CpuStorage::F64(_) => {
                let (v, s) = self.run(contiguous_slice(storage, layout, "heads")?, dims);
                (CpuStorage::F64(v), s)
            }
            _ => candle_core::bail!("heads: unsupported dtype"),
        };
        Ok((out, Shape::from_dims(&shape)))
    }
}

fn check_heads(inner: usize, heads: usize) -> Result<()> {
    if heads == 0 || !inner.is_multiple_of(heads) {
        candle_core::bail!("attention: width {inner} does not split into {heads} heads");
    }
    Ok(())
}

/// `[batch, n, heads * head_dim]` -> `[batch * heads, n, head_dim]` (contiguous).
pub fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    check_heads(xs.dim(2)?, heads)?;
    xs.contiguous()?.apply_op1_no_bwd(&Heads {
        heads,
        layout: HeadLayout::Split,
    })
}

/// `[batch, n, heads * head_dim]` -> `[batch * heads, head_dim, n]` (contiguous; keys for `q k^T`).
pub fn split_heads_transposed(xs: &Tensor, heads: usize) -> Result<Tensor> {
    check_heads(xs.dim(2)?, heads)?;
    xs.contiguous()?.apply_op1_no_bwd(&Heads {
        heads,
        layout: HeadLayout::SplitTransposed,
    })
}

/// `[batch * heads, n, head_dim]` -> `[batch, n, heads * head_dim]` (contiguous).
pub fn merge_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    if heads == 0 || xs.dim(0)? % heads != 0 {
        candle_core::bail!(
            "attention: {} rows do not hold whole groups of {heads} heads",
            xs.dim(0)?
        );
    }
    xs.contiguous()?.apply_op1_no_bwd(&Heads {
        heads,
        layout: HeadLayout::Merge,
    })
}

/// Adds `bias` (`[..., n]` last-dimension values) in place to a contiguous f32 tensor the caller owns.
struct AddBiasInPlace<'a> {
    bias: &'a [f32],
}

impl InplaceOp1 for AddBiasInPlace<'_> {
    fn name(&self) -> &'static str {
        "attend-add-bias"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("add bias: tensor must be contiguous");
        };
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("add bias: only f32 is supported");
        };
        let width = self.bias.len().max(1);
        let data = &mut data[start..end];
        let rows = data.len() / width;
        parallel_chunks_mut(data, rows, |_, piece| {
            for row in piece.chunks_exact_mut(width) {
                for (value, &b) in row.iter_mut().zip(self.bias) {
                    *value += b;
                }
            }
        });
        Ok(())
    }
}

/// `xs + bias` over the last dimension. Adds in place when `xs` is a freshly computed contiguous
/// f32 tensor (`owned`), otherwise falls back to a broadcast add.
pub fn add_bias(xs: Tensor, bias: &Tensor, owned: bool) -> Result<Tensor> {
    let width = xs.dim(xs.rank() - 1)?;
    if owned
        && xs.dtype() == candle_core::DType::F32
        && xs.is_contiguous()
        && bias.elem_count() == width
    {
        let values: Vec<f32> = bias
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        xs.inplace_op1(&AddBiasInPlace { bias: &values })?;
        Ok(xs)
    } else {
        xs.broadcast_add(bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn fast_exp_and_erf_are_accurate() {
        let mut worst_exp = 0f64;
        let mut worst_erf = 0f64;
        for i in -8000..=8000 {
            let x = i as f32 * 0.01;
            let exact = f64::from(x).exp();
            worst_exp = worst_exp.max(((f64::from(fast_exp(x)) - exact) / exact).abs());
            let exact_erf = libm_erf(f64::from(x));
            worst_erf = worst_erf.max((f64::from(fast_erf(x)) - exact_erf).abs());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        // Out of range inputs clamp to e^-87 and e^88 (finite, positive).
        for (x, clamped) in [
            (-1000.0f32, -87.0f64),
            (-87.0, -87.0),
            (88.0, 88.0),
            (1e6, 88.0),
        ] {
            let relative = (f64::from(fast_exp(x)) - clamped.exp()).abs() / clamped.exp();
            assert!(relative < 3e-7, "exp({x}) relative error {relative}");
        }
        assert!(worst_erf < 3e-7, "erf abs error {worst_erf}");
    }

    /// erf by its Taylor series / continued fraction (f64), for the test only.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() > 6.0 {
            return x.signum();
        }
        if x.abs() < 2.5 {
            let mut term = x;
            let mut sum = x;
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            return sum * 2.0 / std::f64::consts::PI.sqrt();
        }
        // erfc continued fraction for large |x|.
        let a = x.abs();
        let mut fraction = 0.0;
        for n in (1..200).rev() {
            fraction = (n as f64 / 2.0) / (a + fraction);
        }
        let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + fraction);
        x.signum() * (1.0 - erfc)
    }

    #[test]
    fn im2col_matmul_matches_conv2d() {
        let device = Device::Cpu;
        for (height, width, stride, pad_before, pad_after) in
            [(7, 5, 1, 1, 1), (9, 6, 2, 1, 1), (8, 8, 2, 0, 1)]
        {
            let image = Tensor::randn(0f32, 1.0, (2, 6, height, width), &device).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (5, 6, 3, 3), &device).unwrap();
            let padded = image
                .pad_with_zeros(2, pad_before, pad_after)
                .unwrap()
                .pad_with_zeros(3, pad_before, pad_after)
                .unwrap();
            let expected = padded
                .conv2d(&weight, 0, stride, 1, 1)
                .unwrap()
                .permute((0, 2, 3, 1))
                .unwrap();
            let geometry = PatchGeometry {
                kernel: 3,
                stride,
                pad_before,
                pad_after,
            };
            let (out_h, out_w) = (geometry.output_size(height), geometry.output_size(width));
            let nhwc = image.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
            let mut pieces = Vec::new();
            let split = out_h + 1;
            for rows in [0..split, split..2 * out_h] {
                let cols = im2col(&nhwc, geometry, rows).unwrap();
                let packed = weight
                    .permute((0, 2, 3, 1))
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .reshape((5, 54))
                    .unwrap();
                pieces.push(cols.matmul(&packed.t().unwrap()).unwrap());
            }
            let actual = Tensor::cat(&pieces, 0)
                .unwrap()
                .reshape((2, out_h, out_w, 5))
                .unwrap();
            assert!(max_diff(&actual, &expected) < 1e-4);
        }
    }

    #[test]
    fn group_norm_matches_candle() {
        let device = Device::Cpu;
        // The second shape is large enough to run in pieces, some of which span two items.
        for shape in [(2, 64, 5, 7), (3, 64, 20, 21)] {
            let xs = (Tensor::randn(0f32, 1.0, shape, &device).unwrap() + 3.0).unwrap();
            let weight = Tensor::randn(0f32, 1.0, 64, &device).unwrap();
            let bias = Tensor::randn(0f32, 1.0, 64, &device).unwrap();
            let reference =
                candle_nn::GroupNorm::new(weight.clone(), bias.clone(), 64, 8, 1e-5).unwrap();
            let expected = candle_nn::Module::forward(&reference, &xs).unwrap();
            let nhwc = xs.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
            let plain = group_norm(&nhwc, 8, 1e-5, &weight, &bias, false).unwrap();
            assert!(max_diff(&plain.permute((0, 3, 1, 2)).unwrap(), &expected) < 1e-5);
            let activated = group_norm(&nhwc, 8, 1e-5, &weight, &bias, true).unwrap();
            let expected_silu = candle_nn::ops::silu(&expected).unwrap();
            assert!(max_diff(&activated.permute((0, 3, 1, 2)).unwrap(), &expected_silu) < 1e-5);
        }
    }

    #[test]
    fn output_pieces_come_back_initialised_or_fail() {
        let mut slots = vec![MaybeUninit::new(7f32); 6];
        // A job that initialises only part of its piece is an error, and the piece is zeroed.
        let short = initialise_piece(&mut slots, |piece| Ok(zeroed(&mut piece[..4])));
        assert!(short.unwrap_err().to_string().contains("4 initialised"));
        let failed = initialise_piece(&mut slots, |_| candle_core::bail!("no product"));
        assert!(failed.unwrap_err().to_string().contains("no product"));
        initialise_piece(&mut slots, |piece| {
            let values = zeroed(piece);
            values.fill(2.0);
            Ok(values)
        })
        .unwrap();
        // A failing block's error comes back from the whole output, large or small.
        for rows in [4, 4096] {
            let result = parallel_row_blocks(rows, 32, rows, 2, |first, block| {
                if first == rows / 2 {
                    candle_core::bail!("block at row {first}");
                }
                Ok(zeroed(block))
            });
            let expected = format!("block at row {}", rows / 2);
            assert!(result.unwrap_err().to_string().contains(&expected));
        }
        let out = parallel_pieces(10_000, 3_000, 16, |index, piece| {
            let values = zeroed(piece);
            values.fill(index as f32);
            Ok(values)
        })
        .unwrap();
        assert_eq!(
            (out[0], out[2_999], out[3_000], out[9_999]),
            (0.0, 0.0, 1.0, 3.0)
        );
    }

    #[test]
    fn upsample_matches_candle_nearest() {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &device).unwrap();
        for (height, width) in [(8, 10), (7, 9), (4, 5)] {
            let expected = xs.upsample_nearest2d(height, width).unwrap();
            let nhwc = xs.permute((0, 2, 3, 1)).unwrap();
            let actual = upsample_nearest(&nhwc, height, width)
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap();
            assert_eq!(max_diff(&actual, &expected), 0.0);
        }
    }

    #[test]
    fn layer_norm_matches_candle() {
        let device = Device::Cpu;
        // Widths with and without a lane remainder; the large shape runs in pieces.
        for shape in [(2, 5, 40), (2, 300, 320), (1, 7, 77)] {
            let width = shape.2;
            let xs = (Tensor::randn(0f32, 2.0, shape, &device).unwrap() + 5.0).unwrap();
            let weight = Tensor::randn(0f32, 1.0, width, &device).unwrap();
            let bias = Tensor::randn(0f32, 1.0, width, &device).unwrap();
            let expected = candle_nn::ops::layer_norm(&xs, &weight, &bias, 1e-5).unwrap();
            let actual = layer_norm(&xs, &weight, &bias, 1e-5).unwrap();
            assert_eq!(actual.dims(), expected.dims());
            assert!(max_diff(&actual, &expected) < 1e-4, "{shape:?}");
        }
        let wrong = Tensor::zeros((2, 3, 8), DType::F32, &device).unwrap();
        let weight = Tensor::ones(5, DType::F32, &device).unwrap();
        let error = layer_norm(&wrong, &weight, &weight, 1e-5).unwrap_err();
        assert!(error.to_string().contains("5 channels"), "{error}");
    }

    #[test]
    fn scaled_softmax_and_geglu_match_candle() {
        let device = Device::Cpu;
        let scores = Tensor::randn(0f32, 4.0, (3, 5, 77), &device).unwrap();
        let expected = candle_nn::ops::softmax_last_dim(&(&scores * 0.3).unwrap()).unwrap();
        let actual = scores.copy().unwrap();
        scaled_softmax_in_place(&actual, 0.3).unwrap();
        assert!(max_diff(&actual, &expected) < 1e-6);

        let projected = Tensor::randn(0f32, 2.0, (4, 3, 16), &device).unwrap();
        let hidden = projected.narrow(2, 0, 8).unwrap();
        let gate = projected.narrow(2, 8, 8).unwrap();
        let expected = (hidden * gate.gelu_erf().unwrap()).unwrap();
        assert!(max_diff(&geglu(&projected).unwrap(), &expected) < 1e-5);
        assert_eq!(geglu(&projected).unwrap().dtype(), DType::F32);
    }

    /// Plain per-head attention: `[batch, n, heads * d]` inputs -> (probabilities `[batch * heads,
    /// queries, keys]`, output `[batch, queries, heads * d]`).
    fn reference_attention(
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        heads: usize,
        scale: f64,
    ) -> (Tensor, Tensor) {
        let split = |xs: &Tensor| {
            let (batch, n, inner) = xs.dims3().unwrap();
            xs.reshape((batch, n, heads, inner / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((batch * heads, n, inner / heads))
                .unwrap()
        };
        let (q, k, v) = (split(query), split(key), split(value));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let out = probs.matmul(&v).unwrap();
        let (batch, queries, inner) = query.dims3().unwrap();
        let merged = out
            .reshape((batch, heads, queries, inner / heads))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((batch, queries, inner))
            .unwrap();
        (probs, merged)
    }

    #[test]
    fn attention_kernels_match_plain_attention() {
        let device = Device::Cpu;
        // 600 keys make blocks of 109 queries: blocks end inside and at the items' 250 queries.
        for (batch, queries, keys, heads, head_dim) in [(2, 250, 600, 3, 5), (1, 7, 77, 2, 8)] {
            let inner = heads * head_dim;
            let query = Tensor::randn(0f32, 1.0, (batch, queries, inner), &device).unwrap();
            let key = Tensor::randn(0f32, 1.0, (batch, keys, inner), &device).unwrap();
            let value = Tensor::randn(0f32, 1.0, (batch, keys, inner), &device).unwrap();
            let scale = 1.0 / (head_dim as f64).sqrt();
            let (probs, expected) = reference_attention(&query, &key, &value, heads, scale);
            let key_t = split_heads_transposed(&key, heads).unwrap();

            let fused = fused_attention(&query, &key_t, &value, heads, scale as f32).unwrap();
            assert!(max_diff(&fused, &expected) < 1e-5);
            let computed = attention_probabilities(&query, &key_t, heads, scale as f32).unwrap();
            assert!(max_diff(&computed, &probs) < 1e-6);
            let attended = attend_probabilities(&probs, &value, heads).unwrap();
            assert!(max_diff(&attended, &expected) < 1e-5);
        }
        // Shapes that do not fit are errors, not panics.
        let query = Tensor::zeros((1, 4, 6), DType::F32, &device).unwrap();
        let key_t = Tensor::zeros((2, 3, 5), DType::F32, &device).unwrap();
        let value = Tensor::zeros((1, 4, 6), DType::F32, &device).unwrap();
        assert!(fused_attention(&query, &key_t, &value, 2, 1.0).is_err());
        assert!(attention_probabilities(&query, &key_t, 4, 1.0).is_err());
        let probs = Tensor::zeros((2, 4, 5), DType::F32, &device).unwrap();
        assert!(attend_probabilities(&probs, &value, 2).is_err());
    }

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
            assert!(max_diff(&actual, &expected) < 1e-4, "{m}x{k}x{n}");
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
            assert!(max_diff(&matmul_split_rows(&a, &b).unwrap(), &expected) < 1e-4);
        }
        let a = Tensor::randn(0f32, 1.0, (16, 37, 20), &device).unwrap();
        let b = Tensor::randn(0f32, 1.0, (16, 20, 9), &device).unwrap();
        let expected = a.matmul(&b).unwrap();
        assert!(max_diff(&batched_matmul_parallel(&a, &b).unwrap(), &expected) < 1e-4);
        let wrong = Tensor::zeros((15, 20, 9), DType::F32, &device).unwrap();
        assert!(batched_matmul_parallel(&a, &wrong).is_err());
        assert!(
            matmul_split_rows(&a.get(0).unwrap(), &wrong.get(0).unwrap().t().unwrap()).is_err()
        );
    }

    #[test]
    fn mean_of_planes_matches_mean() {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (3, 300, 301), &device).unwrap();
        let expected = xs.mean(0).unwrap();
        assert!(max_diff(&mean_of_planes(&xs).unwrap(), &expected) < 1e-6);
        let narrowed = xs.narrow(0, 1, 2).unwrap();
        let expected = narrowed.mean(0).unwrap();
        assert!(max_diff(&mean_of_planes(&narrowed).unwrap(), &expected) < 1e-6);
    }

    #[test]
    fn winograd_matches_conv2d() {
        let device = Device::Cpu;
        for (height, width) in [(6, 6), (7, 5), (1, 3), (9, 4)] {
            let image = Tensor::randn(0f32, 1.0, (2, 6, height, width), &device).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (5, 6, 3, 3), &device).unwrap();
            let expected = image
                .conv2d(&weight, 1, 1, 1, 1)
                .unwrap()
                .permute((0, 2, 3, 1))
                .unwrap();
            let matrix = weight
                .permute((2, 3, 1, 0))
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((54, 5))
                .unwrap();
            let filter = winograd_filter(&matrix).unwrap();
            assert_eq!(filter.dims(), &[16, 6, 5]);
            assert!(filter.is_contiguous());
            let nhwc = image.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
            // Chunks of tile rows that start, end and cross batch items anywhere; a bias per item.
            let batch_rows = 2 * height.div_ceil(2);
            let biases: Vec<f32> = (0..10).map(|i| i as f32 * 0.25 - 1.0).collect();
            let bias_tensor = Tensor::from_vec(biases.clone(), (2, 1, 1, 5), &device).unwrap();
            let expected = expected.broadcast_add(&bias_tensor).unwrap();
            for chunk in [1, 2, 3, batch_rows] {
                let mut pieces = Vec::new();
                for start in (0..batch_rows).step_by(chunk) {
                    let rows = start..(start + chunk).min(batch_rows);
                    let v = winograd_input(&nhwc, rows.clone()).unwrap();
                    let m = v.matmul(&filter).unwrap();
                    pieces.push(winograd_output(&m, rows, height, width, biases.clone()).unwrap());
                }
                let actual = Tensor::cat(&pieces, 0)
                    .unwrap()
                    .reshape((2, height, width, 5))
                    .unwrap();
                let diff = max_diff(&actual, &expected);
                assert!(diff < 1e-4, "{height}x{width}, chunks of {chunk}: {diff}");
            }
        }
    }

    #[test]
    fn head_layouts_match_candle() {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (2, 5, 12), &device).unwrap();
        let expected = xs
            .reshape((2, 5, 3, 4))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((6, 5, 4))
            .unwrap();
        let split = split_heads(&xs, 3).unwrap();
        assert_eq!(max_diff(&split, &expected), 0.0);
        let transposed = split_heads_transposed(&xs, 3).unwrap();
        assert_eq!(
            max_diff(&transposed, &expected.transpose(1, 2).unwrap()),
            0.0
        );
        assert_eq!(max_diff(&merge_heads(&split, 3).unwrap(), &xs), 0.0);
        let bias = Tensor::randn(0f32, 1.0, 12, &device).unwrap();
        let expected = xs.broadcast_add(&bias).unwrap();
        let added = add_bias(xs.copy().unwrap(), &bias, true).unwrap();
        assert_eq!(max_diff(&added, &expected), 0.0);
    }
}
