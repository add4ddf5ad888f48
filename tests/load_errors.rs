//! Broken model folders and bad run parameters give the right error variant, naming the file or
//! value at fault; odd but valid prompts work.
//!
//! Each broken folder is a copy of `tests/fixtures/tiny-sd1` in a temporary directory.

// Test helpers may unwrap like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;
use common::{copy_of_fixture_model, edit_json, fixture, max_abs_diff};
use std::path::{Path, PathBuf};

use attend::hook::CancelToken;
use attend::pipeline::model::{LoadOptions, StableDiffusion};
use attend::pipeline::sampling::{generate, GenerateOutput, GenerateRequest};
use attend::pipeline::scheduler::SchedulerKind;
use attend::pipeline::weights::WeightVariant;
use attend::pipeline::{PipelineError, PipelineResult};
use candle_core::{DType, Device, Tensor};

fn tiny_sd1() -> PathBuf {
    fixture("tiny-sd1")
}

/// Copies tiny-sd1 into a fresh temporary folder (without the large reference outputs).
fn copy_of_tiny_sd1() -> (tempfile::TempDir, PathBuf) {
    copy_of_fixture_model("tiny-sd1")
}

fn load(dir: &Path) -> PipelineResult<StableDiffusion> {
    StableDiffusion::load(dir, &LoadOptions::default())
}

fn load_error(dir: &Path) -> PipelineError {
    match load(dir) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(err) => err,
    }
}

fn quick_request(model: &StableDiffusion, prompt: &str) -> GenerateRequest {
    let mut request = GenerateRequest::new(model, prompt);
    request.steps = 2;
    request.seed = 3;
    request
}

fn run(model: &StableDiffusion, request: &GenerateRequest) -> PipelineResult<GenerateOutput> {
    generate(model, request, None, &mut |_| Ok(()), &CancelToken::new())
}

#[test]
fn missing_folder_is_named() {
    let err = load_error(Path::new("/definitely/not/a/model"));
    assert!(matches!(err, PipelineError::Missing { .. }), "{err:?}");
    assert!(err.to_string().contains("/definitely/not/a/model"), "{err}");
}

#[test]
fn missing_weights_fall_back_to_fp16_then_fail_naming_the_folder() {
    let (_temp, dir) = copy_of_tiny_sd1();
    let unet_dir = dir.join("unet");
    std::fs::remove_file(unet_dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let model = load(&dir).unwrap();
    assert!(
        model.load_warnings().iter().any(|w| w.contains("fp16")),
        "{:?}",
        model.load_warnings()
    );
    drop(model);

    std::fs::remove_file(unet_dir.join("diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let err = load_error(&dir);
    assert!(matches!(err, PipelineError::Missing { .. }), "{err:?}");
    assert!(err.to_string().contains("unet"), "{err}");
}

#[test]
fn fp16_variant_is_used_when_asked() {
    let options = LoadOptions {
        variant: WeightVariant::Fp16,
        ..LoadOptions::default()
    };
    let model = StableDiffusion::load(&tiny_sd1(), &options).unwrap();
    assert!(
        model.load_warnings().is_empty(),
        "{:?}",
        model.load_warnings()
    );
}

#[test]
fn truncated_safetensors_is_a_bad_file() {
    let (_temp, dir) = copy_of_tiny_sd1();
    let weights = dir.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&dir);
    assert!(matches!(err, PipelineError::BadFile { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("diffusion_pytorch_model.safetensors"),
        "{message}"
    );
    assert!(message.contains("truncated"), "{message}");

    // Garbage where the header should be.
    std::fs::write(
        &weights,
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
    )
    .unwrap();
    let err = load_error(&dir);
    assert!(matches!(err, PipelineError::BadFile { .. }), "{err:?}");
    assert!(err.to_string().contains("header"), "{err}");
}

#[test]
fn broken_config_json_is_a_bad_file() {
    for config in [
        "unet/config.json",
        "scheduler/scheduler_config.json",
        "model_index.json",
    ] {
        let (_temp, dir) = copy_of_tiny_sd1();
        std::fs::write(dir.join(config), "{ \"in_channels\": 4, ").unwrap();
        let err = load_error(&dir);
        assert!(
            matches!(err, PipelineError::BadFile { .. }),
            "{config}: {err:?}"
        );
        assert!(err.to_string().contains(config), "{err}");
    }
}

#[test]
fn wrong_shape_weight_names_tensor_and_file() {
    let (_temp, dir) = copy_of_tiny_sd1();
    let weights = dir.join("text_encoder/model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    tensors.insert(
        "final_layer_norm.weight".to_string(),
        Tensor::ones(33, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let err = load_error(&dir);
    assert!(matches!(err, PipelineError::BadWeights { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("final_layer_norm.weight"), "{message}");
    assert!(message.contains("model.safetensors"), "{message}");
    assert!(
        message.contains("[33]") && message.contains("[32]"),
        "{message}"
    );
}

#[test]
fn unet_that_does_not_fit_pixel_space_is_a_config_error() {
    let (_temp, dir) = copy_of_tiny_sd1();
    edit_json(&dir.join("model_index.json"), |index| {
        index["vae"] = serde_json::json!([null, null]);
    });
    let err = load_error(&dir);
    assert!(matches!(err, PipelineError::BadConfig { .. }), "{err:?}");
    assert!(err.to_string().contains("unet/config.json"), "{err}");
}

#[test]
fn unknown_scheduler_name_lists_the_accepted_ones() {
    let err = "pndm".parse::<SchedulerKind>().unwrap_err();
    assert!(
        matches!(err, PipelineError::InvalidArgument { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    for expected in ["pndm", "ddim", "euler", "euler-a", "dpmpp-2m"] {
        assert!(message.contains(expected), "{message}");
    }
}

#[test]
fn unimplemented_scheduler_class_runs_as_ddim_with_a_warning() {
    let (_temp, dir) = copy_of_tiny_sd1();
    edit_json(&dir.join("scheduler/scheduler_config.json"), |config| {
        config["_class_name"] = serde_json::json!("PNDMScheduler");
    });
    let model = load(&dir).unwrap();
    let output = run(&model, &quick_request(&model, "a cat")).unwrap();
    assert_eq!(output.scheduler, SchedulerKind::Ddim);
    assert!(
        output.warnings.iter().any(|w| w.contains("PNDMScheduler")),
        "{:?}",
        output.warnings
    );
}

#[test]
fn bad_run_parameters_name_the_value() {
    let model = load(&tiny_sd1()).unwrap();

    let mut request = quick_request(&model, "a cat");
    request.steps = 0;
    let err = run(&model, &request).unwrap_err();
    assert!(
        matches!(err, PipelineError::InvalidArgument { name: "steps", .. }),
        "{err:?}"
    );

    let mut request = quick_request(&model, "a cat");
    request.width = 37;
    let err = run(&model, &request).unwrap_err();
    assert!(
        matches!(err, PipelineError::InvalidArgument { name: "width", .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("37") && message.contains("multiple of 2"),
        "{message}"
    );

    let mut request = quick_request(&model, "a cat");
    request.height = 0;
    let err = run(&model, &request).unwrap_err();
    assert!(
        matches!(err, PipelineError::InvalidArgument { name: "height", .. }),
        "{err:?}"
    );

    let mut request = quick_request(&model, "a cat");
    request.init_latents = Some(Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap());
    let err = run(&model, &request).unwrap_err();
    assert!(
        matches!(
            err,
            PipelineError::InvalidArgument {
                name: "init_latents",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("[1, 4, 16, 16]"), "{err}");
}

#[test]
fn empty_and_overlong_prompts() {
    let model = load(&tiny_sd1()).unwrap();
    let output = run(&model, &quick_request(&model, "")).unwrap();
    assert!(output.warnings.is_empty(), "{:?}", output.warnings);
    assert_eq!(output.latents_per_step.dims(), &[2, 1, 4, 16, 16]);

    // 280 tokens: beyond the 3 chunks of 75 that long prompts are encoded in.
    let long_prompt = "a very long prompt about a cat ".repeat(40);
    let output = run(&model, &quick_request(&model, &long_prompt)).unwrap();
    assert!(
        output.warnings.iter().any(|w| w.contains("truncated")),
        "{:?}",
        output.warnings
    );
}

#[test]
fn cancel_and_step_errors_stop_the_run() {
    let model = load(&tiny_sd1()).unwrap();
    let request = quick_request(&model, "a cat");

    let cancel = CancelToken::new();
    let mut steps_seen = 0;
    let err = generate(
        &model,
        &request,
        None,
        &mut |report| {
            steps_seen += 1;
            assert_eq!(report.step_count, 2);
            cancel.cancel();
            Ok(())
        },
        &cancel.clone(),
    )
    .unwrap_err();
    assert!(matches!(err, PipelineError::Cancelled), "{err:?}");
    assert_eq!(steps_seen, 1);

    let err = generate(
        &model,
        &request,
        None,
        &mut |_| {
            Err(PipelineError::InvalidArgument {
                name: "on_step",
                reason: "stop".to_string(),
            })
        },
        &CancelToken::new(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            PipelineError::InvalidArgument {
                name: "on_step",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn same_seed_same_image_and_previews_have_latent_size() {
    let model = load(&tiny_sd1()).unwrap();
    let mut request = quick_request(&model, "a cat");
    request.scheduler = Some(SchedulerKind::EulerAncestral);
    request.preview = true;
    let mut previews = Vec::new();
    let first = generate(
        &model,
        &request,
        None,
        &mut |report| {
            previews.push(report.preview.clone());
            Ok(())
        },
        &CancelToken::new(),
    )
    .unwrap();
    let second = run(&model, &request).unwrap();
    assert_eq!(first.image, second.image);
    assert_eq!(previews.len(), 2);
    let preview = previews[0].as_ref().unwrap();
    assert_eq!(
        (preview.width, preview.height, preview.pixels.len()),
        (16, 16, 16 * 16 * 3)
    );

    request.seed += 1;
    let third = run(&model, &request).unwrap();
    assert_ne!(first.image, third.image);
}

#[test]
fn pixel_space_model_runs_without_a_vae() {
    // Turn the tiny SD1 copy into a pixel-space model: no VAE, a UNet with 3 input and output
    // channels (the first 3 of its conv_in / conv_out channels).
    let (_temp, dir) = copy_of_tiny_sd1();
    edit_json(&dir.join("model_index.json"), |index| {
        index["vae"] = serde_json::json!([null, null]);
    });
    std::fs::remove_dir_all(dir.join("vae")).unwrap();
    edit_json(&dir.join("unet/config.json"), |config| {
        config["in_channels"] = serde_json::json!(3);
        config["out_channels"] = serde_json::json!(3);
    });
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let weights_path = dir.join("unet/diffusion_pytorch_model.safetensors");
    let mut weights = candle_core::safetensors::load(&weights_path, &Device::Cpu).unwrap();
    for (name, axis) in [
        ("conv_in.weight", 1),
        ("conv_out.weight", 0),
        ("conv_out.bias", 0),
    ] {
        let narrowed = weights[name]
            .narrow(axis, 0, 3)
            .unwrap()
            .contiguous()
            .unwrap();
        weights.insert(name.to_string(), narrowed);
    }
    candle_core::safetensors::save(&weights, &weights_path).unwrap();

    let model = load(&dir).unwrap();
    assert!(model.is_pixel_space());
    assert_eq!(model.latent_downscale_factor(), 1);
    assert_eq!(model.latent_channels(), 3);
    assert_eq!(model.default_size_px(), (16, 16));
    assert_eq!(model.size_multiple_px(), 1);
    let mut request = quick_request(&model, "a red circle");
    request.preview = true;
    let mut preview_sizes = Vec::new();
    let output = generate(
        &model,
        &request,
        None,
        &mut |report| {
            let preview = report.preview.as_ref().unwrap();
            preview_sizes.push((preview.width, preview.height));
            Ok(())
        },
        &CancelToken::new(),
    )
    .unwrap();
    assert_eq!(preview_sizes, [(16, 16), (16, 16)]);
    assert_eq!(output.latents_per_step.dims(), &[2, 1, 3, 16, 16]);
    assert_eq!(output.image_f32.dims(), &[16, 16, 3]);
    // In pixel space the image is the final sample mapped from [-1, 1] to [0, 1].
    let last = output.latents_per_step.get(1).unwrap().squeeze(0).unwrap();
    let expected = last
        .affine(0.5, 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap()
        .permute((1, 2, 0))
        .unwrap();
    let diff = max_abs_diff(&output.image_f32, &expected);
    assert_eq!(diff, 0.0);
}
