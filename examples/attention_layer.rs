//! Times one fused attention layer of a chosen shape, single layer, best of several calls, with
//! bf16 and f32 products, without and with the attention store's head mean. The shape comes from
//! the environment: `QUERIES`, `KEYS`, `HEADS`, `HEAD_DIM` (default: the bundled model's 32x32
//! self-attention, 1024 x 1024, 4 heads of 32), `CALLS` (default 20); `PRODUCTS=bf16|f32` picks
//! one precision. Threads: `RAYON_NUM_THREADS`, as for the editor.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release --example attention_layer`

use attend::kernels::{
    fused_attention, fused_attention_adding_head_mean, split_heads_transposed,
    with_product_precision, ProductPrecision,
};
use candle_core::{Device, Tensor};

/// A positive whole number from the environment variable `name`, or `default`.
fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .filter(|&value| value > 0)
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let device = Device::Cpu;
    let (queries, keys) = (setting("QUERIES", 1024), setting("KEYS", 1024));
    let (heads, head_dim, calls) = (
        setting("HEADS", 4),
        setting("HEAD_DIM", 32),
        setting("CALLS", 20),
    );
    let batch = 2;
    let inner = heads * head_dim;
    let query = Tensor::randn(0f32, 1.0, (batch, queries, inner), &device)?;
    let key = Tensor::randn(0f32, 1.0, (batch, keys, inner), &device)?;
    let value = Tensor::randn(0f32, 1.0, (batch, keys, inner), &device)?;
    let key_t = split_heads_transposed(&key, heads)?;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let precisions = match std::env::var("PRODUCTS").as_deref() {
        Ok("bf16") => vec![ProductPrecision::Bf16],
        Ok("f32") => vec![ProductPrecision::F32],
        _ => vec![ProductPrecision::Bf16, ProductPrecision::F32],
    };
    println!("batch {batch}, {queries} queries, {keys} keys, {heads} heads of {head_dim}");
    for precision in precisions {
        for with_mean in [false, true] {
            let best = with_product_precision(precision, || -> anyhow::Result<f64> {
                let mut best = f64::MAX;
                for _ in 0..calls {
                    let start = std::time::Instant::now();
                    if with_mean {
                        let mut sum = vec![0f32; queries * keys];
                        let observed = (1, &mut sum[..]);
                        fused_attention_adding_head_mean(
                            &query, &key_t, &value, heads, scale, observed,
                        )?;
                    } else {
                        fused_attention(&query, &key_t, &value, heads, scale)?;
                    }
                    best = best.min(start.elapsed().as_secs_f64());
                }
                Ok(best)
            })?;
            let mean = if with_mean { ", with head mean" } else { "" };
            println!("{precision:?} products{mean}: best {:.2} ms", best * 1e3);
        }
    }
    Ok(())
}
