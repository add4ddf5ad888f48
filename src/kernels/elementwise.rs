//! Element-wise kernels over channels-last data: GEGLU (exact GELU), a bias added in place, the
//! residual connections' sums, and nearest-neighbour upsampling.

use candle_core::{
    CpuStorage, CustomOp1, InplaceOp1, InplaceOp2, Layout, Result, Shape, Tensor, WithDType,
};

use super::bf16::{PackedRhs, WeightPacking};
use super::buffers::{parallel_filled, parallel_row_blocks, zeroed};
use super::gemm::{product_piece, MatrixView};
use super::operands::{contiguous_slice, f32_operand, with_f32_pair, with_values};
use super::simd::{gelu, simd_kernel};
use super::threads::{parallel_chunks_mut, worker_count};

simd_kernel!(
    /// GEGLU rows after a bias: `dst[r] = (hidden + bias_h) * gelu(gate + bias_g)` for the rows
    /// of `src` (`[hidden | gate]`, as `bias` is `[bias_h | bias_g]`).
    GegluRows<'data> { dst: &'data mut [f32], src: &'data [f32], bias: &'data [f32], inner: usize } => {
        let (hidden_bias, gate_bias) = bias.split_at(inner);
        for (dst_row, row) in dst.chunks_exact_mut(inner).zip(src.chunks_exact(2 * inner)) {
            let (hidden, gate) = row.split_at(inner);
            let hidden = hidden.iter().zip(hidden_bias);
            let gate = gate.iter().zip(gate_bias);
            for ((d, (&h, &hb)), (&g, &gb)) in dst_row.iter_mut().zip(hidden).zip(gate) {
                *d = (h + hb) * gelu(g + gb);
            }
        }
    }
);

thread_local! {
    /// Each thread's room for a [`linear_geglu`] block's projection (as spare capacity: the
    /// product writes it before anything reads it), kept between blocks and calls.
    static PROJECTED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// Each thread's gated values of a [`linear_geglu`] block, kept between blocks and calls.
    static GATED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
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
        let no_bias = vec![0f32; width];
        let out = parallel_filled(rows * inner, rows, |first, piece| {
            pulp::Arch::new().dispatch(GegluRows {
                dst: piece,
                src: &src[first * width..],
                bias: &no_bias,
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

/// Rows of scratch space [`linear_geglu`] keeps per block: about 2 MiB of the projection, so a
/// block's projection is still in the core's cache when GEGLU reads it.
const LINEAR_GEGLU_BLOCK_ELEMENTS: usize = 512 * 1024;

/// Fewest rows of a [`linear_geglu`] block with f32 products, whose weights are packed anew for
/// every block's product (for wide layers the cache-sized blocks above are a few dozen rows: SD
/// 1.5's 1280 -> 10240 projection, 51). 192 rows instead of the cache-sized blocks: SD 1.5 UNet
/// calls took 5.6% less time at 512 px and 6.3% less at 256 px (medians). 384 instead of 192: the
/// feed-forward stages of a 512 px call summed 1047 ms against 1103 ms (means of two and six
/// runs; 512 rows: 1045 ms over eight, 768 rows: 1090 ms over two), at 256 px 350 ms against 363
/// ms (three runs each).
const F32_LINEAR_GEGLU_MIN_BLOCK_ROWS: usize = 384;

/// A linear layer as [`linear_geglu`] takes it.
#[derive(Clone, Copy)]
pub struct LinearParts<'a> {
    /// `[in, out]`, contiguous.
    pub weight: &'a Tensor,
    /// `[out]`.
    pub bias: &'a Tensor,
    /// With bf16 products: the layer's packing, holding `weight` packed once for all calls.
    pub packing: Option<&'a WeightPacking>,
}

/// `geglu(xs W_in + b_in)` in one pass, then, with `project_out`, times `W_out` plus `b_out` in
/// the same pass (a transformer's whole feed-forward): `xs` `[rows, k]`, `project_in` `[k, 2 *
/// inner]` -> `[rows, inner]`, or `[rows, out]` with `project_out` `[inner, out]`. Blocks of rows
/// are spread over the cores; each block's projection and gated values live only in cache-sized
/// scratch buffers, so neither the `[rows, 2 * inner]` projection nor the `[rows, inner]` gated
/// values are written to memory. The products are the unfused layers'; the projection's bias is
/// added to its product in the GEGLU pass rather than before the sums (within f32 rounding of the
/// unfused layers' values).
pub fn linear_geglu(
    xs: &Tensor,
    project_in: LinearParts<'_>,
    project_out: Option<LinearParts<'_>>,
) -> Result<Tensor> {
    let (rows, k) = xs.dims2()?;
    let (weight_rows, width) = project_in.weight.dims2()?;
    if weight_rows != k || width % 2 != 0 || project_in.bias.elem_count() != width {
        candle_core::bail!(
            "linear + geglu: {:?} times {:?} plus bias {:?}",
            xs.dims(),
            project_in.weight.dims(),
            project_in.bias.dims()
        );
    }
    let inner = width / 2;
    let out_width = match project_out {
        Some(out) => {
            let (out_rows, out_width) = out.weight.dims2()?;
            if out_rows != inner || out.bias.elem_count() != out_width {
                candle_core::bail!(
                    "linear + geglu + linear: {inner} gated values times {:?} plus bias {:?}",
                    out.weight.dims(),
                    out.bias.dims()
                );
            }
            out_width
        }
        None => inner,
    };
    let bias_values = |bias: &Tensor| -> Result<Vec<f32>> {
        bias.to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()
    };
    let bias = bias_values(project_in.bias)?;
    let out_bias = project_out.map(|out| bias_values(out.bias)).transpose()?;
    let out_weight = project_out.map(|out| f32_operand(out.weight)).transpose()?;
    let per_core = rows.div_ceil(2 * worker_count()).max(1);
    let packed = project_in
        .packing
        .and_then(|packing| packing.packed_for(project_in.weight));
    let cache_rows = (LINEAR_GEGLU_BLOCK_ELEMENTS / width.max(1))
        .clamp(8, rows.max(8))
        .min(per_core);
    // f32 products pack both weights anew in every block's product: at least
    // `F32_LINEAR_GEGLU_MIN_BLOCK_ROWS` rows (or one block per core) share that packing, in
    // whole rounds of blocks over the cores.
    let wanted = F32_LINEAR_GEGLU_MIN_BLOCK_ROWS.min(rows.div_ceil(worker_count()));
    let block_rows = if packed.is_none() && wanted > cache_rows {
        // Whole rounds of blocks over the cores.
        let blocks = rows.div_ceil(wanted).next_multiple_of(worker_count());
        rows.div_ceil(blocks)
    } else {
        cache_rows
    };
    let out_packed = project_out.and_then(|out| out.packing?.packed_for(out.weight));
    let out = with_f32_pair(xs, project_in.weight, |xs, weight| {
        let run = |out_weight: Option<&[f32]>| {
            parallel_row_blocks(rows, out_width, rows, block_rows, |first, slots| {
                let block = slots.len() / out_width.max(1);
                let mut scratch = PROJECTED.take();
                scratch.clear();
                scratch.reserve(block * width);
                let lhs = MatrixView::new(xs, first * k, (block, k), k);
                let rhs = MatrixView::new(weight, 0, (k, width), width);
                // The bias joins in the GEGLU pass: the product neither writes the bias into
                // its output first nor reads it back.
                let projected = product_piece(
                    &mut scratch.spare_capacity_mut()[..block * width],
                    lhs,
                    rhs,
                    packed.map(PackedRhs::all_columns),
                    None,
                )?;
                let gelu_rows = |dst: &mut [f32]| {
                    pulp::Arch::new().dispatch(GegluRows {
                        dst,
                        src: projected,
                        bias: &bias,
                        inner,
                    });
                };
                let (Some(out_weight), Some(out_bias)) = (out_weight, out_bias.as_deref()) else {
                    let out = zeroed(slots);
                    gelu_rows(&mut *out);
                    PROJECTED.set(scratch);
                    return Ok(out);
                };
                // Every gated value is written before the product reads it: a per-thread buffer
                // kept between blocks (a fresh one was allocated and zeroed for every block).
                let mut gated = GATED.take();
                if gated.len() < block * inner {
                    gated.resize(block * inner, 0.0);
                }
                gelu_rows(&mut gated[..block * inner]);
                let out = product_piece(
                    slots,
                    MatrixView::new(&gated, 0, (block, inner), inner),
                    MatrixView::new(out_weight, 0, (inner, out_width), out_width),
                    out_packed.map(PackedRhs::all_columns),
                    Some(out_bias),
                );
                GATED.set(gated);
                PROJECTED.set(scratch);
                out
            })
        };
        match &out_weight {
            Some(out_weight) => with_values(out_weight, |out_weight| run(Some(out_weight))),
            None => run(None),
        }
    })?;
    Tensor::from_vec(out, (rows, out_width), xs.device())
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

/// Whether `xs` is contiguous f32 values on the CPU that carry no gradient: what the element-wise
/// kernels here take (anything else goes through candle).
fn plain_values(xs: &Tensor) -> bool {
    xs.dtype() == candle_core::DType::F32
        && xs.device().is_cpu()
        && xs.is_contiguous()
        && !xs.track_op()
}

/// `a + b` for two tensors of the same shape (a residual connection, a running sum of maps),
/// spread over the kernel threads for contiguous f32 CPU tensors that carry no gradient (candle's
/// own add would wake its separate thread pool); otherwise candle's add.
pub fn add_same_shape(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() || !plain_values(a) || !plain_values(b) {
        return a + b;
    }
    with_values(a, |lhs| {
        with_values(b, |rhs| {
            let len = lhs.len();
            Ok(parallel_filled(len, len, |first, piece: &mut [f32]| {
                let (lhs, rhs) = (&lhs[first..][..piece.len()], &rhs[first..][..piece.len()]);
                pulp::Arch::new().dispatch(AddSlices {
                    lhs,
                    rhs,
                    out: piece,
                });
            }))
        })
    })
    .and_then(|sum| Tensor::from_vec(sum, a.dims(), a.device()))
}

/// `xs * scales` with `scales` (`[n]`, any shape of `n` values) broadcast over the last
/// dimension of `xs` (`[..., n]`), for instance per-token weights on attention probabilities.
/// Contiguous f32 CPU values are scaled on the kernel threads (the same products as candle's);
/// anything else goes through candle's broadcast product.
pub fn scale_last_dim(xs: &Tensor, scales: &Tensor) -> Result<Tensor> {
    let width = xs.dim(xs.rank().saturating_sub(1))?;
    if !plain_values(xs) || scales.elem_count() != width || width == 0 {
        return xs.broadcast_mul(scales);
    }
    let scales: Vec<f32> = scales
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    with_values(xs, |values| {
        let rows = values.len() / width;
        Ok(parallel_filled(
            values.len(),
            rows,
            |first_row, piece: &mut [f32]| {
                // Pieces are whole rows.
                let values = &values[first_row * width..][..piece.len()];
                for (out, values) in piece
                    .chunks_exact_mut(width)
                    .zip(values.chunks_exact(width))
                {
                    for ((out, &value), &scale) in out.iter_mut().zip(values).zip(&scales) {
                        *out = value * scale;
                    }
                }
            },
        ))
    })
    .and_then(|scaled| Tensor::from_vec(scaled, xs.dims(), xs.device()))
}

/// `fresh + other` for two tensors of the same shape, added in place over `fresh`'s values when
/// both are plain contiguous f32 values (see [`add_same_shape`]): a layer's output meeting its
/// residual connection needs no new buffer. The caller passes a `fresh` tensor it has just
/// computed and holds nowhere else (a view of it would see the sum).
pub fn add_to_fresh(fresh: Tensor, other: &Tensor) -> Result<Tensor> {
    if fresh.dims() != other.dims() || !plain_values(&fresh) || !plain_values(other) {
        return add_same_shape(&fresh, other);
    }
    fresh.inplace_op2(other, &AddInPlace)?;
    Ok(fresh)
}

/// Adds a second contiguous f32 tensor of the same size in place ([`add_to_fresh`]).
struct AddInPlace;

impl InplaceOp2 for AddInPlace {
    fn name(&self) -> &'static str {
        "attend-add-in-place"
    }

    fn cpu_fwd(
        &self,
        storage: &mut CpuStorage,
        layout: &Layout,
        other: &CpuStorage,
        other_layout: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(data), CpuStorage::F32(values)) = (storage, other) else {
            candle_core::bail!("add in place: only f32 is supported");
        };
        let (Some((start, end)), Some((other_start, other_end))) = (
            layout.contiguous_offsets(),
            other_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("add in place: both tensors must be contiguous");
        };
        if end - start != other_end - other_start {
            candle_core::bail!(
                "add in place: {} values and {} values",
                end - start,
                other_end - other_start
            );
        }
        add_slice_into(&mut data[start..end], &values[other_start..other_end]);
        Ok(())
    }
}

/// `sum += values` element by element, spread over the kernel threads: a running sum of maps
/// kept as plain values (`values` as long as `sum`, f32-convertible, on the CPU).
pub fn add_into(sum: &mut [f32], values: &Tensor) -> Result<()> {
    if values.elem_count() != sum.len() {
        candle_core::bail!(
            "add into a sum of {} values: a tensor {:?} of {} values",
            sum.len(),
            values.dims(),
            values.elem_count()
        );
    }
    let values = f32_operand(values)?;
    with_values(&values, |values| {
        add_slice_into(sum, values);
        Ok(())
    })
}

/// `sum += values` element by element (equal lengths), spread over the kernel threads.
pub fn add_slice_into(sum: &mut [f32], values: &[f32]) {
    let len = sum.len().min(values.len());
    parallel_chunks_mut(&mut sum[..len], len, |first, piece| {
        let values = &values[first..][..piece.len()];
        pulp::Arch::new().dispatch(AddInto { sum: piece, values });
    });
}

/// `len` zeros, written by the kernel threads (a 4 MiB map zeroed by one thread kept the other
/// cores waiting).
pub fn zeros(len: usize) -> Vec<f32> {
    parallel_filled(len, len, |_, _: &mut [f32]| {})
}

/// `first` `[..., a]` and `second` `[..., b]` (the same leading dimensions) joined along the last
/// dimension: `[..., a + b]`, the rows copied on the kernel threads (candle's `cat` copies them on
/// the calling thread while the other cores wait). Tensors that are not contiguous f32 CPU values,
/// or that track gradients, go through `Tensor::cat`.
pub fn concat_last_dim(first: &Tensor, second: &Tensor) -> Result<Tensor> {
    let last = first.rank().saturating_sub(1);
    let leading_match = first.rank() > 0
        && first.rank() == second.rank()
        && first.dims()[..last] == second.dims()[..last];
    if !plain_values(first) || !plain_values(second) || !leading_match {
        return Tensor::cat(&[first, second], last);
    }
    let (a, b) = (first.dims()[last], second.dims()[last]);
    let rows: usize = first.dims()[..last].iter().product();
    let joined = with_values(first, |lhs| {
        with_values(second, |rhs| {
            Ok(parallel_filled(
                rows * (a + b),
                rows,
                |first_row, piece: &mut [f32]| {
                    for (offset, row) in piece.chunks_exact_mut(a + b).enumerate() {
                        let index = first_row + offset;
                        row[..a].copy_from_slice(&lhs[index * a..][..a]);
                        row[a..].copy_from_slice(&rhs[index * b..][..b]);
                    }
                },
            ))
        })
    })?;
    let mut dims = first.dims().to_vec();
    dims[last] = a + b;
    Tensor::from_vec(joined, dims, first.device())
}

simd_kernel!(
    /// `sum += values` element by element (the same length).
    AddInto<'data> { sum: &'data mut [f32], values: &'data [f32] } => {
        for (total, &value) in sum.iter_mut().zip(values) {
            *total += value;
        }
    }
);

simd_kernel!(
    /// `out = lhs + rhs` element by element (all the same length).
    AddSlices<'data> { lhs: &'data [f32], rhs: &'data [f32], out: &'data mut [f32] } => {
        for ((out, &x), &y) in out.iter_mut().zip(lhs).zip(rhs) {
            *out = x + y;
        }
    }
);

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::{max_abs_diff, same_bits};
    use crate::kernels::{with_product_precision, ProductPrecision};
    use candle_core::{DType, Device};

    #[test]
    fn residual_sums_match_candle() {
        let device = Device::Cpu;
        // Large enough to be spread over the kernel threads, and small.
        for shape in [(2, 300, 301), (1, 3, 5)] {
            let a = Tensor::randn(0f32, 1.0, shape, &device).unwrap();
            let b = Tensor::randn(0f32, 1.0, shape, &device).unwrap();
            let expected = (&a + &b).unwrap();
            assert_eq!(
                max_abs_diff(&add_same_shape(&a, &b).unwrap(), &expected),
                0.0
            );
            // A transposed view and another dtype go through candle.
            let at = a.transpose(1, 2).unwrap();
            let bt = b.transpose(1, 2).unwrap();
            let sum = add_same_shape(&at, &bt).unwrap();
            assert_eq!(max_abs_diff(&sum, &(&at + &bt).unwrap()), 0.0);
            let half = add_same_shape(
                &a.to_dtype(DType::F16).unwrap(),
                &b.to_dtype(DType::F16).unwrap(),
            )
            .unwrap();
            assert_eq!(half.dtype(), DType::F16);
        }
        // Mismatched shapes are candle's error, not a panic.
        let a = Tensor::zeros((2, 3), DType::F32, &device).unwrap();
        let b = Tensor::zeros((3, 2), DType::F32, &device).unwrap();
        assert!(add_same_shape(&a, &b).is_err());
    }

    #[test]
    fn running_sums_add_in_place() {
        let device = Device::Cpu;
        // Large enough to be spread over the kernel threads, and small.
        for len in [2 * 300 * 301, 15] {
            let values = Tensor::randn(0f32, 1.0, len, &device).unwrap();
            let zeros = zeros(len);
            assert!(zeros.len() == len && zeros.iter().all(|&value| value == 0.0));
            let mut sum: Vec<f32> = (0..len).map(|index| index as f32 * 0.5).collect();
            let expected = (Tensor::from_vec(sum.clone(), len, &device).unwrap() + &values)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            add_into(&mut sum, &values).unwrap();
            let bits = |values: &[f32]| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&sum), bits(&expected));
            // The slice form adds the same values.
            let values = values.to_vec1::<f32>().unwrap();
            add_slice_into(&mut sum, &values);
            let twice: Vec<f32> = expected.iter().zip(&values).map(|(a, b)| a + b).collect();
            assert_eq!(bits(&sum), bits(&twice));
        }
        // A tensor of another length is refused.
        let values = Tensor::zeros(4, DType::F32, &device).unwrap();
        let error = add_into(&mut [0.0; 3], &values).unwrap_err();
        assert!(error.to_string().contains("sum of 3 values"), "{error}");
    }

    #[test]
    fn last_dim_scales_match_candle() {
        let device = Device::Cpu;
        let scales = Tensor::randn(0f32, 1.0, 77, &device).unwrap();
        // Large enough to be spread over the kernel threads, and small.
        for dims in [vec![4, 1024, 77], vec![2, 3, 77]] {
            let xs = Tensor::randn(0f32, 1.0, dims.as_slice(), &device).unwrap();
            let expected = xs.broadcast_mul(&scales).unwrap();
            let scaled = scale_last_dim(&xs, &scales).unwrap();
            assert_eq!(scaled.dims(), expected.dims());
            assert!(same_bits(&scaled, &expected), "{dims:?}");
        }
        // Scales shaped [1, 1, n] broadcast the same way; a view goes through candle.
        let xs = Tensor::randn(0f32, 1.0, (2, 5, 77), &device).unwrap();
        let shaped = scales.reshape((1, 1, 77)).unwrap();
        let expected = xs.broadcast_mul(&shaped).unwrap();
        assert!(same_bits(&scale_last_dim(&xs, &shaped).unwrap(), &expected));
        let view = xs.narrow(1, 1, 3).unwrap();
        let expected = view.broadcast_mul(&scales).unwrap();
        assert!(same_bits(
            &scale_last_dim(&view, &scales).unwrap(),
            &expected
        ));
    }

    #[test]
    fn a_fresh_output_takes_its_residual_in_place() {
        let device = Device::Cpu;
        let bits = |xs: &Tensor| {
            xs.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        let residual = Tensor::randn(0f32, 1.0, (2, 300, 64), &device).unwrap();
        let fresh = Tensor::randn(0f32, 1.0, (2, 300, 64), &device).unwrap();
        let expected = (&fresh + &residual).unwrap();
        let sum = add_to_fresh(fresh.copy().unwrap(), &residual).unwrap();
        assert_eq!(bits(&sum), bits(&expected));
        // A view that is not contiguous, and another shape, go through candle's add instead.
        let transposed = residual.transpose(1, 2).unwrap();
        let fresh_t = Tensor::randn(0f32, 1.0, (2, 64, 300), &device).unwrap();
        let expected = (&fresh_t + &transposed).unwrap();
        assert_eq!(
            bits(&add_to_fresh(fresh_t, &transposed).unwrap()),
            bits(&expected)
        );
        let other_shape = Tensor::zeros((2, 300), DType::F32, &device).unwrap();
        assert!(add_to_fresh(fresh.copy().unwrap(), &other_shape).is_err());
    }

    #[test]
    fn geglu_matches_candle() {
        let device = Device::Cpu;
        let projected = Tensor::randn(0f32, 2.0, (4, 3, 16), &device).unwrap();
        let hidden = projected.narrow(2, 0, 8).unwrap();
        let gate = projected.narrow(2, 8, 8).unwrap();
        let expected = (hidden * gate.gelu_erf().unwrap()).unwrap();
        assert!(max_abs_diff(&geglu(&projected).unwrap(), &expected) < 1e-5);
        assert_eq!(geglu(&projected).unwrap().dtype(), DType::F32);
    }

    /// `weight`, `bias` and `packing` as [`linear_geglu`] takes them.
    fn parts<'a>(
        weight: &'a Tensor,
        bias: &'a Tensor,
        packing: Option<&'a WeightPacking>,
    ) -> LinearParts<'a> {
        LinearParts {
            weight,
            bias,
            packing,
        }
    }

    #[test]
    fn linear_geglu_matches_product_then_geglu() {
        let device = Device::Cpu;
        // One block, several blocks (rows split over the cores), and a remainder block.
        for (rows, k, inner) in [(3, 5, 4), (700, 24, 40), (2048, 16, 64)] {
            let xs = Tensor::randn(0f32, 1.0, (rows, k), &device).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (k, 2 * inner), &device).unwrap();
            let bias = Tensor::randn(0f32, 1.0, 2 * inner, &device).unwrap();
            let projected = xs.matmul(&weight).unwrap().broadcast_add(&bias).unwrap();
            let expected = geglu(&projected).unwrap();
            let actual = linear_geglu(&xs, parts(&weight, &bias, None), None).unwrap();
            assert_eq!(actual.dims(), &[rows, inner]);
            assert!(
                max_abs_diff(&actual, &expected) < 1e-4,
                "{rows}x{k}x{inner}"
            );
        }
        // With bf16 products, a packed weight gives the values of the unpacked one.
        if crate::kernels::bf16_supported() {
            let xs = Tensor::randn(0f32, 1.0, (700, 24), &device).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (24, 160), &device).unwrap();
            let bias = Tensor::randn(0f32, 1.0, 160, &device).unwrap();
            let packing = WeightPacking::default();
            crate::kernels::with_product_precision(crate::kernels::ProductPrecision::Bf16, || {
                let unpacked = linear_geglu(&xs, parts(&weight, &bias, None), None).unwrap();
                let packed =
                    linear_geglu(&xs, parts(&weight, &bias, Some(&packing)), None).unwrap();
                assert!(same_bits(&unpacked, &packed));
            });
        }
        let xs = Tensor::zeros((4, 6), DType::F32, &device).unwrap();
        let odd = Tensor::zeros((6, 7), DType::F32, &device).unwrap();
        let bias = Tensor::zeros(7, DType::F32, &device).unwrap();
        assert!(linear_geglu(&xs, parts(&odd, &bias, None), None).is_err());
        let weight = Tensor::zeros((6, 8), DType::F32, &device).unwrap();
        assert!(linear_geglu(&xs, parts(&weight, &bias, None), None).is_err());
    }

    #[test]
    fn the_fused_feed_forward_gives_the_layers_values() {
        let device = Device::Cpu;
        let precisions = if crate::kernels::bf16_supported() {
            vec![ProductPrecision::F32, ProductPrecision::Bf16]
        } else {
            vec![ProductPrecision::F32]
        };
        for precision in precisions {
            for (rows, k, inner, out) in [(3, 16, 8, 16), (700, 32, 40, 24), (2048, 16, 64, 16)] {
                let xs = Tensor::randn(0f32, 1.0, (rows, k), &device).unwrap();
                let weight_in = Tensor::randn(0f32, 1.0, (k, 2 * inner), &device).unwrap();
                let bias_in = Tensor::randn(0f32, 1.0, 2 * inner, &device).unwrap();
                let weight_out = Tensor::randn(0f32, 1.0, (inner, out), &device).unwrap();
                let bias_out = Tensor::randn(0f32, 1.0, out, &device).unwrap();
                let (packing_in, packing_out) =
                    (WeightPacking::default(), WeightPacking::default());
                with_product_precision(precision, || {
                    let gated =
                        linear_geglu(&xs, parts(&weight_in, &bias_in, Some(&packing_in)), None)
                            .unwrap();
                    let expected = crate::kernels::matmul_split_rows(
                        &gated,
                        &weight_out,
                        Some(&bias_out),
                        Some(&packing_out),
                    )
                    .unwrap();
                    let fused = linear_geglu(
                        &xs,
                        parts(&weight_in, &bias_in, Some(&packing_in)),
                        Some(parts(&weight_out, &bias_out, Some(&packing_out))),
                    )
                    .unwrap();
                    assert_eq!(fused.dims(), &[rows, out]);
                    // bf16: the same register tiles over the same sums, bit for bit; f32: the
                    // GEMM library may block its sums differently for another buffer, so within
                    // f32 rounding of these sums (values of about 10).
                    let close = match precision {
                        ProductPrecision::Bf16 => same_bits(&fused, &expected),
                        ProductPrecision::F32 => max_abs_diff(&fused, &expected) < 1e-4,
                    };
                    assert!(close, "{precision:?} {rows}x{k}x{inner}x{out}");
                });
            }
        }
        // A second layer that does not take the gated width is an error.
        let xs = Tensor::zeros((4, 6), DType::F32, &device).unwrap();
        let weight_in = Tensor::zeros((6, 8), DType::F32, &device).unwrap();
        let bias_in = Tensor::zeros(8, DType::F32, &device).unwrap();
        let weight_out = Tensor::zeros((5, 3), DType::F32, &device).unwrap();
        let bias_out = Tensor::zeros(3, DType::F32, &device).unwrap();
        let error = linear_geglu(
            &xs,
            parts(&weight_in, &bias_in, None),
            Some(parts(&weight_out, &bias_out, None)),
        )
        .unwrap_err();
        assert!(error.to_string().contains("4 gated values"), "{error}");
    }

    #[test]
    fn joined_channels_match_cat() {
        let device = Device::Cpu;
        for (rows, a, b) in [(1, 3, 5), (4096, 64, 128), (77, 1, 2)] {
            let first = Tensor::randn(0f32, 1.0, (2, rows, a), &device).unwrap();
            let second = Tensor::randn(0f32, 1.0, (2, rows, b), &device).unwrap();
            let expected = Tensor::cat(&[&first, &second], 2).unwrap();
            let actual = concat_last_dim(&first, &second).unwrap();
            assert_eq!(actual.dims(), expected.dims());
            assert_eq!(max_abs_diff(&actual, &expected), 0.0);
        }
        // Different leading dimensions are candle's error, not a panic.
        let first = Tensor::zeros((2, 3, 4), DType::F32, &device).unwrap();
        let second = Tensor::zeros((2, 5, 4), DType::F32, &device).unwrap();
        assert!(concat_last_dim(&first, &second).is_err());
    }

    #[test]
    fn add_bias_in_place_matches_broadcast_add() {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (2, 5, 12), &device).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 12, &device).unwrap();
        let expected = xs.broadcast_add(&bias).unwrap();
        let added = add_bias(xs.copy().unwrap(), &bias, true).unwrap();
        assert_eq!(max_abs_diff(&added, &expected), 0.0);
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
            assert_eq!(max_abs_diff(&actual, &expected), 0.0);
        }
    }
}
