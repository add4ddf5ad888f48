//! Single-file checkpoints (original LDM layout):
//!
//! - the tiny-sd1 / tiny-sd2 fixtures as diffusers' own conversion script writes them (rebuilt from
//!   the folders by `tests/fixtures/single_file/*.recipe.json`, every tensor's bytes checked against
//!   the script's) load with configs inferred from their shapes and reproduce the folders' reference
//!   outputs at the parity tests' tolerances;
//! - the real SD 1.5, SD 2.1 and SD-Turbo parameter lists, written in the LDM layout by a test-only
//!   inverse of the rename (with the tensors real checkpoints carry besides: buffers, EMA, OpenCLIP's
//!   last layer), rename back to every parameter and infer the published configs;
//! - OpenCLIP's fused layout, fp16 weights, and bad files (truncated, no UNet, unknown layout, pickle).

#![allow(clippy::unwrap_used)]

mod common;
use common::{fixture, max_abs_diff, read_json, references};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use attend::hook::CancelToken;
use attend::pipeline::checkpoint::{
    CheckpointConfigs, CheckpointLayout, Component, ModelFamily, SingleFileCheckpoint,
};
use attend::pipeline::clip::ClipTextConfig;
use attend::pipeline::model::{LoadOptions, StableDiffusion};
use attend::pipeline::sampling::{generate, GenerateRequest};
use attend::pipeline::scheduler::{PredictionType, SchedulerConfig, SchedulerKind};
use attend::pipeline::unet::UnetConfig;
use attend::pipeline::vae::VaeConfig;
use attend::pipeline::weights::{ParameterManifest, TensorInfo};
use attend::pipeline::PipelineError;
use candle_core::{DType, Device, Tensor};

fn fnv1a64(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

fn folder_tensors(model: &str) -> HashMap<&'static str, HashMap<String, Tensor>> {
    [
        ("unet", "unet/diffusion_pytorch_model.safetensors"),
        ("vae", "vae/diffusion_pytorch_model.safetensors"),
        ("text_encoder", "text_encoder/model.safetensors"),
    ]
    .into_iter()
    .map(|(component, file)| {
        let path = fixture(&format!("{model}/{file}"));
        (
            component,
            candle_core::safetensors::load(path, &Device::Cpu).unwrap(),
        )
    })
    .collect()
}

/// The tensors diffusers' conversion script wrote for `model`, rebuilt from the folder by the recipe
/// (each tensor's bytes checked against the script's hash), converted to `dtype`.
fn rebuilt_tensors(model: &str, dtype: DType) -> HashMap<String, Tensor> {
    let recipe = read_json(&fixture(&format!("single_file/{model}.recipe.json")));
    let folder = folder_tensors(model);
    let mut tensors = HashMap::new();
    for (ldm_name, entry) in recipe.as_object().unwrap() {
        let component = entry["component"].as_str().unwrap();
        let name = entry["name"].as_str().unwrap();
        let shape: Vec<usize> = serde_json::from_value(entry["shape"].clone()).unwrap();
        assert_eq!(entry["dtype"], "float32");
        let tensor = folder[component][name].reshape(shape).unwrap();
        let values: Vec<f32> = tensor.flatten_all().unwrap().to_vec1().unwrap();
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect();
        assert_eq!(
            fnv1a64(&bytes),
            entry["fnv1a64"].as_str().unwrap(),
            "{model}: {ldm_name} is not what the conversion script wrote"
        );
        tensors.insert(ldm_name.clone(), tensor.to_dtype(dtype).unwrap());
    }
    tensors
}

fn write_single_file(model: &str, dtype: DType, dir: &Path) -> PathBuf {
    let path = dir.join(format!("{model}.safetensors"));
    candle_core::safetensors::save(&rebuilt_tensors(model, dtype), &path).unwrap();
    path
}

/// What shapes cannot tell about the tiny models, taken from their folders: tiny-sd2's head counts
/// (2/4/4 heads of 16 channels, not SD 2's 64-channel heads) and the UNet's sample size.
fn correct_tiny_configs(model: &str, configs: &mut CheckpointConfigs) {
    let folder_unet =
        UnetConfig::from_file(&fixture(&format!("{model}/unet/config.json"))).unwrap();
    configs.unet.sample_size = folder_unet.sample_size.clone();
    if model == "tiny-sd2" {
        configs.unet.attention_head_dim = folder_unet.attention_head_dim.clone();
        configs.unet.num_attention_heads = folder_unet.num_attention_heads.clone();
    }
}

fn open_tiny(model: &str, path: &Path) -> SingleFileCheckpoint {
    let prediction = (model == "tiny-sd2").then_some(PredictionType::VPrediction);
    let mut checkpoint = SingleFileCheckpoint::open(path, prediction).unwrap();
    correct_tiny_configs(model, &mut checkpoint.configs);
    checkpoint
}

/// The inferred configs equal the folder's in everything shapes can tell.
fn check_inferred_configs(model: &str, checkpoint: &SingleFileCheckpoint) {
    let configs = &checkpoint.configs;
    let expected_family = if model == "tiny-sd2" {
        ModelFamily::Sd2
    } else {
        ModelFamily::Sd1
    };
    assert_eq!(configs.family, expected_family, "{model}");
    let unet = UnetConfig::from_file(&fixture(&format!("{model}/unet/config.json"))).unwrap();
    assert_eq!(configs.unet.down_blocks(), unet.down_blocks(), "{model}");
    assert_eq!(configs.unet.up_blocks(), unet.up_blocks(), "{model}");
    assert_eq!(configs.unet.mid_block(), unet.mid_block(), "{model}");
    assert_eq!(
        (configs.unet.in_channels, configs.unet.out_channels),
        (unet.in_channels, unet.out_channels)
    );
    assert_eq!(
        configs.unet.use_linear_projection,
        unet.use_linear_projection
    );
    assert_eq!(configs.unet.upcast_attention, unet.upcast_attention);
    assert_eq!(configs.unet.text_embedding_dim(), unet.text_embedding_dim());
    let text =
        ClipTextConfig::from_file(&fixture(&format!("{model}/text_encoder/config.json"))).unwrap();
    assert_eq!(configs.text_encoder, text, "{model}");
    let vae = VaeConfig::from_file(&fixture(&format!("{model}/vae/config.json"))).unwrap();
    assert_eq!(
        format!("{:?}", configs.vae),
        format!("{vae:?}"),
        "{model} VAE config"
    );
    let scheduler = SchedulerConfig::from_file(&fixture(&format!(
        "{model}/scheduler/scheduler_config.json"
    )))
    .unwrap();
    assert_eq!(
        format!("{:?}", configs.scheduler),
        format!("{scheduler:?}"),
        "{model}"
    );
    let tokenizer_config = read_json(&fixture(&format!(
        "{model}/tokenizer/tokenizer_config.json"
    )));
    assert_eq!(configs.pad_token, tokenizer_config["pad_token"], "{model}");
}

fn check_parity(model: &str) {
    let temp = tempfile::tempdir().unwrap();
    let path = write_single_file(model, DType::F32, temp.path());

    // Before any correction: the heuristic follows diffusers (a context narrower than 1024 is
    // an epsilon model), so tiny-sd2 needs the override.
    let plain = SingleFileCheckpoint::open(&path, None).unwrap();
    assert_eq!(
        plain.configs.scheduler.prediction_type,
        PredictionType::Epsilon
    );
    if model == "tiny-sd1" {
        // tiny-sd1 follows SD 1's rules (8 heads) in everything but its sample size.
        let mut corrected = plain.clone();
        correct_tiny_configs(model, &mut corrected.configs);
        assert_eq!(
            format!("{:?}", plain.configs.unet.attention_head_dim),
            format!("{:?}", corrected.configs.unet.attention_head_dim)
        );
    }

    let checkpoint = open_tiny(model, &path);
    check_inferred_configs(model, &checkpoint);
    assert!(!checkpoint.layout.open_clip);
    let mut progress = Vec::new();
    let mut model_loaded =
        StableDiffusion::load_checkpoint(&checkpoint, &LoadOptions::default(), &mut |stage| {
            progress.push(stage.stage);
            Ok(())
        })
        .unwrap();
    assert_eq!(progress, ["tokenizer", "text encoder", "UNet", "VAE"]);
    assert_eq!(model_loaded.name(), model);

    let reference = references(model);
    // Tokenizer (the bundled CLIP files) and text encoder.
    let expected_ids: Vec<Vec<i64>> = reference["text.input_ids"].to_vec2().unwrap();
    for (prompt, expected) in ["a photo of a cat wearing sunglasses", ""]
        .iter()
        .zip(&expected_ids)
    {
        let ids: Vec<i64> = model_loaded
            .tokenizer
            .encode(prompt)
            .unwrap()
            .ids
            .iter()
            .map(|&id| i64::from(id))
            .collect();
        assert_eq!(&ids, expected, "{model} ids of {prompt:?}");
    }
    let input_ids = reference["text.input_ids"].to_dtype(DType::U32).unwrap();
    let hidden = model_loaded.text_encoder.forward(&input_ids).unwrap();
    let diff = max_abs_diff(&hidden, &reference["text.last_hidden_state"]);
    eprintln!("{model} single file: text encoder max abs diff {diff:e}");
    assert!(diff < 1e-4, "{model}: text encoder differs by {diff}");

    // UNet.
    let timestep = reference["unet.timestep"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()[0] as f64;
    let out = model_loaded
        .unet
        .forward(
            &reference["unet.sample"],
            timestep,
            &reference["unet.encoder_hidden_states"],
            None,
        )
        .unwrap();
    let diff = max_abs_diff(&out, &reference["unet.out"]);
    eprintln!("{model} single file: unet.out max abs diff {diff:e}");
    assert!(diff < 1e-4, "{model}: unet.out differs by {diff}");

    // VAE.
    let vae = model_loaded.vae.as_ref().unwrap();
    let decoded = vae.decode(&reference["vae.decode.latents"]).unwrap();
    let diff = max_abs_diff(&decoded, &reference["vae.decode.out"]);
    eprintln!("{model} single file: vae.decode max abs diff {diff:e}");
    assert!(diff < 1e-4, "{model}: decode differs by {diff}");
    let mean = vae.encode_mean(&reference["vae.encode.image"]).unwrap();
    let diff = max_abs_diff(&mean, &reference["vae.encode.mean"]);
    assert!(diff < 1e-4, "{model}: encode mean differs by {diff}");

    // The whole pipeline, DDIM, 8 steps, at the parity test's tolerances.
    model_loaded.scheduler_config =
        SchedulerConfig::from_file(&fixture(&format!("{model}/reference_scheduler_ddim.json")))
            .unwrap();
    let mut request = GenerateRequest::new(&model_loaded, "a photo of a cat wearing sunglasses");
    request.steps = 8;
    request.guidance = 7.5;
    request.scheduler = Some(SchedulerKind::Ddim);
    request.init_latents = Some(reference["pipeline.init_latents"].clone());
    assert_eq!((request.width, request.height), (32, 32));
    let output = generate(
        &model_loaded,
        &request,
        None,
        &mut |_| Ok(()),
        &CancelToken::new(),
    )
    .unwrap();
    let expected_latents = &reference["pipeline.ddim.latents_per_step"];
    for step in 0..8 {
        let diff = max_abs_diff(
            &output.latents_per_step.get(step).unwrap(),
            &expected_latents.get(step).unwrap(),
        );
        assert!(
            diff <= 3e-4,
            "{model}: latents after step {step} differ by {diff}"
        );
    }
    let diff = max_abs_diff(&output.image_f32, &reference["pipeline.ddim.image"]);
    eprintln!("{model} single file: DDIM image max abs diff {diff:e}");
    assert!(diff < 1e-4, "{model}: image differs by {diff}");
}

#[test]
fn tiny_sd1_single_file_matches_the_folder_references() {
    check_parity("tiny-sd1");
}

#[test]
fn tiny_sd2_single_file_matches_the_folder_references() {
    check_parity("tiny-sd2");
}

#[test]
fn fp16_and_bf16_single_files_load_and_stay_close() {
    for (dtype, name, tolerance) in [(DType::F16, "F16", 1e-2), (DType::BF16, "BF16", 5e-2)] {
        check_half_precision(dtype, name, tolerance);
    }
}

fn check_half_precision(dtype: DType, dtype_name: &str, tolerance: f32) {
    let temp = tempfile::tempdir().unwrap();
    let path = write_single_file("tiny-sd1", dtype, temp.path());
    let checkpoint = open_tiny("tiny-sd1", &path);
    assert_eq!(
        checkpoint.tensors()["model.diffusion_model.out.2.weight"].dtype,
        dtype_name
    );
    let model =
        StableDiffusion::load_checkpoint(&checkpoint, &LoadOptions::default(), &mut |_| Ok(()))
            .unwrap();
    let reference = references("tiny-sd1");
    let input_ids = reference["text.input_ids"].to_dtype(DType::U32).unwrap();
    let hidden = model.text_encoder.forward(&input_ids).unwrap();
    assert_eq!(hidden.dtype(), DType::F32);
    let diff = max_abs_diff(&hidden, &reference["text.last_hidden_state"]);
    eprintln!("{dtype_name} weights: text encoder max abs diff {diff:e}");
    assert!(
        diff < tolerance,
        "{dtype_name} weights moved the text encoder by {diff}"
    );
}

/// SD 2's OpenCLIP layout: tiny-sd2's text encoder written with fused `in_proj` and OpenCLIP names
/// (plus an unused 3rd layer standing for resblock 23 when there are 24) gives the same output.
#[test]
fn open_clip_layout_text_encoder_matches_transformers() {
    let mut tensors = rebuilt_tensors("tiny-sd2", DType::F32);
    let text: HashMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(name, tensor)| {
            Some((
                name.strip_prefix("cond_stage_model.transformer.")?
                    .to_string(),
                tensor.clone(),
            ))
        })
        .collect();
    tensors.retain(|name, _| !name.starts_with("cond_stage_model."));
    let open_clip = to_open_clip(&text);
    assert!(open_clip.len() > 10);
    tensors.extend(open_clip);
    let temp = tempfile::tempdir().unwrap();
    let path = temp.path().join("tiny-sd2-openclip.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();

    let checkpoint = open_tiny("tiny-sd2", &path);
    assert!(checkpoint.layout.open_clip);
    let text_config =
        ClipTextConfig::from_file(&fixture("tiny-sd2/text_encoder/config.json")).unwrap();
    assert_eq!(checkpoint.configs.text_encoder, text_config);
    let model =
        StableDiffusion::load_checkpoint(&checkpoint, &LoadOptions::default(), &mut |_| Ok(()))
            .unwrap();
    let reference = references("tiny-sd2");
    let input_ids = reference["text.input_ids"].to_dtype(DType::U32).unwrap();
    let hidden = model.text_encoder.forward(&input_ids).unwrap();
    let diff = max_abs_diff(&hidden, &reference["text.last_hidden_state"]);
    assert!(
        diff < 1e-4,
        "OpenCLIP layout: text encoder differs by {diff}"
    );
}

/// transformers CLIP names (no `text_model.` prefix) -> OpenCLIP names with fused projections.
fn to_open_clip(text: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let prefix = "cond_stage_model.model.";
    let mut out = HashMap::new();
    let layers = (0..)
        .take_while(|layer| {
            text.contains_key(&format!("encoder.layers.{layer}.layer_norm1.weight"))
        })
        .count();
    out.insert(
        format!("{prefix}token_embedding.weight"),
        text["embeddings.token_embedding.weight"].clone(),
    );
    out.insert(
        format!("{prefix}positional_embedding"),
        text["embeddings.position_embedding.weight"].clone(),
    );
    for kind in ["weight", "bias"] {
        out.insert(
            format!("{prefix}ln_final.{kind}"),
            text[&format!("final_layer_norm.{kind}")].clone(),
        );
    }
    for layer in 0..layers {
        let from = |name: &str| text[&format!("encoder.layers.{layer}.{name}")].clone();
        let to = format!("{prefix}transformer.resblocks.{layer}.");
        for kind in ["weight", "bias"] {
            let fused = Tensor::cat(
                &[
                    from(&format!("self_attn.q_proj.{kind}")),
                    from(&format!("self_attn.k_proj.{kind}")),
                    from(&format!("self_attn.v_proj.{kind}")),
                ],
                0,
            )
            .unwrap();
            out.insert(format!("{to}attn.in_proj_{kind}"), fused);
            for (diffusers, open_clip) in [
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("self_attn.out_proj", "attn.out_proj"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ] {
                out.insert(
                    format!("{to}{open_clip}.{kind}"),
                    from(&format!("{diffusers}.{kind}")),
                );
            }
        }
    }
    let width = text["embeddings.token_embedding.weight"].dims()[1];
    out.insert(
        format!("{prefix}text_projection"),
        Tensor::zeros((width, width), DType::F32, &Device::Cpu).unwrap(),
    );
    out.insert(
        format!("{prefix}logit_scale"),
        Tensor::zeros((), DType::F32, &Device::Cpu).unwrap(),
    );
    out
}

// ---- Real checkpoints' names and shapes -------------------------------------------------------

/// Test-only inverse of the rename: a diffusers UNet parameter name -> its LDM name.
fn unet_to_ldm(name: &str, layers: usize, up_attends: &[bool]) -> String {
    let stride = layers + 1;
    let resnet = |rest: &str| {
        for (diffusers, ldm) in [
            ("norm1.", "in_layers.0."),
            ("conv1.", "in_layers.2."),
            ("time_emb_proj.", "emb_layers.1."),
            ("norm2.", "out_layers.0."),
            ("conv2.", "out_layers.3."),
            ("conv_shortcut.", "skip_connection."),
        ] {
            if let Some(tail) = rest.strip_prefix(diffusers) {
                return format!("{ldm}{tail}");
            }
        }
        panic!("resnet parameter {rest}")
    };
    let index = |text: &str| -> (usize, String) {
        let (index, rest) = text.split_once('.').unwrap();
        (index.parse().unwrap(), rest.to_string())
    };
    let body = if let Some(tail) = name.strip_prefix("conv_in.") {
        format!("input_blocks.0.0.{tail}")
    } else if let Some(tail) = name.strip_prefix("time_embedding.linear_1.") {
        format!("time_embed.0.{tail}")
    } else if let Some(tail) = name.strip_prefix("time_embedding.linear_2.") {
        format!("time_embed.2.{tail}")
    } else if let Some(tail) = name.strip_prefix("conv_norm_out.") {
        format!("out.0.{tail}")
    } else if let Some(tail) = name.strip_prefix("conv_out.") {
        format!("out.2.{tail}")
    } else if let Some(rest) = name.strip_prefix("down_blocks.") {
        let (block, rest) = index(rest);
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (layer, rest) = index(rest);
            format!(
                "input_blocks.{}.0.{}",
                1 + block * stride + layer,
                resnet(&rest)
            )
        } else if let Some(rest) = rest.strip_prefix("attentions.") {
            let (layer, rest) = index(rest);
            format!("input_blocks.{}.1.{rest}", 1 + block * stride + layer)
        } else {
            let tail = rest.strip_prefix("downsamplers.0.conv.").unwrap();
            format!("input_blocks.{}.0.op.{tail}", (block + 1) * stride)
        }
    } else if let Some(rest) = name.strip_prefix("mid_block.") {
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (which, rest) = index(rest);
            format!("middle_block.{}.{}", which * 2, resnet(&rest))
        } else {
            format!(
                "middle_block.1.{}",
                rest.strip_prefix("attentions.0.").unwrap()
            )
        }
    } else if let Some(rest) = name.strip_prefix("up_blocks.") {
        let (block, rest) = index(rest);
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (layer, rest) = index(rest);
            format!(
                "output_blocks.{}.0.{}",
                block * stride + layer,
                resnet(&rest)
            )
        } else if let Some(rest) = rest.strip_prefix("attentions.") {
            let (layer, rest) = index(rest);
            format!("output_blocks.{}.1.{rest}", block * stride + layer)
        } else {
            let tail = rest.strip_prefix("upsamplers.0.conv.").unwrap();
            let sub = if up_attends[block] { 2 } else { 1 };
            format!(
                "output_blocks.{}.{sub}.conv.{tail}",
                block * stride + layers
            )
        }
    } else {
        panic!("UNet parameter {name}")
    };
    format!("model.diffusion_model.{body}")
}

/// Test-only inverse for the VAE: name and shape (attention weights become 1x1 convolutions).
fn vae_to_ldm(name: &str, shape: &[usize], levels: usize) -> (String, Vec<usize>) {
    let inner = |rest: &str| -> (String, bool) {
        for (diffusers, ldm, conv) in [
            ("conv_shortcut.", "nin_shortcut.", false),
            ("group_norm.", "norm.", false),
            ("to_q.", "q.", true),
            ("to_k.", "k.", true),
            ("to_v.", "v.", true),
            ("to_out.0.", "proj_out.", true),
        ] {
            if let Some(tail) = rest.strip_prefix(diffusers) {
                return (format!("{ldm}{tail}"), conv);
            }
        }
        (rest.to_string(), false)
    };
    let (part, rest) = name.split_once('.').unwrap();
    let index = |text: &str| -> (usize, String) {
        let (index, rest) = text.split_once('.').unwrap();
        (index.parse().unwrap(), rest.to_string())
    };
    let (body, conv) = if part == "quant_conv" || part == "post_quant_conv" {
        (name.to_string(), false)
    } else if let Some(tail) = rest.strip_prefix("conv_norm_out.") {
        (format!("{part}.norm_out.{tail}"), false)
    } else if let Some(rest) = rest.strip_prefix("mid_block.") {
        let (which, tail) = if let Some(tail) = rest.strip_prefix("resnets.0.") {
            ("block_1", tail)
        } else if let Some(tail) = rest.strip_prefix("resnets.1.") {
            ("block_2", tail)
        } else {
            ("attn_1", rest.strip_prefix("attentions.0.").unwrap())
        };
        let (tail, conv) = inner(tail);
        (format!("{part}.mid.{which}.{tail}"), conv)
    } else if let Some(rest) = rest.strip_prefix("down_blocks.") {
        let (level, rest) = index(rest);
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (resnet, rest) = index(rest);
            (
                format!("{part}.down.{level}.block.{resnet}.{}", inner(&rest).0),
                false,
            )
        } else {
            let tail = rest.strip_prefix("downsamplers.0.conv.").unwrap();
            (format!("{part}.down.{level}.downsample.conv.{tail}"), false)
        }
    } else if let Some(rest) = rest.strip_prefix("up_blocks.") {
        let (level, rest) = index(rest);
        let ldm_level = levels - 1 - level;
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (resnet, rest) = index(rest);
            (
                format!("{part}.up.{ldm_level}.block.{resnet}.{}", inner(&rest).0),
                false,
            )
        } else {
            let tail = rest.strip_prefix("upsamplers.0.conv.").unwrap();
            (format!("{part}.up.{ldm_level}.upsample.conv.{tail}"), false)
        }
    } else {
        (name.to_string(), false)
    };
    let mut shape = shape.to_vec();
    if conv && shape.len() == 2 {
        shape.extend([1, 1]);
    }
    (format!("first_stage_model.{body}"), shape)
}

/// The manifest's parameters written as a real LDM checkpoint's header would list them.
fn ldm_header(manifest: &ParameterManifest, open_clip: bool) -> BTreeMap<String, TensorInfo> {
    let info = |shape: Vec<usize>| TensorInfo {
        dtype: "F16".to_string(),
        shape,
    };
    let mut header = BTreeMap::new();
    let unet_config = &manifest.configs["unet"];
    let layers = unet_config["layers_per_block"].as_u64().unwrap() as usize;
    let up_attends: Vec<bool> = unet_config["up_block_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kind| kind.as_str().unwrap().starts_with("CrossAttn"))
        .collect();
    for (name, shape) in &manifest.parameters["unet"] {
        header.insert(unet_to_ldm(name, layers, &up_attends), info(shape.clone()));
    }
    let levels = manifest.configs["vae"]["block_out_channels"]
        .as_array()
        .unwrap()
        .len();
    for (name, shape) in &manifest.parameters["vae"] {
        let (name, shape) = vae_to_ldm(name, shape, levels);
        header.insert(name, info(shape));
    }
    let text = &manifest.parameters["text_encoder"];
    if open_clip {
        let prefix = "cond_stage_model.model.";
        let width = text["embeddings.token_embedding.weight"][1];
        let mut layer_count = 0;
        for (name, shape) in text {
            let renamed = match name.as_str() {
                "embeddings.token_embedding.weight" => "token_embedding.weight".to_string(),
                "embeddings.position_embedding.weight" => "positional_embedding".to_string(),
                other if other.starts_with("final_layer_norm.") => {
                    other.replace("final_layer_norm.", "ln_final.")
                }
                other => {
                    let rest = other.strip_prefix("encoder.layers.").unwrap();
                    let (layer, tail) = rest.split_once('.').unwrap();
                    layer_count = layer_count.max(layer.parse::<usize>().unwrap() + 1);
                    let tail = match tail {
                        t if t.starts_with("self_attn.q_proj.") => {
                            let kind = t.rsplit('.').next().unwrap();
                            let mut fused = shape.clone();
                            fused[0] *= 3;
                            header.insert(
                                format!(
                                    "{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"
                                ),
                                info(fused),
                            );
                            continue;
                        }
                        t if t.starts_with("self_attn.k_proj.")
                            || t.starts_with("self_attn.v_proj.") =>
                        {
                            continue
                        }
                        t => t
                            .replace("layer_norm1.", "ln_1.")
                            .replace("layer_norm2.", "ln_2.")
                            .replace("self_attn.out_proj.", "attn.out_proj.")
                            .replace("mlp.fc1.", "mlp.c_fc.")
                            .replace("mlp.fc2.", "mlp.c_proj."),
                    };
                    format!("transformer.resblocks.{layer}.{tail}")
                }
            };
            header.insert(format!("{prefix}{renamed}"), info(shape.clone()));
        }
        // Real SD 2 checkpoints hold OpenCLIP ViT-H's 24th layer and its projection, unused.
        assert_eq!(layer_count, 23);
        for (tail, shape) in [
            ("ln_1.weight", vec![width]),
            ("attn.in_proj_weight", vec![3 * width, width]),
            ("attn.in_proj_bias", vec![3 * width]),
            ("mlp.c_fc.weight", vec![4 * width, width]),
        ] {
            header.insert(
                format!("{prefix}transformer.resblocks.23.{tail}"),
                info(shape),
            );
        }
        header.insert(format!("{prefix}text_projection"), info(vec![width, width]));
        header.insert(format!("{prefix}logit_scale"), info(vec![]));
    } else {
        for (name, shape) in text {
            header.insert(
                format!("cond_stage_model.transformer.text_model.{name}"),
                info(shape.clone()),
            );
        }
        header.insert(
            "cond_stage_model.transformer.text_model.embeddings.position_ids".to_string(),
            TensorInfo {
                dtype: "I64".to_string(),
                shape: vec![1, 77],
            },
        );
    }
    // Buffers and EMA copies real checkpoints carry.
    header.insert("alphas_cumprod".to_string(), info(vec![1000]));
    header.insert("model_ema.decay".to_string(), info(vec![]));
    header.insert(
        "model_ema.diffusion_modelinput_blocks00weight".to_string(),
        info(vec![320, 4, 3, 3]),
    );
    header
}

#[test]
fn real_checkpoint_layouts_rename_to_every_parameter_and_infer_the_published_configs() {
    for (checkpoint, open_clip, prediction, family) in [
        ("sd15", false, PredictionType::Epsilon, ModelFamily::Sd1),
        ("sd21", true, PredictionType::VPrediction, ModelFamily::Sd2),
        (
            "sd-turbo",
            true,
            PredictionType::VPrediction,
            ModelFamily::Sd2,
        ),
    ] {
        let manifest =
            ParameterManifest::from_file(&fixture(&format!("manifests/{checkpoint}.json")))
                .unwrap();
        let header = ldm_header(&manifest, open_clip);
        let path = PathBuf::from(format!("{checkpoint}.safetensors"));
        let layout = CheckpointLayout::from_tensors(&header, &path).unwrap();
        assert_eq!(layout.open_clip, open_clip);

        // Every parameter, and nothing else, with its shape (VAE attention as 1x1 convolutions).
        for (component, key, prefix) in [
            (Component::Unet, "unet", ""),
            (Component::Vae, "vae", ""),
            (Component::TextEncoder, "text_encoder", "text_model."),
        ] {
            let renamed = layout.shapes(component, &header);
            let expected: BTreeMap<String, Vec<usize>> = manifest.parameters[key]
                .iter()
                .map(|(name, shape)| (format!("{prefix}{name}"), shape.clone()))
                .collect();
            assert_eq!(
                renamed.keys().collect::<Vec<_>>(),
                expected.keys().collect::<Vec<_>>(),
                "{checkpoint} {key}: renamed parameters"
            );
            for (name, shape) in &expected {
                let got = &renamed[name];
                let squeezed: Vec<usize> = if got.len() == 4 && shape.len() == 2 {
                    got[..2].to_vec()
                } else {
                    got.clone()
                };
                assert_eq!(&squeezed, shape, "{checkpoint} {name}");
            }
        }
        // Every tensor of the file is used or knowingly ignored.
        let used: usize = [Component::Unet, Component::Vae, Component::TextEncoder]
            .iter()
            .map(|&component| {
                layout
                    .component(component)
                    .values()
                    .map(|source| &source.checkpoint_name)
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            })
            .sum();
        assert_eq!(used + layout.ignored.len(), header.len(), "{checkpoint}");

        let configs = CheckpointConfigs::infer(&layout, &header, None, &path).unwrap();
        assert_eq!(configs.family, family, "{checkpoint}");
        assert_eq!(
            configs.scheduler.prediction_type, prediction,
            "{checkpoint}"
        );
        let published_unet =
            UnetConfig::from_json(&manifest.configs["unet"].to_string(), &path).unwrap();
        assert_eq!(
            configs.unet.down_blocks(),
            published_unet.down_blocks(),
            "{checkpoint}"
        );
        assert_eq!(
            configs.unet.up_blocks(),
            published_unet.up_blocks(),
            "{checkpoint}"
        );
        assert_eq!(
            configs.unet.mid_block(),
            published_unet.mid_block(),
            "{checkpoint}"
        );
        assert_eq!(
            configs.unet.heads_per_block(),
            published_unet.heads_per_block()
        );
        assert_eq!(
            configs.unet.use_linear_projection, published_unet.use_linear_projection,
            "{checkpoint}"
        );
        assert_eq!(
            configs.unet.text_embedding_dim(),
            published_unet.text_embedding_dim()
        );
        let published_text: ClipTextConfig =
            serde_json::from_value(manifest.configs["text_encoder"].clone()).unwrap();
        assert_eq!(configs.text_encoder, published_text, "{checkpoint}");
        let published_vae =
            VaeConfig::from_json(&manifest.configs["vae"].to_string(), &path).unwrap();
        assert_eq!(
            format!("{:?}", configs.vae),
            format!("{published_vae:?}"),
            "{checkpoint}"
        );
        // The sample size follows the prediction type: 768 px for v-prediction SD 2.x.
        let with_epsilon =
            CheckpointConfigs::infer(&layout, &header, Some(PredictionType::Epsilon), &path)
                .unwrap();
        let published_size = manifest.configs["unet"]["sample_size"].clone();
        let inferred_size = if checkpoint == "sd-turbo" {
            // SD-Turbo has SD 2.1's shapes: only `--prediction-type epsilon` tells it apart.
            with_epsilon.unet.sample_size.clone()
        } else {
            configs.unet.sample_size.clone()
        };
        assert_eq!(inferred_size, Some(published_size), "{checkpoint}");
    }
}

// ---- Bad input ----------------------------------------------------------------------------------

fn load_error(path: &Path) -> PipelineError {
    match StableDiffusion::load(path, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(error) => error,
    }
}

#[test]
fn bad_single_files_fail_with_a_message_naming_the_file() {
    let temp = tempfile::tempdir().unwrap();
    let good = write_single_file("tiny-sd1", DType::F32, temp.path());
    let bytes = std::fs::read(&good).unwrap();

    let truncated = temp.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let message = load_error(&truncated).to_string();
    assert!(
        message.contains("truncated.safetensors") && message.contains("truncated"),
        "{message}"
    );

    let mut tensors = rebuilt_tensors("tiny-sd1", DType::F32);
    tensors.retain(|name, _| !name.starts_with("model.diffusion_model."));
    let no_unet = temp.path().join("no-unet.safetensors");
    candle_core::safetensors::save(&tensors, &no_unet).unwrap();
    let message = load_error(&no_unet).to_string();
    assert!(
        message.contains("no-unet.safetensors") && message.contains("no UNet tensors"),
        "{message}"
    );

    // A diffusers component file is not a checkpoint.
    let component = fixture("tiny-sd1/unet/diffusion_pytorch_model.safetensors");
    let message = load_error(&component).to_string();
    assert!(
        message.contains("diffusion_pytorch_model.safetensors") && message.contains("model folder"),
        "{message}"
    );

    // An unknown layout: an extra block no rule knows.
    let mut tensors = rebuilt_tensors("tiny-sd1", DType::F32);
    tensors.insert(
        "model.diffusion_model.label_emb.0.0.weight".to_string(),
        Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    let unknown = temp.path().join("unknown.safetensors");
    candle_core::safetensors::save(&tensors, &unknown).unwrap();
    let message = load_error(&unknown).to_string();
    assert!(
        message.contains("unknown.safetensors")
            && message.contains("unknown checkpoint layout")
            && message.contains("label_emb"),
        "{message}"
    );

    // A wrong shape is caught by name while building, before the model exists.
    let mut tensors = rebuilt_tensors("tiny-sd1", DType::F32);
    tensors.insert(
        "model.diffusion_model.out.2.bias".to_string(),
        Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
    );
    let wrong = temp.path().join("wrong-shape.safetensors");
    candle_core::safetensors::save(&tensors, &wrong).unwrap();
    let message = load_error(&wrong).to_string();
    assert!(
        message.contains("wrong-shape.safetensors") && message.contains("out.2.bias"),
        "{message}"
    );

    // Pickles are refused unread, with the way out.
    for name in ["model.ckpt", "model.pt", "model.pth"] {
        let pickle = temp.path().join(name);
        std::fs::write(&pickle, b"\x80\x02not read").unwrap();
        let message = load_error(&pickle).to_string();
        assert!(
            message.contains(name)
                && message.contains("arbitrary code")
                && message.contains("safetensors"),
            "{message}"
        );
    }
}

#[test]
fn prediction_type_override_applies_to_folders_too() {
    let options = LoadOptions {
        prediction_type: Some(PredictionType::VPrediction),
        ..LoadOptions::default()
    };
    let model = StableDiffusion::load(&fixture("tiny-sd1"), &options).unwrap();
    assert_eq!(
        model.scheduler_config.prediction_type,
        PredictionType::VPrediction
    );
}

#[test]
fn cancelling_a_load_stops_it() {
    let mut stages = 0;
    let result = StableDiffusion::load_observed(
        &fixture("tiny-sd1"),
        &LoadOptions::default(),
        &mut |progress| {
            stages += 1;
            if progress.stage == "UNet" {
                Err(PipelineError::Cancelled)
            } else {
                Ok(())
            }
        },
    );
    assert!(matches!(result, Err(PipelineError::Cancelled)));
    assert_eq!(stages, 3);
}

/// Through the worker: a single file loads; a truncated file and a pickle fail with their names and
/// the model loaded before stays usable.
#[test]
fn worker_loads_single_files_and_keeps_the_previous_model_on_failure() {
    use attend::worker::{Event, GenerateParams, ModelSource, WorkerHandle};
    let next = |worker: &WorkerHandle| {
        worker
            .events()
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("no event from the worker")
    };
    let temp = tempfile::tempdir().unwrap();
    let good = write_single_file("tiny-sd1", DType::F32, temp.path());
    let truncated = temp.path().join("cut.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let pickle = temp.path().join("old.ckpt");
    std::fs::write(&pickle, b"\x80\x02").unwrap();

    let mut worker = WorkerHandle::spawn(attend::worker::pipeline_engine_factory()).unwrap();
    worker
        .load_model(ModelSource::from_path(good.clone()))
        .unwrap();
    match next(&worker) {
        Event::ModelLoaded { info } => {
            assert_eq!(info.source, ModelSource::File(good.clone()));
            assert_eq!(info.name, "tiny-sd1");
        }
        other => panic!("expected ModelLoaded, got {other:?}"),
    }
    for (bad, expected) in [(&truncated, "truncated"), (&pickle, "arbitrary code")] {
        worker
            .load_model(ModelSource::from_path(bad.clone()))
            .unwrap();
        match next(&worker) {
            Event::ModelLoadFailed { source, message } => {
                assert_eq!(source, ModelSource::File(bad.clone()));
                assert!(
                    message.contains(&*bad.to_string_lossy()) && message.contains(expected),
                    "{message}"
                );
            }
            other => panic!("expected ModelLoadFailed, got {other:?}"),
        }
    }
    assert_eq!(worker.load_progress(), None);
    let run_id = worker
        .generate(GenerateParams {
            prompt: "a cat".to_owned(),
            steps: 2,
            width_px: Some(32),
            height_px: Some(32),
            ..GenerateParams::default()
        })
        .unwrap();
    loop {
        match next(&worker) {
            Event::Finished { run_id: id, .. } if id == run_id => break,
            Event::Failed { message, .. } => panic!("the previous model failed: {message}"),
            _ => {}
        }
    }
}

#[test]
fn prediction_type_names_parse_and_bad_ones_are_explained() {
    use attend::pipeline::checkpoint::parse_prediction_type;
    assert_eq!(
        parse_prediction_type("epsilon"),
        Ok(PredictionType::Epsilon)
    );
    assert_eq!(
        parse_prediction_type("v_prediction"),
        Ok(PredictionType::VPrediction)
    );
    assert_eq!(parse_prediction_type("V"), Ok(PredictionType::VPrediction));
    let message = parse_prediction_type("velocity").unwrap_err();
    assert!(
        message.contains("velocity") && message.contains("v_prediction"),
        "{message}"
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_attend"))
        .args(["generate", "--prompt", "x", "--prediction-type", "velocity"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--prediction-type") && stderr.contains("velocity"),
        "{stderr}"
    );
}
