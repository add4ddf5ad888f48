//! Reading a tensor's CPU storage: contiguous slices of custom ops' inputs, and f32 operands for
//! the product and attention kernels.

use candle_core::{CpuStorage, Layout, Result, Tensor, WithDType};

/// The contiguous values of `storage` under `layout` (an error naming `op` otherwise).
pub(super) fn contiguous_slice<'a, T: WithDType>(
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

/// The f32 values of `xs` (contiguous), for the product, attention and convolution kernels.
pub(super) fn f32_operand(xs: &Tensor) -> Result<Tensor> {
    if !xs.device().is_cpu() {
        candle_core::bail!("attend's kernels: CPU tensors only");
    }
    xs.to_dtype(candle_core::DType::F32)?.contiguous()
}

/// Runs `job` on the contiguous f32 values of `xs` (see [`f32_operand`]).
pub(super) fn with_values<R>(xs: &Tensor, job: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = xs.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*storage else {
        candle_core::bail!("attend's kernels: CPU tensors only");
    };
    job(contiguous_slice(storage, layout, "kernel input")?)
}

/// Runs `job` on the contiguous f32 values of `a` and `b` (converted as [`f32_operand`] does).
pub(super) fn with_f32_pair<R>(
    a: &Tensor,
    b: &Tensor,
    job: impl FnOnce(&[f32], &[f32]) -> Result<R>,
) -> Result<R> {
    let (a, b) = (f32_operand(a)?, f32_operand(b)?);
    with_values(&a, |a| with_values(&b, |b| job(a, b)))
}
