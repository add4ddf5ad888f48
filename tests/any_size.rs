//! Any size diffusers accepts: multiples of the VAE factor, with latents the UNet's down-samplings
//! do not halve evenly (each up-sampling takes its skip connection's size). A whole tiny-sd1
//! pipeline at 26x18 px (latent 13x9 -> 7x5 -> 4x3) against diffusers
//! (`fixtures/any_size/generate.py`), SD 1.5's layout at 600x400 px, and heat maps and segments
//! on the odd, non-square grids.

// Test helpers outside `#[test]` functions unwrap too.
#![allow(clippy::unwrap_used)]

mod common;
use common::{fixture, generate_with_store, max_abs_diff, read_json};
use std::collections::HashMap;

use attend::analysis::heatmap::{word_heatmaps, AggregationSettings, SelfAttentionSpan, UnetPlace};
use attend::analysis::segment::{kmeans_segments, KMeansSettings};
use attend::hook::CancelToken;
use attend::pipeline::limits::{available_memory, check_unet_call, ModelFootprint, RunCapture};
use attend::pipeline::model::{LoadOptions, StableDiffusion};
use attend::pipeline::sampling::{generate, GenerateRequest};
use attend::pipeline::scheduler::{SchedulerConfig, SchedulerKind};
use attend::pipeline::unet::UnetConfig;
use candle_core::{DType, Device, Tensor};

const WIDTH: usize = 26;
const HEIGHT: usize = 18;

fn tiny_sd1_with_reference_ddim() -> StableDiffusion {
    let dir = fixture("tiny-sd1");
    let mut model = StableDiffusion::load(&dir, &LoadOptions::default()).unwrap();
    model.scheduler_config =
        SchedulerConfig::from_file(&dir.join("reference_scheduler_ddim.json")).unwrap();
    model
}

fn request(model: &StableDiffusion) -> GenerateRequest {
    let mut request = GenerateRequest::new(model, "a photo of a cat wearing sunglasses");
    request.width = WIDTH;
    request.height = HEIGHT;
    request.steps = 4;
    request.guidance = 7.5;
    request.scheduler = Some(SchedulerKind::Ddim);
    request
}

#[test]
fn a_latent_with_odd_halvings_matches_diffusers() {
    let model = tiny_sd1_with_reference_ddim();
    assert_eq!(model.size_multiple_px(), 2);
    let reference: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixture("any_size/pipeline_26x18.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut request = request(&model);
    request.init_latents = Some(reference["init_latents"].clone());
    let output = generate(&model, &request, None, &mut |_| Ok(()), &CancelToken::new()).unwrap();
    let timesteps: Vec<f32> = output.timesteps.iter().map(|&t| t as f32).collect();
    assert_eq!(timesteps, reference["timesteps"].to_vec1::<f32>().unwrap());
    assert_eq!(output.latents_per_step.dims(), [4, 1, 4, 9, 13]);
    let latent_diff = max_abs_diff(&output.latents_per_step, &reference["latents_per_step"]);
    let image_diff = max_abs_diff(&output.image_f32, &reference["image"]);
    eprintln!("26x18 px: latents max abs diff {latent_diff:.2e}, image {image_diff:.2e}");
    assert!(latent_diff <= 3e-4, "latents differ by {latent_diff:.2e}");
    assert!(image_diff <= 1e-4, "image differs by {image_diff:.2e}");
    assert_eq!((output.image.width, output.image.height), (WIDTH, HEIGHT));
}

#[test]
fn sizes_off_the_vae_factor_are_refused_with_a_suggestion() {
    let model = tiny_sd1_with_reference_ddim();
    let mut request = request(&model);
    request.width = 27;
    let error = generate(&model, &request, None, &mut |_| Ok(()), &CancelToken::new())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("27 px is not a positive multiple of 2 px"),
        "{error}"
    );
    assert!(error.contains("VAE's downscale factor 2"), "{error}");
    assert!(error.contains("try 26 or 28"), "{error}");
}

#[test]
fn sd15_layout_takes_600_by_400() {
    // SD 1.5's UNet config (from its published manifest) over the tiny-sd1 defaults.
    let manifest = read_json(&fixture("manifests/sd15.json"));
    let mut config = read_json(&fixture("tiny-sd1/unet/config.json"));
    for (key, value) in manifest["configs"]["unet"].as_object().unwrap() {
        config[key] = value.clone();
    }
    let unet = UnetConfig::from_json(&config.to_string(), &fixture("manifests/sd15.json")).unwrap();
    let footprint = ModelFootprint::unet_only(&unet, 8, 77, DType::F32, true);
    let memory = check_unet_call(
        &footprint,
        (600, 400),
        8,
        &RunCapture::none(),
        &available_memory(),
    );
    // Refused only when this machine lacks the memory, never for the size.
    if let Err(error) = memory {
        let message = error.to_string();
        assert!(!message.contains("multiple"), "{message}");
    }
    let error = check_unet_call(
        &footprint,
        (604, 400),
        8,
        &RunCapture::none(),
        &available_memory(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("604 px is not a positive multiple of 8 px"),
        "{error}"
    );
}

#[test]
fn heat_maps_and_segments_work_on_odd_non_square_grids() {
    let model = tiny_sd1_with_reference_ddim();
    let request = request(&model);
    let (output, store) = generate_with_store(&model, &request);
    let grids: Vec<(UnetPlace, usize, usize)> = store.steps()[0]
        .groups
        .iter()
        .map(|group| (group.place, group.h, group.w))
        .collect();
    assert!(grids.contains(&(UnetPlace::Down, 9, 13)), "{grids:?}");
    assert!(grids.contains(&(UnetPlace::Down, 5, 7)), "{grids:?}");
    assert!(grids.contains(&(UnetPlace::Up, 9, 13)), "{grids:?}");

    let heatmaps = word_heatmaps(
        store.steps(),
        &output.prompt_tokens.words,
        &AggregationSettings::default(),
        HEIGHT,
        WIDTH,
    );
    assert_eq!(heatmaps.len(), 7);
    for heatmap in &heatmaps {
        assert_eq!((heatmap.h, heatmap.w), (HEIGHT, WIDTH), "{}", heatmap.word);
        assert_eq!(heatmap.data.len(), HEIGHT * WIDTH);
        assert!(heatmap
            .data
            .iter()
            .all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
        assert!(heatmap.peak > 0.0, "{}", heatmap.word);
    }

    let self_map = store
        .self_attention(
            9,
            13,
            &[UnetPlace::Down, UnetPlace::Up],
            SelfAttentionSpan::LatestStep,
        )
        .unwrap();
    assert_eq!((self_map.h, self_map.w), (9, 13));
    let settings = KMeansSettings {
        k: 3,
        ..KMeansSettings::default()
    };
    let segments = kmeans_segments(&self_map, &settings).unwrap();
    assert_eq!(segments.cell_counts().iter().sum::<usize>(), 9 * 13);
    let at_image = segments.resized(HEIGHT, WIDTH);
    assert_eq!(at_image.cell_counts().iter().sum::<usize>(), HEIGHT * WIDTH);
}
