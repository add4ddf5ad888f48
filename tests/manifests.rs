//! The full-size text encoder, UNet and VAE of real checkpoints (SD 1.5, SD 2.1, sd-turbo) ask for
//! exactly the parameters, with exactly the shapes, that the published weights have.
//!
//! The manifests in `tests/fixtures/manifests/` list each checkpoint's configs and the name and shape
//! of every parameter (no values). The models are built against a checking backend that serves
//! zero-cost broadcast zeros, rejects unknown names and wrong shapes, and records every request.
//! The manifests' configs are abridged, so each is laid over the tiny-sd1 fixture's config for the same
//! component (keys the manifest leaves out are diffusers defaults in both).

// Test helpers may unwrap like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;
use common::{fixture, read_json};
use std::path::{Path, PathBuf};

use attend::pipeline::clip::{ClipTextConfig, ClipTextEncoder};
use attend::pipeline::unet::{Unet, UnetConfig};
use attend::pipeline::vae::{AutoencoderKl, VaeConfig};
use attend::pipeline::weights::{ManifestBackend, ParameterManifest};
use candle_core::{DType, Device};

/// Writes the manifest's config for `component` over tiny-sd1's `config_file` into `out_dir`.
fn merged_config(
    manifest: &ParameterManifest,
    component: &str,
    config_file: &str,
    out_dir: &Path,
) -> PathBuf {
    let base_path = fixture("tiny-sd1").join(component).join(config_file);
    let mut config = read_json(&base_path);
    let overrides = manifest.configs[component].as_object().unwrap();
    for (key, value) in overrides {
        config[key] = value.clone();
    }
    let path = out_dir.join(format!("{component}.json"));
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

fn assert_all_requested(backend: &ManifestBackend, what: &str) {
    let missing = backend.unrequested_names();
    eprintln!(
        "{what}: {} of {} parameters requested",
        backend.requested_names().len(),
        backend.parameter_count()
    );
    assert!(
        missing.is_empty(),
        "{what}: {} parameters never requested, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

#[test]
fn full_size_models_request_every_checkpoint_parameter() {
    let temp = tempfile::tempdir().unwrap();
    let device = Device::Cpu;
    // One checkpoint and one component at a time keeps memory bounded.
    for checkpoint in ["sd15", "sd21", "sd-turbo"] {
        let manifest =
            ParameterManifest::from_file(&fixture(&format!("manifests/{checkpoint}.json")))
                .unwrap();

        let backend = manifest.backend("text_encoder").unwrap();
        let config = ClipTextConfig::from_file(&merged_config(
            &manifest,
            "text_encoder",
            "config.json",
            temp.path(),
        ))
        .unwrap();
        let encoder = ClipTextEncoder::new(backend.var_builder(DType::F16, &device), &config)
            .unwrap_or_else(|err| panic!("{checkpoint} text encoder: {err}"));
        drop(encoder);
        assert_all_requested(&backend, &format!("{checkpoint} text encoder"));

        let backend = manifest.backend("unet").unwrap();
        let config = UnetConfig::from_file(&merged_config(
            &manifest,
            "unet",
            "config.json",
            temp.path(),
        ))
        .unwrap();
        let unet = Unet::new(backend.var_builder(DType::F16, &device), &config)
            .unwrap_or_else(|err| panic!("{checkpoint} UNet: {err}"));
        drop(unet);
        assert_all_requested(&backend, &format!("{checkpoint} UNet"));

        let backend = manifest.backend("vae").unwrap();
        let config =
            VaeConfig::from_file(&merged_config(&manifest, "vae", "config.json", temp.path()))
                .unwrap();
        let vae = AutoencoderKl::new(backend.var_builder(DType::F16, &device), &config)
            .unwrap_or_else(|err| panic!("{checkpoint} VAE: {err}"));
        drop(vae);
        assert_all_requested(&backend, &format!("{checkpoint} VAE"));
    }
}

#[test]
fn manifest_backend_rejects_unknown_names_and_wrong_shapes() {
    let manifest = ParameterManifest::from_file(&fixture("manifests/sd15.json")).unwrap();
    let backend = manifest.backend("vae").unwrap();
    let vb = backend.var_builder(DType::F16, &Device::Cpu);
    let err = vb
        .get((128, 3, 3, 3), "not.a.parameter")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not.a.parameter"), "{err}");
    let err = vb
        .get((64, 3, 3, 3), "encoder.conv_in.weight")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("encoder.conv_in.weight") && err.contains("[128, 3, 3, 3]"),
        "{err}"
    );
    let zeros = vb.get((128, 3, 3, 3), "encoder.conv_in.weight").unwrap();
    assert_eq!(zeros.dims(), &[128, 3, 3, 3]);
    assert_eq!(backend.requested_names().len(), 1);
}
