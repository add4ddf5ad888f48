//! UNet parity with diffusers: `unet.out` and every attention module's probabilities of the
//! tiny-sd1 / tiny-sd2 reference fixtures (tests/fixtures/README.md), plus the fp16 weight variant.

// The fixtures are memory-mapped as the brief's loading recipe does; nothing writes them meanwhile.
#![allow(unsafe_code)]
// Test helpers outside `#[test]` functions unwrap too.
#![allow(clippy::unwrap_used)]

mod common;
use common::{fixture, max_abs_diff, random_tensors, references};
use std::collections::HashMap;
use std::path::Path;

use attend::hook::{AttentionHook, AttentionProcessor, AttentionSite, QueryKeyValue};
use attend::pipeline::unet::{Unet, UnetConfig};
use candle_core::{DType, Device, Tensor};

fn load_unet(model: &str, weights: &str) -> Unet {
    let config = UnetConfig::from_file(&fixture(&format!("{model}/unet/config.json"))).unwrap();
    let path = fixture(&format!("{model}/unet/{weights}"));
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu).unwrap()
    };
    Unet::new(vb, &config).unwrap()
}

/// Keeps the first batch item's probabilities of every attention call, by module path.
#[derive(Default)]
struct Capture {
    probs: HashMap<String, Tensor>,
    sites: Vec<AttentionSite>,
}

impl AttentionProcessor for Capture {
    fn process_probabilities(
        &mut self,
        site: &AttentionSite,
        probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        assert_eq!(
            probs.dims(),
            &[site.batch * site.heads, site.queries(), site.keys]
        );
        assert_eq!(probs.dtype(), DType::F32);
        let expected_keys = match site.kind {
            attend::hook::AttentionKind::SelfAttention => site.queries(),
            attend::hook::AttentionKind::Cross => 77,
        };
        assert_eq!(site.keys, expected_keys, "{}", site.module_path());
        self.probs
            .insert(site.module_path(), probs.narrow(0, 0, site.heads)?);
        self.sites.push(site.clone());
        Ok(None)
    }
}

fn unet_inputs(reference: &HashMap<String, Tensor>) -> (Tensor, f64, Tensor) {
    let timestep = reference["unet.timestep"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()[0] as f64;
    (
        reference["unet.sample"].clone(),
        timestep,
        reference["unet.encoder_hidden_states"].clone(),
    )
}

fn check_model(model: &str) {
    let reference = references(model);
    let unet = load_unet(model, "diffusion_pytorch_model.safetensors");
    let (sample, timestep, context) = unet_inputs(&reference);

    let plain = unet.forward(&sample, timestep, &context, None).unwrap();
    let diff = max_abs_diff(&plain, &reference["unet.out"]);
    eprintln!("{model}: unet.out max abs diff (no hook) = {diff:e}");
    assert!(diff < 1e-4, "{model}: unet.out differs by {diff}");

    let mut capture = Capture::default();
    let hooked = {
        let mut hook = AttentionHook {
            processor: &mut capture,
            step_index: 3,
            step_count: 8,
            cfg: true,
            cancel: None,
        };
        unet.forward(&sample, timestep, &context, Some(&mut hook))
            .unwrap()
    };
    let hooked_diff = max_abs_diff(&hooked, &reference["unet.out"]);
    eprintln!("{model}: unet.out max abs diff (with a reading hook) = {hooked_diff:e}");
    assert!(hooked_diff < 1e-4);

    let mut worst = 0f32;
    let mut expected_modules = 0;
    for (name, expected) in &reference {
        let Some(module) = name.strip_prefix("attn_probs.") else {
            continue;
        };
        expected_modules += 1;
        let Some(actual) = capture.probs.get(module) else {
            panic!("{model}: the hook never saw {module}");
        };
        let diff = max_abs_diff(actual, expected);
        eprintln!("{model}: attn_probs.{module} max abs diff = {diff:e}");
        assert!(diff < 1e-4, "{model}: {module} differs by {diff}");
        worst = worst.max(diff);
    }
    assert_eq!(
        capture.probs.len(),
        expected_modules,
        "{model}: the hook saw modules the fixture lacks"
    );
    eprintln!("{model}: {expected_modules} attention modules, worst max abs diff = {worst:e}");
    for site in &capture.sites {
        assert_eq!(
            (site.batch, site.step_index, site.step_count, site.cfg),
            (2, 3, 8, true)
        );
    }
}

#[test]
fn tiny_sd1_matches_diffusers() {
    check_model("tiny-sd1");
}

#[test]
fn tiny_sd2_matches_diffusers() {
    check_model("tiny-sd2");
}

/// Appends every key/value a second time: each score then appears twice, so the probabilities halve
/// and the attention output is unchanged. Checks the query/key/value stage, `site.keys` after it,
/// and that a returned probability tensor is used.
struct DuplicateKeys {
    calls: usize,
}

impl AttentionProcessor for DuplicateKeys {
    fn wants_queries_keys_values(&self, _site: &AttentionSite) -> bool {
        true
    }

    fn process_queries_keys_values(
        &mut self,
        site: &AttentionSite,
        projections: &QueryKeyValue,
    ) -> candle_core::Result<Option<QueryKeyValue>> {
        let QueryKeyValue { query, key, value } = projections;
        assert_eq!(key.dims()[..2], [site.batch, site.keys]);
        assert_eq!(query.dims()[..2], [site.batch, site.queries()]);
        assert_eq!(key.dims(), value.dims());
        Ok(Some(QueryKeyValue {
            query: query.clone(),
            key: Tensor::cat(&[key, key], 1)?,
            value: Tensor::cat(&[value, value], 1)?,
        }))
    }

    fn process_probabilities(
        &mut self,
        site: &AttentionSite,
        probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let base_keys = match site.kind {
            attend::hook::AttentionKind::SelfAttention => site.queries(),
            attend::hook::AttentionKind::Cross => 77,
        };
        assert_eq!(site.keys, 2 * base_keys);
        assert_eq!(probs.dim(2)?, site.keys);
        self.calls += 1;
        // Returned unchanged but as a new tensor: the UNet must use what comes back.
        Ok(Some(probs.copy()?))
    }
}

/// Replaces every probability row with uniform weights.
struct Uniform;

impl AttentionProcessor for Uniform {
    fn process_probabilities(
        &mut self,
        site: &AttentionSite,
        probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some((probs.ones_like()? / site.keys as f64)?))
    }
}

/// Replaces every layer's queries with zeros (all scores 0: uniform attention) and declines the
/// probabilities, so the layers run fused on the replaced projections.
struct ZeroQueries {
    calls: usize,
}

impl AttentionProcessor for ZeroQueries {
    fn wants_queries_keys_values(&self, _site: &AttentionSite) -> bool {
        true
    }

    fn process_queries_keys_values(
        &mut self,
        _site: &AttentionSite,
        projections: &QueryKeyValue,
    ) -> candle_core::Result<Option<QueryKeyValue>> {
        self.calls += 1;
        Ok(Some(QueryKeyValue {
            query: projections.query.zeros_like()?,
            ..projections.clone()
        }))
    }

    fn wants_probabilities(&self, _site: &AttentionSite) -> bool {
        false
    }

    fn process_probabilities(
        &mut self,
        _site: &AttentionSite,
        _probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        panic!("declined probabilities must not be handed over");
    }
}

/// Zero queries through the fused path give what uniform probabilities give through the
/// probability path: the query stage reaches the fused kernel.
#[test]
fn replaced_queries_reach_the_fused_path() {
    let reference = references("tiny-sd1");
    let unet = load_unet("tiny-sd1", "diffusion_pytorch_model.safetensors");
    let (sample, timestep, context) = unet_inputs(&reference);
    let run = |processor: &mut dyn AttentionProcessor| {
        let mut hook = AttentionHook {
            processor,
            step_index: 0,
            step_count: 1,
            cfg: false,
            cancel: None,
        };
        unet.forward(&sample, timestep, &context, Some(&mut hook))
            .unwrap()
    };
    let mut zero = ZeroQueries { calls: 0 };
    let zeroed = run(&mut zero);
    let uniform = run(&mut Uniform);
    assert_eq!(zero.calls, 22);
    let diff = max_abs_diff(&zeroed, &uniform);
    eprintln!("zero queries (fused) vs uniform probabilities: max abs diff = {diff:e}");
    assert!(diff < 1e-4, "{diff}");
    assert!(max_abs_diff(&zeroed, &reference["unet.out"]) > 1e-2);
}

/// The cross-attention keys and values are cached per text embedding: a call with another
/// embedding must not reuse them, and a repeated embedding gives the same output.
#[test]
fn text_projections_follow_the_embedding() {
    let reference = references("tiny-sd1");
    let unet = load_unet("tiny-sd1", "diffusion_pytorch_model.safetensors");
    let (sample, timestep, context) = unet_inputs(&reference);
    let first = unet.forward(&sample, timestep, &context, None).unwrap();
    let other_context = context.affine(0.5, 0.25).unwrap();
    let other = unet
        .forward(&sample, timestep, &other_context, None)
        .unwrap();
    let fresh = load_unet("tiny-sd1", "diffusion_pytorch_model.safetensors");
    let expected_other = fresh
        .forward(&sample, timestep, &other_context, None)
        .unwrap();
    assert_eq!(max_abs_diff(&other, &expected_other), 0.0);
    assert!(max_abs_diff(&other, &first) > 1e-3);
    let again = unet.forward(&sample, timestep, &context, None).unwrap();
    assert_eq!(max_abs_diff(&again, &first), 0.0);
}

#[test]
fn hook_can_replace_queries_keys_values_and_probabilities() {
    let reference = references("tiny-sd2");
    let unet = load_unet("tiny-sd2", "diffusion_pytorch_model.safetensors");
    let (sample, timestep, context) = unet_inputs(&reference);
    let mut duplicate = DuplicateKeys { calls: 0 };
    let out = {
        let mut hook = AttentionHook {
            processor: &mut duplicate,
            step_index: 0,
            step_count: 1,
            cfg: false,
            cancel: None,
        };
        unet.forward(&sample, timestep, &context, Some(&mut hook))
            .unwrap()
    };
    assert_eq!(duplicate.calls, 22);
    let diff = max_abs_diff(&out, &reference["unet.out"]);
    eprintln!("tiny-sd2 with every key/value duplicated: unet.out max abs diff = {diff:e}");
    assert!(diff < 1e-4);

    let uniform = {
        let mut processor = Uniform;
        let mut hook = AttentionHook {
            processor: &mut processor,
            step_index: 0,
            step_count: 1,
            cfg: false,
            cancel: None,
        };
        unet.forward(&sample, timestep, &context, Some(&mut hook))
            .unwrap()
    };
    assert!(
        max_abs_diff(&uniform, &reference["unet.out"]) > 1e-2,
        "replaced probabilities must change the output"
    );
}

/// Duplicates every layer's keys and doubles its values, and takes the probabilities only when
/// `wants` (declined, the UNet runs its fused attention under the hook); counts what it was asked.
#[derive(Default)]
struct DoubledValues {
    wants: bool,
    asked: usize,
    key_value_calls: usize,
}

impl AttentionProcessor for DoubledValues {
    fn wants_probabilities(&self, _site: &AttentionSite) -> bool {
        self.wants
    }

    fn wants_queries_keys_values(&self, _site: &AttentionSite) -> bool {
        true
    }

    fn process_queries_keys_values(
        &mut self,
        _site: &AttentionSite,
        projections: &QueryKeyValue,
    ) -> candle_core::Result<Option<QueryKeyValue>> {
        self.key_value_calls += 1;
        let QueryKeyValue { query, key, value } = projections;
        let doubled = (value * 2.0)?;
        Ok(Some(QueryKeyValue {
            query: query.clone(),
            key: Tensor::cat(&[key, key], 1)?,
            value: Tensor::cat(&[&doubled, &doubled], 1)?,
        }))
    }

    fn process_probabilities(
        &mut self,
        _site: &AttentionSite,
        _probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.asked += 1;
        Ok(None)
    }
}

#[test]
fn declined_probabilities_are_not_materialised_and_change_nothing() {
    let reference = references("tiny-sd1");
    let unet = load_unet("tiny-sd1", "diffusion_pytorch_model.safetensors");
    let (sample, timestep, context) = unet_inputs(&reference);
    let run = |wants: bool| {
        let mut processor = DoubledValues {
            wants,
            ..DoubledValues::default()
        };
        let out = {
            let mut hook = AttentionHook {
                processor: &mut processor,
                step_index: 0,
                step_count: 1,
                cfg: true,
                cancel: None,
            };
            unet.forward(&sample, timestep, &context, Some(&mut hook))
                .unwrap()
        };
        (out, processor.asked, processor.key_value_calls)
    };
    let (taken, asked_taken, calls_taken) = run(true);
    let (declined, asked_declined, calls_declined) = run(false);
    assert!(asked_taken > 0);
    assert_eq!(
        asked_declined, 0,
        "declined probabilities must not be handed over"
    );
    assert_eq!(calls_taken, calls_declined);
    // The replaced values count on both paths, and the two paths agree.
    assert!(max_abs_diff(&declined, &reference["unet.out"]) > 1e-3);
    let diff = max_abs_diff(&declined, &taken);
    eprintln!(
        "tiny-sd1, doubled values, fused vs materialised probabilities: max abs diff = {diff:e}"
    );
    // Summation order apart, the two paths' outputs pass through the same convolutions, whose
    // Winograd F(4x4, 3x3) transforms round more than F(2x2, 3x3)'s: 1.0e-5 measured (4.1e-6
    // with F(2x2, 3x3)). A path that ignored the replaced values would be off by more than 1e-3.
    assert!(diff < 3e-5);
}

/// Non-square latents whose halvings are odd (13x10 -> 7x5 -> 4x3), at a fractional timestep:
/// the up blocks must upsample to each skip connection's size, as diffusers' `upsample_size` does.
#[test]
fn odd_non_square_latents_and_fractional_timesteps_match_diffusers() {
    let reference = candle_core::safetensors::load(
        fixture("unet_odd_sizes/unet_odd_sizes.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for model in ["tiny-sd1", "tiny-sd2"] {
        let key = model.replace('-', "_");
        let unet = load_unet(model, "diffusion_pytorch_model.safetensors");
        let timestep = reference[&format!("{key}.timestep")]
            .to_vec1::<f32>()
            .unwrap()[0];
        assert_eq!(timestep, 437.25);
        let out = unet
            .forward(
                &reference[&format!("{key}.sample")],
                f64::from(timestep),
                &reference[&format!("{key}.encoder_hidden_states")],
                None,
            )
            .unwrap();
        let diff = max_abs_diff(&out, &reference[&format!("{key}.out")]);
        eprintln!("{model}: 13x10 latent, t = 437.25: unet.out max abs diff = {diff:e}");
        assert!(diff < 1e-4, "{model}: {diff}");
    }
}

/// The fp16 weight file, loaded and computed in f32, against the fp32 reference output.
///
/// Tolerance: the fixture's fp32 weights are the fp16 ones widened (every value is exactly
/// representable in f16; the two files hold the same numbers), so loading the f16 file must give the
/// very same f32 model: the outputs of both loads are compared for equality, and the reference is
/// held to the fp32 bound of 1e-4 (measured: the same max difference as the fp32 file, ~5e-6).
#[test]
fn fp16_weights_computed_in_f32_match_the_fp32_reference() {
    let reference = references("tiny-sd1");
    let from_f16 = load_unet("tiny-sd1", "diffusion_pytorch_model.fp16.safetensors");
    let from_f32 = load_unet("tiny-sd1", "diffusion_pytorch_model.safetensors");
    let (sample, timestep, context) = unet_inputs(&reference);
    let out = from_f16.forward(&sample, timestep, &context, None).unwrap();
    let diff = max_abs_diff(&out, &reference["unet.out"]);
    eprintln!("tiny-sd1 fp16 weights (computed in f32): unet.out max abs diff = {diff:e}");
    assert!(diff < 1e-4, "{diff}");
    let same_model = from_f32.forward(&sample, timestep, &context, None).unwrap();
    assert_eq!(
        max_abs_diff(&out, &same_model),
        0.0,
        "f16 and f32 files should load to the same f32 weights"
    );
}

/// Computing in f16 (weights loaded as f16) works end to end and stays near the f32 reference;
/// the bound (measured: 8e-3) reflects f16 precision through ~40 layers; this is no parity check.
#[test]
fn unet_computes_in_f16() {
    let reference = references("tiny-sd2");
    let config = UnetConfig::from_file(&fixture("tiny-sd2/unet/config.json")).unwrap();
    let path = fixture("tiny-sd2/unet/diffusion_pytorch_model.safetensors");
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[path], DType::F16, &Device::Cpu).unwrap()
    };
    let unet = Unet::new(vb, &config).unwrap();
    let (sample, timestep, context) = unet_inputs(&reference);
    let out = unet.forward(&sample, timestep, &context, None).unwrap();
    assert_eq!(
        out.dtype(),
        DType::F32,
        "output comes back in the sample's dtype"
    );
    let diff = max_abs_diff(&out, &reference["unet.out"]);
    eprintln!("tiny-sd2 computed in f16 (upcast attention): unet.out max abs diff = {diff:e}");
    assert!(diff < 0.05, "{diff}");
}

fn manifest(name: &str) -> attend::pipeline::weights::ParameterManifest {
    attend::pipeline::weights::ParameterManifest::from_file(&fixture(&format!(
        "manifests/{name}.json"
    )))
    .unwrap()
}

fn manifest_unet_config(manifest: &attend::pipeline::weights::ParameterManifest) -> UnetConfig {
    let text = manifest.configs["unet"].to_string();
    UnetConfig::from_json(&text, Path::new("manifest")).unwrap()
}

#[test]
fn real_checkpoint_manifests_load_every_parameter() {
    for name in ["sd15", "sd21", "sd-turbo"] {
        let manifest = manifest(name);
        let config = manifest_unet_config(&manifest);
        let backend = manifest.backend("unet").unwrap();
        Unet::new(backend.var_builder(DType::F32, &Device::Cpu), &config).unwrap();
        let unrequested = backend.unrequested_names();
        assert!(
            unrequested.is_empty(),
            "{name}: never requested {unrequested:?}"
        );
        eprintln!(
            "{name}: all {} UNet parameters requested with their shapes",
            backend.parameter_count()
        );
    }
}

/// User + system CPU seconds of this process (all threads), from `/proc/self/stat` (Linux).
fn process_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// A UNet of a real checkpoint's shapes with small random weights (timing only).
fn random_unet(name: &str) -> Unet {
    let manifest = manifest(name);
    let config = manifest_unet_config(&manifest);
    let tensors = random_tensors(&manifest.parameters["unet"], 0x9E37_79B9_7F4A_7C15u64);
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    Unet::new(vb, &config).unwrap()
}

/// SD 1.5 UNet call, batch 2, random weights: `ATTEND_TIMING_SIZES=32,64 cargo test --test
/// parity_unet timing -- --ignored --nocapture` (latent sides; default 32,64). The dev profile builds
/// attend itself at opt-level 1; add `--config 'profile.dev.package.attend.opt-level=3'` for numbers
/// closer to a release build (the kernels in candle/gemm are opt-level 3 either way).
#[test]
#[ignore]
fn timing_sd15_batch2() {
    let unet = random_unet("sd15");
    let context = Tensor::randn(0f32, 1.0, (2, 77, 768), &Device::Cpu).unwrap();
    let sizes: Vec<usize> = std::env::var("ATTEND_TIMING_SIZES")
        .ok()
        .map(|text| {
            text.split(',')
                .filter_map(|s| s.trim().parse().ok())
                .collect()
        })
        .unwrap_or_else(|| vec![32, 64]);
    for latent in sizes {
        let sample = Tensor::randn(0f32, 1.0, (2, 4, latent, latent), &Device::Cpu).unwrap();
        // Warm-up (page faults, allocator).
        unet.forward(&sample, 500.0, &context, None).unwrap();
        let (start, cpu_start) = (std::time::Instant::now(), process_cpu_secs());
        let out = unet.forward(&sample, 500.0, &context, None).unwrap();
        eprintln!(
            "SD1.5 UNet, batch 2, {latent}x{latent} latent ({} px): {:.2} s wall, {:.2} s CPU",
            latent * 8,
            start.elapsed().as_secs_f64(),
            process_cpu_secs() - cpu_start
        );
        assert_eq!(out.dims(), &[2, 4, latent, latent]);
    }
}
