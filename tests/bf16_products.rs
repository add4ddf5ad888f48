//! The bundled model with bf16 products (operands rounded to bf16, sums in f32; the editor's
//! default for it) against the f32 reference: one UNet call, a whole run's image and its word heat
//! maps stay within stated bounds, and the bf16 path really runs where the CPU has AVX-512 BF16.

// Test helpers outside `#[test]` functions unwrap too.
#![allow(clippy::unwrap_used)]

mod common;
use common::{generate_with_store, max_abs_diff};

use attend::analysis::heatmap::{word_heatmaps, AggregationSettings};
use attend::attention::store::AttentionStore;
use attend::kernels::{bf16_supported, ProductPrecision};
use attend::pipeline::model::{LoadOptions, StableDiffusion};
use attend::pipeline::rng::NoiseRng;
use attend::pipeline::sampling::{GenerateOutput, GenerateRequest};
use attend::worker::{bundled_model_dir, BUNDLED_MODEL_PRODUCTS};
use candle_core::{Device, Tensor};

const PROMPT: &str = "a red square and a blue circle on a yellow background";

fn bundled(products: ProductPrecision) -> StableDiffusion {
    let options = LoadOptions {
        products,
        ..LoadOptions::default()
    };
    StableDiffusion::load(&bundled_model_dir(), &options).unwrap()
}

/// A run of `steps` steps with its cross-attention stored.
fn run(model: &StableDiffusion, steps: usize) -> (GenerateOutput, AttentionStore) {
    let mut request = GenerateRequest::new(model, PROMPT);
    request.steps = steps;
    request.seed = 7;
    generate_with_store(model, &request)
}

#[test]
fn the_bundled_model_defaults_to_bf16_products() {
    assert_eq!(BUNDLED_MODEL_PRODUCTS, ProductPrecision::Bf16);
    assert_eq!(
        bundled(ProductPrecision::F32).unet.product_precision(),
        ProductPrecision::F32
    );
}

#[test]
fn one_unet_call_with_bf16_products_stays_within_one_percent_of_f32() {
    if !bf16_supported() {
        eprintln!("skipped: this CPU has no AVX-512 BF16, so products stay f32");
        return;
    }
    let exact = bundled(ProductPrecision::F32);
    let fast = bundled(ProductPrecision::Bf16);
    let device = Device::Cpu;
    let sample = NoiseRng::new(3).randn((2, 3, 64, 64), &device).unwrap();
    let ids = exact.tokenizer.encode(PROMPT).unwrap().ids;
    let ids = Tensor::new(ids.as_slice(), &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let text = exact.text_encoder.forward(&ids).unwrap();
    let context = Tensor::cat(&[&text, &text], 0).unwrap();
    let reference = exact.unet.forward(&sample, 500.0, &context, None).unwrap();
    let rounded = fast.unet.forward(&sample, 500.0, &context, None).unwrap();
    let scale = reference.abs().unwrap().max_all().unwrap();
    let scale = scale.to_scalar::<f32>().unwrap();
    let difference = max_abs_diff(&rounded, &reference);
    eprintln!(
        "one UNet call: bf16 differs by {:.3}% of the largest value",
        100.0 * difference / scale
    );
    // Measured: 0.32% of the output's largest value. bf16 keeps 8 significant bits, so the
    // path was taken when the outputs differ at all.
    assert!(difference > 0.0, "bf16 products left the output unchanged");
    assert!(
        difference <= 0.01 * scale,
        "bf16 output differs by {difference} (largest value {scale})"
    );
}

#[test]
fn a_run_with_bf16_products_keeps_its_image_and_word_maps() {
    if !bf16_supported() {
        eprintln!("skipped: this CPU has no AVX-512 BF16, so products stay f32");
        return;
    }
    let steps = 8;
    let (exact, exact_store) = run(&bundled(ProductPrecision::F32), steps);
    let (fast, fast_store) = run(&bundled(ProductPrecision::Bf16), steps);
    // Image in 0..1: measured a mean difference of 0.12%.
    let image_difference = (&fast.image_f32 - &exact.image_f32)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("8 steps: mean image difference {image_difference}");
    assert!(
        image_difference < 0.005,
        "mean image difference {image_difference}"
    );
    let words = &exact.prompt_tokens.words;
    let settings = AggregationSettings::default();
    let exact_maps = word_heatmaps(exact_store.steps(), words, &settings, 64, 64);
    let fast_maps = word_heatmaps(fast_store.steps(), words, &settings, 64, 64);
    for (exact_map, fast_map) in exact_maps.iter().zip(&fast_maps) {
        let mean = exact_map
            .data
            .iter()
            .zip(&fast_map.data)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / exact_map.data.len() as f32;
        eprintln!("word {}: mean map difference {mean}", exact_map.word);
        // Normalised maps (0..1): measured mean differences of at most about 1%.
        assert!(
            mean < 0.03,
            "word {}: mean map difference {mean}",
            exact_map.word
        );
    }
}
