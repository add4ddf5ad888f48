//! tiny-sd1 ships an fp16 variant of its UNet (`diffusion_pytorch_model.fp16.safetensors`: the fp32
//! weights rounded to f16). Loaded through the engine's own loader with the fp16 variant chosen, and
//! computed in f32, its output must stay close to diffusers' fp32 reference.
//!
//! Tolerance: the fixture's fp32 weights happen to be exactly representable in f16 (checked: the
//! two files hold the same values), so the f16 -> f32 conversion is exact and the output must match
//! as closely as the fp32 weights do (measured 5.4e-6, the same as fp32). The bound stays 1e-4, the
//! f32 parity bound; for real checkpoints, whose fp32 weights are not f16-exact, rounding a weight to
//! f16 changes it by up to 2^-11 relative and the difference grows accordingly.

// Test helpers outside `#[test]` functions unwrap too.
#![allow(clippy::unwrap_used)]

mod common;
use common::max_abs_diff;
use std::path::Path;

use attend::pipeline::model::{LoadOptions, StableDiffusion};
use attend::pipeline::weights::WeightVariant;
use candle_core::{Device, Tensor};

#[test]
fn tiny_sd1_fp16_unet_variant_stays_close_to_the_fp32_reference() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1");
    let options = LoadOptions {
        variant: WeightVariant::Fp16,
        ..LoadOptions::default()
    };
    let model = StableDiffusion::load(&dir, &options).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("reference_outputs.safetensors"), &Device::Cpu)
            .unwrap();
    let timestep = reference["unet.timestep"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()[0] as f64;
    let output = model
        .unet
        .forward(
            &reference["unet.sample"],
            timestep,
            &reference["unet.encoder_hidden_states"],
            None,
        )
        .unwrap();
    let expected: &Tensor = &reference["unet.out"];
    let diff = max_abs_diff(&output, expected);
    let scale = expected
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!(
        "tiny-sd1 fp16 UNet variant: max abs diff {diff:e} (largest reference value {scale})"
    );
    assert!(diff < 1e-4, "fp16 variant differs by {diff}");
    // And the fp16 file is the one the loader picked.
    let files = attend::pipeline::weights::find_weight_files(
        &dir.join("unet"),
        "UNet weights",
        WeightVariant::Fp16,
    )
    .unwrap();
    assert!(
        files
            .iter()
            .all(|file| file.to_string_lossy().ends_with(".fp16.safetensors")),
        "{files:?}"
    );
}
