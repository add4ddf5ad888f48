//! Cross-image attention (appearance transfer): with mixing off and swap guidance 1 the output is
//! the structure's reconstruction; mixing changes the output and records a correspondence; masked
//! AdaIN gives the appearance's masked statistics and leaves unmasked pixels alone; the attention
//! contrast leaves a uniform row unchanged; bad input is a clear error. End to end on the tiny
//! SD 1.x fixture (32 px, few steps).

// Test helpers may unwrap like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;
use common::fixture;

use std::path::{Path, PathBuf};
use std::process::Command;

use attend::analysis::image::RgbImage;
use attend::attention::appearance_sampling::{
    transfer_appearance, AppearanceSettings, AppearanceTransferOutput, AppearanceTransferRequest,
    AppearanceTransferRun,
};
use attend::attention::cross_image::{contrast_probabilities, masked_adain, MASKED_ADAIN_EPS};
use attend::hook::CancelToken;
use attend::pipeline::model::{LoadOptions, StableDiffusion};
use attend::pipeline::PipelineError;
use candle_core::{Device, Tensor};

fn tiny_sd1() -> StableDiffusion {
    StableDiffusion::load(&fixture("tiny-sd1"), &LoadOptions::default()).unwrap()
}

/// A 32x32 image: a disc of `inside` on `outside`.
fn disc_image(inside: [u8; 3], outside: [u8; 3], centre: (f32, f32)) -> RgbImage {
    let size = 32;
    let mut pixels = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            let (dx, dy) = (x as f32 - centre.0, y as f32 - centre.1);
            let colour = if dx * dx + dy * dy < 64.0 {
                inside
            } else {
                outside
            };
            pixels.extend_from_slice(&colour);
        }
    }
    RgbImage {
        width: size,
        height: size,
        pixels,
    }
}

fn request(settings: AppearanceSettings) -> AppearanceTransferRequest {
    AppearanceTransferRequest {
        structure: disc_image([220, 30, 30], [250, 250, 250], (12.0, 14.0)),
        structure_prompt: "a red ball on a white table".to_string(),
        appearance: disc_image([30, 40, 220], [240, 200, 20], (20.0, 18.0)),
        appearance_prompt: "a blue ball on a yellow table".to_string(),
        settings,
        seed: 3,
    }
}

fn few_steps() -> AppearanceSettings {
    AppearanceSettings {
        steps: 8,
        skip_fraction: 0.25,
        ..AppearanceSettings::default()
    }
}

fn transfer(
    model: &StableDiffusion,
    request: &AppearanceTransferRequest,
) -> AppearanceTransferOutput {
    transfer_appearance(model, request, &mut |_| Ok(()), &CancelToken::new()).unwrap()
}

#[test]
fn without_mixing_and_swap_guidance_the_output_is_the_structure_reconstruction() {
    let model = tiny_sd1();
    let settings = AppearanceSettings {
        mixing: false,
        swap_guidance_start: 1.0,
        swap_guidance_end: 1.0,
        adain: false,
        ..few_steps()
    };
    let output = transfer(&model, &request(settings));
    assert_eq!(output.output, output.structure_reconstruction);
    assert!(output.correspondence.is_empty());
    assert!(output.masks.structure.is_empty());

    // Swap guidance alone (mixing off) has nothing to guide either.
    let guided = transfer(
        &model,
        &request(AppearanceSettings {
            mixing: false,
            adain: false,
            ..few_steps()
        }),
    );
    assert_eq!(guided.output, guided.structure_reconstruction);
}

#[test]
fn mixing_changes_the_output_and_records_where_it_looked() {
    let model = tiny_sd1();
    let settings = AppearanceSettings {
        adain: false,
        ..few_steps()
    };
    let mut run =
        AppearanceTransferRun::new(&model, &request(settings), &CancelToken::new()).unwrap();
    let mut reports = 0;
    let mut last_index = None;
    while let Some(report) = run.step().unwrap() {
        assert_eq!(report.output_latent.dims(), &[1, 4, 16, 16]);
        assert!(last_index.is_none_or(|index| report.step_index == index + 1));
        last_index = Some(report.step_index);
        reports += 1;
    }
    // 8 steps, a quarter skipped.
    assert_eq!(reports, 6);
    let output = run.finish().unwrap();
    assert_ne!(output.output, output.structure_reconstruction);
    let correspondence = &output.correspondence;
    assert!(!correspondence.is_empty());
    // The finest decoder self-attention of a 32 px run on tiny-sd1 is 16x16.
    assert_eq!((correspondence.grid_h, correspondence.grid_w), (16, 16));
    assert_eq!(correspondence.top_key.len(), 256);
    assert!(correspondence.top_key.iter().all(|&key| key < 256));
    let map = correspondence.map_for(0).unwrap();
    assert_eq!((map.h, map.w), (32, 32));
    // A pooled map row holds the mean attention: it sums to 1.
    let cells = correspondence.map_h * correspondence.map_w;
    let row_sum: f32 = correspondence.maps[..cells].iter().sum();
    assert!((row_sum - 1.0).abs() < 1e-3, "{row_sum}");
}

#[test]
fn masked_adain_takes_the_masked_statistics_and_leaves_the_rest() {
    let device = Device::Cpu;
    let (channels, h, w) = (3, 6, 5);
    let values = |seed: u32, scale: f32, offset: f32| -> Vec<f32> {
        (0..channels * h * w)
            .map(|index| {
                let x =
                    ((index as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 1000;
                x as f32 / 1000.0 * scale + offset
            })
            .collect()
    };
    let content = Tensor::from_vec(values(1, 2.0, -1.0), (1, channels, h, w), &device).unwrap();
    let style = Tensor::from_vec(values(2, 0.5, 3.0), (1, channels, h, w), &device).unwrap();
    // Content mask: the left two columns; style mask: the bottom three rows.
    let content_mask: Vec<f32> = (0..h * w)
        .map(|cell| if cell % w < 2 { 1.0 } else { 0.0 })
        .collect();
    let style_mask: Vec<f32> = (0..h * w)
        .map(|cell| if cell / w >= 3 { 1.0 } else { 0.0 })
        .collect();
    let moved = masked_adain(&content, &style, &content_mask, &style_mask).unwrap();
    let moved = moved.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let content = content.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let style = style.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let statistics = |values: &[f32], mask: &[f32], channel: usize| -> (f64, f64) {
        let picked: Vec<f64> = (0..h * w)
            .filter(|&cell| mask[cell] == 1.0)
            .map(|cell| f64::from(values[channel * h * w + cell]))
            .collect();
        let mean = picked.iter().sum::<f64>() / picked.len() as f64;
        let variance =
            picked.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (picked.len() - 1) as f64;
        (mean, variance.sqrt())
    };
    for channel in 0..channels {
        let (moved_mean, moved_std) = statistics(&moved, &content_mask, channel);
        let (style_mean, style_std) = statistics(&style, &style_mask, channel);
        assert!(
            (moved_mean - style_mean).abs() < 1e-5,
            "{moved_mean} {style_mean}"
        );
        // The eps enters twice (normalising, then the target std).
        assert!(
            (moved_std - style_std).abs() < 10.0 * MASKED_ADAIN_EPS,
            "{moved_std} {style_std}"
        );
        for (cell, &inside) in content_mask.iter().enumerate() {
            let index = channel * h * w + cell;
            if inside == 0.0 {
                assert_eq!(
                    moved[index], content[index],
                    "unmasked pixel {cell} changed"
                );
            }
        }
    }
    // An empty mask changes nothing.
    let content_tensor = Tensor::from_vec(content.clone(), (1, channels, h, w), &device).unwrap();
    let style_tensor = Tensor::from_vec(style, (1, channels, h, w), &device).unwrap();
    let unchanged = masked_adain(
        &content_tensor,
        &style_tensor,
        &vec![0.0; h * w],
        &style_mask,
    )
    .unwrap();
    assert_eq!(
        unchanged.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        content
    );
    // Masks of the wrong size are an error, not a panic.
    assert!(masked_adain(&content_tensor, &style_tensor, &[1.0; 3], &style_mask).is_err());
}

#[test]
fn contrast_leaves_a_uniform_row_unchanged() {
    let keys = 7;
    let uniform = Tensor::full(1.0f32 / keys as f32, (2, 3, keys), &Device::Cpu).unwrap();
    for contrast in [0.5, 1.67, 4.0] {
        let contrasted = contrast_probabilities(&uniform, contrast).unwrap();
        let difference = (contrasted - &uniform)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(difference < 1e-7, "contrast {contrast}: {difference}");
    }
    // A peaked row gets more peaked and stays within 0..1.
    let row = Tensor::new(&[[0.5f32, 0.3, 0.1, 0.1]], &Device::Cpu).unwrap();
    let contrasted = contrast_probabilities(&row, 1.67)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(contrasted[0][0] > 0.5 && contrasted[0][0] <= 1.0);
    assert!(contrasted[0][2] >= 0.0 && contrasted[0][2] < 0.1);
}

#[test]
fn bad_requests_are_clear_errors() {
    let model = tiny_sd1();
    let cancel = CancelToken::new();
    let reason = |request: AppearanceTransferRequest| -> String {
        match AppearanceTransferRun::new(&model, &request, &cancel) {
            Err(PipelineError::InvalidArgument { name, reason }) => format!("{name}: {reason}"),
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("accepted a bad request"),
        }
    };
    let mut empty_prompt = request(few_steps());
    empty_prompt.appearance_prompt = "  ".to_string();
    assert!(reason(empty_prompt).starts_with("appearance prompt"));
    let mut broken = request(few_steps());
    broken.structure.pixels.truncate(10);
    assert!(reason(broken).starts_with("structure image"));
    let skip_all = request(AppearanceSettings {
        skip_fraction: 1.0,
        ..few_steps()
    });
    assert!(reason(skip_all).starts_with("skip"));
    let bad_range = request(AppearanceSettings {
        fine_range: attend::attention::appearance_sampling::StepFractionRange::new(0.1, 1.5),
        ..few_steps()
    });
    assert!(reason(bad_range).contains("mixing range"));
    let one_step = request(AppearanceSettings {
        steps: 1,
        ..few_steps()
    });
    assert!(reason(one_step).starts_with("steps"));

    // An appearance image of another size is fitted, not refused.
    let mut other_size = request(AppearanceSettings {
        steps: 4,
        ..few_steps()
    });
    other_size.appearance = RgbImage {
        width: 48,
        height: 40,
        pixels: vec![90; 48 * 40 * 3],
    };
    let mut run = AppearanceTransferRun::new(&model, &other_size, &cancel).unwrap();
    while run.step().unwrap().is_some() {}
    let output = run.finish().unwrap();
    assert_eq!(
        (
            output.appearance_reconstruction.width,
            output.appearance_reconstruction.height
        ),
        (32, 32)
    );
    assert!(output
        .warnings
        .iter()
        .any(|warning| warning.contains("fitted")));

    // A cancelled run stops.
    let cancelled = CancelToken::new();
    cancelled.cancel();
    assert!(matches!(
        AppearanceTransferRun::new(&model, &request(few_steps()), &cancelled),
        Err(PipelineError::Cancelled)
    ));
}

fn write_png(path: &Path, image: &RgbImage) {
    attend::analysis::export::write_png_rgb(path, image.width, image.height, &image.pixels, None)
        .unwrap();
}

/// Runs `attend appearance-transfer` with `extra` after the model and out-dir flags.
fn cli(out_dir: &Path, args: &[&str]) -> std::process::Output {
    let model: PathBuf = fixture("tiny-sd1");
    Command::new(env!("CARGO_BIN_EXE_attend"))
        .arg("appearance-transfer")
        .args(args)
        .args(["--model", model.to_str().unwrap(), "--quiet", "--out-dir"])
        .arg(out_dir)
        .output()
        .unwrap()
}

#[test]
fn the_command_writes_every_file_or_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let structure = temp.path().join("structure.png");
    let appearance = temp.path().join("appearance.png");
    let example = request(few_steps());
    write_png(&structure, &example.structure);
    // Another size: fitted.
    write_png(
        &appearance,
        &RgbImage {
            width: 40,
            height: 36,
            pixels: vec![200; 40 * 36 * 3],
        },
    );
    let structure = structure.to_str().unwrap();
    let appearance = appearance.to_str().unwrap();
    let out = temp.path().join("out");

    let failures: [(&[&str], &str); 3] = [
        (
            &[
                "--structure",
                structure,
                "--structure-prompt",
                " ",
                "--appearance",
                appearance,
                "--appearance-prompt",
                "a cat",
            ],
            "--structure-prompt",
        ),
        (
            &[
                "--structure",
                "/no/such.png",
                "--structure-prompt",
                "a cat",
                "--appearance",
                appearance,
                "--appearance-prompt",
                "a cat",
            ],
            "--structure /no/such.png",
        ),
        (
            &[
                "--structure",
                structure,
                "--structure-prompt",
                "a cat",
                "--appearance",
                appearance,
                "--appearance-prompt",
                "a cat",
                "--skip",
                "1.5",
            ],
            "--skip",
        ),
    ];
    for (args, named) in failures {
        let output = cli(&out, args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "accepted {args:?}");
        assert!(stderr.contains(named), "{named} not named in: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
    let output = cli(
        &out,
        &[
            "--structure",
            structure,
            "--structure-prompt",
            "a red ball",
            "--appearance",
            appearance,
            "--appearance-prompt",
            "a grey ball",
            "--steps",
            "4",
            "--width",
            "32",
            "--height",
            "32",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for name in [
        "output.png",
        "structure.png",
        "appearance.png",
        "report.json",
    ] {
        assert!(out.join(name).is_file(), "{name} missing");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert!(report["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(report["settings"]["steps"], 4);
}
