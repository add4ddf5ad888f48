//! Winograd F(2x2, 3x3) convolution for channels-last 3x3, stride-1 layers: the filter transform
//! `G g G^T` (once per weight), the input transform `B^T d B` of 4x4 tiles and the output
//! transform `A^T m A` plus bias; the sixteen products between them run on the GEMM.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::buffers::{parallel_filled, parallel_filled_planes, parallel_pieces};
use super::gemm::{gemm_uninit_batched, MatrixView};
use super::operands::{contiguous_slice, with_f32_pair};
use super::simd::simd_kernel;
use super::threads::piece_count;

/// Winograd F(2x2, 3x3) filter transform `U = G g G^T` of a 3x3 convolution weight given as the
/// im2col matrix `[3 * 3 * in, out]` (rows in `(kh, kw, in)` order): returns `[16, in, out]` (f32,
/// contiguous), one `in x out` right-hand factor per transform position.
///
/// Both layouts keep `out` innermost, so the transform streams nine `in x out` planes into sixteen
/// and the products read the result with contiguous rows (a transposed view would make the GEMM
/// gather it element by element).
pub fn winograd_filter(matrix: &Tensor) -> Result<Tensor> {
    transformed_filter::<16>(matrix, 25, |inputs, outputs| {
        pulp::Arch::new().dispatch(WinogradFilterPiece { inputs, outputs });
    })
}

/// Output channels per column block of [`winograd_products_from_weight`]: wide enough for the
/// products to run at full speed, narrow enough that a block's transformed filter (`16 * in *
/// 64` values, 5.2 MB for 1280 input channels) stays in the caches.
const FILTER_BLOCK_COLUMNS: usize = 64;

thread_local! {
    /// Each thread's transformed filter block of [`winograd_products_from_weight`].
    static FILTER_BLOCK: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The sixteen Winograd F(2x2, 3x3) products `V_p U_p` of the input tiles `tiles` `[16, T, in]`
/// ([`winograd_input`]) with the filter `U` transformed from the 3x3 weight's im2col matrix
/// `[3 * 3 * in, out]` one block of output channels at a time: each core transforms a block's
/// columns into a buffer of its own and multiplies them right away, so the whole transformed
/// filter (16/9 of the weight) is never written out and read back. Returns `[blocks, 16, T,
/// width]`: the products of each block of `width` output channels ([`winograd_output`] reads
/// this layout as it reads `[16, T, out]`). The filter values are [`winograd_filter`]'s, bit for
/// bit.
pub fn winograd_products_from_weight(tiles: &Tensor, matrix: &Tensor) -> Result<Tensor> {
    let (positions, tile_count, in_channels) = tiles.dims3()?;
    let (rows, out_channels) = matrix.dims2()?;
    if positions != 16 || rows != 9 * in_channels {
        candle_core::bail!(
            "winograd products: tiles {:?} with a weight matrix {:?}",
            tiles.dims(),
            matrix.dims()
        );
    }
    let width = if out_channels.is_multiple_of(FILTER_BLOCK_COLUMNS) {
        FILTER_BLOCK_COLUMNS
    } else {
        out_channels
    };
    let blocks = out_channels / width.max(1);
    let block_len = 16 * tile_count * width;
    let out = with_f32_pair(tiles, matrix, |tile_values, weight| {
        parallel_pieces(
            blocks * block_len,
            block_len,
            in_channels,
            |block, slots| {
                let mut filter = FILTER_BLOCK.take();
                filter.clear();
                filter.resize(16 * in_channels * width, 0.0);
                pulp::Arch::new().dispatch(WinogradFilterColumns {
                    matrix: weight,
                    shape: [in_channels, out_channels, block * width, width],
                    outputs: &mut filter,
                });
                let products: Vec<_> = (0..16)
                    .map(|position| {
                        let lhs = MatrixView::new(
                            tile_values,
                            position * tile_count * in_channels,
                            (tile_count, in_channels),
                            in_channels,
                        );
                        let rhs = MatrixView::new(
                            &filter,
                            position * in_channels * width,
                            (in_channels, width),
                            width,
                        );
                        (lhs, rhs)
                    })
                    .collect();
                let done = gemm_uninit_batched(slots, &products);
                FILTER_BLOCK.set(filter);
                done
            },
        )
    })?;
    Tensor::from_vec(out, (blocks, 16, tile_count, width), tiles.device())
}

simd_kernel!(
    /// The Winograd filter transform of output channels `first..first + width` of the im2col
    /// matrix `matrix` `[9 * in, out]` (`shape` = `[in, out, first, width]`) into `outputs` `[16,
    /// in, width]`, in [`WinogradFilterPiece`]'s order of operations.
    WinogradFilterColumns<'data> {
        matrix: &'data [f32],
        shape: [usize; 4],
        outputs: &'data mut [f32],
    } => {
        let [in_channels, out_channels, first, width] = shape;
        let mut rows = [[0f32; FILTER_ELEMENTS]; 3];
        for start in (0..width).step_by(FILTER_ELEMENTS) {
            let block = FILTER_ELEMENTS.min(width - start);
            for input in 0..in_channels {
                let inputs: [&[f32]; 9] = std::array::from_fn(|plane| {
                    &matrix[(plane * in_channels + input) * out_channels + first + start..]
                        [..block]
                });
                // Position p's row `input` of the block.
                let mut rest: &mut [f32] = &mut *outputs;
                let positions: [&mut [f32]; 16] = std::array::from_fn(|_| {
                    let (position, tail) = std::mem::take(&mut rest).split_at_mut(in_channels * width);
                    rest = tail;
                    &mut position[input * width + start..][..block]
                });
                filter_block(inputs, positions, &mut rows);
            }
        }
    }
);

/// The filter transform of a 3x3 weight given as the im2col matrix `[3 * 3 * in, out]` into `P`
/// transform positions, `[P, in, out]` (f32, contiguous): ranges of the `in x out` plane elements
/// go to `piece(inputs, outputs)` in parallel (the nine `(kh, kw)` planes' elements -> the `P`
/// positions' elements), `unit_cost` operations per element.
pub(super) fn transformed_filter<const P: usize>(
    matrix: &Tensor,
    unit_cost: usize,
    piece: impl Fn([&[f32]; 9], [&mut [f32]; P]) + Sync,
) -> Result<Tensor> {
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
    // Each piece is one range of plane elements, written at all P positions.
    let pieces = piece_count(plane, unit_cost).max(1);
    let per_piece = plane.div_ceil(pieces).max(1);
    let transformed = parallel_filled_planes(P, plane, per_piece, |first, outputs| {
        let Ok(outputs) = <[&mut [f32]; P]>::try_from(outputs) else {
            return;
        };
        let len = outputs[0].len();
        piece(
            std::array::from_fn(|index| &values[index * plane + first..][..len]),
            outputs,
        );
    });
    Tensor::from_vec(transformed, (P, in_channels, out_channels), matrix.device())
}

/// The 3x3 weight as the im2col matrix `[3 * 3 * in, out]` from its transformed filter: `[16, in,
/// out]` (F(2x2, 3x3), exactly) or `[36, in, out]` (F(4x4, 3x3), to rounding). `g = L U L^T` with
/// `L` a left inverse of the transform's `G`, applied to the rows, then to the columns.
pub fn winograd_weight(filter: &Tensor) -> Result<Tensor> {
    type InverseRow = fn(usize, &dyn Fn(usize) -> Result<Tensor>) -> Result<Tensor>;
    let (positions, in_channels, out_channels) = filter.dims3()?;
    let (side, inverse_row): (usize, InverseRow) = match positions {
        16 => (4, inverse_row),
        36 => (6, super::winograd4::inverse_row),
        _ => candle_core::bail!("winograd: a filter has 16 or 36 positions, got {positions}"),
    };
    let position = |row: usize, column: usize| filter.get(row * side + column);
    let mut planes = Vec::with_capacity(9);
    for kernel_y in 0..3 {
        for kernel_x in 0..3 {
            let column_of = |row: usize| inverse_row(kernel_x, &|column| position(row, column));
            planes.push(inverse_row(kernel_y, &column_of)?);
        }
    }
    Tensor::stack(&planes, 0)?.reshape((9 * in_channels, out_channels))
}

/// Row `index` (0..3) of `L X` where `L = [[1, 0, 0, 0], [0, 1, -1, 0], [0, 0, 0, 1]]` is the
/// left inverse of `G` below; `row(i)` gives row `i` of `X` (0..4).
fn inverse_row(index: usize, row: &dyn Fn(usize) -> Result<Tensor>) -> Result<Tensor> {
    match index {
        0 => row(0),
        1 => row(1)? - row(2)?,
        _ => row(3),
    }
}

/// Per output row of the tile rows `tile_rows` (counted over the batch, `tile` output rows per
/// tile row, fewer for the last of a height that `tile` does not divide): (tile row within the
/// chunk, row within the tile, batch item).
pub(super) fn output_rows(
    tile_rows: Range<usize>,
    height: usize,
    tile: usize,
) -> Vec<(usize, usize, usize)> {
    let tiles_h = height.div_ceil(tile);
    let mut rows = Vec::with_capacity(tile * tile_rows.len());
    for (local, batch_row) in tile_rows.enumerate() {
        let (item, tile_row) = (batch_row / tiles_h, batch_row % tiles_h);
        for within in 0..tile {
            if tile * tile_row + within < height {
                rows.push((local, within, item));
            }
        }
    }
    rows
}

simd_kernel!(
    /// One range of the Winograd filter transform: the nine `(kh, kw)` planes' elements `inputs`
    /// -> the sixteen transform positions' elements `outputs` (all the same length).
    WinogradFilterPiece<'data> { inputs: [&'data [f32]; 9], outputs: [&'data mut [f32]; 16] } => {
        let (len, mut outputs) = (outputs[0].len(), outputs);
        let mut rows = [[0f32; FILTER_ELEMENTS]; 3];
        for start in (0..len).step_by(FILTER_ELEMENTS) {
            let block = FILTER_ELEMENTS.min(len - start);
            filter_block(
                inputs.each_ref().map(|input| &input[start..start + block]),
                outputs.each_mut().map(|output| &mut output[start..start + block]),
                &mut rows,
            );
        }
    }
);

/// Elements the filter transform takes at once.
const FILTER_ELEMENTS: usize = 512;

/// The filter transform of at most [`FILTER_ELEMENTS`] elements: the nine `(kh, kw)` planes'
/// `inputs` -> the sixteen positions' `outputs` (all the same length), `rows` its scratch.
#[inline(always)]
fn filter_block(
    inputs: [&[f32]; 9],
    outputs: [&mut [f32]; 16],
    rows: &mut [[f32; FILTER_ELEMENTS]; 3],
) {
    let block = outputs[0].len();
    for r in 0..4 {
        // Row r of G g, for each kernel column j: rows[j] = sum_i G[r][i] g[i][j].
        for (j, row) in rows.iter_mut().enumerate() {
            let [a, b, c] = [0, 1, 2].map(|i| inputs[i * 3 + j]);
            winograd_g_rows(r, &mut row[..block], a, b, c);
        }
        // (G g) G^T: column `column` of row r.
        let [a, b, c] = [&rows[0][..block], &rows[1][..block], &rows[2][..block]];
        for column in 0..4 {
            winograd_g_rows(column, &mut *outputs[r * 4 + column], a, b, c);
        }
    }
}

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
        let geometry = [height, width, channels];
        transformed_input::<16>(
            self.tile_rows.clone(),
            (width, channels, 2),
            16,
            |first, outputs| {
                pulp::Arch::new().dispatch(WinogradInputTiles {
                    src,
                    geometry,
                    first_tile: first,
                    outputs,
                });
            },
        )
    }
}

/// An input transform's `P` position planes (`[P, tiles, channels]`) for tile rows `tile_rows`
/// (counted over the whole batch) of tiles `tile` pixels apart: pieces of whole tiles spread over
/// the cores (`unit_cost` operations per tile and channel), each written by `job(first_tile,
/// outputs)` (its tiles' rows of every plane; `first_tile` counted over the batch).
pub(super) fn transformed_input<const P: usize>(
    tile_rows: Range<usize>,
    (width, channels, tile): (usize, usize, usize),
    unit_cost: usize,
    job: impl Fn(usize, [&mut [f32]; P]) + Sync,
) -> Vec<f32> {
    let tiles_w = width.div_ceil(tile);
    let tiles = tile_rows.len() * tiles_w;
    let plane = tiles * channels;
    if plane == 0 {
        return Vec::new();
    }
    let pieces = piece_count(tiles, unit_cost * channels);
    let per_piece = tiles.div_ceil(pieces).max(1);
    parallel_filled_planes(P, plane, per_piece * channels, |first, outputs| {
        if let Ok(outputs) = <[&mut [f32]; P]>::try_from(outputs) {
            job(tile_rows.start * tiles_w + first / channels, outputs);
        }
    })
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
        output_rows(self.tile_rows.clone(), self.height, 2)
    }

    /// The output rows from the products `src`, `[blocks, 16, tiles, width]` (`blocks` column
    /// blocks of `width` channels; one block is `[16, tiles, k]`).
    fn run(&self, src: &[f32], tiles: usize, (blocks, width): (usize, usize)) -> Vec<f32> {
        let channels = blocks * width;
        let tiles_w = self.width.div_ceil(2);
        let rows = self.out_rows();
        let row_len = self.width * channels;
        // Values per position plane of a block, and per block.
        let plane = tiles * width;
        let block_len = 16 * plane;
        let bias_rows = self.biases.len() / channels.max(1);
        // Workers take whole output rows; each output row belongs to one tile row.
        let out = parallel_filled(
            rows.len() * row_len,
            rows.len(),
            |first, piece: &mut [f32]| {
                for (offset, dst_row) in piece.chunks_exact_mut(row_len).enumerate() {
                    let (tile_row, within, item) = rows[first + offset];
                    let bias =
                        &self.biases[if bias_rows > 1 { item } else { 0 } * channels..][..channels];
                    #[cfg(target_arch = "x86_64")]
                    if x86::supported() {
                        let dst_at = dst_row.as_mut_ptr();
                        for tile_col in 0..tiles_w {
                            let tile = tile_row * tiles_w + tile_col;
                            let pixels = (self.width - 2 * tile_col).min(2);
                            for block in 0..blocks {
                                let column = block * width;
                                let positions = block * block_len + tile * width;
                                #[allow(unsafe_code)]
                                // SAFETY: AVX-512 F is present; the sixteen positions of `tile`
                                // in `block` lie inside `src` (`[blocks, 16, tiles, width]`),
                                // `bias` holds `channels` values and the tile's pixels (their
                                // block's `width` channels) lie inside `dst_row`.
                                unsafe {
                                    x86::output_tile(
                                        (src.as_ptr().add(positions), plane),
                                        (width, bias.as_ptr().add(column)),
                                        (within..within + 1, pixels),
                                        |_, x_within| {
                                            let x = 2 * tile_col + x_within;
                                            dst_at.add(x * channels + column)
                                        },
                                    );
                                }
                            }
                        }
                        continue;
                    }
                    for tile_col in 0..tiles_w {
                        let tile = tile_row * tiles_w + tile_col;
                        for block in 0..blocks {
                            let column = block * width;
                            let m = |position: usize| {
                                &src[block * block_len + position * plane + tile * width..][..width]
                            };
                            let planes: [&[f32]; 16] = std::array::from_fn(m);
                            for x_within in 0..2 {
                                let x = 2 * tile_col + x_within;
                                if x >= self.width {
                                    continue;
                                }
                                let dst = &mut dst_row[x * channels + column..][..width];
                                let bias = &bias[column..][..width];
                                output_pixel(&planes, (within, x_within), bias, dst);
                            }
                        }
                    }
                }
            },
        );
        out
    }
}

/// One output pixel of a tile, `(within, x_within)` of its 2x2, for every channel of `dst`: the
/// output transform `A^T m A` plus `bias`, from the tile's sixteen transform positions `planes`
/// (each at least `dst.len()` channels). Shared by the unfused and the fused bf16 paths, so both
/// sum in the same order.
#[inline(always)]
pub(super) fn output_pixel(
    planes: &[&[f32]; 16],
    (within, x_within): (usize, usize),
    bias: &[f32],
    dst: &mut [f32],
) {
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

impl CustomOp1 for WinogradOutput {
    fn name(&self) -> &'static str {
        "attend-winograd-output"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        // `[16, tiles, k]`, or `[blocks, 16, tiles, width]` column blocks of `k = blocks * width`.
        let (blocks, positions, tiles, width) = match *layout.shape().dims() {
            [positions, tiles, width] => (1, positions, tiles, width),
            [blocks, positions, tiles, width] => (blocks, positions, tiles, width),
            _ => candle_core::bail!("winograd output: unexpected shape {:?}", layout.shape()),
        };
        let channels = blocks * width;
        if positions != 16 || channels == 0 || !self.biases.len().is_multiple_of(channels) {
            candle_core::bail!("winograd output: unexpected shape {:?}", layout.shape());
        }
        let src = contiguous_slice::<f32>(storage, layout, "winograd output")?;
        Ok((
            CpuStorage::F32(self.run(src, tiles, (blocks, width))),
            Shape::from_dims(&[self.out_rows().len(), self.width, channels]),
        ))
    }
}

/// The output transform written with AVX-512 intrinsics, for both Winograd paths.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod x86 {
    use crate::kernels::bf16::x86::lanes;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Whether this CPU has AVX-512 F.
    pub(in crate::kernels) fn supported() -> bool {
        static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SUPPORTED.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }

    /// One tile's output pixels, `A^T m A` plus bias: rows `withins` of its 2x2 (each row of `A^T
    /// m` formed once for both pixels) by its first `pixels` columns, for `channels` channels.
    /// Position `p`'s values are at `positions + p * position_stride`; pixel `(within,
    /// x_within)` goes to `dst(within, x_within)`. The sums are [`super::output_pixel`]'s in the
    /// same order, so the values are the same bit for bit.
    ///
    /// # Safety
    /// AVX-512 F present; the sixteen positions hold `channels` values each, `bias` holds
    /// `channels` values and every `dst` pixel has room for `channels` values.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(in crate::kernels) unsafe fn output_tile(
        (positions, position_stride): (*const f32, usize),
        (channels, bias): (usize, *const f32),
        (withins, pixels): (Range<usize>, usize),
        dst: impl Fn(usize, usize) -> *mut f32,
    ) {
        for vector in (0..channels).step_by(16) {
            let mask = lanes(channels - vector);
            let m: [__m512; 16] = std::array::from_fn(|position| {
                _mm512_maskz_loadu_ps(mask, positions.add(position * position_stride + vector))
            });
            let bias = _mm512_maskz_loadu_ps(mask, bias.add(vector));
            for within in withins.clone() {
                // Row `within` of A^T m: [m0+m1+m2, m1-m2-m3] per column.
                let row: [__m512; 4] = std::array::from_fn(|j| {
                    if within == 0 {
                        _mm512_add_ps(_mm512_add_ps(m[j], m[4 + j]), m[8 + j])
                    } else {
                        _mm512_sub_ps(_mm512_sub_ps(m[4 + j], m[8 + j]), m[12 + j])
                    }
                });
                for x_within in 0..pixels {
                    let result = if x_within == 0 {
                        _mm512_add_ps(_mm512_add_ps(row[0], row[1]), row[2])
                    } else {
                        _mm512_sub_ps(_mm512_sub_ps(row[1], row[2]), row[3])
                    };
                    _mm512_mask_storeu_ps(
                        dst(within, x_within).add(vector),
                        mask,
                        _mm512_add_ps(result, bias),
                    );
                }
            }
        }
    }
}

/// Winograd tiles of tile rows `tile_rows` of `xs` `[batch, h, w, c]` (f32), the rows counted over
/// the whole batch (`batch * ceil(h / 2)` of them; one chunk may span items): `[16, tiles, c]`.
pub fn winograd_input(xs: &Tensor, tile_rows: Range<usize>) -> Result<Tensor> {
    xs.contiguous()?
        .apply_op1_no_bwd(&WinogradInput { tile_rows })
}

/// Output rows of tile rows `tile_rows` (counted as in [`winograd_input`]) from the transformed
/// products `m` `[16, tiles, k]`, or `[blocks, 16, tiles, k / blocks]` in column blocks (f32;
/// [`winograd_products_from_weight`]): `[rows, width, k]` with `biases` added, given as `k` values
/// for every item or `batch * k` values (one row per item).
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::kernels::test_support::max_abs_diff;
    use candle_core::Device;

    /// An output transform: `(m, tile_rows, height, width, biases)` -> output rows.
    type OutputStage = fn(&Tensor, Range<usize>, usize, usize, Vec<f32>) -> Result<Tensor>;

    /// A Winograd size's three stages.
    pub(in crate::kernels) struct Stages {
        pub filter: fn(&Tensor) -> Result<Tensor>,
        pub input: fn(&Tensor, Range<usize>) -> Result<Tensor>,
        pub output: OutputStage,
    }

    /// A `[out, in, 3, 3]` weight as the im2col matrix `[9 * in, out]`.
    pub(in crate::kernels) fn weight_matrix(weight: &Tensor) -> Tensor {
        let (out, input, _, _) = weight.dims4().unwrap();
        weight
            .permute((2, 3, 1, 0))
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((9 * input, out))
            .unwrap()
    }

    /// The stages of tiles of `tile` outputs a side (`positions` transform positions) against
    /// candle's `conv2d`, at each of `sizes`, in chunks of tile rows that start, end and cross
    /// batch items anywhere, with a bias per item.
    pub(in crate::kernels) fn stages_match_conv2d(
        (tile, positions): (usize, usize),
        sizes: &[(usize, usize)],
        stages: &Stages,
    ) {
        let device = Device::Cpu;
        for &(height, width) in sizes {
            let image = Tensor::randn(0f32, 1.0, (2, 6, height, width), &device).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (5, 6, 3, 3), &device).unwrap();
            let expected = image
                .conv2d(&weight, 1, 1, 1, 1)
                .unwrap()
                .permute((0, 2, 3, 1))
                .unwrap();
            let filter = (stages.filter)(&weight_matrix(&weight)).unwrap();
            assert_eq!(filter.dims(), &[positions, 6, 5]);
            assert!(filter.is_contiguous());
            let nhwc = image.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
            let batch_rows = 2 * height.div_ceil(tile);
            let biases: Vec<f32> = (0..10).map(|i| i as f32 * 0.25 - 1.0).collect();
            let bias_tensor = Tensor::from_vec(biases.clone(), (2, 1, 1, 5), &device).unwrap();
            let expected = expected.broadcast_add(&bias_tensor).unwrap();
            for chunk in [1, 2, 3, batch_rows] {
                let mut pieces = Vec::new();
                for start in (0..batch_rows).step_by(chunk) {
                    let rows = start..(start + chunk).min(batch_rows);
                    let v = (stages.input)(&nhwc, rows.clone()).unwrap();
                    let m = v.matmul(&filter).unwrap();
                    let out = (stages.output)(&m, rows, height, width, biases.clone()).unwrap();
                    pieces.push(out);
                }
                let actual = Tensor::cat(&pieces, 0)
                    .unwrap()
                    .reshape((2, height, width, 5))
                    .unwrap();
                let diff = max_abs_diff(&actual, &expected);
                assert!(diff < 1e-4, "{height}x{width}, chunks of {chunk}: {diff}");
            }
        }
    }

    #[test]
    fn products_from_the_weight_match_the_stored_filter() {
        let device = Device::Cpu;
        // 128 output channels: two blocks of 64; 40: one block of all of them.
        for out in [128, 40] {
            let (height, width, input) = (6, 5, 7);
            let image = Tensor::randn(0f32, 1.0, (2, height, width, input), &device).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (out, input, 3, 3), &device).unwrap();
            let matrix = weight_matrix(&weight);
            let batch_rows = 2 * height.div_ceil(2);
            let tiles = winograd_input(&image, 0..batch_rows).unwrap();
            let stored = tiles.matmul(&winograd_filter(&matrix).unwrap()).unwrap();
            let blocks = winograd_products_from_weight(&tiles, &matrix).unwrap();
            let width_of_block = blocks.dim(3).unwrap();
            assert_eq!(blocks.dim(0).unwrap() * width_of_block, out);
            // Block b holds output channels b * width..: the same products.
            let regrouped = blocks
                .permute((1, 2, 0, 3))
                .unwrap()
                .reshape(stored.dims())
                .unwrap();
            assert!(max_abs_diff(&regrouped, &stored) < 1e-4, "{out} channels");
            // The output transform reads both layouts alike.
            let biases: Vec<f32> = (0..out).map(|i| i as f32 * 0.01).collect();
            let from_stored =
                winograd_output(&stored, 0..batch_rows, height, width, biases.clone()).unwrap();
            let from_blocks =
                winograd_output(&blocks, 0..batch_rows, height, width, biases).unwrap();
            assert!(
                max_abs_diff(&from_blocks, &from_stored) < 1e-4,
                "{out} channels"
            );
        }
    }

    #[test]
    fn winograd_matches_conv2d() {
        let stages = Stages {
            filter: winograd_filter,
            input: winograd_input,
            output: winograd_output,
        };
        stages_match_conv2d((2, 16), &[(6, 6), (7, 5), (1, 3), (9, 4)], &stages);
    }
}
