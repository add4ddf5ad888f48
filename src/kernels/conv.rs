//! im2col for channels-last convolutions: each output pixel's patch as one row of a matrix that a
//! GEMM multiplies with the weight, and the geometry of the patches.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};

use super::buffers::parallel_filled;
use super::operands::contiguous_slice;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::max_abs_diff;
    use candle_core::Device;

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
            assert!(max_abs_diff(&actual, &expected) < 1e-4);
        }
    }
}
