//! Null-text inversion (Mokady et al.): per step, Adam on the unconditional embedding so that
//! guided DDIM sampling follows the inverted trajectory. Gradients flow through the UNet by
//! candle's autograd (the UNet's layers take a differentiable path when their input tracks
//! gradients; the fused kernels otherwise).
