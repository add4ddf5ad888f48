//! CPU kernels for attend's channels-last (`[batch, h, w, channels]`) models: im2col and Winograd
//! convolutions, group and layer norm, softmax, GEGLU and the fused feed-forward, nearest
//! upsampling, matrix products split over the cores, multi-head attention without head copies,
//! and the head rearrangements.
//!
//! A layer of its own below the pipeline, the attention hook and the processors: the UNet, the VAE
//! and the attention store all call it, and it imports nothing else of attend (only candle, std,
//! `gemm` and `pulp`). The kernels are candle custom ops over `CpuStorage` (or work on the
//! contiguous f32 values of CPU tensors), so they run on the CPU device only. Large tensors are
//! split over the machine's cores with long-lived (named) kernel threads; small ones run inline.
//!
//! | file | what it is |
//! |---|---|
//! | `threads.rs` | worker count, the shared queue drained by the caller and the kernel threads, cutting work into ranges, chunks and row blocks |
//! | `pool.rs` | the long-lived kernel threads: spin briefly between jobs, then sleep |
//! | `buffers.rs` | output vectors the workers initialise piece by piece (zeroed by their worker, or checked after a product) |
//! | `operands.rs` | reading a tensor's CPU storage: contiguous slices, f32 operands |
//! | `simd.rs` | `simd_kernel!` (loops compiled per vector level), `fast_exp`, `fast_erf`, SiLU, GELU, lane reductions |
//! | `conv.rs` | im2col patches and their geometry |
//! | `winograd.rs` | Winograd F(2x2, 3x3): filter, input and output transforms (the output transform in AVX-512 intrinsics where the CPU has them), and the products with a filter transformed block by block from the weight (wide layers that store no filter) |
//! | `winograd4.rs` | Winograd F(4x4, 3x3) with f32 products: filter, input and output transforms (2.25 multiplications per output instead of F(2x2, 3x3)'s 4) |
//! | `winograd_bf16.rs` | the same convolution with bf16 products, fused per block of tile rows (no materialised tiles) |
//! | `norm.rs` | group norm (+ SiLU), layer norm |
//! | `softmax.rs` | row softmax: scaled in place, and unnormalised with row sums |
//! | `softmax_bf16.rs` | the fused attention's softmax rows with bf16 products (bf16 weights, the head mean), in AVX-512 intrinsics |
//! | `gemm.rs` | matrix views, the single-threaded GEMM, products split by columns, rows or batch items, weights stored as column panels |
//! | `panel_product.rs` | a few rows times one column panel in AVX-512 register tiles, fetching the panel ahead of its use |
//! | `bf16.rs` | the product precision (f32, or bf16 operands with f32 sums) and the AVX-512 BF16 product |
//! | `amx.rs` | the same bf16 product on Intel AMX tiles, where the CPU and OS offer them |
//! | `attention.rs` | fused attention, attention probabilities and their product with values, mean of planes |
//! | `attention_f32.rs` | the f32 fused attention's products and exponentials for one block of queries, or, where nothing records the probabilities, with the queries along the vector lanes and the keys in chunks (online softmax), in AVX-512 register tiles |
//! | `heads.rs` | attention heads split (plain or transposed) and merged |
//! | `elementwise.rs` | GEGLU (alone, after its linear layer, or as the whole feed-forward), bias added in place, residual sums (in place into a fresh output), channels joined, nearest upsampling |
//!
//! The `unsafe` code (each block with its SAFETY note) is in `gemm.rs` (the bounds-checked GEMM
//! call), `bf16.rs`, `winograd.rs`, `winograd_bf16.rs`, `softmax_bf16.rs`, `attention_f32.rs` and `panel_product.rs` (the
//! bounds-checked AVX-512 intrinsics), `amx.rs` (the tile instructions and the OS request for them), `pool.rs` (a borrowed job
//! handed to the kernel threads) and `buffers.rs` (outputs initialised piece by piece).

mod amx;
mod attention;
mod attention_f32;
mod bf16;
mod buffers;
mod conv;
mod elementwise;
mod gemm;
mod heads;
mod norm;
mod operands;
mod panel_product;
mod pool;
mod simd;
mod softmax;
mod softmax_bf16;
#[cfg(test)]
pub(crate) mod test_support;
mod threads;
mod winograd;
mod winograd4;
mod winograd_bf16;

pub use attention::{
    attend_probabilities, attention_probabilities, fused_attention,
    fused_attention_adding_head_mean, mean_of_planes,
};
pub use bf16::{
    bf16_supported, product_precision, with_product_precision, ProductPrecision, WeightPacking,
};
pub use conv::{im2col, PatchGeometry};
pub use elementwise::{
    add_bias, add_into, add_same_shape, add_slice_into, add_to_fresh, concat_last_dim, geglu,
    linear_geglu, scale_last_dim, upsample_nearest, zeros, LinearParts,
};
pub use gemm::{
    batched_matmul_panels, batched_matmul_parallel, matmul_column_groups, matmul_split_columns,
    matmul_split_rows, ColumnPanels, PANEL_COLUMNS,
};
pub use heads::{merge_heads, split_heads, split_heads_transposed};
pub use norm::{group_norm, layer_norm};
pub use softmax::scaled_softmax_in_place;
pub use threads::parallel_map;
pub use winograd::{
    winograd_filter, winograd_input, winograd_output, winograd_products_from_weight,
    winograd_weight,
};
pub use winograd4::{winograd4_filter, winograd4_input, winograd4_output};
pub use winograd_bf16::{
    pack_winograd_filter, winograd_bf16_supported, winograd_conv_bf16, PackedWinogradFilter,
};
