//! The UNet's differentiable path (taken when the text embedding tracks gradients, as null-text
//! inversion's optimised embedding does) computes the same numbers as the fused path, never
//! serves cross-attention keys/values cached for an earlier value of the embedding, and lets
//! gradients reach the embedding. tiny-sd1 fixture and the bundled model.

#![allow(clippy::unwrap_used)]

mod common;
use common::{fixture, max_abs_diff, references};

use std::path::{Path, PathBuf};

use attend::pipeline::model::{LoadOptions, StableDiffusion};
use candle_core::{DType, Device, Tensor, Var};

fn load(dir: &Path) -> StableDiffusion {
    StableDiffusion::load(dir, &LoadOptions::default()).unwrap()
}

fn bundled_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/attend-shapes")
}

/// Deterministic values in [-1, 1) (xorshift).
fn pseudo_random(shape: &[usize], seed: u64) -> Tensor {
    let mut state = seed | 1;
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// The fused and differentiable outputs for `context`, then for a second value written into the
/// same variable (same tensor id): both must match the fused path on that value.
fn check_paths_agree(model: &StableDiffusion, sample: &Tensor, timestep: f64, context: &Tensor) {
    let fused = model.unet.forward(sample, timestep, context, None).unwrap();
    assert!(!fused.track_op());
    let variable = Var::from_tensor(&context.copy().unwrap()).unwrap();
    let differentiable = model
        .unet
        .forward(sample, timestep, variable.as_tensor(), None)
        .unwrap();
    assert!(differentiable.track_op(), "the output is not in the graph");
    let diff = max_abs_diff(&differentiable, &fused);
    eprintln!(
        "{}: differentiable vs fused max abs diff {diff:e}",
        model.name()
    );
    assert!(diff < 1e-4, "{}: paths differ by {diff}", model.name());

    // A second value in the same variable: a cached projection of the first would be stale.
    let second = ((context * 0.5).unwrap() + 0.25).unwrap();
    variable.set(&second).unwrap();
    let differentiable = model
        .unet
        .forward(sample, timestep, variable.as_tensor(), None)
        .unwrap();
    let fused_second = model.unet.forward(sample, timestep, &second, None).unwrap();
    assert!(
        max_abs_diff(&fused_second, &fused) > 1e-3,
        "the change must matter"
    );
    let diff = max_abs_diff(&differentiable, &fused_second);
    assert!(
        diff < 1e-4,
        "{}: after set, paths differ by {diff}",
        model.name()
    );

    // Gradients reach the embedding.
    let gradients = differentiable
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gradient = gradients.get(variable.as_tensor()).unwrap();
    let norm = gradient
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");
}

#[test]
fn differentiable_path_matches_the_fused_path_on_tiny_sd1() {
    let model = load(&fixture("tiny-sd1"));
    let reference = references("tiny-sd1");
    let timestep = reference["unet.timestep"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()[0] as f64;
    let sample = &reference["unet.sample"];
    let context = &reference["unet.encoder_hidden_states"];
    // The reference batch and its first item alone (null-text optimises one item).
    check_paths_agree(&model, sample, timestep, context);
    check_paths_agree(
        &model,
        &sample.narrow(0, 0, 1).unwrap(),
        timestep,
        &context.narrow(0, 0, 1).unwrap(),
    );
}

#[test]
fn differentiable_path_matches_the_fused_path_on_the_bundled_model() {
    let model = load(&bundled_model_dir());
    let ids = Tensor::from_vec(
        model.tokenizer.encode("a red circle").unwrap().ids,
        (1, 77),
        &Device::Cpu,
    )
    .unwrap();
    let context = model.text_encoder.forward(&ids).unwrap();
    let sample = pseudo_random(&[1, 3, 64, 64], 7);
    check_paths_agree(
        &model,
        &sample,
        501.0,
        &context.to_dtype(DType::F32).unwrap(),
    );
}
