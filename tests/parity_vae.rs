//! VAE parity with diffusers: `vae.decode` and the posterior mean of `vae.encode` for the tiny-sd1 /
//! tiny-sd2 reference fixtures (tests/fixtures/README.md).

// The fixtures are memory-mapped as the brief's loading recipe does; nothing writes them meanwhile.
#![allow(unsafe_code)]
// Test helpers outside `#[test]` functions unwrap too.
#![allow(clippy::unwrap_used)]

mod common;
use common::{fixture, max_abs_diff, random_tensors, references};
use std::path::Path;

use attend::pipeline::vae::{AutoencoderKl, VaeConfig};
use candle_core::{DType, Device, Tensor};

fn load_vae(model: &str) -> AutoencoderKl {
    let config = VaeConfig::from_file(&fixture(&format!("{model}/vae/config.json"))).unwrap();
    let path = fixture(&format!("{model}/vae/diffusion_pytorch_model.safetensors"));
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu).unwrap()
    };
    AutoencoderKl::new(vb, &config).unwrap()
}

fn check_model(model: &str) {
    let reference = references(model);
    let vae = load_vae(model);
    assert_eq!(vae.downscale_factor(), 2);

    let decoded = vae.decode(&reference["vae.decode.latents"]).unwrap();
    let diff = max_abs_diff(&decoded, &reference["vae.decode.out"]);
    eprintln!("{model}: vae.decode max abs diff = {diff:e}");
    assert!(diff < 1e-4, "{model}: decode differs by {diff}");

    let mean = vae.encode_mean(&reference["vae.encode.image"]).unwrap();
    let diff = max_abs_diff(&mean, &reference["vae.encode.mean"]);
    eprintln!("{model}: vae.encode mean max abs diff = {diff:e}");
    assert!(diff < 1e-4, "{model}: encode mean differs by {diff}");

    // A posterior sample with zero noise is the mean.
    let zero_noise = Tensor::zeros(mean.dims(), DType::F32, &Device::Cpu).unwrap();
    let sample = vae
        .encode_sample(&reference["vae.encode.image"], &zero_noise)
        .unwrap();
    assert!(max_abs_diff(&sample, &mean) < 1e-6);
}

#[test]
fn tiny_sd1_vae_matches_diffusers() {
    check_model("tiny-sd1");
}

#[test]
fn tiny_sd2_vae_matches_diffusers() {
    check_model("tiny-sd2");
}

#[test]
fn wrong_image_size_is_an_invalid_argument() {
    let vae = load_vae("tiny-sd1");
    let odd = Tensor::zeros((1, 3, 31, 32), DType::F32, &Device::Cpu).unwrap();
    let error = vae.encode_mean(&odd).unwrap_err();
    assert!(error.to_string().contains("image"), "{error}");
}

#[test]
fn real_checkpoint_manifests_load_every_parameter() {
    for name in ["sd15", "sd21", "sd-turbo"] {
        let manifest = attend::pipeline::weights::ParameterManifest::from_file(&fixture(&format!(
            "manifests/{name}.json"
        )))
        .unwrap();
        let text = manifest.configs["vae"].to_string();
        let config = VaeConfig::from_json(&text, Path::new("manifest")).unwrap();
        assert_eq!(config.downscale_factor(), 8);
        let backend = manifest.backend("vae").unwrap();
        AutoencoderKl::new(backend.var_builder(DType::F32, &Device::Cpu), &config).unwrap();
        let unrequested = backend.unrequested_names();
        assert!(
            unrequested.is_empty(),
            "{name}: never requested {unrequested:?}"
        );
        eprintln!(
            "{name}: all {} VAE parameters requested with their shapes",
            backend.parameter_count()
        );
    }
}

/// `cargo test --test parity_vae timing -- --ignored --nocapture`: SD VAE decode of one 64x64
/// latent (512 px) with random weights of the real shapes.
#[test]
#[ignore]
fn timing_sd_vae_decode_512() {
    let manifest =
        attend::pipeline::weights::ParameterManifest::from_file(&fixture("manifests/sd15.json"))
            .unwrap();
    let config =
        VaeConfig::from_json(&manifest.configs["vae"].to_string(), Path::new("manifest")).unwrap();
    let tensors = random_tensors(&manifest.parameters["vae"], 0x2545_F491_4F6C_DD1Du64);
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let vae = AutoencoderKl::new(vb, &config).unwrap();
    let latents = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &Device::Cpu).unwrap();
    vae.decode(&latents).unwrap();
    let start = std::time::Instant::now();
    let image = vae.decode(&latents).unwrap();
    eprintln!(
        "SD VAE decode, 64x64 latent -> 512x512: {:.2} s",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(image.dims(), &[1, 3, 512, 512]);
}
