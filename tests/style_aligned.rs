//! Style Aligned: the reference image is unchanged by sharing, `only_self_level` 1 without group
//! norm sharing is independent generation, a score shift of 0 is the fused attention, a set
//! too large for memory is refused before it starts, an image reference follows its inverted
//! trajectory, and sharing can be limited to steps and blocks. End to end on the tiny SD 1.x fixture and the
//! bundled model (few steps).

// Test helpers may unwrap like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;
use common::{fixture, max_abs_diff};

use attend::attention::style_aligned::{shifted_attention, StyleAlignedConfig};
use attend::attention::style_sampling::{
    check_style_set_fits, generate_style_set, invert_reference_image, StyleSetOutput,
    StyleSetRequest, REFERENCE_INVERSION_GUIDANCE,
};
use attend::hook::{CancelToken, QueryKeyValue};
use attend::pipeline::limits::{AvailableMemory, RunCapture};
use attend::pipeline::model::{LoadOptions, StableDiffusion};
use attend::pipeline::sampling::{generate, GenerateRequest};
use attend::pipeline::scheduler::SchedulerKind;
use attend::pipeline::weights::WeightVariant;
use attend::pipeline::PipelineError;
use candle_core::{Device, Tensor};

fn tiny_sd1() -> StableDiffusion {
    StableDiffusion::load(&fixture("tiny-sd1"), &LoadOptions::default()).unwrap()
}

fn bundled() -> Option<StableDiffusion> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/attend-shapes");
    if !dir.join("model_index.json").is_file() {
        return None;
    }
    let options = LoadOptions {
        variant: WeightVariant::Fp16,
        ..LoadOptions::default()
    };
    Some(StableDiffusion::load(&dir, &options).unwrap())
}

fn request(
    model: &StableDiffusion,
    reference: &str,
    targets: &[&str],
    steps: usize,
    sharing: Option<StyleAlignedConfig>,
) -> StyleSetRequest {
    let mut generate = GenerateRequest::new(model, reference);
    generate.seed = 11;
    generate.steps = steps;
    StyleSetRequest {
        generate,
        target_prompts: targets.iter().map(|prompt| prompt.to_string()).collect(),
        sharing,
        reference_image: None,
    }
}

fn run(model: &StableDiffusion, request: &StyleSetRequest) -> StyleSetOutput {
    generate_style_set(
        model,
        request,
        &RunCapture::none(),
        None,
        &mut |_| Ok(()),
        &CancelToken::new(),
    )
    .unwrap()
}

const TINY_REFERENCE: &str = "a watercolor painting of a cat";
const TINY_TARGETS: [&str; 2] = ["a dog", "a house by the sea"];

#[test]
fn the_reference_is_the_same_with_and_without_sharing() {
    let model = tiny_sd1();
    let independent = run(
        &model,
        &request(&model, TINY_REFERENCE, &TINY_TARGETS, 3, None),
    );
    for config in [
        StyleAlignedConfig::default(),
        StyleAlignedConfig {
            shared_score_shift: std::f32::consts::LN_2,
            shared_score_scale: 0.8,
            adain_values: true,
            ..StyleAlignedConfig::default()
        },
    ] {
        let shared = run(
            &model,
            &request(&model, TINY_REFERENCE, &TINY_TARGETS, 3, Some(config)),
        );
        assert_eq!(
            shared.reference.image.pixels, independent.reference.image.pixels,
            "{config:?}"
        );
        assert_eq!(
            max_abs_diff(
                &shared.reference.latents_per_step,
                &independent.reference.latents_per_step
            ),
            0.0,
            "{config:?}"
        );
        // Sharing does change the targets.
        for (shared_target, independent_target) in shared.targets.iter().zip(&independent.targets) {
            let diff = max_abs_diff(
                &shared_target.latents_per_step,
                &independent_target.latents_per_step,
            );
            assert!(diff > 1e-3, "{config:?}: target unchanged ({diff})");
        }
    }
}

#[test]
fn independent_rows_are_their_own_plain_runs() {
    let model = tiny_sd1();
    let set = run(
        &model,
        &request(&model, TINY_REFERENCE, &TINY_TARGETS, 3, None),
    );
    // Row i is `generate` of its prompt with seed + i (up to float batching effects of the
    // larger UNet batch).
    let prompts = std::iter::once(TINY_REFERENCE).chain(TINY_TARGETS);
    let runs = std::iter::once(&set.reference).chain(&set.targets);
    for (index, (prompt, row)) in prompts.zip(runs).enumerate() {
        let mut plain = GenerateRequest::new(&model, prompt);
        plain.seed = 11 + index as u64;
        plain.steps = 3;
        let alone = generate(&model, &plain, None, &mut |_| Ok(()), &CancelToken::new()).unwrap();
        let diff = max_abs_diff(&alone.latents_per_step, &row.latents_per_step);
        // 1.4e-4 measured with the F(4x4, 3x3) convolutions (their rounding, multiplied by
        // guidance 7.5 over three steps), the bound of the fixture trajectories; a row that took
        // another's prompt, seed or style would differ by far more than 1e-3.
        assert!(diff < 3e-4, "image {index}: {diff}");
    }
}

#[test]
fn only_self_level_one_without_group_norm_sharing_is_independent_generation() {
    let model = tiny_sd1();
    let independent = run(
        &model,
        &request(&model, TINY_REFERENCE, &TINY_TARGETS, 3, None),
    );
    let plain_layers = StyleAlignedConfig {
        only_self_level: 1.0,
        share_group_norm: false,
        ..StyleAlignedConfig::default()
    };
    let shared = run(
        &model,
        &request(&model, TINY_REFERENCE, &TINY_TARGETS, 3, Some(plain_layers)),
    );
    for (shared_row, independent_row) in std::iter::once(&shared.reference)
        .chain(&shared.targets)
        .zip(std::iter::once(&independent.reference).chain(&independent.targets))
    {
        assert_eq!(shared_row.image.pixels, independent_row.image.pixels);
        assert_eq!(
            max_abs_diff(
                &shared_row.latents_per_step,
                &independent_row.latents_per_step
            ),
            0.0
        );
    }
    // Group norm sharing alone (every attention layer plain) still moves the targets.
    let group_norm_only = run(
        &model,
        &request(
            &model,
            TINY_REFERENCE,
            &TINY_TARGETS,
            3,
            Some(StyleAlignedConfig {
                share_group_norm: true,
                ..plain_layers
            }),
        ),
    );
    assert_eq!(
        group_norm_only.reference.image.pixels,
        independent.reference.image.pixels
    );
    let diff = max_abs_diff(
        &group_norm_only.targets[0].latents_per_step,
        &independent.targets[0].latents_per_step,
    );
    assert!(diff > 1e-4, "group norm sharing changed nothing ({diff})");
}

fn values(shape: (usize, usize, usize), seed: u32) -> Tensor {
    let count = shape.0 * shape.1 * shape.2;
    let data: Vec<f32> = (0..count)
        .map(|index| {
            let x = (index as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed * 97);
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

#[test]
fn a_zero_shift_is_the_fused_attention() {
    let heads = 4;
    let projections = QueryKeyValue {
        query: values((2, 24, 32), 1),
        key: values((2, 48, 32), 2),
        value: values((2, 48, 32), 3),
    };
    let scale = (8f32).powf(-0.5);
    let explicit = shifted_attention(&projections, heads, scale, 24, 0.0).unwrap();
    let key_t = attend::kernels::split_heads_transposed(&projections.key, heads).unwrap();
    let fused = attend::kernels::fused_attention(
        &projections.query,
        &key_t,
        &projections.value,
        heads,
        scale,
    )
    .unwrap();
    let diff = max_abs_diff(&explicit, &fused);
    assert!(diff < 1e-5, "{diff}");
    // A shift moves the output towards the second half's values.
    let shifted = shifted_attention(&projections, heads, scale, 24, 2.0).unwrap();
    assert!(max_abs_diff(&shifted, &fused) > 1e-3);
}

#[test]
fn a_set_too_large_for_memory_is_refused_before_it_starts() {
    let model = tiny_sd1();
    let small = request(&model, TINY_REFERENCE, &TINY_TARGETS, 3, None);
    let mut large = small.clone();
    large.target_prompts = vec!["a dog".to_string(); 40];
    let available = |bytes: u64| AvailableMemory {
        bytes,
        source: "test".to_string(),
    };
    let capture = RunCapture::none();
    // Find the small set's need, then offer just that: the small set fits, the large one not.
    let mut bytes = 1u64 << 20;
    while check_style_set_fits(&model, &small, &capture, &available(bytes)).is_err() {
        bytes *= 2;
    }
    let error = check_style_set_fits(&model, &large, &capture, &available(bytes)).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, PipelineError::TooLarge { .. }), "{message}");
    assert!(
        message.contains("a set of 41 images") && message.contains("fewer target prompts"),
        "{message}"
    );
    // No target prompt at all is an error too.
    let mut empty = small;
    empty.target_prompts.clear();
    let error = generate_style_set(
        &model,
        &empty,
        &capture,
        None,
        &mut |_| Ok(()),
        &CancelToken::new(),
    )
    .unwrap_err();
    assert!(error.to_string().contains("at least one target"), "{error}");
}

#[test]
fn bundled_model_reference_is_unchanged_and_targets_move() {
    let Some(model) = bundled() else {
        eprintln!("bundled model missing: skipped");
        return;
    };
    let reference = "a red circle on a blue background";
    let targets = ["a green square"];
    let independent = run(&model, &request(&model, reference, &targets, 4, None));
    let shared = run(
        &model,
        &request(
            &model,
            reference,
            &targets,
            4,
            Some(StyleAlignedConfig::default()),
        ),
    );
    assert_eq!(
        shared.reference.image.pixels,
        independent.reference.image.pixels
    );
    let diff = max_abs_diff(
        &shared.targets[0].image_f32,
        &independent.targets[0].image_f32,
    );
    assert!(diff > 1e-2, "the target did not change ({diff})");
}

/// Runs `attend ARGS`, expects failure without a panic, returns stderr.
fn cli_fails(args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_attend"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "`attend {args:?}` should fail");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn the_command_refuses_a_set_without_targets_and_bad_settings() {
    let model = fixture("tiny-sd1");
    let model = model.to_str().unwrap();
    let out = std::env::temp_dir().join(format!("attend-style-cli-{}", std::process::id()));
    let out = out.to_str().unwrap();
    let base = [
        "style-aligned",
        "--reference-prompt",
        "a cat",
        "--model",
        model,
        "--steps",
        "1",
        "--out-dir",
        out,
        "--quiet",
    ];
    let stderr = cli_fails(&base);
    assert!(stderr.contains("no target prompt"), "{stderr}");
    for (flag, value) in [
        ("--only-self-level", "1.5"),
        ("--shift", "NaN"),
        ("--scale", "inf"),
    ] {
        let mut args = base.to_vec();
        args.extend(["--prompt", "a dog", flag, value]);
        let stderr = cli_fails(&args);
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
    assert!(
        !std::path::Path::new(out).exists(),
        "a failed run left {out} behind"
    );
}

/// A colourful test picture of the model's default size.
fn test_picture(model: &StableDiffusion) -> attend::analysis::image::RgbImage {
    let (width, height) = model.default_size_px();
    let mut pixels = Vec::with_capacity(width * height * 3);
    for row in 0..height {
        for column in 0..width {
            let inside = (row as i64 - height as i64 / 2).pow(2)
                + (column as i64 - width as i64 / 2).pow(2)
                < (width as i64 / 4).pow(2);
            if inside {
                pixels.extend([220, 40, 30]);
            } else {
                pixels.extend([30, 60, (column * 255 / width.max(1)) as u8]);
            }
        }
    }
    attend::analysis::image::RgbImage {
        width,
        height,
        pixels,
    }
}

#[test]
fn an_image_reference_follows_its_inverted_trajectory() {
    let model = tiny_sd1();
    let steps = 3;
    let picture = test_picture(&model);
    let reference_image = invert_reference_image(
        &model,
        &picture,
        TINY_REFERENCE,
        steps,
        REFERENCE_INVERSION_GUIDANCE,
        &mut |_| Ok(()),
        &CancelToken::new(),
    )
    .unwrap();
    assert_eq!(reference_image.step_count(), steps);
    let config = StyleAlignedConfig {
        shared_score_shift: std::f32::consts::LN_2,
        ..StyleAlignedConfig::default()
    };
    let mut with_image = request(&model, TINY_REFERENCE, &TINY_TARGETS, steps, Some(config));
    with_image.reference_image = Some(reference_image.clone());
    let mut step_latents = Vec::new();
    let from_image = generate_style_set(
        &model,
        &with_image,
        &RunCapture::none(),
        None,
        &mut |report| {
            step_latents.push(report.latents[0].clone());
            Ok(())
        },
        &CancelToken::new(),
    )
    .unwrap();
    // Every step's reference latents are the trajectory's, z*_{T-i-1} after step i.
    assert_eq!(step_latents.len(), steps);
    for (step_index, latents) in step_latents.iter().enumerate() {
        let expected = reference_image
            .trajectory
            .get(steps - step_index - 1)
            .unwrap();
        assert_eq!(max_abs_diff(latents, &expected), 0.0, "step {step_index}");
        let recorded = from_image
            .reference
            .latents_per_step
            .get(step_index)
            .unwrap();
        assert_eq!(max_abs_diff(&recorded, &expected), 0.0, "step {step_index}");
    }
    // The trajectory starts at the picture itself (guidance 2 changed the walk up, not z*_0).
    let unguided = invert_reference_image(
        &model,
        &picture,
        TINY_REFERENCE,
        steps,
        1.0,
        &mut |_| Ok(()),
        &CancelToken::new(),
    )
    .unwrap();
    assert_eq!(
        max_abs_diff(
            &reference_image.trajectory.get(0).unwrap(),
            &unguided.trajectory.get(0).unwrap()
        ),
        0.0
    );
    assert!(
        max_abs_diff(
            &reference_image.trajectory.get(steps).unwrap(),
            &unguided.trajectory.get(steps).unwrap()
        ) > 1e-4,
        "guidance 2 and 1 walked the same trajectory"
    );
    // The targets differ from a set whose reference is generated from the same prompt.
    let mut from_prompt_request = with_image.clone();
    from_prompt_request.reference_image = None;
    from_prompt_request.generate.scheduler = Some(SchedulerKind::Ddim);
    let from_prompt = run(&model, &from_prompt_request);
    for (image_target, prompt_target) in from_image.targets.iter().zip(&from_prompt.targets) {
        let diff = max_abs_diff(&image_target.image_f32, &prompt_target.image_f32);
        assert!(diff > 1e-3, "the image reference changed nothing ({diff})");
    }
    // A trajectory of other steps is refused with a clear error.
    let mut wrong_steps = with_image;
    wrong_steps.generate.steps = steps + 1;
    let error = generate_style_set(
        &model,
        &wrong_steps,
        &RunCapture::none(),
        None,
        &mut |_| Ok(()),
        &CancelToken::new(),
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("inverted with 3 steps"),
        "{error}"
    );
}

#[test]
fn sharing_in_no_step_is_independent_generation_and_limits_change_the_targets() {
    let model = tiny_sd1();
    let independent = run(
        &model,
        &request(&model, TINY_REFERENCE, &TINY_TARGETS, 3, None),
    );
    let no_step = StyleAlignedConfig {
        shared_steps_fraction: 0.0,
        ..StyleAlignedConfig::default()
    };
    let shared = run(
        &model,
        &request(&model, TINY_REFERENCE, &TINY_TARGETS, 3, Some(no_step)),
    );
    for (shared_row, independent_row) in std::iter::once(&shared.reference)
        .chain(&shared.targets)
        .zip(std::iter::once(&independent.reference).chain(&independent.targets))
    {
        assert_eq!(
            max_abs_diff(
                &shared_row.latents_per_step,
                &independent_row.latents_per_step
            ),
            0.0
        );
    }
    // Sharing in the first step only: step 1 moves, and the later steps run alone but from
    // moved latents; decoder only moves the targets less than every block.
    let everywhere = run(
        &model,
        &request(
            &model,
            TINY_REFERENCE,
            &TINY_TARGETS,
            3,
            Some(StyleAlignedConfig::default()),
        ),
    );
    let first_step = run(
        &model,
        &request(
            &model,
            TINY_REFERENCE,
            &TINY_TARGETS,
            3,
            Some(StyleAlignedConfig {
                shared_steps_fraction: 0.34,
                ..StyleAlignedConfig::default()
            }),
        ),
    );
    let first = |output: &StyleSetOutput| output.targets[0].latents_per_step.get(0).unwrap();
    assert_eq!(max_abs_diff(&first(&first_step), &first(&everywhere)), 0.0);
    assert!(
        max_abs_diff(
            &first_step.targets[0].latents_per_step,
            &everywhere.targets[0].latents_per_step
        ) > 1e-4
    );
    let decoder_only = run(
        &model,
        &request(
            &model,
            TINY_REFERENCE,
            &TINY_TARGETS,
            3,
            Some(StyleAlignedConfig {
                share_encoder: false,
                share_middle: false,
                share_group_norm: false,
                ..StyleAlignedConfig::default()
            }),
        ),
    );
    let moved = max_abs_diff(
        &decoder_only.targets[0].latents_per_step,
        &independent.targets[0].latents_per_step,
    );
    assert!(moved > 1e-4, "decoder sharing changed nothing ({moved})");
    assert!(
        max_abs_diff(
            &decoder_only.targets[0].latents_per_step,
            &everywhere.targets[0].latents_per_step
        ) > 1e-4
    );
}

#[test]
fn an_unreadable_reference_image_is_named() {
    let model = fixture("tiny-sd1");
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.png");
    std::fs::write(&broken, b"not an image at all").unwrap();
    let out = dir.path().join("out");
    for path in [broken.clone(), dir.path().join("missing.png")] {
        let stderr = cli_fails(&[
            "style-aligned",
            "--reference-prompt",
            "a cat",
            "--prompt",
            "a dog",
            "--reference-image",
            path.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--steps",
            "1",
            "--out-dir",
            out.to_str().unwrap(),
            "--quiet",
        ]);
        assert!(
            stderr.contains("--reference-image") && stderr.contains(path.to_str().unwrap()),
            "{stderr}"
        );
    }
    assert!(!out.exists(), "a failed run left {} behind", out.display());
}
