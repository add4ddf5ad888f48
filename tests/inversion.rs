//! Real images in: DDIM inversion against diffusers' `DDIMInverseScheduler` on tiny-sd1, exact
//! reconstructions of `direct` and `ddpm` (tiny-sd1 and the bundled pixel-space model), the other
//! methods' replays, saved inversions, refusals and cancel, and Prompt-to-Prompt on an inverted
//! image.

// Test helpers may unwrap like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;
use common::{fixture, max_abs_diff};

use std::path::Path;
use std::sync::Arc;

use attend::analysis::edit_spec::{CrossWindow, EditSpec, SelfReplace, StepWindow};
use attend::analysis::image::{read_image, RgbImage};
use attend::attention::edit_sampling::{
    generate_edit, generate_edited_branch, invert_recording_source, record_source, EditObservers,
    EditRequest,
};
use attend::attention::p2p::RecordConfig;
use attend::hook::CancelToken;
use attend::pipeline::inversion::{
    encode_image, invert, Inversion, InversionMethod, InversionRequest,
};
use attend::pipeline::model::{LoadOptions, StableDiffusion};
use attend::pipeline::sampling::{decode_to_unit_range, generate, GenerateOutput, GenerateRequest};
use attend::pipeline::scheduler::SchedulerKind;
use attend::pipeline::PipelineError;
use attend::scenes::{generate_scene, SceneOptions};
use candle_core::{Device, Tensor};

const PROMPT: &str = "a red circle on a blue background";

/// How far an exact method's replay may end from the image's latents on tiny-sd1 (latents up to
/// about 2.7): the first replayed step lands on the trajectory within one f32 rounding (measured
/// 1.2e-7), and the random-weight UNet and DDIM's `1 / sqrt(alpha)` amplify those roundings over
/// the steps (measured 1.8e-4 after 5 steps).
const LATENT_TOLERANCE: f32 = 1e-3;

/// The same for the decoded images in `[0, 1]`: the random-weight tiny VAE decoder amplifies the
/// latents' difference (measured 1.6e-3 for 1.8e-4).
const PIXEL_TOLERANCE: f32 = 1e-2;

fn tiny_sd1() -> StableDiffusion {
    StableDiffusion::load(&fixture("tiny-sd1"), &LoadOptions::default()).unwrap()
}

fn bundled() -> StableDiffusion {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/attend-shapes");
    StableDiffusion::load(&dir, &LoadOptions::default()).unwrap()
}

fn test_image() -> RgbImage {
    read_image(&fixture("inversion/image.png")).unwrap()
}

/// A drawn scene the bundled model never saw in training (its seeds start at 1,000,000).
fn unseen_scene() -> (RgbImage, String) {
    let scene = generate_scene(100_003, &SceneOptions::default());
    let image = RgbImage {
        width: scene.size_px,
        height: scene.size_px,
        pixels: scene.rgb,
    };
    (image, scene.caption)
}

fn request(prompt: &str, method: InversionMethod, steps: usize, guidance: f64) -> InversionRequest {
    InversionRequest {
        prompt: prompt.to_string(),
        method,
        steps,
        guidance,
        seed: 7,
    }
}

fn run_inversion(
    model: &StableDiffusion,
    image: &RgbImage,
    request: &InversionRequest,
) -> Arc<Inversion> {
    invert(model, image, request, &mut |_| Ok(()), &CancelToken::new()).unwrap()
}

/// A plain run replaying `inversion` with its own settings.
fn replay_request(model: &StableDiffusion, inversion: &Arc<Inversion>) -> GenerateRequest {
    let mut request = GenerateRequest::new(model, inversion.request.prompt.clone());
    request.steps = inversion.request.steps;
    request.guidance = inversion.request.guidance;
    (request.width, request.height) = inversion.size_px;
    request.inversion = Some(Arc::clone(inversion));
    request
}

fn replay(model: &StableDiffusion, inversion: &Arc<Inversion>) -> GenerateOutput {
    let request = replay_request(model, inversion);
    generate(model, &request, None, &mut |_| Ok(()), &CancelToken::new()).unwrap()
}

fn final_latents(output: &GenerateOutput) -> Tensor {
    let steps = output.latents_per_step.dim(0).unwrap();
    output.latents_per_step.get(steps - 1).unwrap()
}

/// PSNR in dB of two `[h, w, 3]` images in `[0, 1]`.
fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let mse = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    10.0 * (1.0 / f64::from(mse.max(1e-12))).log10()
}

fn unit_image(image: &RgbImage) -> Tensor {
    let values: Vec<f32> = image.pixels.iter().map(|&v| f32::from(v) / 255.0).collect();
    Tensor::from_vec(values, (image.height, image.width, 3), &Device::Cpu).unwrap()
}

#[test]
fn ddim_inversion_matches_diffusers_inverse_scheduler() {
    let model = tiny_sd1();
    let reference = candle_core::safetensors::load(
        fixture("inversion/inversion_reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let image = test_image();
    let latents = encode_image(&model, &image).unwrap();
    let expected = &reference["trajectory"];
    let first = expected.get(0).unwrap();
    let encode_error = max_abs_diff(&latents, &first);
    assert!(
        encode_error < 1e-4,
        "image latents differ by {encode_error}"
    );
    let inversion = run_inversion(
        &model,
        &image,
        &request(PROMPT, InversionMethod::Ddim, 5, 1.0),
    );
    let mut timesteps = inversion.timesteps.clone();
    timesteps.reverse();
    let expected_timesteps: Vec<f64> = reference["timesteps"]
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    assert_eq!(timesteps, expected_timesteps);
    let error = max_abs_diff(&inversion.trajectory, expected);
    assert!(error < 1e-4, "trajectory differs from diffusers by {error}");
}

#[test]
fn direct_and_ddpm_reconstruct_exactly_on_tiny_sd1() {
    let model = tiny_sd1();
    let image = test_image();
    for method in [InversionMethod::Direct, InversionMethod::Ddpm] {
        let inversion = run_inversion(&model, &image, &request(PROMPT, method, 5, 4.0));
        let image_latents = inversion.trajectory.get(0).unwrap();
        let output = replay(&model, &inversion);
        let latent_error = max_abs_diff(&final_latents(&output), &image_latents);
        assert!(
            latent_error < LATENT_TOLERANCE,
            "{method}: latents differ by {latent_error}"
        );
        let decoded = decode_to_unit_range(&model, &image_latents).unwrap();
        let pixel_error = max_abs_diff(&output.image_f32, &decoded);
        assert!(
            pixel_error < PIXEL_TOLERANCE,
            "{method}: pixels differ by {pixel_error}"
        );
        assert_eq!(output.scheduler, SchedulerKind::Ddim);
    }
}

#[test]
fn methods_on_the_bundled_model() {
    let model = bundled();
    let (image, caption) = unseen_scene();
    let target = unit_image(&image);
    for method in [InversionMethod::Direct, InversionMethod::Ddpm] {
        let inversion = run_inversion(&model, &image, &request(&caption, method, 4, 4.0));
        let output = replay(&model, &inversion);
        // Pixel space: the latents are the image in [-1, 1].
        let pixel_error = max_abs_diff(&output.image_f32, &target);
        assert!(
            pixel_error < 1e-3,
            "{method}: pixels differ by {pixel_error}"
        );
        assert_eq!(
            output.image, image,
            "{method}: the 8-bit image is not reproduced"
        );
    }
    // DDIM at guidance 1: close, not exact (each step evaluates the noise one step away;
    // measured 19.6 dB here, where reading the velocity as diffusers does gives 4.1 dB).
    let inversion = run_inversion(
        &model,
        &image,
        &request(&caption, InversionMethod::Ddim, 10, 1.0),
    );
    let output = replay(&model, &inversion);
    let ddim_psnr = psnr(&output.image_f32, &target);
    assert!(
        ddim_psnr > 15.0,
        "DDIM reconstruction PSNR {ddim_psnr:.1} dB"
    );
    // Negative-prompt inversion replays with guidance (the prompt as its own negative).
    let inversion = run_inversion(
        &model,
        &image,
        &request(&caption, InversionMethod::NegativePrompt, 10, 4.0),
    );
    let mut replayed = replay_request(&model, &inversion);
    replayed.negative_prompt = "blurry".to_string();
    let output = generate(
        &model,
        &replayed,
        None,
        &mut |_| Ok(()),
        &CancelToken::new(),
    )
    .unwrap();
    assert!(
        output
            .warnings
            .iter()
            .any(|warning| warning.contains("negative prompt")),
        "{:?}",
        output.warnings
    );
    let negative_psnr = psnr(&output.image_f32, &target);
    assert!(
        negative_psnr > 15.0,
        "negative-prompt reconstruction PSNR {negative_psnr:.1} dB"
    );
}

#[test]
fn saved_inversions_load_back_and_refuse_another_model_or_size() {
    let model = tiny_sd1();
    let image = test_image();
    let dir = tempfile::tempdir().unwrap();
    for method in [
        InversionMethod::Ddim,
        InversionMethod::Direct,
        InversionMethod::Ddpm,
    ] {
        let inversion = run_inversion(&model, &image, &request(PROMPT, method, 3, 3.0));
        let path = dir.path().join(format!("{method}.safetensors"));
        inversion.save(&path).unwrap();
        let loaded = Arc::new(Inversion::load(&path, &model).unwrap());
        assert_eq!(loaded.request, inversion.request);
        assert_eq!(loaded.timesteps, inversion.timesteps);
        assert_eq!(loaded.size_px, inversion.size_px);
        assert_eq!(loaded.image_hash, inversion.image_hash);
        assert_eq!(max_abs_diff(&loaded.trajectory, &inversion.trajectory), 0.0);
        let original = replay(&model, &inversion);
        let reloaded = replay(&model, &loaded);
        assert_eq!(
            max_abs_diff(&original.image_f32, &reloaded.image_f32),
            0.0,
            "{method}"
        );
    }
    let path = dir.path().join("direct.safetensors");
    // Another model.
    let other = StableDiffusion::load(&fixture("tiny-sd2"), &LoadOptions::default()).unwrap();
    let message = Inversion::load(&path, &other).unwrap_err().to_string();
    assert!(
        message.contains("direct.safetensors")
            && message.contains("tiny-sd1")
            && message.contains("tiny-sd2"),
        "{message}"
    );
    // Another size than its tensors: rewrite the metadata's width.
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut metadata = header.metadata().clone().unwrap();
    metadata.insert("width".to_string(), "64".to_string());
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let resized = dir.path().join("resized.safetensors");
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(name, tensor)| {
            let values = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                name.clone(),
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                tensor.dims().to_vec(),
            )
        })
        .collect();
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(name, bytes, shape)| {
            (
                name.as_str(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        &resized,
        safetensors::tensor::serialize(views, Some(metadata)).unwrap(),
    )
    .unwrap();
    let message = Inversion::load(&resized, &model).unwrap_err().to_string();
    assert!(
        message.contains("resized.safetensors")
            && message.contains("trajectory")
            && message.contains("64x32"),
        "{message}"
    );
    // Not an inversion at all.
    let message = Inversion::load(&fixture("inversion/image.png"), &model)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("image.png") && message.contains("safetensors"),
        "{message}"
    );
}

#[test]
fn replays_with_other_settings_are_refused_or_forced_to_ddim() {
    let model = tiny_sd1();
    let inversion = run_inversion(
        &model,
        &test_image(),
        &request(PROMPT, InversionMethod::Direct, 3, 3.0),
    );
    let refused = |edit: &dyn Fn(&mut GenerateRequest), expected: &str| {
        let mut request = replay_request(&model, &inversion);
        edit(&mut request);
        let message = generate(&model, &request, None, &mut |_| Ok(()), &CancelToken::new())
            .unwrap_err()
            .to_string();
        assert!(message.contains(expected), "{message}");
    };
    refused(&|request| request.steps = 4, "inverted with 3 steps");
    refused(&|request| request.width = 64, "inverted at 32x32 px");
    refused(&|request| request.guidance = 5.0, "guidance");
    let mut request = replay_request(&model, &inversion);
    request.scheduler = Some(SchedulerKind::Euler);
    let output = generate(&model, &request, None, &mut |_| Ok(()), &CancelToken::new()).unwrap();
    assert_eq!(output.scheduler, SchedulerKind::Ddim);
    assert!(
        output
            .warnings
            .iter()
            .any(|warning| warning.contains("Euler")),
        "{:?}",
        output.warnings
    );
}

#[test]
fn cancel_stops_an_inversion_and_bad_inputs_are_refused() {
    let model = tiny_sd1();
    let image = test_image();
    let cancel = CancelToken::new();
    let mut reports = 0;
    let result = invert(
        &model,
        &image,
        &request(PROMPT, InversionMethod::Direct, 5, 3.0),
        &mut |progress| {
            reports += 1;
            assert_eq!(progress.phase, "inverting");
            cancel.cancel();
            Ok(())
        },
        &cancel,
    );
    assert!(
        matches!(result, Err(PipelineError::Cancelled)),
        "{result:?}"
    );
    assert_eq!(reports, 1);
    let message = invert(
        &model,
        &image,
        &request(" ", InversionMethod::Ddim, 5, 1.0),
        &mut |_| Ok(()),
        &CancelToken::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(message.contains("prompt"), "{message}");
    // tiny-sd1's VAE halves each side: an odd width cannot be encoded.
    let odd = RgbImage::black(31, 32);
    let message = encode_image(&model, &odd).unwrap_err().to_string();
    assert!(message.contains("31"), "{message}");
}

#[test]
fn an_edit_to_the_same_prompt_reproduces_the_inverted_image() {
    let model = tiny_sd1();
    let image = test_image();
    for method in [InversionMethod::Direct, InversionMethod::Ddpm] {
        let inversion = run_inversion(&model, &image, &request(PROMPT, method, 4, 3.0));
        let image_latents = inversion.trajectory.get(0).unwrap();
        let mut spec = EditSpec::new(PROMPT);
        spec.cross_window = CrossWindow::uniform(StepWindow::until(1.0));
        spec.self_replace = SelfReplace {
            window: StepWindow::until(1.0),
            ..SelfReplace::default()
        };
        for replay_mode in [false, true] {
            let edit = EditRequest {
                generate: replay_request(&model, &inversion),
                spec: spec.clone(),
                replay: replay_mode,
            };
            let output = generate_edit(
                &model,
                &edit,
                EditObservers::default(),
                &mut |_| Ok(()),
                &CancelToken::new(),
            )
            .unwrap();
            // Direct inversion's offsets steer the source row only; ddpm's noise maps every row.
            let branches: &[(&str, &GenerateOutput)] = match method {
                InversionMethod::Ddpm => &[("source", &output.source), ("edited", &output.edited)],
                _ => &[("source", &output.source)],
            };
            for &(branch, run) in branches {
                let error = max_abs_diff(&final_latents(run), &image_latents);
                assert!(
                    error < LATENT_TOLERANCE,
                    "{method}, replay {replay_mode}: the {branch} branch is {error} off"
                );
            }
        }
    }
}

#[test]
fn null_text_through_the_engine_beats_plain_ddim_at_guidance_and_round_trips() {
    let model = tiny_sd1();
    let image = test_image();
    let steps = 4;
    let guidance = 7.5;
    let null_text = run_inversion(
        &model,
        &image,
        &request(PROMPT, InversionMethod::NullText, steps, guidance),
    );
    let ddim = run_inversion(
        &model,
        &image,
        &request(PROMPT, InversionMethod::Ddim, steps, guidance),
    );
    let image_latents = null_text.trajectory.get(0).unwrap();
    let error_of = |inversion: &Arc<Inversion>| {
        let latents = final_latents(&replay(&model, inversion));
        (latents - &image_latents)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let null_text_error = error_of(&null_text);
    let ddim_error = error_of(&ddim);
    assert!(
        null_text_error < ddim_error,
        "null-text replay MSE {null_text_error} is not below plain DDIM's {ddim_error} at guidance {guidance}"
    );
    // What an edit needs to replay it survives a save and a load.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inversion.safetensors");
    null_text.save(&path).unwrap();
    let loaded = Arc::new(Inversion::load(&path, &model).unwrap());
    let difference = max_abs_diff(
        &final_latents(&replay(&model, &loaded)),
        &final_latents(&replay(&model, &null_text)),
    );
    assert!(difference == 0.0, "loaded replay differs by {difference}");
}

#[test]
fn the_inversion_pass_records_the_source_branch_bit_identically() {
    let model = tiny_sd1();
    let image = test_image();
    let cancel = CancelToken::new();
    let mut template = GenerateRequest::new(&model, PROMPT);
    (template.width, template.height) = (image.width, image.height);
    let record = RecordConfig {
        self_max_queries: usize::MAX,
        batch_item: 0,
    };
    let mut spec = EditSpec::new("a red square on a blue background");
    spec.self_replace = SelfReplace {
        window: StepWindow::until(0.5),
        max_queries: usize::MAX,
    };
    for method in [
        InversionMethod::Direct,
        InversionMethod::Ddpm,
        InversionMethod::Ddim,
    ] {
        let inverted = invert_recording_source(
            &model,
            &image,
            &request(PROMPT, method, 4, 3.0),
            &template,
            record,
            &mut |_| Ok(()),
            &cancel,
        )
        .unwrap();
        assert_eq!(
            inverted.recorded_while_inverting,
            method.records_source_while_inverting(),
            "{method}"
        );
        // The separate source run of the same replay: the same latents, image and recording.
        let (source, recording) = record_source(
            &model,
            &inverted.request,
            record,
            None,
            &mut |_| Ok(()),
            &cancel,
        )
        .unwrap();
        assert_eq!(
            max_abs_diff(&inverted.source.latents_per_step, &source.latents_per_step),
            0.0,
            "{method}: source latents"
        );
        assert_eq!(
            inverted.source.image, source.image,
            "{method}: source image"
        );
        assert!(recording.layer_step_count() > 0);
        assert_eq!(
            inverted.recording.layer_step_count(),
            recording.layer_step_count(),
            "{method}: recorded layers"
        );
        // An edit replayed from either recording is the same edit.
        let edited: Vec<Tensor> = [Arc::clone(&inverted.recording), recording]
            .into_iter()
            .map(|recording| {
                generate_edited_branch(
                    &model,
                    &inverted.request,
                    &spec,
                    recording,
                    None,
                    &mut |_| Ok(()),
                    &cancel,
                )
                .unwrap()
                .edited
                .latents_per_step
            })
            .collect();
        assert_eq!(
            max_abs_diff(&edited[0], &edited[1]),
            0.0,
            "{method}: edited latents"
        );
    }
    // The prompt of the replay must be the inverted one.
    let mut other = template.clone();
    other.prompt = "a blue circle".to_string();
    let refused = invert_recording_source(
        &model,
        &image,
        &request(PROMPT, InversionMethod::Direct, 2, 3.0),
        &other,
        record,
        &mut |_| Ok(()),
        &cancel,
    );
    assert!(
        matches!(refused, Err(PipelineError::InvalidArgument { .. })),
        "{refused:?}"
    );
}
