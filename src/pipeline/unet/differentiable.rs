//! The UNet's differentiable path, for inputs that track gradients.
//!
//! The fused CPU kernels of [`crate::kernels`] build their outputs from raw slices, so candle's
//! autograd cannot see through them. Every layer therefore checks its input with
//! [`candle_core::Tensor::track_op`]: when it tracks gradients (an optimised text embedding, or
//! anything computed from one) the layer takes its differentiable path (its
//! `forward_differentiable` or an inline branch, built on the operations here); otherwise it
//! runs the fused kernels exactly as before. Only the
//! layers downstream of a tracked tensor take this path: in a UNet call whose text embedding is a
//! [`candle_core::Var`], everything before the first cross-attention stays fused.
//!
//! Every layer keeps its fused forward (so the numbers are the fused path's) and becomes one node
//! of candle's graph with a backward of its own ([`with_backward`], [`attention_with_backward`]):
//! only input gradients (no weight gradients), closed-form norm and GEGLU gradients, and
//! attention that recomputes its probabilities in the backward pass instead of keeping
//! `[batch, heads, queries, keys]` tensors for every layer. Resampling, residual additions and
//! concatenations are plain candle operations with candle's own backward.

use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor, D};

use crate::kernels::PatchGeometry;

/// The input-gradient function of [`with_backward`]: output gradient -> input gradient.
type InputGradient = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// A custom op whose forward hands out a precomputed output and whose backward is a closure.
struct WithBackward {
    /// Taken by the (single) forward call.
    output: Mutex<Option<Tensor>>,
    input_gradient: InputGradient,
}

impl candle_core::CustomOp1 for WithBackward {
    fn name(&self) -> &'static str {
        "attend-with-backward"
    }

    fn cpu_fwd(
        &self,
        _storage: &CpuStorage,
        _layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let output = self
            .output
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| candle_core::Error::Msg("custom backward op ran twice".to_string()))?;
        let shape = output.shape().clone();
        let values = output.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(values), shape))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        (self.input_gradient)(grad_res).map(Some)
    }
}

/// `output` (computed from `input` without gradients, f32 on the CPU) as a node of `input`'s
/// graph whose backward maps the output's gradient to the input's with `input_gradient`.
pub(super) fn with_backward(
    input: &Tensor,
    output: Tensor,
    input_gradient: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> candle_core::Result<Tensor> {
    if output.dtype() != DType::F32 || !output.device().is_cpu() {
        candle_core::bail!(
            "the differentiable path runs in f32 on the CPU, got {:?} on {:?}",
            output.dtype(),
            output.device()
        );
    }
    input.apply_op1(WithBackward {
        output: Mutex::new(Some(output)),
        input_gradient: Box::new(input_gradient),
    })
}

/// The adjoint of im2col: patch gradients `[batch * out_h * out_w, k * k * channels]` (patch
/// order ky, kx, channel) summed back onto the input positions they were read from,
/// `[batch, height, width, channels]` f32.
pub(super) fn col2im(
    patches: &Tensor,
    geometry: PatchGeometry,
    (batch, height, width, channels): (usize, usize, usize, usize),
) -> candle_core::Result<Tensor> {
    let (out_h, out_w) = (geometry.output_size(height), geometry.output_size(width));
    let kernel = geometry.kernel;
    let patch = kernel * kernel * channels;
    let values = patches
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if values.len() != batch * out_h * out_w * patch {
        candle_core::bail!(
            "col2im: {} patch values for {batch}x{out_h}x{out_w} patches of {patch}",
            values.len()
        );
    }
    let mut out = vec![0f32; batch * height * width * channels];
    let source_position = |output: usize, offset: usize, size: usize| {
        (output * geometry.stride + offset)
            .checked_sub(geometry.pad_before)
            .filter(|&position| position < size)
    };
    for (row_index, row) in values.chunks_exact(patch).enumerate() {
        let item = row_index / (out_h * out_w);
        let (out_y, out_x) = ((row_index / out_w) % out_h, row_index % out_w);
        for kernel_y in 0..kernel {
            let Some(y) = source_position(out_y, kernel_y, height) else {
                continue;
            };
            for kernel_x in 0..kernel {
                let Some(x) = source_position(out_x, kernel_x, width) else {
                    continue;
                };
                let source = &row[(kernel_y * kernel + kernel_x) * channels..][..channels];
                let start = ((item * height + y) * width + x) * channels;
                for (sum, value) in out[start..start + channels].iter_mut().zip(source) {
                    *sum += value;
                }
            }
        }
    }
    Tensor::from_vec(out, (batch, height, width, channels), patches.device())
}

/// Nearest-neighbour resize of channels-last `[batch, h, w, c]` to `[batch, target_h, target_w,
/// c]` with the fused kernel's source index `min(y * h / target_h, h - 1)` (torch's `nearest`),
/// by `index_select` (differentiable for any factor).
pub(super) fn upsample_nearest(
    xs: &Tensor,
    target_h: usize,
    target_w: usize,
) -> candle_core::Result<Tensor> {
    let (_, height, width, _) = xs.dims4()?;
    if height == 0 || width == 0 {
        candle_core::bail!("upsample: empty input");
    }
    let sources = |target: usize, size: usize| -> candle_core::Result<Tensor> {
        let indices = (0..target)
            .map(|position| u32::try_from((position * size / target).min(size - 1)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| candle_core::Error::Msg("upsample index beyond u32".to_string()))?;
        Tensor::new(indices, xs.device())
    };
    xs.index_select(&sources(target_h, height)?, 1)?
        .index_select(&sources(target_w, width)?, 2)
}

/// Fused attention output with a backward that recomputes the probabilities per call (nothing of
/// size `queries x keys` is kept for the backward pass).
struct AttentionWithBackward {
    /// Taken by the (single) forward call.
    output: Mutex<Option<Tensor>>,
    heads: usize,
    scale: f64,
}

impl candle_core::CustomOp3 for AttentionWithBackward {
    fn name(&self) -> &'static str {
        "attend-attention-with-backward"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let output = self
            .output
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| candle_core::Error::Msg("attention op ran twice".to_string()))?;
        let shape = output.shape().clone();
        let values = output.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(values), shape))
    }

    /// With `P = softmax(Q K^T s)` per head and `O = P V`: `dV = P^T dO`, `dS = P * (dO V^T -
    /// rowsum(dO * O))`, `dQ = dS K s`, `dK = dS^T Q s`.
    fn bwd(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        output: &Tensor,
        grad_output: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, queries, inner) = query.dims3()?;
        let keys = key.dim(1)?;
        let heads = self.heads;
        let head_dim = inner / heads.max(1);
        let split = |xs: &Tensor, tokens: usize| {
            xs.to_dtype(DType::F32)?
                .reshape((batch, tokens, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let merge = |xs: Tensor, tokens: usize, like: &Tensor| {
            xs.transpose(1, 2)?
                .reshape((batch, tokens, inner))?
                .to_dtype(like.dtype())
        };
        let (q, k, v) = (
            split(query, queries)?,
            split(key, keys)?,
            split(value, keys)?,
        );
        let (o, d_o) = (split(output, queries)?, split(grad_output, queries)?);
        let probs = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * self.scale)?)?;
        let d_v = probs.t()?.matmul(&d_o)?;
        let row = (&d_o * &o)?.sum_keepdim(D::Minus1)?;
        let d_s = (probs * d_o.matmul(&v.t()?)?.broadcast_sub(&row)?)?;
        let d_q = (d_s.matmul(&k)? * self.scale)?;
        let d_k = (d_s.t()?.matmul(&q)? * self.scale)?;
        Ok((
            if query.track_op() {
                Some(merge(d_q, queries, query)?)
            } else {
                None
            },
            if key.track_op() {
                Some(merge(d_k, keys, key)?)
            } else {
                None
            },
            if value.track_op() {
                Some(merge(d_v, keys, value)?)
            } else {
                None
            },
        ))
    }
}

/// `output` = `softmax(q k^T * scale) v` (computed by the fused path, f32 on the CPU) as a node of
/// the graph of `query` `[batch, queries, heads * head_dim]`, `key` and `value` `[batch, keys,
/// heads * head_dim]`.
pub(super) fn attention_with_backward(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    output: Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    if output.dtype() != DType::F32 || !output.device().is_cpu() {
        candle_core::bail!("the differentiable path runs in f32 on the CPU");
    }
    query.apply_op3(
        key,
        value,
        AttentionWithBackward {
            output: Mutex::new(Some(output)),
            heads,
            scale,
        },
    )
}

/// The input gradient of `y = act(normalise(x) * weight + bias)` where the statistics are taken
/// per `[batch, _, group, _]` over dimensions 1 and 3 of `shape` (a group norm as `[batch,
/// positions, groups, channels / groups]`, a layer norm as `[rows, 1, 1, channels]`) and `act`
/// is SiLU or the identity. `input`, `grad` any shape with `shape`'s element count; returns
/// `input`'s shape.
pub(super) fn normalisation_input_gradient(
    input: &Tensor,
    grad: &Tensor,
    (weight, bias): (&Tensor, &Tensor),
    eps: f64,
    shape: (usize, usize, usize, usize),
    silu: bool,
) -> candle_core::Result<Tensor> {
    let (_, _, groups, per_group) = shape;
    let affine_shape = (1, 1, groups, per_group);
    let values = input.to_dtype(DType::F32)?.reshape(shape)?;
    let mean = values.mean_keepdim((1, 3))?;
    let centred = values.broadcast_sub(&mean)?;
    let inverse_std = centred
        .sqr()?
        .mean_keepdim((1, 3))?
        .affine(1.0, eps)?
        .sqrt()?
        .recip()?;
    let normalised = centred.broadcast_mul(&inverse_std)?;
    let weight = weight.to_dtype(DType::F32)?.reshape(affine_shape)?;
    let mut grad = grad.to_dtype(DType::F32)?.reshape(shape)?;
    if silu {
        let bias = bias.to_dtype(DType::F32)?.reshape(affine_shape)?;
        let pre = normalised.broadcast_mul(&weight)?.broadcast_add(&bias)?;
        let sigmoid = (pre.neg()?.exp()? + 1.0)?.recip()?;
        // silu'(z) = s (1 + z (1 - s))
        let slope = (&sigmoid * ((&pre * (1.0 - &sigmoid)?)? + 1.0)?)?;
        grad = (grad * slope)?;
    }
    let grad_normalised = grad.broadcast_mul(&weight)?;
    let mean_grad = grad_normalised.mean_keepdim((1, 3))?;
    let mean_product = (&grad_normalised * &normalised)?.mean_keepdim((1, 3))?;
    grad_normalised
        .broadcast_sub(&mean_grad)?
        .sub(&normalised.broadcast_mul(&mean_product)?)?
        .broadcast_mul(&inverse_std)?
        .reshape(input.dims())?
        .to_dtype(input.dtype())
}

/// The input gradient of GEGLU, `[..., 2 * inner]` -> `hidden * gelu(gate)`: `gelu(gate) g` for
/// the hidden half, `hidden gelu'(gate) g` for the gate half, with the exact GELU
/// `gelu'(x) = Phi(x) + x phi(x)`.
pub(super) fn geglu_input_gradient(
    projected: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<Tensor> {
    let width = projected.dim(D::Minus1)?;
    let inner = width / 2;
    let hidden = projected.narrow(D::Minus1, 0, inner)?;
    let gate = projected.narrow(D::Minus1, inner, inner)?;
    let cumulative = ((gate.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)? * 0.5)?;
    let density = (gate.sqr()?.affine(-0.5, 0.0)?.exp()?
        * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
    let slope = (&cumulative + (&gate * density)?)?;
    let grad_hidden = (grad * gate.gelu_erf()?)?;
    let grad_gate = ((grad * hidden)? * slope)?;
    Tensor::cat(&[&grad_hidden, &grad_gate], D::Minus1)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{Device, Var};
    use candle_nn::VarBuilder;

    use super::*;
    use crate::kernels;
    use crate::kernels::test_support::max_abs_diff;
    use crate::pipeline::unet::layers::{Conv2d, GroupNorm, LayerNorm};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut state = seed | 1;
        let values: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// The gradient of `sum(f(x) * weights)` with respect to `x`, by candle's autograd.
    fn gradient_of(x: &Tensor, f: impl Fn(&Tensor) -> Tensor, seed: u64) -> Tensor {
        let variable = Var::from_tensor(&x.copy().unwrap()).unwrap();
        let out = f(variable.as_tensor());
        let weights = random(out.dims(), seed);
        let grads = (out * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        grads.get(variable.as_tensor()).unwrap().clone()
    }

    fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
        let diff = max_abs_diff(a, b);
        assert!(diff < 1e-4, "{what}: gradients differ by {diff}");
    }

    #[test]
    fn conv_backward_matches_autograd_of_candle_conv2d() {
        // (in, out, kernel, stride, (pad before, pad after)): Winograd, strided, asymmetric, 1x1.
        for (case, (in_c, out_c, kernel, stride, pads)) in [
            (6, 5, 3, 1, (1, 1)),
            (6, 5, 3, 2, (1, 1)),
            (4, 3, 3, 2, (0, 1)),
            (6, 5, 1, 1, (0, 0)),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = case as u64 * 10;
            let weight = random(&[out_c, in_c, kernel, kernel], seed + 1);
            let bias = random(&[out_c], seed + 2);
            let tensors = HashMap::from([
                ("weight".to_string(), weight.clone()),
                ("bias".to_string(), bias.clone()),
            ]);
            let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
            let conv = Conv2d::with_padding(vb, in_c, out_c, kernel, stride, pads).unwrap();
            // Square: candle's conv2d backward takes its output padding from the height.
            let xs = random(&[2, 7, 7, in_c], seed + 3);
            let ours = gradient_of(&xs, |x| conv.forward(x).unwrap(), seed + 4);
            let reference = gradient_of(
                &xs,
                |x| {
                    let nchw = x
                        .permute((0, 3, 1, 2))
                        .unwrap()
                        .pad_with_zeros(2, pads.0, pads.1)
                        .unwrap()
                        .pad_with_zeros(3, pads.0, pads.1)
                        .unwrap();
                    nchw.conv2d(&weight, 0, stride, 1, 1)
                        .unwrap()
                        .broadcast_add(&bias.reshape((out_c, 1, 1)).unwrap())
                        .unwrap()
                        .permute((0, 2, 3, 1))
                        .unwrap()
                },
                seed + 4,
            );
            assert_close(&ours, &reference, &format!("conv case {case}"));
        }
    }

    fn plain_normalisation(
        x: &Tensor,
        (weight, bias): (&Tensor, &Tensor),
        shape: (usize, usize, usize, usize),
        silu: bool,
    ) -> Tensor {
        let grouped = x.reshape(shape).unwrap();
        let mean = grouped.mean_keepdim((1, 3)).unwrap();
        let centred = grouped.broadcast_sub(&mean).unwrap();
        let variance = centred.sqr().unwrap().mean_keepdim((1, 3)).unwrap();
        let affine = (1, 1, shape.2, shape.3);
        let out = centred
            .broadcast_div(&(variance + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&weight.reshape(affine).unwrap())
            .unwrap()
            .broadcast_add(&bias.reshape(affine).unwrap())
            .unwrap();
        let out = if silu { out.silu().unwrap() } else { out };
        out.reshape(x.dims()).unwrap()
    }

    #[test]
    fn norm_backward_matches_autograd_of_plain_operations() {
        let (weight, bias) = (random(&[8], 1), random(&[8], 2));
        let tensors = HashMap::from([
            ("weight".to_string(), weight.clone()),
            ("bias".to_string(), bias.clone()),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let group_norm = GroupNorm::new(vb.clone(), 4, 8, 1e-5).unwrap();
        let layer_norm = LayerNorm::new(vb, 8, 1e-5).unwrap();
        let xs = (random(&[2, 3, 5, 8], 3) * 3.0).unwrap();
        for silu in [false, true] {
            let ours = gradient_of(
                &xs,
                |x| {
                    if silu {
                        group_norm.forward_silu(x).unwrap()
                    } else {
                        group_norm.forward(x).unwrap()
                    }
                },
                4,
            );
            let reference = gradient_of(
                &xs,
                |x| plain_normalisation(x, (&weight, &bias), (2, 15, 4, 2), silu),
                4,
            );
            assert_close(&ours, &reference, &format!("group norm, silu {silu}"));
        }
        let ours = gradient_of(&xs, |x| layer_norm.forward(x).unwrap(), 5);
        let reference = gradient_of(
            &xs,
            |x| plain_normalisation(x, (&weight, &bias), (30, 1, 1, 8), false),
            5,
        );
        assert_close(&ours, &reference, "layer norm");
    }

    #[test]
    fn geglu_backward_matches_autograd_of_plain_operations() {
        let projected = (random(&[3, 4, 12], 6) * 3.0).unwrap();
        let ours = gradient_of(
            &projected,
            |x| {
                let out = kernels::geglu(&x.detach()).unwrap();
                let saved = x.detach();
                with_backward(x, out, move |grad| geglu_input_gradient(&saved, grad)).unwrap()
            },
            7,
        );
        let reference = gradient_of(
            &projected,
            |x| {
                let hidden = x.narrow(2, 0, 6).unwrap();
                let gate = x.narrow(2, 6, 6).unwrap();
                (hidden * gate.gelu_erf().unwrap()).unwrap()
            },
            7,
        );
        assert_close(&ours, &reference, "geglu");
    }

    #[test]
    fn attention_backward_matches_autograd_of_plain_operations() {
        let (batch, queries, keys, heads, head_dim) = (2, 5, 7, 3, 4);
        let inner = heads * head_dim;
        let query = random(&[batch, queries, inner], 8);
        let key = random(&[batch, keys, inner], 9);
        let value = random(&[batch, keys, inner], 10);
        let scale = (head_dim as f64).powf(-0.5);
        let plain = |q: &Tensor, k: &Tensor, v: &Tensor| {
            let split = |xs: &Tensor, tokens: usize| {
                xs.reshape((batch, tokens, heads, head_dim))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let scores = (split(q, queries)
                .matmul(&split(k, keys).t().unwrap())
                .unwrap()
                * scale)
                .unwrap();
            let exponentials = scores.exp().unwrap();
            let probs = exponentials
                .broadcast_div(&exponentials.sum_keepdim(D::Minus1).unwrap())
                .unwrap();
            probs
                .matmul(&split(v, keys))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((batch, queries, inner))
                .unwrap()
        };
        let ours = |q: &Tensor, k: &Tensor, v: &Tensor| {
            let out = plain(&q.detach(), &k.detach(), &v.detach());
            attention_with_backward(q, k, v, out, heads, scale).unwrap()
        };
        let reference_query = gradient_of(&query, |q| plain(q, &key, &value), 11);
        let ours_query = gradient_of(&query, |q| ours(q, &key, &value), 11);
        assert_close(&ours_query, &reference_query, "attention query");
        let reference_key = gradient_of(&key, |k| plain(&query, k, &value), 12);
        let ours_key = gradient_of(&key, |k| ours(&query, k, &value), 12);
        assert_close(&ours_key, &reference_key, "attention key");
        let reference_value = gradient_of(&value, |v| plain(&query, &key, v), 13);
        let ours_value = gradient_of(&value, |v| ours(&query, &key, v), 13);
        assert_close(&ours_value, &reference_value, "attention value");
    }

    #[test]
    fn upsample_matches_the_fused_kernel_for_any_factor() {
        let xs = random(&[2, 3, 5, 4], 14);
        for (height, width) in [(6, 10), (7, 9), (3, 5)] {
            let ours = upsample_nearest(&xs, height, width).unwrap();
            let fused = kernels::upsample_nearest(&xs, height, width).unwrap();
            assert_eq!(max_abs_diff(&ours, &fused), 0.0);
        }
    }
}
