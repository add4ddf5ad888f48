//! Style Aligned: the reference image is unchanged by sharing, `only_self_level` 1 without group
//! norm sharing is independent generation, a score shift of 0 is the fused attention, and a set
//! too large for memory is refused before it starts. End to end on the tiny SD 1.x fixture and the
//! bundled model (few steps).

// Test helpers may unwrap like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;
use common::{fixture, max_abs_diff};

use attend::attention::style_aligned::{shifted_attention, StyleAlignedConfig};
use attend::attention::style_sampling::{
    check_style_set_fits, generate_style_set, StyleSetOutput, StyleSetRequest,
};
use attend::hook::{CancelToken, QueryKeyValue};
use attend::pipeline::limits::{AvailableMemory, RunCapture};
use attend::pipeline::model::{LoadOptions, StableDiffusion};
use attend::pipeline::sampling::{generate, GenerateRequest};
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
        assert!(diff < 1e-4, "image {index}: {diff}");
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
