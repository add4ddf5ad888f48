//! Building blocks shared by the UNet and the VAE, loaded under diffusers' parameter names.
//!
//! Activations are **channels-last**, `[batch, h, w, channels]`: convolutions become one matrix
//! product over image patches (see [`crate::kernels`]) and the transformers' token layout
//! `[batch, h * w, channels]` is the same memory, so no transposes are needed between them.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::differentiable;
use crate::hook::SharedGroupNorm;
use crate::kernels::{self, PatchGeometry};
use crate::pipeline::{limits, profile, PipelineResult};

/// Bytes of im2col patches materialised at once by a convolution (bounds memory and keeps the
/// buffers out of the allocator's fresh-mmap path).
const CONV_CHUNK_BYTES: usize = 16 << 20;

/// Elements of Winograd tiles (`16 * tiles * max(in, out)`) materialised at once.
const WINOGRAD_CHUNK_ELEMENTS: usize = 4 << 20;

/// In a model built for bf16 products, 3x3 convolutions with at most this many output channels
/// keep their F(2x2, 3x3) filter (16/9 of the weight; about 200 MB more for SD 1.5, all in its
/// high-resolution layers).
const WINOGRAD_STORED_MAX_OUT_CHANNELS: usize = 640;

/// In a model built for f32 products, 3x3 convolutions with at most this many output channels keep
/// their F(4x4, 3x3) filter instead (36/9 of the weight): 2.25 multiplications per output rather
/// than 4. SD 1.5 at 512 px then peaks at 4.53 GB rather than 3.98 GB (diffusers: 4.59 GB).
///
/// The wider ones keep their F(2x2, 3x3) filter (16/9 of the weight; F(4x4, 3x3) would be 4x)
/// while the machine has room for it (see [`leaves_memory_reserve`]): transforming it on every call
/// cost SD 1.5 at 512 px about 140 ms per UNet call at 16x16 and 32x32 latents, and the stored
/// filter also beats im2col at 8x8 (about 44 ms less). SD 1.5 then peaks at 5.8 GB at 512 px.
const WINOGRAD4_MAX_OUT_CHANNELS: usize = 640;

/// Memory a convolution leaves available when it keeps a second form of its weight for speed (a
/// wide layer's F(2x2, 3x3) filter, the im2col matrix for gradients): room for the runs, the
/// text encoder and the VAE, and the rest of the system.
const MEMORY_RESERVE_BYTES: u64 = 4 << 30;

/// Whether keeping `extra_bytes` more with `available_bytes` of memory available leaves at least
/// [`MEMORY_RESERVE_BYTES`]. A wide convolution of a model built for f32 products that may not
/// store its F(2x2, 3x3) filter transforms it on each call instead, slower but with no memory
/// beyond the weight.
fn leaves_memory_reserve(extra_bytes: u64, available_bytes: u64) -> bool {
    available_bytes >= extra_bytes.saturating_add(MEMORY_RESERVE_BYTES)
}

/// Bytes the F(2x2, 3x3) filter of the im2col weight `matrix` (`[9 * in, out]` f32) takes beyond
/// the weight it replaces: 7/9 of it.
fn wide_filter_extra_bytes(matrix: &Tensor) -> u64 {
    (matrix.elem_count() as u64).saturating_mul(4 * 7) / 9
}

/// A wide layer's stored F(2x2, 3x3) filter (16/9 of the weight) runs im2col on inputs of fewer
/// 2x2 tiles than this, with the weight transformed back once and kept where memory allows: few
/// tiles make both ways read their weight more than they multiply. SD 1.5's 1280-channel layers
/// at 256 px, per UNet call: at 4x4 latents (8 tiles) im2col 66.7 / 35.5 ms against Winograd
/// 108.7 / 61.7 ms; at 8x8 (32 tiles) Winograd was faster (above).
const WIDE_FILTER_MIN_TILES: usize = 16;

/// In a model built for bf16 products, wider 3x3 convolutions transform their filter on each call
/// when the input has at least this many 2x2 tiles (the transform then costs far less than the
/// multiplications it saves).
const WINOGRAD_ON_THE_FLY_MIN_TILES: usize = 128;

/// How a convolution multiplies.
#[derive(Clone, Debug)]
enum ConvKernel {
    /// im2col patches times the weight as `[k * k * in, out]` (contiguous for real weights).
    Patches(Tensor),
    /// Winograd F(2x2, 3x3) with the stored transformed filter `[16, in, out]` (3x3, stride 1,
    /// padding 1, f32).
    Winograd(StoredFilter),
    /// Winograd F(4x4, 3x3) with the stored transformed filter `[36, in, out]` (3x3, stride 1,
    /// padding 1, f32); bf16 products take F(2x2, 3x3), made from it.
    Winograd4(StoredFilter),
    /// The weight as `[3 * 3 * in, out]` (contiguous for real weights), transformed on the fly
    /// for large inputs and used as the im2col matrix otherwise (wide layers of a model built for
    /// bf16 products, or where memory is short).
    WinogradOnTheFly(Tensor),
}

/// A stored Winograd filter, `[positions, in, out]` (16 positions for F(2x2, 3x3), 36 for F(4x4,
/// 3x3)).
#[derive(Clone, Debug)]
enum StoredFilter {
    /// As matrices (contiguous): the F(4x4, 3x3) filters, models built for bf16 products (which
    /// pack their own copy), and output channel counts that are not a multiple of
    /// [`kernels::PANEL_COLUMNS`].
    Matrices(Tensor),
    /// As panels of 64 output channels that the f32 products read in place, so gemm no longer
    /// packs each position's `in x out` matrix on every call; the tiles are read once per panel
    /// instead. That pays where the filter is large against the tiles: the wide layers' F(2x2,
    /// 3x3) filters (SD 1.5 at 512 px, per UNet call, profiles of two calls against the packing
    /// build, alternating: those stages 590-640 -> 550-577 ms). The F(4x4, 3x3) filters (at
    /// most 640 output channels, hundreds of tiles per product) got slower: 465-477 -> 499-503 ms.
    Panels(kernels::ColumnPanels),
}

impl StoredFilter {
    /// `filter` `[positions, in, out]`, as panels where f32 products will read it and the output
    /// channels allow.
    fn new(filter: Tensor, f32_products: bool) -> candle_core::Result<Self> {
        if f32_products {
            if let Some(panels) = kernels::ColumnPanels::new(&filter)? {
                return Ok(Self::Panels(panels));
            }
        }
        Ok(Self::Matrices(filter))
    }

    /// The filter as `[positions, in, out]` (a new tensor for panels).
    fn matrices(&self) -> candle_core::Result<Tensor> {
        match self {
            Self::Matrices(filter) => Ok(filter.clone()),
            Self::Panels(panels) => panels.matrices(),
        }
    }

    /// Transform positions: 16 or 36.
    fn positions(&self) -> candle_core::Result<usize> {
        match self {
            Self::Matrices(filter) => filter.dim(0),
            Self::Panels(panels) => Ok(panels.batch()),
        }
    }

    /// The products of transformed tiles `[positions, tiles, in]` with the filter: `[positions,
    /// tiles, out]`.
    fn products(&self, tiles: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Matrices(filter) => kernels::batched_matmul_parallel(tiles, filter),
            Self::Panels(panels) => kernels::batched_matmul_panels(tiles, panels),
        }
    }
}

/// Where a Winograd convolution's transformed filter comes from.
#[derive(Clone, Copy)]
enum WinogradFilter<'a> {
    /// Stored: `[16, in, out]` (F(2x2, 3x3)) or `[36, in, out]` (F(4x4, 3x3)).
    Stored(&'a StoredFilter),
    /// Transformed block by block during the products (F(2x2, 3x3)) from the weight as `[3 * 3
    /// * in, out]` (see [`kernels::winograd_products_from_weight`]).
    FromWeight(&'a Tensor),
}

/// A 2-D convolution with bias on channels-last input. The diffusers weight `[out, in, k, k]` is
/// repacked as `[k * k * in, out]` to match the patch layout, or transformed for Winograd.
#[derive(Clone, Debug)]
pub struct Conv2d {
    kernel_weights: ConvKernel,
    /// The stored Winograd filter packed for bf16 products, made on the first call with bf16
    /// products (shared by clones).
    winograd_bf16: Arc<OnceLock<kernels::PackedWinogradFilter>>,
    /// A stored Winograd filter's im2col matrix, kept after its first use (gradients, inputs too
    /// small for a wide layer's Winograd) where memory allows; `None` once memory did not allow
    /// it. Decided once (shared by clones).
    kept_matrix: Arc<OnceLock<Option<Tensor>>>,
    /// The im2col matrix packed for bf16 products (made on first use, shared by clones).
    matrix_packing: kernels::WeightPacking,
    bias: Tensor,
    in_channels: usize,
    out_channels: usize,
    geometry: PatchGeometry,
}

impl Conv2d {
    /// Loads `weight` `[out, in, k, k]` and `bias` `[out]` under `vb`; `padding` on every side.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        padding: usize,
        stride: usize,
    ) -> PipelineResult<Self> {
        Self::with_padding(
            vb,
            in_channels,
            out_channels,
            kernel,
            stride,
            (padding, padding),
        )
    }

    /// Like [`Conv2d::new`] with `(before, after)` zero padding (top/left, bottom/right).
    pub fn with_padding(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        (pad_before, pad_after): (usize, usize),
    ) -> PipelineResult<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = vb.get(out_channels, "bias")?;
        // A lazily broadcast placeholder (shape-checking loads) is not real data: keep it a view.
        let is_real = weight.is_contiguous();
        let patch = kernel * kernel * in_channels;
        // `[out, k, k, in]` (the patch order) -> `[k * k * in, out]`: the GEMM's right-hand factor
        // with contiguous rows.
        let matrix = if is_real {
            transposed(
                &weight
                    .permute((0, 2, 3, 1))?
                    .reshape((out_channels, patch))?,
            )?
        } else {
            Tensor::zeros((), weight.dtype(), weight.device())?
                .broadcast_as((patch, out_channels))?
        };
        let winograd_shape = kernel == 3 && stride == 1 && (pad_before, pad_after) == (1, 1);
        let kernel_weights = if winograd_shape
            && weight.dtype() == DType::F32
            && weight.device().is_cpu()
        {
            // bf16 products run F(2x2, 3x3): a model built for them keeps that filter.
            let f32_products = !kernels::product_precision().uses_bf16_here();
            if is_real && out_channels <= WINOGRAD4_MAX_OUT_CHANNELS && f32_products {
                ConvKernel::Winograd4(StoredFilter::Matrices(kernels::winograd4_filter(&matrix)?))
            } else if is_real
                && (out_channels <= WINOGRAD_STORED_MAX_OUT_CHANNELS
                    || (f32_products
                        && leaves_memory_reserve(
                            wide_filter_extra_bytes(&matrix),
                            limits::available_memory().bytes,
                        )))
            {
                // With f32 products only wide layers (many channels, few tiles) come here: their
                // filters are worth their panels.
                ConvKernel::Winograd(StoredFilter::new(
                    kernels::winograd_filter(&matrix)?,
                    f32_products,
                )?)
            } else {
                ConvKernel::WinogradOnTheFly(matrix)
            }
        } else {
            ConvKernel::Patches(matrix)
        };
        Ok(Self {
            kernel_weights,
            winograd_bf16: Arc::default(),
            kept_matrix: Arc::default(),
            matrix_packing: kernels::WeightPacking::default(),
            bias,
            in_channels,
            out_channels,
            geometry: PatchGeometry {
                kernel,
                stride,
                pad_before,
                pad_after,
            },
        })
    }

    /// `[batch, h, w, in]` -> `[batch, h', w', out]`.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with_bias(xs, None)
    }

    /// Like [`Conv2d::forward`], adding `extra_bias` `[batch, out]` (one row per batch item) to the
    /// output, e.g. a resnet's time-embedding projection.
    pub fn forward_with_bias(
        &self,
        xs: &Tensor,
        extra_bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (batch, height, width, channels) = xs.dims4()?;
        if channels != self.in_channels {
            candle_core::bail!(
                "conv expects {} input channels, got {channels}",
                self.in_channels
            );
        }
        if xs.track_op() || extra_bias.is_some_and(Tensor::track_op) {
            return self.forward_differentiable(xs, extra_bias);
        }
        let xs = xs.contiguous()?;
        let tiles = batch * height.div_ceil(2) * width.div_ceil(2);
        let label = || {
            let method = match &self.kernel_weights {
                ConvKernel::Patches(_) => "im2col",
                ConvKernel::Winograd(_) | ConvKernel::Winograd4(_)
                    if self.fused_bf16_winograd() =>
                {
                    "winograd bf16 fused"
                }
                ConvKernel::Winograd(_) if self.small_input_takes_im2col(tiles) => {
                    "im2col (kept weight)"
                }
                ConvKernel::Winograd(_) => "winograd",
                ConvKernel::Winograd4(_) => "winograd4",
                ConvKernel::WinogradOnTheFly(_) if tiles >= WINOGRAD_ON_THE_FLY_MIN_TILES => {
                    "winograd+filter"
                }
                ConvKernel::WinogradOnTheFly(_) => "im2col",
            };
            let kernel = self.geometry.kernel;
            format!(
                "conv{kernel}x{kernel} {method} {}->{} @{height}x{width}",
                self.in_channels, self.out_channels
            )
        };
        profile::measure(label, || self.forward_contiguous(&xs, tiles, extra_bias))
    }

    /// The differentiable path of [`Conv2d::forward_with_bias`] (see [`differentiable`]): the
    /// fused forward on the detached input, and as backward the input's gradient only,
    /// `col2im(grad x W^T)` with the weight as `[k * k * in, out]`.
    fn forward_differentiable(
        &self,
        xs: &Tensor,
        extra_bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        if extra_bias.is_some_and(Tensor::track_op) {
            candle_core::bail!("a convolution's extra bias cannot carry gradients");
        }
        let (batch, height, width, channels) = xs.dims4()?;
        let out = self.forward_with_bias(&xs.detach(), extra_bias)?;
        let matrix = self.gradient_matrix()?;
        let geometry = self.geometry;
        let out_channels = self.out_channels;
        differentiable::with_backward(xs, out, move |grad| {
            let rows = grad.elem_count() / out_channels.max(1);
            let patches = grad.reshape((rows, out_channels))?.matmul(&matrix.t()?)?;
            differentiable::col2im(&patches, geometry, (batch, height, width, channels))
        })
    }

    /// [`Conv2d::weight_matrix`] for a backward pass: a stored Winograd filter's is transformed
    /// back once and kept where memory allows ([`Conv2d::kept_matrix`]), else on every call (42
    /// ms for 1280 x 1280 channels).
    fn gradient_matrix(&self) -> candle_core::Result<Tensor> {
        match &self.kernel_weights {
            ConvKernel::Patches(matrix) | ConvKernel::WinogradOnTheFly(matrix) => {
                Ok(matrix.clone())
            }
            ConvKernel::Winograd(_) | ConvKernel::Winograd4(_) => match self.kept_matrix()? {
                Some(matrix) => Ok(matrix),
                None => self.weight_matrix(),
            },
        }
    }

    /// The im2col matrix of a stored Winograd filter, transformed back on first use and kept when
    /// that leaves the memory reserve ([`leaves_memory_reserve`]); `None` where it may not be kept
    /// (decided on the first use, so later calls read no memory figures).
    fn kept_matrix(&self) -> candle_core::Result<Option<Tensor>> {
        if let Some(kept) = self.kept_matrix.get() {
            return Ok(kept.clone());
        }
        let (in_rows, out) = (9 * self.in_channels, self.out_channels);
        let bytes = ((in_rows * out) as u64).saturating_mul(4);
        let kept = if leaves_memory_reserve(bytes, limits::available_memory().bytes) {
            Some(self.weight_matrix()?)
        } else {
            None
        };
        Ok(self.kept_matrix.get_or_init(|| kept).clone())
    }

    /// The weight as `[k * k * in, out]`; a stored Winograd filter is transformed back
    /// ([`kernels::winograd_weight`]).
    fn weight_matrix(&self) -> candle_core::Result<Tensor> {
        match &self.kernel_weights {
            ConvKernel::Patches(matrix) | ConvKernel::WinogradOnTheFly(matrix) => {
                Ok(matrix.clone())
            }
            ConvKernel::Winograd(filter) | ConvKernel::Winograd4(filter) => {
                kernels::winograd_weight(&filter.matrices()?)
            }
        }
    }

    /// [`Conv2d::forward_with_bias`] on contiguous input with `tiles` 2x2 Winograd tiles.
    fn forward_contiguous(
        &self,
        xs: &Tensor,
        tiles: usize,
        extra_bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let xs = xs.clone();
        match &self.kernel_weights {
            ConvKernel::Patches(matrix) => self.forward_patches(&xs, matrix, extra_bias),
            ConvKernel::Winograd(filter) if self.small_input_takes_im2col(tiles) => {
                match self.kept_matrix()? {
                    Some(matrix) => self.forward_patches(&xs, &matrix, extra_bias),
                    None => self.forward_winograd(&xs, WinogradFilter::Stored(filter), extra_bias),
                }
            }
            ConvKernel::Winograd(filter) | ConvKernel::Winograd4(filter) => {
                self.forward_winograd(&xs, WinogradFilter::Stored(filter), extra_bias)
            }
            ConvKernel::WinogradOnTheFly(matrix) => {
                if tiles < WINOGRAD_ON_THE_FLY_MIN_TILES {
                    self.forward_patches(&xs, matrix, extra_bias)
                } else if kernels::product_precision().uses_bf16_here() {
                    // bf16 products convert their operands per product: filter blocks would
                    // convert the tiles once per block, so the whole filter is transformed.
                    let filter = StoredFilter::Matrices(kernels::winograd_filter(matrix)?);
                    self.forward_winograd(&xs, WinogradFilter::Stored(&filter), extra_bias)
                } else {
                    self.forward_winograd(&xs, WinogradFilter::FromWeight(matrix), extra_bias)
                }
            }
        }
    }

    /// Whether a wide layer's stored F(2x2, 3x3) filter gives way to im2col on an input of
    /// `tiles` 2x2 tiles (see [`WIDE_FILTER_MIN_TILES`]; where the matrix may not be kept, the
    /// filter runs after all).
    fn small_input_takes_im2col(&self, tiles: usize) -> bool {
        matches!(self.kernel_weights, ConvKernel::Winograd(_))
            && tiles < WIDE_FILTER_MIN_TILES
            && self.out_channels > WINOGRAD_STORED_MAX_OUT_CHANNELS
            && !self.fused_bf16_winograd()
    }

    /// The bias of batch item `item`: `bias + extra_bias[item]`, `[out]`.
    fn item_bias(&self, extra_bias: Option<&Tensor>, item: usize) -> candle_core::Result<Tensor> {
        match extra_bias {
            Some(extra) => &self.bias + extra.get(item)?,
            None => Ok(self.bias.clone()),
        }
    }

    /// im2col path; `matrix` is the weight as `[k * k * in, out]`. The whole batch goes through
    /// each product (chunks of output rows may span items), so the weight is read once per chunk
    /// rather than once per item.
    fn forward_patches(
        &self,
        xs: &Tensor,
        matrix: &Tensor,
        extra_bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (batch, height, width, channels) = xs.dims4()?;
        let geometry = self.geometry;
        let (out_h, out_w) = (geometry.output_size(height), geometry.output_size(width));
        let patch = geometry.kernel * geometry.kernel * self.in_channels;
        let is_pointwise = geometry.kernel == 1
            && geometry.stride == 1
            && geometry.pad_before == 0
            && geometry.pad_after == 0;
        let row_bytes = out_w * patch * xs.dtype().size_in_bytes();
        let batch_rows = batch * out_h;
        let rows_per_chunk = (CONV_CHUNK_BYTES / row_bytes.max(1)).clamp(1, batch_rows.max(1));
        let biases = (0..batch)
            .map(|item| self.item_bias(extra_bias, item))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < batch_rows {
            let rows = rows_per_chunk.min(batch_rows - start);
            let patches = if is_pointwise {
                xs.reshape((batch * height * width, channels))?.narrow(
                    0,
                    start * out_w,
                    rows * out_w,
                )?
            } else {
                kernels::im2col(xs, geometry, start..start + rows)?
            };
            if extra_bias.is_none() {
                // One bias for every item: added inside the product.
                pieces.push(product_of(
                    &patches,
                    matrix,
                    Some(&self.bias),
                    &self.matrix_packing,
                )?);
                start += rows;
                continue;
            }
            let product = product_of(&patches, matrix, None, &self.matrix_packing)?;
            // Each item's rows of the chunk get that item's bias.
            let mut row = start;
            while row < start + rows {
                let item = row / out_h;
                let item_end = ((item + 1) * out_h).min(start + rows);
                let part = if (row, item_end) == (start, start + rows) {
                    product.clone()
                } else {
                    product.narrow(0, (row - start) * out_w, (item_end - row) * out_w)?
                };
                pieces.push(kernels::add_bias(part, &biases[item], true)?);
                row = item_end;
            }
            start += rows;
        }
        let out = if pieces.len() == 1 {
            pieces.remove(0)
        } else {
            Tensor::cat(&pieces, 0)?
        };
        out.reshape((batch, out_h, out_w, self.out_channels))
    }

    /// Whether this convolution runs the fused Winograd kernel with bf16 products: a stored
    /// filter, the calling thread's products in bf16 on a CPU with AVX-512 BF16, channel counts
    /// the kernel takes.
    fn fused_bf16_winograd(&self) -> bool {
        matches!(
            self.kernel_weights,
            ConvKernel::Winograd(_) | ConvKernel::Winograd4(_)
        ) && kernels::product_precision().uses_bf16_here()
            && kernels::winograd_bf16_supported(self.in_channels, self.out_channels)
    }

    /// Winograd with the transformed filter `filter`, `[16, in, out]` for F(2x2, 3x3) or `[36, in,
    /// out]` for F(4x4, 3x3): per block of tile rows (counted over the whole batch, so the filter
    /// is read once per block rather than once per item), transform the input tiles, multiply by
    /// the filter (one matrix product per transform position) and transform back. bf16 products
    /// run the fused F(2x2, 3x3) instead.
    fn forward_winograd(
        &self,
        xs: &Tensor,
        filter: WinogradFilter<'_>,
        extra_bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (batch, height, width, _) = xs.dims4()?;
        // `[batch, out]` when each item has its own bias, else `[out]`.
        let biases: Vec<f32> = match extra_bias {
            Some(extra) => extra
                .broadcast_add(&self.bias)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            None => self.bias.to_dtype(DType::F32)?.to_vec1()?,
        };
        if self.fused_bf16_winograd() {
            let packed = match self.winograd_bf16.get() {
                Some(packed) => packed,
                None => {
                    let packed = match (&self.kernel_weights, filter) {
                        (ConvKernel::Winograd(_), WinogradFilter::Stored(filter)) => {
                            kernels::pack_winograd_filter(&filter.matrices()?)?
                        }
                        _ => kernels::pack_winograd_filter(&kernels::winograd_filter(
                            &self.weight_matrix()?,
                        )?)?,
                    };
                    self.winograd_bf16.get_or_init(|| packed)
                }
            };
            return kernels::winograd_conv_bf16(xs, packed, &biases);
        }
        let positions = match filter {
            WinogradFilter::Stored(filter) => filter.positions()?,
            WinogradFilter::FromWeight(_) => 16,
        };
        let tile = if positions == 36 { 4 } else { 2 };
        let (tiles_h, tiles_w) = (height.div_ceil(tile), width.div_ceil(tile));
        let batch_rows = batch * tiles_h;
        let widest = self.in_channels.max(self.out_channels);
        // Chunks hold at least as many elements as the filter, so a wide filter (larger than the
        // tiles themselves) is read (or transformed) once, not once per chunk.
        let filter_elements = positions * self.in_channels * self.out_channels;
        let chunk_elements = WINOGRAD_CHUNK_ELEMENTS.max(filter_elements);
        let rows_per_chunk =
            (chunk_elements / (positions * tiles_w * widest).max(1)).clamp(1, batch_rows.max(1));
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < batch_rows {
            let rows = start..(start + rows_per_chunk).min(batch_rows);
            let piece = match filter {
                WinogradFilter::Stored(filter) if tile == 4 => {
                    let transformed = kernels::winograd4_input(xs, rows.clone())?;
                    let products = filter.products(&transformed)?;
                    let biases = biases.clone();
                    kernels::winograd4_output(&products, rows.clone(), height, width, biases)?
                }
                _ => {
                    let transformed = kernels::winograd_input(xs, rows.clone())?;
                    let products = match filter {
                        WinogradFilter::Stored(filter) => filter.products(&transformed)?,
                        WinogradFilter::FromWeight(matrix) => {
                            kernels::winograd_products_from_weight(&transformed, matrix)?
                        }
                    };
                    let biases = biases.clone();
                    kernels::winograd_output(&products, rows.clone(), height, width, biases)?
                }
            };
            pieces.push(piece);
            start = rows.end;
        }
        let out = if pieces.len() == 1 {
            pieces.remove(0)
        } else {
            Tensor::cat(&pieces, 0)?
        };
        out.reshape((batch, height, width, self.out_channels))
    }
}

/// Rows up to which a matrix product splits the weight's columns over the cores (each core
/// reads its share of the weight, once) when the weight has at least as many columns as the
/// product has rows. Splitting rows instead makes every row piece read the whole weight.
/// Single products, best of 9 (rows split / columns split): 154x768x1280 1.53-1.64 / 1.17-1.21
/// ms, 512x2560x640 6.0-6.1 / 5.5 ms, 512x640x5120 12.2-12.4 / 11.8 ms, 512x640x640 1.43 / 1.47
/// ms, 1024x320x2560 5.7-5.9 / 6.2-12.2 ms.
const SPLIT_COLUMNS_MAX_ROWS: usize = 512;

/// `xs` `[rows, in]` times `weight` `[in, out]`, plus `bias` `[out]` on every row when given,
/// split over the cores by attend rather than inside the GEMM: by the weight's columns for few
/// rows and a weight at least as wide (each core reads its share of the weight), by rows
/// otherwise (each core one product, no per-call thread hand-offs). The bias is added inside the
/// products (no second pass over the output).
fn product_of(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    packing: &kernels::WeightPacking,
) -> candle_core::Result<Tensor> {
    let (rows, _) = xs.dims2()?;
    let (_, columns) = weight.dims2()?;
    let plain_f32 = xs.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && weight.is_contiguous()
        && xs.device().is_cpu();
    if !plain_f32 {
        let out = xs.matmul(weight)?;
        match bias {
            Some(bias) => kernels::add_bias(out, bias, true),
            None => Ok(out),
        }
    } else if rows <= SPLIT_COLUMNS_MAX_ROWS && columns >= rows {
        kernels::matmul_split_columns(xs, weight, bias)
    } else {
        kernels::matmul_split_rows(xs, weight, bias, Some(packing))
    }
}

/// `[rows, cols]` -> `[cols, rows]`, materialised for real (contiguous) weights; a lazily
/// broadcast placeholder from a shape-checking load stays a view.
fn transposed(weight: &Tensor) -> candle_core::Result<Tensor> {
    if weight.is_contiguous() {
        weight.t()?.contiguous()
    } else {
        weight.t()
    }
}

/// A linear layer (`weight` `[out, in]`, optional `bias` `[out]`) applied to the last dimension.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[in, out]`: the transposed weight, contiguous for real weights (faster to multiply).
    weight_t: Tensor,
    bias: Option<Tensor>,
    /// `weight_t` packed for bf16 products (made on first use, shared by clones).
    packing: kernels::WeightPacking,
}

impl Linear {
    /// Loads `weight` (and `bias` when `with_bias`) under `vb`.
    pub fn new(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        with_bias: bool,
    ) -> PipelineResult<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = if with_bias {
            Some(vb.get(out_features, "bias")?)
        } else {
            None
        };
        Ok(Self {
            weight_t: transposed(&weight)?,
            bias,
            packing: kernels::WeightPacking::default(),
        })
    }

    /// A 1x1 convolution's `weight` `[out, in, 1, 1]` and `bias` under `vb`, as a linear layer.
    pub fn from_pointwise_conv(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
    ) -> PipelineResult<Self> {
        let weight = vb.get((out_features, in_features, 1, 1), "weight")?;
        let bias = vb.get(out_features, "bias")?;
        // `squeeze` keeps a lazily broadcast placeholder a view.
        let weight = weight.squeeze(3)?.squeeze(2)?;
        Ok(Self {
            weight_t: transposed(&weight)?,
            bias: Some(bias),
            packing: kernels::WeightPacking::default(),
        })
    }

    /// The transposed weight, `[in, out]`.
    pub(super) fn weight_t(&self) -> &Tensor {
        &self.weight_t
    }

    /// The layer as attend's fused kernels take it (transposed weight, bias, bf16 packing), when
    /// it has a bias and a plain f32 weight (see [`Linear::has_plain_f32_weight`]).
    pub(super) fn kernel_parts(&self) -> Option<kernels::LinearParts<'_>> {
        let bias = self.bias.as_ref().filter(|_| self.has_plain_f32_weight())?;
        Some(kernels::LinearParts {
            weight: &self.weight_t,
            bias,
            packing: Some(&self.packing),
        })
    }

    /// Whether the weight is f32 values in CPU memory, laid out for attend's own product kernels
    /// (not a lazily broadcast placeholder of a shape-checking load).
    pub(super) fn has_plain_f32_weight(&self) -> bool {
        self.weight_t.dtype() == DType::F32
            && self.weight_t.is_contiguous()
            && self.weight_t.device().is_cpu()
    }

    /// `[..., in]` -> `[..., out]`; the leading dimensions are flattened into one matrix product.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dims = xs.dims().to_vec();
        let Some((&in_features, leading)) = dims.split_last() else {
            candle_core::bail!("linear layer applied to a scalar");
        };
        let rows: usize = leading.iter().product();
        let flat = xs.reshape((rows, in_features))?;
        let out_features = self.weight_t.dim(1)?;
        if xs.track_op() {
            // The differentiable path (see [`differentiable`]): the fused forward, and as
            // backward the input's gradient only, `grad x W`.
            let out = self.forward(&xs.detach())?;
            let weight_t = self.weight_t.clone();
            let input_dims = dims.clone();
            return differentiable::with_backward(xs, out, move |grad| {
                grad.reshape((rows, out_features))?
                    .matmul(&weight_t.t()?)?
                    .reshape(input_dims.as_slice())
            });
        }
        let label = || format!("linear {in_features}->{out_features} x{rows}");
        let out = profile::measure(label, || {
            product_of(&flat, &self.weight_t, self.bias.as_ref(), &self.packing)
        })?;
        let mut out_dims = leading.to_vec();
        out_dims.push(out.dim(1)?);
        out.reshape(out_dims)
    }
}

/// Group normalisation of channels-last `[batch, ..., channels]` data with a per-channel affine
/// transform, optionally followed by SiLU (the pair every resnet uses).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` (`[channels]`) under `vb`.
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> PipelineResult<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// `[batch, ..., channels]` -> same shape, normalised per (batch item, channel group).
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if xs.track_op() {
            return self.forward_differentiable(xs, false);
        }
        profile::measure(
            || format!("group norm {:?}", xs.dims()),
            || kernels::group_norm(xs, self.groups, self.eps, &self.weight, &self.bias, false),
        )
    }

    /// `silu(group_norm(xs))`, same shape.
    pub fn forward_silu(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if xs.track_op() {
            return self.forward_differentiable(xs, true);
        }
        profile::measure(
            || format!("group norm + silu {:?}", xs.dims()),
            || kernels::group_norm(xs, self.groups, self.eps, &self.weight, &self.bias, true),
        )
    }

    /// [`GroupNorm::forward`] (`silu`: [`GroupNorm::forward_silu`]) of channels-last
    /// `[batch, h, w, channels]`, each item normalised with the statistics of itself and the
    /// item `shared` names, concatenated along the height (Style Aligned's group norm sharing);
    /// items sharing with nobody, and every item when `shared` is `None` or shares nothing, take
    /// the fused kernel alone (the same values as without sharing).
    pub fn forward_shared(
        &self,
        xs: &Tensor,
        shared: Option<&SharedGroupNorm>,
        silu: bool,
    ) -> candle_core::Result<Tensor> {
        let plain = |xs: &Tensor| {
            kernels::group_norm(xs, self.groups, self.eps, &self.weight, &self.bias, silu)
        };
        let Some(shared) = shared.filter(|shared| shared.shares_any()) else {
            // Unshared: exactly the plain layer, differentiable path included.
            return if silu {
                self.forward_silu(xs)
            } else {
                self.forward(xs)
            };
        };
        if xs.track_op() {
            candle_core::bail!(
                "shared group norm has no differentiable path (gradients would be cut here)"
            );
        }
        let (batch, height, _, _) = xs.dims4()?;
        if shared.references.len() != batch {
            candle_core::bail!(
                "shared group norm: {} references for a batch of {batch}",
                shared.references.len()
            );
        }
        profile::measure(
            || format!("shared group norm {:?}", xs.dims()),
            || {
                // Items alone first, then the sharing items as `[own; reference]` pairs, each
                // set in one kernel call; the rows are put back in batch order.
                let mut alone = Vec::new();
                let mut pairs = Vec::new();
                for (item, reference) in shared.references.iter().enumerate() {
                    match reference {
                        Some(reference) if *reference != item => {
                            if *reference >= batch {
                                candle_core::bail!(
                                    "shared group norm: item {item} shares with item \
                                     {reference} of a batch of {batch}"
                                );
                            }
                            pairs.push((item, *reference));
                        }
                        _ => alone.push(item),
                    }
                }
                let mut rows: Vec<Option<Tensor>> = vec![None; batch];
                if !alone.is_empty() {
                    let items = select_items(xs, &alone)?;
                    let normed = plain(&items)?;
                    for (index, &item) in alone.iter().enumerate() {
                        rows[item] = Some(normed.narrow(0, index, 1)?);
                    }
                }
                let joined = pairs
                    .iter()
                    .map(|&(item, reference)| {
                        Tensor::cat(&[&xs.narrow(0, item, 1)?, &xs.narrow(0, reference, 1)?], 1)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let normed = plain(&Tensor::cat(&joined, 0)?)?.narrow(1, 0, height)?;
                for (index, &(item, _)) in pairs.iter().enumerate() {
                    rows[item] = Some(normed.narrow(0, index, 1)?);
                }
                let rows = rows.into_iter().flatten().collect::<Vec<_>>();
                Tensor::cat(&rows, 0)?.contiguous()
            },
        )
    }
}

/// Items `items` of `xs` (`[batch, ...]`) as one tensor `[items.len(), ...]`.
fn select_items(xs: &Tensor, items: &[usize]) -> candle_core::Result<Tensor> {
    let pieces = items
        .iter()
        .map(|&item| xs.narrow(0, item, 1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&pieces, 0)
}

impl GroupNorm {
    /// The differentiable path (see [`differentiable`]): the fused forward, the closed-form
    /// input gradient as backward.
    fn forward_differentiable(&self, xs: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let detached = xs.detach();
        let out = if silu {
            self.forward_silu(&detached)?
        } else {
            self.forward(&detached)?
        };
        let dims = xs.dims();
        let (Some(&batch), Some(&channels)) = (dims.first(), dims.last()) else {
            candle_core::bail!("group norm applied to a scalar");
        };
        let positions = xs.elem_count() / (batch * channels).max(1);
        let shape = (batch, positions, self.groups, channels / self.groups.max(1));
        let (weight, bias, eps) = (self.weight.clone(), self.bias.clone(), self.eps);
        differentiable::with_backward(xs, out, move |grad| {
            differentiable::normalisation_input_gradient(
                &detached,
                grad,
                (&weight, &bias),
                eps,
                shape,
                silu,
            )
        })
    }
}

/// Layer normalisation over the last dimension with weight and bias (`[channels]`).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` under `vb`.
    pub fn new(vb: VarBuilder, channels: usize, eps: f64) -> PipelineResult<Self> {
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            eps,
        })
    }

    /// `[..., channels]` -> same shape.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if xs.track_op() {
            return self.forward_differentiable(xs);
        }
        profile::measure(
            || format!("layer norm {:?}", xs.dims()),
            || {
                if xs.device().is_cpu() {
                    kernels::layer_norm(xs, &self.weight, &self.bias, self.eps)
                } else {
                    candle_nn::ops::layer_norm(
                        &xs.contiguous()?,
                        &self.weight,
                        &self.bias,
                        self.eps as f32,
                    )
                }
            },
        )
    }
}

impl LayerNorm {
    /// The differentiable path (see [`differentiable`]): the fused forward, the closed-form
    /// input gradient as backward.
    fn forward_differentiable(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let detached = xs.detach();
        let out = self.forward(&detached)?;
        let channels = xs.dim(candle_core::D::Minus1)?;
        let shape = (xs.elem_count() / channels.max(1), 1, 1, channels);
        let (weight, bias, eps) = (self.weight.clone(), self.bias.clone(), self.eps);
        differentiable::with_backward(xs, out, move |grad| {
            differentiable::normalisation_input_gradient(
                &detached,
                grad,
                (&weight, &bias),
                eps,
                shape,
                false,
            )
        })
    }
}

/// diffusers' `ResnetBlock2D` (`resnet_time_scale_shift = "default"`, SiLU): two group-norm/SiLU/conv
/// stages, an optional time-embedding projection added between them, and a 1x1 `conv_shortcut`
/// when the channel count changes.
#[derive(Clone, Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// Shape parameters of a [`ResnetBlock`].
#[derive(Clone, Copy, Debug)]
pub struct ResnetSpec {
    /// Channels in.
    pub in_channels: usize,
    /// Channels out.
    pub out_channels: usize,
    /// Width of the time embedding, `None` for the VAE (no `time_emb_proj`).
    pub time_embedding_width: Option<usize>,
    /// Group norm groups.
    pub groups: usize,
    /// Group norm epsilon.
    pub eps: f64,
    /// The output is divided by this.
    pub output_scale_factor: f64,
}

impl ResnetBlock {
    /// Loads `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2` and `conv_shortcut` under `vb`.
    pub fn new(vb: VarBuilder, spec: ResnetSpec) -> PipelineResult<Self> {
        let ResnetSpec {
            in_channels,
            out_channels,
            time_embedding_width,
            groups,
            eps,
            output_scale_factor,
        } = spec;
        let norm1 = GroupNorm::new(vb.pp("norm1"), groups, in_channels, eps)?;
        let conv1 = Conv2d::new(vb.pp("conv1"), in_channels, out_channels, 3, 1, 1)?;
        let time_emb_proj = match time_embedding_width {
            Some(width) => Some(Linear::new(
                vb.pp("time_emb_proj"),
                width,
                out_channels,
                true,
            )?),
            None => None,
        };
        let norm2 = GroupNorm::new(vb.pp("norm2"), groups, out_channels, eps)?;
        let conv2 = Conv2d::new(vb.pp("conv2"), out_channels, out_channels, 3, 1, 1)?;
        let conv_shortcut = if in_channels != out_channels {
            Some(Conv2d::new(
                vb.pp("conv_shortcut"),
                in_channels,
                out_channels,
                1,
                0,
                1,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor,
        })
    }

    /// `xs` `[batch, h, w, in]`, `activated_time_embedding` `[batch, width]` (the SiLU every resnet
    /// applies to the time embedding, computed once by the caller) -> `[batch, h, w, out]`.
    pub fn forward(
        &self,
        xs: &Tensor,
        activated_time_embedding: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.forward_shared(xs, activated_time_embedding, None)
    }

    /// [`ResnetBlock::forward`] with both group norms sharing statistics as `shared` says (see
    /// [`GroupNorm::forward_shared`]).
    pub fn forward_shared(
        &self,
        xs: &Tensor,
        activated_time_embedding: Option<&Tensor>,
        shared: Option<&SharedGroupNorm>,
    ) -> candle_core::Result<Tensor> {
        let time = match (&self.time_emb_proj, activated_time_embedding) {
            (Some(projection), Some(embedding)) => Some(projection.forward(embedding)?),
            _ => None,
        };
        let hidden = self
            .conv1
            .forward_with_bias(&self.norm1.forward_shared(xs, shared, true)?, time.as_ref())?;
        let hidden = self
            .conv2
            .forward(&self.norm2.forward_shared(&hidden, shared, true)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let out = kernels::add_to_fresh(hidden, &shortcut)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers' `Downsample2D` with a convolution (`conv`, 3x3, stride 2). Padding 1 pads all sides;
/// padding 0 (the VAE) pads one pixel right and bottom, as diffusers does before its convolution.
#[derive(Clone, Debug)]
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    /// Loads `conv` under `vb` (`vb` is `.../downsamplers.0`).
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> PipelineResult<Self> {
        let pads = if padding == 0 {
            (0, 1)
        } else {
            (padding, padding)
        };
        Ok(Self {
            conv: Conv2d::with_padding(vb.pp("conv"), channels, channels, 3, 2, pads)?,
        })
    }

    /// `[batch, h, w, c]` -> `[batch, ceil(h/2), ceil(w/2), c]` (padding 1; `floor` sizes for padding 0).
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.conv.forward(xs)
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest-neighbour resize, then `conv` (3x3).
#[derive(Clone, Debug)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    /// Loads `conv` under `vb` (`vb` is `.../upsamplers.0`).
    pub fn new(vb: VarBuilder, channels: usize) -> PipelineResult<Self> {
        Ok(Self {
            conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// `[batch, h, w, c]` -> `[batch, target_h, target_w, c]` (nearest, as torch's `interpolate`).
    pub fn forward(
        &self,
        xs: &Tensor,
        target_h: usize,
        target_w: usize,
    ) -> candle_core::Result<Tensor> {
        let upsampled = if xs.track_op() {
            differentiable::upsample_nearest(xs, target_h, target_w)?
        } else {
            profile::measure(
                || format!("upsample {:?}", xs.dims()),
                || kernels::upsample_nearest(xs, target_h, target_w),
            )?
        };
        self.conv.forward(&upsampled)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{Device, Module};

    use super::*;
    use crate::kernels::test_support::{max_abs_diff, values};

    #[test]
    fn wide_filters_are_stored_only_with_memory_to_spare() {
        let gib = 1u64 << 30;
        assert!(leaves_memory_reserve(gib, 6 * gib));
        assert!(leaves_memory_reserve(gib, 5 * gib));
        assert!(!leaves_memory_reserve(gib, 5 * gib - 1));
        assert!(!leaves_memory_reserve(u64::MAX, u64::MAX - 1));
        // SD 1.5's 1280 x 1280 convolutions: 59 MB of weight, 46 MB more as the filter.
        let matrix = Tensor::zeros((9 * 1280, 1280), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            wide_filter_extra_bytes(&matrix),
            9 * 1280 * 1280 * 4 * 7 / 9
        );
    }

    /// A 3x3 convolution wider than the F(4x4, 3x3) layers (its filter stored or transformed on
    /// each call, whichever the memory allows) gives candle's `conv2d` values, on inputs with few
    /// tiles and with many.
    #[test]
    fn wide_convolutions_match_conv2d() {
        // 648 output channels keep their filter as matrices, 704 (eleven panels) as panels.
        for out in [
            WINOGRAD4_MAX_OUT_CHANNELS + 8,
            WINOGRAD4_MAX_OUT_CHANNELS + kernels::PANEL_COLUMNS,
        ] {
            wide_convolution_matches_conv2d(out);
        }
    }

    fn wide_convolution_matches_conv2d(out: usize) {
        let device = Device::Cpu;
        let input = 3;
        let weight =
            Tensor::from_vec(values(out * input * 9, 1), (out, input, 3, 3), &device).unwrap();
        let bias = Tensor::from_vec(values(out, 2), out, &device).unwrap();
        let tensors = HashMap::from([
            ("weight".to_string(), weight.clone()),
            ("bias".to_string(), bias.clone()),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let conv = Conv2d::new(vb, input, out, 3, 1, 1).unwrap();
        // Stored (with memory to spare), the filter takes panels where they divide the channels.
        if let ConvKernel::Winograd(filter) = &conv.kernel_weights {
            let panels = matches!(filter, StoredFilter::Panels(_));
            assert_eq!(panels, out.is_multiple_of(kernels::PANEL_COLUMNS), "{out}");
        }
        let reference = candle_nn::Conv2d::new(
            weight,
            Some(bias),
            candle_nn::Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
        );
        // 8 tiles (im2col on the kept weight), 18 and 312 (the F(2x2, 3x3) filter).
        for (height, width) in [(4, 3), (6, 5), (26, 24)] {
            let shape = (2, height, width, input);
            let image =
                Tensor::from_vec(values(2 * height * width * input, 3), shape, &device).unwrap();
            let actual = conv.forward(&image).unwrap();
            let expected = reference
                .forward(&image.permute((0, 3, 1, 2)).unwrap())
                .unwrap()
                .permute((0, 2, 3, 1))
                .unwrap();
            let diff = max_abs_diff(&actual, &expected);
            assert!(diff < 1e-4, "{out} channels, {height}x{width}: {diff}");
        }
    }
}
