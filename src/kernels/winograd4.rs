//! Winograd F(4x4, 3x3) convolution for channels-last 3x3, stride-1 layers with f32 products: the
//! filter transform `G g G^T` (once per weight, `[36, in, out]`), the input transform `B^T d B`
//! of 6x6 tiles (stride 4, padding 1) and the output transform `A^T m A` plus bias; the 36
//! products between them run on the GEMM. Against F(2x2, 3x3) ([`super::winograd`]) it takes
//! 2.25 multiplications per output instead of 4, for filters 2.25 times larger.
//!
//! Toom-Cook matrices for the interpolation points 0, 2/3, -2/3, 3/2, -3/2 and infinity. Of the
//! point sets tried in a float32 simulation (every set of four from 0, +-1, +-2, +-3, +-4, +-1/2,
//! +-1/3, +-1/4, +-2/3, +-3/2 with 0), these gave the smallest error: 2.5 to 3 times less than
//! the usual 0, +-1, +-2 (`B^T` with 4 and 5, `A^T` with 8), about 2.5 times F(2x2, 3x3)'s.
//!
//! `B^T = [[1, 0, -97/36, 0, 1, 0], [0, -3/2, -9/4, 2/3, 1, 0], [0, 3/2, -9/4, -2/3, 1, 0], [0,
//! -2/3, -4/9, 3/2, 1, 0], [0, 2/3, -4/9, -3/2, 1, 0], [0, 1, 0, -97/36, 0, 1]]`,
//! `G = [[1, 0, 0], [-81/130, -27/65, -18/65], [-81/130, 27/65, -18/65], [8/65, 12/65, 18/65],
//! [8/65, -12/65, 18/65], [0, 0, 1]]`,
//! `A^T = [[1, 1, 1, 1, 1, 0], [0, 2/3, -2/3, 3/2, -3/2, 0], [0, 4/9, 4/9, 9/4, 9/4, 0], [0, 8/27,
//! -8/27, 27/8, -27/8, 1]]`.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::buffers::parallel_filled;
use super::operands::contiguous_slice;
use super::simd::simd_kernel;
use super::winograd::{output_rows, transformed_filter, transformed_input};

/// Transform positions per tile (6 x 6).
const POSITIONS: usize = 36;

/// Output pixels per tile side.
const TILE: usize = 4;

/// Winograd F(4x4, 3x3) filter transform `U = G g G^T` of a 3x3 convolution weight given as the
/// im2col matrix `[3 * 3 * in, out]` (rows in `(kh, kw, in)` order): returns `[36, in, out]`
/// (f32, contiguous), one `in x out` right-hand factor per transform position.
pub fn winograd4_filter(matrix: &Tensor) -> Result<Tensor> {
    transformed_filter::<POSITIONS>(matrix, 60, |inputs, outputs| {
        pulp::Arch::new().dispatch(FilterPiece { inputs, outputs });
    })
}

simd_kernel!(
    /// One range of the filter transform: the nine `(kh, kw)` planes' elements `inputs` -> the
    /// 36 transform positions' elements `outputs` (all the same length).
    FilterPiece<'data> { inputs: [&'data [f32]; 9], outputs: [&'data mut [f32]; POSITIONS] } => {
        let len = outputs[0].len();
        const BLOCK: usize = 512;
        let mut rows = [[0f32; BLOCK]; 3];
        for start in (0..len).step_by(BLOCK) {
            let block = BLOCK.min(len - start);
            for r in 0..6 {
                // Row r of G g, for each kernel column j: rows[j] = sum_i G[r][i] g[i][j].
                for (j, row) in rows.iter_mut().enumerate() {
                    let [a, b, c] = [0, 1, 2].map(|i| &inputs[i * 3 + j][start..start + block]);
                    for (((d, &a), &b), &c) in row[..block].iter_mut().zip(a).zip(b).zip(c) {
                        *d = g_row(r, a, b, c);
                    }
                }
                // (G g) G^T: column `column` of row r.
                let [a, b, c] = [&rows[0][..block], &rows[1][..block], &rows[2][..block]];
                for column in 0..6 {
                    let dst = &mut outputs[r * 6 + column][start..start + block];
                    for (((d, &a), &b), &c) in dst.iter_mut().zip(a).zip(b).zip(c) {
                        *d = g_row(column, a, b, c);
                    }
                }
            }
        }
    }
);

/// Row `r` of `G` applied to `(a, b, c)`.
#[inline(always)]
fn g_row(r: usize, a: f32, b: f32, c: f32) -> f32 {
    const OUTER: f32 = 81.0 / 130.0;
    const MIDDLE: f32 = 27.0 / 65.0;
    match r {
        0 => a,
        1 => -OUTER * a - MIDDLE * b - (18.0 / 65.0) * c,
        2 => -OUTER * a + MIDDLE * b - (18.0 / 65.0) * c,
        3 => (8.0 / 65.0) * a + (12.0 / 65.0) * b + (18.0 / 65.0) * c,
        4 => (8.0 / 65.0) * a - (12.0 / 65.0) * b + (18.0 / 65.0) * c,
        _ => c,
    }
}

/// Row `index` (0..3) of `L X`, where `L` is a left inverse of `G` (`g0 = u0`, `g1 = 65/54 (u2 -
/// u1)`, `g2 = u5`); `row(i)` gives row `i` of `X` (0..6), for [`super::winograd::winograd_weight`].
pub(super) fn inverse_row(index: usize, row: &dyn Fn(usize) -> Result<Tensor>) -> Result<Tensor> {
    match index {
        0 => row(0),
        1 => (row(2)? - row(1)?)? * (65.0 / 54.0),
        _ => row(5),
    }
}

/// Row `r` of `B^T` applied element-wise to the six slices `d`: `dst = B^T[r] . d`.
#[inline(always)]
fn b_rows(r: usize, dst: &mut [f32], d: [&[f32]; 6]) {
    #[inline(always)]
    fn rows<const R: usize>(dst: &mut [f32], d: [&[f32]; 6]) {
        let [d0, d1, d2, d3, d4, d5] = d;
        let len = dst.len();
        let (d0, d1, d2, d3, d4, d5) = (
            &d0[..len],
            &d1[..len],
            &d2[..len],
            &d3[..len],
            &d4[..len],
            &d5[..len],
        );
        const CENTRE: f32 = 97.0 / 36.0;
        for k in 0..len {
            let (a, b, c, e, f, g) = (d0[k], d1[k], d2[k], d3[k], d4[k], d5[k]);
            dst[k] = match R {
                0 => a - CENTRE * c + f,
                1 => (2.0 / 3.0) * e - 1.5 * b - 2.25 * c + f,
                2 => 1.5 * b - (2.0 / 3.0) * e - 2.25 * c + f,
                3 => 1.5 * e - (2.0 / 3.0) * b - (4.0 / 9.0) * c + f,
                4 => (2.0 / 3.0) * b - 1.5 * e - (4.0 / 9.0) * c + f,
                _ => b - CENTRE * e + g,
            };
        }
    }
    match r {
        0 => rows::<0>(dst, d),
        1 => rows::<1>(dst, d),
        2 => rows::<2>(dst, d),
        3 => rows::<3>(dst, d),
        4 => rows::<4>(dst, d),
        _ => rows::<5>(dst, d),
    }
}

/// Row `r` of `A^T` applied element-wise to the six slices `m`, plus `add`: `dst = A^T[r] . m +
/// add`.
#[inline(always)]
fn a_rows(r: usize, dst: &mut [f32], m: [&[f32]; 6], add: &[f32]) {
    #[inline(always)]
    fn rows<const R: usize>(dst: &mut [f32], m: [&[f32]; 6], add: &[f32]) {
        let [m0, m1, m2, m3, m4, m5] = m;
        let len = dst.len();
        let (m0, m1, m2, m3, m4, m5, add) = (
            &m0[..len],
            &m1[..len],
            &m2[..len],
            &m3[..len],
            &m4[..len],
            &m5[..len],
            &add[..len],
        );
        for k in 0..len {
            let (sum12, diff12) = (m1[k] + m2[k], m1[k] - m2[k]);
            let (sum34, diff34) = (m3[k] + m4[k], m3[k] - m4[k]);
            dst[k] = add[k]
                + match R {
                    0 => m0[k] + sum12 + sum34,
                    1 => (2.0 / 3.0) * diff12 + 1.5 * diff34,
                    2 => (4.0 / 9.0) * sum12 + 2.25 * sum34,
                    _ => (8.0 / 27.0) * diff12 + 3.375 * diff34 + m5[k],
                };
        }
    }
    match r {
        0 => rows::<0>(dst, m, add),
        1 => rows::<1>(dst, m, add),
        2 => rows::<2>(dst, m, add),
        _ => rows::<3>(dst, m, add),
    }
}

/// The input transform `V = B^T d B` of the 6x6 tiles (stride 4, padding 1) covering tile rows
/// `tile_rows`, counted over the whole batch (row `r` is batch item `r / tiles_h`, tile row `r %
/// tiles_h`): `[36, tile_rows.len() * tiles_w, c]`.
struct Input {
    tile_rows: Range<usize>,
}

impl Input {
    fn run(
        &self,
        src: &[f32],
        (_, height, width, channels): (usize, usize, usize, usize),
    ) -> Vec<f32> {
        let geometry = [height, width, channels];
        let shape = (width, channels, TILE);
        transformed_input::<POSITIONS>(
            self.tile_rows.clone(),
            shape,
            POSITIONS * 4,
            |first, outputs| {
                pulp::Arch::new().dispatch(InputTiles {
                    src,
                    geometry,
                    first_tile: first,
                    outputs,
                });
            },
        )
    }
}

simd_kernel!(
    /// The input transform of consecutive tiles, counted over the batch from `first_tile` (`tile
    /// = batch_row * tiles_w + column`), written to the 36 position planes `outputs` (`[tiles,
    /// channels]` each). `src` is `[batch, height, width, channels]`.
    InputTiles<'data> {
        src: &'data [f32],
        geometry: [usize; 3],
        first_tile: usize,
        outputs: [&'data mut [f32]; POSITIONS],
    } => {
        let [height, width, channels] = geometry;
        let (tiles_h, tiles_w) = (height.div_ceil(TILE), width.div_ceil(TILE));
        let image_len = height * width * channels;
        let count = outputs[0].len() / channels.max(1);
        let zeros = vec![0f32; channels];
        let mut t = vec![0f32; 6 * channels];
        for local in 0..count {
            let tile = first_tile + local;
            let (batch_row, tile_col) = (tile / tiles_w, tile % tiles_w);
            let (item, tile_row) = (batch_row / tiles_h, batch_row % tiles_h);
            let image = &src[item * image_len..][..image_len];
            // Pixel (dy, dx) of the tile's 6x6 window; the window starts one pixel above and
            // left of the tile's outputs (padding 1).
            let pixel = |dy: usize, dx: usize| -> &[f32] {
                let (y, x) = (TILE * tile_row + dy, TILE * tile_col + dx);
                if y == 0 || x == 0 || y > height || x > width {
                    &zeros
                } else {
                    &image[((y - 1) * width + x - 1) * channels..][..channels]
                }
            };
            for i in 0..6 {
                // Row i of B^T d, per window column j: t[j] over channels.
                for (j, tj) in t.chunks_exact_mut(channels).enumerate() {
                    b_rows(i, tj, std::array::from_fn(|dy| pixel(dy, j)));
                }
                // (B^T d) B: column j of row i.
                let columns: [&[f32]; 6] =
                    std::array::from_fn(|j| &t[j * channels..][..channels]);
                for j in 0..6 {
                    let dst = &mut outputs[i * 6 + j][local * channels..][..channels];
                    b_rows(j, dst, columns);
                }
            }
        }
    }
);

impl CustomOp1 for Input {
    fn name(&self) -> &'static str {
        "attend-winograd4-input"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims4()?;
        let tiles = self.tile_rows.len() * dims.2.div_ceil(TILE);
        let src = contiguous_slice::<f32>(storage, layout, "winograd input")?;
        Ok((
            CpuStorage::F32(self.run(src, dims)),
            Shape::from_dims(&[POSITIONS, tiles, dims.3]),
        ))
    }
}

/// The output transform `Y = A^T m A` plus bias: `[36, tiles, k]` for tile rows `tile_rows`
/// (counted over the batch, as in [`Input`]) -> their output rows in order, `[rows, width, k]`
/// (four per tile row, fewer for the last of a height that is not a multiple of 4).
struct Output {
    tile_rows: Range<usize>,
    height: usize,
    width: usize,
    /// `[1, k]` (every item) or `[batch, k]` (one row per batch item).
    biases: Vec<f32>,
}

impl Output {
    /// Per output row: (tile row within the chunk, row within the tile, batch item).
    fn out_rows(&self) -> Vec<(usize, usize, usize)> {
        output_rows(self.tile_rows.clone(), self.height, TILE)
    }

    fn run(&self, src: &[f32], tiles: usize, channels: usize) -> Vec<f32> {
        let tiles_w = self.width.div_ceil(TILE);
        let rows = self.out_rows();
        let row_len = self.width * channels;
        let plane = tiles * channels;
        let bias_rows = self.biases.len() / channels.max(1);
        let zeros = vec![0f32; channels];
        // Workers take whole output rows; each output row belongs to one tile row.
        parallel_filled(
            rows.len() * row_len,
            rows.len(),
            |first, piece: &mut [f32]| {
                let mut row_of_tile = vec![0f32; 6 * channels];
                for (offset, dst_row) in piece.chunks_exact_mut(row_len).enumerate() {
                    let (tile_row, within, item) = rows[first + offset];
                    let bias =
                        &self.biases[if bias_rows > 1 { item } else { 0 } * channels..][..channels];
                    pulp::Arch::new().dispatch(OutputRow {
                        src,
                        plane,
                        first_tile: tile_row * tiles_w,
                        within,
                        bias,
                        zeros: &zeros,
                        row_of_tile: &mut row_of_tile,
                        dst_row,
                    });
                }
            },
        )
    }
}

simd_kernel!(
    /// One output row, row `within` of its tile row (whose first tile is `first_tile`), for every
    /// channel: per tile, row `within` of `A^T m` (six columns, into `row_of_tile`), then its
    /// pixels `(A^T m) A` plus `bias`.
    OutputRow<'data> {
        src: &'data [f32],
        plane: usize,
        first_tile: usize,
        within: usize,
        bias: &'data [f32],
        zeros: &'data [f32],
        row_of_tile: &'data mut [f32],
        dst_row: &'data mut [f32],
    } => {
        let channels = bias.len();
        let width = dst_row.len() / channels.max(1);
        for (tile_col, dst_tile) in dst_row.chunks_mut(TILE * channels).enumerate() {
            let tile = first_tile + tile_col;
            let m = |position: usize| &src[position * plane + tile * channels..][..channels];
            for (j, row) in row_of_tile.chunks_exact_mut(channels).enumerate() {
                a_rows(within, row, std::array::from_fn(|i| m(i * 6 + j)), zeros);
            }
            let columns: [&[f32]; 6] =
                std::array::from_fn(|j| &row_of_tile[j * channels..][..channels]);
            let pixels = (width - TILE * tile_col).min(TILE);
            for (x_within, dst) in dst_tile.chunks_exact_mut(channels).take(pixels).enumerate() {
                a_rows(x_within, dst, columns, bias);
            }
        }
    }
);

impl CustomOp1 for Output {
    fn name(&self) -> &'static str {
        "attend-winograd4-output"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (positions, tiles, channels) = layout.shape().dims3()?;
        if positions != POSITIONS || channels == 0 || !self.biases.len().is_multiple_of(channels) {
            candle_core::bail!("winograd output: unexpected shape {:?}", layout.shape());
        }
        let src = contiguous_slice::<f32>(storage, layout, "winograd output")?;
        Ok((
            CpuStorage::F32(self.run(src, tiles, channels)),
            Shape::from_dims(&[self.out_rows().len(), self.width, channels]),
        ))
    }
}

/// F(4x4, 3x3) tiles of tile rows `tile_rows` of `xs` `[batch, h, w, c]` (f32), the rows counted
/// over the whole batch (`batch * ceil(h / 4)` of them; one chunk may span items): `[36, tiles,
/// c]`.
pub fn winograd4_input(xs: &Tensor, tile_rows: Range<usize>) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&Input { tile_rows })
}

/// Output rows of tile rows `tile_rows` (counted as in [`winograd4_input`]) from the transformed
/// products `m` `[36, tiles, k]` (f32): `[rows, width, k]` with `biases` added, given as `k`
/// values for every item or `batch * k` values (one row per item).
pub fn winograd4_output(
    m: &Tensor,
    tile_rows: Range<usize>,
    height: usize,
    width: usize,
    biases: Vec<f32>,
) -> Result<Tensor> {
    m.contiguous()?.apply_op1_no_bwd(&Output {
        tile_rows,
        height,
        width,
        biases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::max_abs_diff;
    use crate::kernels::winograd::tests::{stages_match_conv2d, weight_matrix, Stages};
    use crate::kernels::winograd::winograd_weight;
    use candle_core::Device;

    #[test]
    fn winograd4_matches_conv2d() {
        let stages = Stages {
            filter: winograd4_filter,
            input: winograd4_input,
            output: winograd4_output,
        };
        let sizes = [(8, 8), (7, 5), (1, 3), (9, 4), (6, 13)];
        stages_match_conv2d((TILE, POSITIONS), &sizes, &stages);
    }

    #[test]
    fn the_inverse_gives_the_weight_back() {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (7, 3, 3, 3), &device).unwrap();
        let matrix = weight_matrix(&weight);
        let filter = winograd4_filter(&matrix).unwrap();
        let back = winograd_weight(&filter).unwrap();
        let diff = max_abs_diff(&back, &matrix);
        assert!(diff < 1e-5, "{diff}");
    }
}
