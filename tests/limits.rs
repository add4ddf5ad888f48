//! The limits of a run are checked before anything is allocated (sizes, steps, guidance, memory),
//! and NaN or infinite values stop a run at the step they appear in, instead of a black image.
//!
//! The memory check is tested with an injected amount of available memory, so nothing here
//! depends on the machine's memory.

// Test helpers may unwrap like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;
mod worker_common;
use common::{copy_of_fixture_model, fixture, read_json};
use std::path::PathBuf;

use attend::hook::CancelToken;
use attend::pipeline::limits::{
    check_run_fits, estimate_run_memory, AvailableMemory, ModelFootprint, RunCapture, MAX_SIDE_PX,
};
use attend::pipeline::model::{LoadOptions, StableDiffusion};
use attend::pipeline::rng::NoiseRng;
use attend::pipeline::sampling::{generate, prepare_run, GenerateOutput, GenerateRequest};
use attend::pipeline::unet::UnetConfig;
use attend::pipeline::vae::VaeConfig;
use attend::pipeline::{PipelineError, PipelineResult};
use attend::worker::{Event, GenerateParams, ModelSource, WorkerHandle};
use candle_core::{DType, Device, Tensor};

const GIB: u64 = 1 << 30;

fn tiny_sd1() -> StableDiffusion {
    StableDiffusion::load(&fixture("tiny-sd1"), &LoadOptions::default()).unwrap()
}

fn quick_request(model: &StableDiffusion) -> GenerateRequest {
    let mut request = GenerateRequest::new(model, "a red square");
    request.steps = 2;
    request.seed = 3;
    request
}

fn run(model: &StableDiffusion, request: &GenerateRequest) -> PipelineResult<GenerateOutput> {
    generate(model, request, None, &mut |_| Ok(()), &CancelToken::new())
}

/// The run's error; fails the test when the run succeeds.
fn run_error(model: &StableDiffusion, request: &GenerateRequest) -> PipelineError {
    match run(model, request) {
        Ok(_) => panic!(
            "a {}x{} run with {} steps, guidance {} should have failed",
            request.width, request.height, request.steps, request.guidance
        ),
        Err(err) => err,
    }
}

fn available(gib: u64) -> AvailableMemory {
    AvailableMemory {
        bytes: gib * GIB,
        source: "given by the test".to_string(),
    }
}

#[test]
fn huge_sides_are_refused_with_the_limit_before_any_allocation() {
    let model = tiny_sd1();
    for side in [18_446_744_073_709_551_612usize, 1_099_511_627_776, 100_000] {
        for width_not_height in [true, false] {
            let mut request = quick_request(&model);
            if width_not_height {
                request.width = side;
            } else {
                request.height = side;
            }
            let err = run_error(&model, &request);
            let message = err.to_string();
            let name = if width_not_height { "width" } else { "height" };
            assert!(
                matches!(err, PipelineError::InvalidArgument { name: n, .. } if n == name),
                "{err:?}"
            );
            assert!(
                message.contains(&side.to_string())
                    && message.contains(&format!("largest supported side {MAX_SIDE_PX} px")),
                "{message}"
            );
        }
    }
}

#[test]
fn sides_just_below_the_limit_that_are_not_multiples_get_a_suggestion() {
    let model = tiny_sd1();
    let mut request = quick_request(&model);
    request.width = MAX_SIDE_PX - 1;
    let message = run_error(&model, &request).to_string();
    assert!(message.contains("not a positive multiple"), "{message}");
    request.width = 0;
    let message = run_error(&model, &request).to_string();
    assert!(
        message.contains("0 px is not a positive multiple"),
        "{message}"
    );
}

#[test]
fn steps_outside_one_to_a_thousand_are_refused() {
    let model = tiny_sd1();
    for steps in [0, 1001, usize::MAX] {
        let mut request = quick_request(&model);
        request.steps = steps;
        let err = run_error(&model, &request);
        let message = err.to_string();
        assert!(
            matches!(err, PipelineError::InvalidArgument { name: "steps", .. }),
            "{err:?}"
        );
        assert!(
            message.contains(&format!("{steps} steps requested")) && message.contains("1 to 1000"),
            "{message}"
        );
    }
}

#[test]
fn non_finite_or_huge_guidance_is_refused_with_the_range() {
    let model = tiny_sd1();
    for (guidance, shown) in [
        (1e300, "1e300"),
        (f64::NAN, "NaN"),
        (f64::INFINITY, "inf"),
        (-1.0, "-1"),
        (100.5, "100.5"),
    ] {
        let mut request = quick_request(&model);
        request.guidance = guidance;
        let err = run_error(&model, &request);
        let message = err.to_string();
        assert!(
            matches!(
                err,
                PipelineError::InvalidArgument {
                    name: "guidance",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            message.contains(&format!("invalid guidance: {shown} "))
                && message.contains("0 to 100"),
            "{message}"
        );
    }
    let mut request = quick_request(&model);
    request.guidance = 100.0;
    request.steps = 1;
    run(&model, &request).unwrap();
}

#[test]
fn noise_of_an_absurd_shape_is_an_error_not_a_panic() {
    let mut rng = NoiseRng::new(1);
    let err = rng
        .randn(vec![2, 4, usize::MAX / 4, 8], &Device::Cpu)
        .unwrap_err();
    assert!(err.to_string().contains("overflows"), "{err}");
    // Fits in a usize, but no machine has 2^62 floats.
    let err = rng
        .randn(vec![1usize << 31, 1usize << 31], &Device::Cpu)
        .unwrap_err();
    assert!(err.to_string().contains("cannot allocate"), "{err}");
}

#[test]
fn a_run_too_large_for_the_memory_is_refused_naming_the_need_and_what_is_available() {
    let model = tiny_sd1();
    let footprint = ModelFootprint::of_model(&model);
    let mut request = quick_request(&model);
    (request.width, request.height) = (4096, 4096);
    let memory = estimate_run_memory(&footprint, &request, &RunCapture::store(77, 32));
    assert!(memory.total_bytes() > GIB, "{memory:?}");
    let err = check_run_fits(&memory, &available(1)).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, PipelineError::TooLarge { .. }), "{err:?}");
    assert!(
        message.contains("a 4096x4096 px run")
            && message.contains("would need about")
            && message.contains("this machine has 1.0 GiB available (given by the test)"),
        "{message}"
    );
    // The same run fits on a machine with enough memory.
    check_run_fits(&memory, &available(1 << 20)).unwrap();
}

#[test]
fn the_estimate_grows_with_the_size_the_steps_and_the_capture() {
    let model = tiny_sd1();
    let footprint = ModelFootprint::of_model(&model);
    let request = quick_request(&model);
    let plain = estimate_run_memory(&footprint, &request, &RunCapture::none());
    let captured = estimate_run_memory(&footprint, &request, &RunCapture::store(77, 32));
    let recorded = estimate_run_memory(
        &footprint,
        &request,
        &RunCapture::store(77, 32).with_replay_recording(256),
    );
    assert_eq!(plain.attention_store, 0);
    assert!(captured.attention_store > 0 && recorded.replay_recording > 0);
    assert!(plain.total_bytes() < captured.total_bytes());
    assert!(captured.total_bytes() < recorded.total_bytes());
    let mut larger = request.clone();
    (larger.width, larger.height) = (256, 256);
    let mut longer = request.clone();
    longer.steps = 200;
    let capture = RunCapture::store(77, 32);
    assert!(
        estimate_run_memory(&footprint, &larger, &capture).total_bytes() > captured.total_bytes()
    );
    assert!(
        estimate_run_memory(&footprint, &longer, &capture).attention_store
            > captured.attention_store
    );
    // The largest side with the most steps saturates nothing and stays an honest number.
    let mut largest = request;
    (largest.width, largest.height, largest.steps) = (MAX_SIDE_PX, MAX_SIDE_PX, 1000);
    let total = estimate_run_memory(&footprint, &largest, &capture).total_bytes();
    assert!(total > 64 * GIB && total < u64::MAX, "{total}");
}

/// The full-size configs of a checkpoint manifest laid over tiny-sd1's (as `tests/manifests.rs`).
fn manifest_config(checkpoint: &str, component: &str) -> (tempfile::TempDir, PathBuf) {
    let manifest = read_json(&fixture(&format!("manifests/{checkpoint}.json")));
    let mut config = read_json(&fixture("tiny-sd1").join(component).join("config.json"));
    for (key, value) in manifest["configs"][component].as_object().unwrap() {
        config[key] = value.clone();
    }
    let temp = tempfile::tempdir().unwrap();
    let path = temp.path().join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    (temp, path)
}

#[test]
fn estimates_of_the_bundled_model_and_sd15() {
    let bundled = StableDiffusion::load(
        &attend::worker::bundled_model_dir(),
        &LoadOptions {
            variant: attend::pipeline::weights::WeightVariant::Fp16,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let footprint = ModelFootprint::of_model(&bundled);
    let mut request = GenerateRequest::new(&bundled, "a red circle");
    assert_eq!((request.width, request.height), (64, 64));
    let small = estimate_run_memory(&footprint, &request, &RunCapture::store(77, 32));
    eprintln!(
        "bundled 64x64, {} steps, capture: {} ({})",
        request.steps,
        attend::pipeline::limits::format_bytes(small.total_bytes()),
        small.breakdown()
    );
    assert!(small.total_bytes() < GIB, "{small:?}");
    (request.width, request.height) = (4096, 4096);
    let huge = estimate_run_memory(&footprint, &request, &RunCapture::store(77, 32));
    eprintln!(
        "bundled 4096x4096: {} ({})",
        attend::pipeline::limits::format_bytes(huge.total_bytes()),
        huge.breakdown()
    );
    assert!(huge.total_bytes() > 32 * GIB, "{huge:?}");

    let tiny = tiny_sd1();
    let tiny_footprint = ModelFootprint::of_model(&tiny);
    for side in [512, 1024] {
        let mut request = quick_request(&tiny);
        (request.width, request.height) = (side, side);
        let memory = estimate_run_memory(&tiny_footprint, &request, &RunCapture::none());
        eprintln!(
            "tiny-sd1 {side}x{side}, 2 steps: {} ({})",
            attend::pipeline::limits::format_bytes(memory.total_bytes()),
            memory.breakdown()
        );
    }

    let (_unet_dir, unet_path) = manifest_config("sd15", "unet");
    let (_vae_dir, vae_path) = manifest_config("sd15", "vae");
    let unet = UnetConfig::from_file(&unet_path).unwrap();
    let vae = VaeConfig::from_file(&vae_path).unwrap();
    let sd15 = ModelFootprint::from_configs(&unet, Some(&vae), 77, DType::F32, true);
    let mut request = quick_request(&tiny_sd1());
    (request.width, request.height, request.steps) = (512, 512, 50);
    request.guidance = 7.5;
    for (label, capture) in [
        ("no capture", RunCapture::none()),
        ("store, 77 tokens, self up to 32", RunCapture::store(77, 32)),
        (
            "store + replay recording (256 queries)",
            RunCapture::store(77, 32).with_replay_recording(256),
        ),
    ] {
        let memory = estimate_run_memory(&sd15, &request, &capture);
        eprintln!(
            "SD 1.5 512x512, 50 steps, f32 CPU, {label}: {} ({})",
            attend::pipeline::limits::format_bytes(memory.total_bytes()),
            memory.breakdown()
        );
        assert!(
            memory.total_bytes() > 256 << 20 && memory.total_bytes() < 16 * GIB,
            "{memory:?}"
        );
    }
}

/// Copies tiny-sd1 into a temporary folder and overwrites `tensor` of `component`'s weight files
/// with NaN.
fn tiny_sd1_with_nan(component: &str, tensor: &str) -> (tempfile::TempDir, PathBuf) {
    let (temp, dir) = copy_of_fixture_model("tiny-sd1");
    let mut poisoned = 0;
    for entry in std::fs::read_dir(dir.join(component)).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|ext| ext != "safetensors") {
            continue;
        }
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let original = tensors.get(tensor).unwrap();
        let nan = Tensor::full(f32::NAN, original.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(original.dtype())
            .unwrap();
        tensors.insert(tensor.to_string(), nan);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        poisoned += 1;
    }
    assert!(poisoned > 0, "no weight file in {component}");
    (temp, dir)
}

#[test]
fn nan_unet_weights_stop_the_run_at_the_first_step_naming_it_and_the_cause() {
    let (_temp, dir) = tiny_sd1_with_nan("unet", "conv_out.weight");
    let model = StableDiffusion::load(&dir, &LoadOptions::default()).unwrap();
    let mut steps_seen = 0;
    let result = generate(
        &model,
        &quick_request(&model),
        None,
        &mut |_| {
            steps_seen += 1;
            Ok(())
        },
        &CancelToken::new(),
    );
    let err = result.expect_err("NaN weights must stop the run");
    let message = err.to_string();
    assert!(
        matches!(
            err,
            PipelineError::NonFinite {
                step_index: Some(0),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        message.contains("latents after step 1 of 2")
            && message.contains("weights")
            && message.contains(&dir.display().to_string()),
        "{message}"
    );
    assert_eq!(steps_seen, 0, "no step is reported with NaN latents");
}

#[test]
fn nan_vae_weights_stop_the_decode_instead_of_writing_a_black_image() {
    let (_temp, dir) = tiny_sd1_with_nan("vae", "decoder.conv_out.weight");
    let model = StableDiffusion::load(&dir, &LoadOptions::default()).unwrap();
    let err = run_error(&model, &quick_request(&model));
    let message = err.to_string();
    assert!(
        matches!(
            err,
            PipelineError::NonFinite {
                step_index: None,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        message.contains("the VAE's decoded image") && message.contains("VAE's weights"),
        "{message}"
    );
}

#[test]
fn nan_initial_noise_is_refused_before_the_run() {
    let model = tiny_sd1();
    let mut request = quick_request(&model);
    let shape = prepare_run(&model, &request).unwrap().latent_shape;
    request.init_latents = Some(Tensor::full(f32::NAN, shape.to_vec(), &Device::Cpu).unwrap());
    let err = run_error(&model, &request);
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
}

#[test]
fn the_checks_do_not_change_a_single_bit_of_a_good_run() {
    let model = tiny_sd1();
    let request = quick_request(&model);
    let first = run(&model, &request).unwrap();
    let second = run(&model, &request).unwrap();
    assert_eq!(first.image, second.image);
    assert!(first.image.pixels.iter().any(|&value| value != 0));
}

/// The worker's real engine reports a refused size as the run's `Failed` event, with the message.
#[test]
fn the_engine_reports_a_refused_size_as_a_failed_run() {
    let mut worker = WorkerHandle::spawn(attend::worker::pipeline_engine_factory()).unwrap();
    worker
        .load_model(ModelSource::Folder(fixture("tiny-sd1")))
        .unwrap();
    match worker_common::next_event(&worker) {
        Event::ModelLoaded { .. } => {}
        other => panic!("expected ModelLoaded, got {other:?}"),
    }
    for (width, steps, expected) in [
        (1_099_511_627_776, 2, "largest supported side 8192 px"),
        (32, 1001, "1 to 1000"),
    ] {
        let run_id = worker
            .generate(GenerateParams {
                prompt: "a red square".to_owned(),
                steps,
                width_px: Some(width),
                ..GenerateParams::default()
            })
            .unwrap();
        match worker_common::next_event_of(&worker, run_id) {
            Event::Failed { message, .. } => {
                assert!(message.contains(expected), "{message}");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
    }
}
