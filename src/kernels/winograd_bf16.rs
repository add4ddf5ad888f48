//! Winograd F(2x2, 3x3) convolution with bf16 products, fused per block of tile rows: the input
//! transform writes its tiles straight into the bf16 product's packed left operand, and the
//! sixteen products and the output transform run on that cache-sized block, so no `[16, tiles,
//! channels]` tensor is materialised, zeroed or packed. The filter is packed once per layer.
//!
//! The arithmetic is the unfused path's with bf16 products (`winograd.rs` then the bf16 product):
//! transforms in f32 in the same order, operands rounded to nearest even, the same register
//! tiles summing in f32, so both paths give the same values.

use std::cell::Cell;

use candle_core::{Result, Tensor};

use super::bf16::bf16_supported;
use super::buffers::{parallel_initialised, zeroed};
use super::operands::{f32_operand, with_values};

/// Tiles per block: about 64 (the products' rows; a multiple of the 6-row register tile is not
/// needed, the last tile is masked).
const BLOCK_TILES: usize = 64;
/// Output columns per pass over the sixteen products (one panel of the bf16 product).
const PANEL_COLUMNS: usize = 64;

thread_local! {
    /// Each thread's transformed tiles (`[16, tiles, in/2]` bf16 pairs) and products (`[16,
    /// tiles, 64]` f32), kept between calls: every element a block reads was written first.
    static TILES: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
    static PRODUCTS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// A Winograd filter `[16, in, out]` rounded to bf16 and packed as the bf16 product's right
/// operand, position by position.
#[derive(Clone, Debug)]
pub struct PackedWinogradFilter {
    in_channels: usize,
    out_channels: usize,
    /// 16 positions of `[in / 2, out rounded up to 16]` pairs in 64-column panels.
    panels: Vec<u32>,
}

impl PackedWinogradFilter {
    /// Elements of one position's panels.
    fn position_len(&self) -> usize {
        self.in_channels / 2 * self.out_channels.div_ceil(16) * 16
    }
}

/// Whether the fused bf16 Winograd convolution takes `in_channels -> out_channels` on this CPU
/// (AVX-512 BF16; input channels a multiple of 16, any number of output channels).
pub fn winograd_bf16_supported(in_channels: usize, out_channels: usize) -> bool {
    bf16_supported() && in_channels > 0 && out_channels > 0 && in_channels.is_multiple_of(16)
}

/// Packs a Winograd filter `[16, in, out]` (see [`winograd_filter`](super::winograd_filter)) for
/// [`winograd_conv_bf16`]. An error when the shape or the CPU is not supported
/// ([`winograd_bf16_supported`]).
pub fn pack_winograd_filter(filter: &Tensor) -> Result<PackedWinogradFilter> {
    let (positions, in_channels, out_channels) = filter.dims3()?;
    if positions != 16 || !winograd_bf16_supported(in_channels, out_channels) {
        candle_core::bail!(
            "winograd bf16: a filter {:?} is not [16, in, out] with input channels in multiples \
             of 16 on a CPU with AVX-512 BF16",
            filter.dims()
        );
    }
    let mut packed = PackedWinogradFilter {
        in_channels,
        out_channels,
        panels: Vec::new(),
    };
    let position_len = packed.position_len();
    let mut panels = vec![0u32; 16 * position_len];
    with_values(&f32_operand(filter)?, |values| {
        pack_positions(values, (in_channels, out_channels), &mut panels);
        Ok(())
    })?;
    packed.panels = panels;
    Ok(packed)
}

/// The 16 positions' `in x out` matrices of `values` rounded to bf16 and packed into `panels`
/// (`position_len` pairs each).
fn pack_positions(values: &[f32], (in_channels, out_channels): (usize, usize), panels: &mut [u32]) {
    let position_len = panels.len() / 16;
    #[cfg(target_arch = "x86_64")]
    for (position, out) in panels.chunks_exact_mut(position_len).enumerate() {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 BF16 is present (`winograd_bf16_supported`); position `position`'s
        // `in x out` matrix lies inside `values` (`16 * in * out` elements) and `out` has the
        // packed length `in/2 * out rounded up to 16` that `pack_rhs` writes.
        unsafe {
            super::bf16::x86::pack_rhs(
                values,
                position * in_channels * out_channels,
                out_channels,
                in_channels,
                out_channels,
                out,
            );
        }
    }
}

/// 3x3 convolution, stride 1, padding 1, by Winograd F(2x2, 3x3) with bf16 products: `xs`
/// `[batch, h, w, in]` (f32) with `filter` -> `[batch, h, w, out]` plus `biases` (`[out]` for
/// every item, or `[batch * out]`, one row per item).
pub fn winograd_conv_bf16(
    xs: &Tensor,
    filter: &PackedWinogradFilter,
    biases: &[f32],
) -> Result<Tensor> {
    let (batch, height, width, channels) = xs.dims4()?;
    let out_channels = filter.out_channels;
    if channels != filter.in_channels
        || !winograd_bf16_supported(channels, out_channels)
        || !(biases.len() == out_channels || biases.len() == batch * out_channels)
    {
        candle_core::bail!(
            "winograd bf16: input {:?}, a filter {} -> {out_channels} and {} bias values do not fit",
            xs.dims(),
            filter.in_channels,
            biases.len()
        );
    }
    let xs = f32_operand(xs)?;
    let out = with_values(&xs, |src| {
        convolve(src, (batch, height, width, channels), filter, biases)
    })?;
    Tensor::from_vec(out, (batch, height, width, out_channels), xs.device())
}

/// [`winograd_conv_bf16`] on the input's values `src` (`[batch, height, width, channels]`,
/// checked against the filter and the biases): the output's values.
fn convolve(
    src: &[f32],
    (batch, height, width, channels): (usize, usize, usize, usize),
    filter: &PackedWinogradFilter,
    biases: &[f32],
) -> Result<Vec<f32>> {
    let out_channels = filter.out_channels;
    let (tiles_h, tiles_w) = (height.div_ceil(2), width.div_ceil(2));
    let batch_rows = batch * tiles_h;
    // Blocks of whole tile rows (so each writes whole output rows), at least 4 of them when there
    // are enough rows, for the cores to share.
    let mut rows_per_block = (BLOCK_TILES / tiles_w.max(1)).clamp(1, batch_rows.max(1));
    while rows_per_block > 1 && batch_rows.div_ceil(rows_per_block) < 4 {
        rows_per_block /= 2;
    }
    let image_rows = |batch_row: usize| {
        if 2 * (batch_row % tiles_h) + 1 < height {
            2
        } else {
            1
        }
    };
    let row_len = width * out_channels;
    let blocks: Vec<(usize, usize)> = (0..batch_rows.div_ceil(rows_per_block))
        .map(|index| {
            let first = index * rows_per_block;
            let rows = first..(first + rows_per_block).min(batch_rows);
            (index, rows.map(image_rows).sum::<usize>() * row_len)
        })
        .collect();
    let geometry = Geometry {
        height,
        width,
        channels,
        tiles_h,
        tiles_w,
    };
    parallel_initialised(
        batch * height * row_len,
        &blocks,
        blocks.len() > 1,
        |index, slots| {
            let first = index * rows_per_block;
            let rows = rows_per_block.min(batch_rows - first);
            let out = zeroed(slots);
            run_block(src, geometry, (first, rows), filter, biases, out);
            Ok(out)
        },
    )
}

/// The input's sizes and its tile grid.
#[derive(Clone, Copy)]
struct Geometry {
    height: usize,
    width: usize,
    channels: usize,
    tiles_h: usize,
    tiles_w: usize,
}

/// Tile rows `first..first + rows` (counted over the batch) -> their output rows, `out` (`[image
/// rows of these tile rows, width, out]`).
fn run_block(
    src: &[f32],
    geometry: Geometry,
    (first, rows): (usize, usize),
    filter: &PackedWinogradFilter,
    biases: &[f32],
    out: &mut [f32],
) {
    let Geometry {
        channels, tiles_w, ..
    } = geometry;
    let tiles = rows * tiles_w;
    let pairs = channels / 2;
    let out_channels = filter.out_channels;
    let position_len = filter.position_len();
    let mut tiles_scratch = TILES.take();
    let mut products_scratch = PRODUCTS.take();
    if tiles_scratch.len() < 16 * tiles * pairs {
        tiles_scratch.resize(16 * tiles * pairs, 0);
    }
    if products_scratch.len() < 16 * tiles * PANEL_COLUMNS {
        products_scratch.resize(16 * tiles * PANEL_COLUMNS, 0.0);
    }
    let transformed = &mut tiles_scratch[..16 * tiles * pairs];
    let products = &mut products_scratch[..16 * tiles * PANEL_COLUMNS];
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: AVX-512 BF16 is present and the input channels are a multiple of 16 (checked by
    // `winograd_conv_bf16`); `src` holds `batch * height * width * channels` values and the tile
    // rows lie inside the batch; `transformed` has `16 * tiles * pairs` pairs and `products`
    // `16 * tiles * 64` values, the sizes the kernels index; the filter's panels hold 16
    // positions of `position_len` pairs, each read from a 64-column panel start.
    unsafe {
        x86::input_tiles(src, geometry, (first, rows), transformed);
        for panel_start in (0..out_channels).step_by(PANEL_COLUMNS) {
            let columns = PANEL_COLUMNS.min(out_channels - panel_start);
            for position in 0..16 {
                super::bf16::x86::multiply(
                    &transformed[position * tiles * pairs..][..tiles * pairs],
                    &filter.panels[position * position_len + pairs * panel_start..],
                    (tiles, pairs, columns),
                    products.as_mut_ptr(),
                    position * tiles * PANEL_COLUMNS,
                    PANEL_COLUMNS,
                    super::bf16::Store::Replace,
                );
            }
            let panel = OutputPanel {
                geometry,
                first,
                rows,
                panel_start,
                columns,
                out_channels,
                biases,
            };
            x86::output_panel(products, panel, out);
        }
    }
    TILES.set(tiles_scratch);
    PRODUCTS.set(products_scratch);
}

/// Where one panel of output channels goes.
struct OutputPanel<'a> {
    geometry: Geometry,
    first: usize,
    rows: usize,
    panel_start: usize,
    columns: usize,
    out_channels: usize,
    biases: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    //! The input transform, written as bf16 pairs, and the output transform. Callers guarantee
    //! the CPU features and the bounds (see `run_block`).

    use super::{Geometry, OutputPanel, PANEL_COLUMNS};
    use crate::kernels::winograd::x86::output_tile;
    use std::arch::x86_64::*;

    /// The output transform `A^T m A` plus bias of one panel of channels for every tile of a
    /// block: `products` is `[16, tiles, 64]`. Each tile's two rows of `A^T m` are formed once
    /// for its pixels, with the sums of `winograd::output_pixel` in the same order, so the
    /// values are the unfused path's bit for bit.
    ///
    /// # Safety
    /// AVX-512 F present; `products` holds `16 * tiles * 64` values; `out` holds the block's
    /// output rows (`[image rows, width, out_channels]`); the panel's columns lie inside
    /// `out_channels` and the biases.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn output_panel(products: &[f32], panel: OutputPanel<'_>, out: &mut [f32]) {
        let OutputPanel {
            geometry,
            first,
            rows,
            panel_start,
            columns,
            out_channels,
            biases,
        } = panel;
        let Geometry {
            height,
            width,
            tiles_h,
            tiles_w,
            ..
        } = geometry;
        let tiles = rows * tiles_w;
        debug_assert!(products.len() >= 16 * tiles * PANEL_COLUMNS);
        let position_stride = tiles * PANEL_COLUMNS;
        let per_item_bias = biases.len() > out_channels;
        let out_at = out.as_mut_ptr();
        let mut out_row = 0;
        for local_row in 0..rows {
            let batch_row = first + local_row;
            let (item, tile_row) = (batch_row / tiles_h, batch_row % tiles_h);
            let bias = &biases[if per_item_bias { item } else { 0 } * out_channels + panel_start..]
                [..columns];
            let image_rows = if 2 * tile_row + 1 < height { 2 } else { 1 };
            for tile_col in 0..tiles_w {
                let tile = local_row * tiles_w + tile_col;
                let at = products.as_ptr().add(tile * PANEL_COLUMNS);
                let pixels = (width - 2 * tile_col).min(2);
                let panel_at = out_at.add(panel_start);
                output_tile(
                    (at, position_stride),
                    (columns, bias.as_ptr()),
                    (0..image_rows, pixels),
                    |within, x_within| {
                        panel_at.add(
                            ((out_row + within) * width + 2 * tile_col + x_within) * out_channels,
                        )
                    },
                );
            }
            out_row += image_rows;
        }
    }

    /// Row `r` of `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]` applied to
    /// `(a, b, c, d)`, as the unfused transform computes it.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn b_row(r: usize, a: __m512, b: __m512, c: __m512, d: __m512) -> __m512 {
        match r {
            0 => _mm512_sub_ps(a, c),
            1 => _mm512_add_ps(b, c),
            2 => _mm512_sub_ps(c, b),
            _ => _mm512_sub_ps(b, d),
        }
    }

    /// The input transform `B^T d B` of every tile of tile rows `first..first + rows` (counted
    /// over the batch), rounded to bf16: `out` is `[16, tiles, channels]` bf16 (as `[16, tiles,
    /// channels / 2]` pairs), the products' left operands.
    ///
    /// # Safety
    /// AVX-512 F/BF16 present; `channels` a multiple of 16; `src` holds the whole batch
    /// (`[batch, height, width, channels]`) and the tile rows lie inside it; `out` holds `16 *
    /// rows * tiles_w * channels / 2` pairs.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn input_tiles(
        src: &[f32],
        geometry: Geometry,
        (first, rows): (usize, usize),
        out: &mut [u32],
    ) {
        let Geometry {
            height,
            width,
            channels,
            tiles_h,
            tiles_w,
        } = geometry;
        let tiles = rows * tiles_w;
        debug_assert!(out.len() >= 16 * tiles * channels / 2);
        let out = out.as_mut_ptr().cast::<u16>();
        let image_len = height * width * channels;
        for local_row in 0..rows {
            let batch_row = first + local_row;
            let (item, tile_row) = (batch_row / tiles_h, batch_row % tiles_h);
            let image = src.as_ptr().add(item * image_len);
            for tile_col in 0..tiles_w {
                let tile = local_row * tiles_w + tile_col;
                // Pixel (dy, dx) of the tile's 4x4 window: image pixel (2 * tile_row + dy - 1,
                // 2 * tile_col + dx - 1), zero outside the image (the padding).
                let pixel = |dy: usize, dx: usize| -> Option<*const f32> {
                    let (y, x) = (2 * tile_row + dy, 2 * tile_col + dx);
                    (y != 0 && x != 0 && y <= height && x <= width)
                        .then(|| image.add(((y - 1) * width + x - 1) * channels))
                };
                let mut window: [[Option<*const f32>; 4]; 4] = [[None; 4]; 4];
                for (dy, window_row) in window.iter_mut().enumerate() {
                    for (dx, at) in window_row.iter_mut().enumerate() {
                        *at = pixel(dy, dx);
                    }
                }
                for channel in (0..channels).step_by(16) {
                    let mut d = [[_mm512_setzero_ps(); 4]; 4];
                    for dy in 0..4 {
                        for dx in 0..4 {
                            if let Some(at) = window[dy][dx] {
                                d[dy][dx] = _mm512_loadu_ps(at.add(channel));
                            }
                        }
                    }
                    for i in 0..4 {
                        // Row i of B^T d, per tile column j.
                        let mut t = [_mm512_setzero_ps(); 4];
                        for (j, value) in t.iter_mut().enumerate() {
                            *value = b_row(i, d[0][j], d[1][j], d[2][j], d[3][j]);
                        }
                        for j in 0..4 {
                            let value = b_row(j, t[0], t[1], t[2], t[3]);
                            let rounded: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(value));
                            let at = out.add(((i * 4 + j) * tiles + tile) * channels + channel);
                            _mm256_storeu_si256(at.cast(), rounded);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{
        batched_matmul_parallel, winograd_filter, winograd_input, winograd_output,
        with_product_precision, ProductPrecision,
    };
    use candle_core::Device;

    /// The unfused path with bf16 products: input transform, sixteen products, output transform.
    fn unfused(xs: &Tensor, filter: &Tensor, biases: Vec<f32>) -> Tensor {
        let (batch, height, width, _) = xs.dims4().unwrap();
        let out_channels = filter.dim(2).unwrap();
        let rows = 0..batch * height.div_ceil(2);
        with_product_precision(ProductPrecision::Bf16, || {
            let transformed = winograd_input(xs, rows.clone()).unwrap();
            let products = batched_matmul_parallel(&transformed, filter).unwrap();
            winograd_output(&products, rows, height, width, biases)
                .unwrap()
                .reshape((batch, height, width, out_channels))
                .unwrap()
        })
    }

    #[test]
    fn the_fused_bf16_winograd_gives_the_unfused_values() {
        if !bf16_supported() {
            return;
        }
        let device = Device::Cpu;
        // Odd and even sizes, one or several blocks, per-item biases, a second output panel, an
        // output narrower than one vector (an RGB output layer).
        for (batch, height, width, in_channels, out_channels, per_item) in [
            (2, 8, 8, 16, 32, false),
            (1, 7, 9, 32, 16, true),
            (2, 33, 31, 48, 80, true),
            (3, 4, 4, 16, 16, false),
            (2, 9, 8, 64, 3, true),
        ] {
            let xs =
                Tensor::randn(0f32, 1.0, (batch, height, width, in_channels), &device).unwrap();
            let weight =
                Tensor::randn(0f32, 0.2, (9 * in_channels, out_channels), &device).unwrap();
            let filter = winograd_filter(&weight).unwrap();
            let bias_rows = if per_item { batch } else { 1 };
            let biases: Vec<f32> = (0..bias_rows * out_channels)
                .map(|index| index as f32 * 0.01 - 0.3)
                .collect();
            let expected = unfused(&xs, &filter, biases.clone());
            let packed = pack_winograd_filter(&filter).unwrap();
            let fused = winograd_conv_bf16(&xs, &packed, &biases).unwrap();
            assert_eq!(fused.dims(), expected.dims());
            let (fused, expected) = (
                fused.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                expected.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(
                fused == expected,
                "{batch}x{height}x{width}x{in_channels} -> {out_channels}: values differ"
            );
        }
        // Shapes the fused path does not take are errors.
        let odd = Tensor::zeros((16, 24, 8), candle_core::DType::F32, &device).unwrap();
        assert!(pack_winograd_filter(&odd).is_err());
        let filter = Tensor::zeros((16, 16, 16), candle_core::DType::F32, &device).unwrap();
        let packed = pack_winograd_filter(&filter).unwrap();
        let xs = Tensor::zeros((1, 4, 4, 32), candle_core::DType::F32, &device).unwrap();
        assert!(winograd_conv_bf16(&xs, &packed, &[0.0; 16]).is_err());
    }
}
