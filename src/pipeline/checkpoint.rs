//! Single-file checkpoints in the original latent-diffusion (LDM / A1111) layout: one `.safetensors`
//! holding the UNet (`model.diffusion_model.*`), the VAE (`first_stage_model.*`) and the text encoder
//! (`cond_stage_model.transformer.*` for SD 1.x's CLIP, `cond_stage_model.model.*` for SD 2.x's
//! OpenCLIP).
//!
//! Loading one takes three steps, all before any weight is read:
//!
//! 1. [`CheckpointLayout::from_tensors`] renames every tensor to the diffusers parameter name attend's
//!    models ask for (the rules diffusers' single-file conversion follows: resnet, attention,
//!    down/up-sampler and mid-block renames, the VAE decoder's reversed level order, OpenCLIP's fused
//!    `in_proj` split into `q_proj`/`k_proj`/`v_proj`). A tensor under a component prefix that no rule
//!    knows is an error naming it (an unknown layout); buffers and EMA copies are ignored.
//! 2. [`CheckpointConfigs::infer`] reads the configs off the tensor shapes: channels, layers per
//!    block, which blocks attend, transformer depth, context width, linear or convolutional
//!    projections, the text encoder's width, depth and vocabulary. What shapes cannot tell comes from
//!    the [`ModelFamily`]: SD 1.x UNets have 8 heads per attention layer, SD 2.x heads 64 wide; CLIP
//!    heads are 64 wide; SD 1.x's CLIP uses quick-GELU and pads with `<|endoftext|>`, SD 2.x's OpenCLIP
//!    uses GELU and pads with `!`. The prediction type follows diffusers' heuristic: v-prediction when
//!    the cross-attention context is 1024 wide (SD 2.x 768), else epsilon; `LoadOptions::prediction_type`
//!    overrides it (SD 2.x base and SD-Turbo are epsilon models with SD 2.x shapes).
//! 3. [`CheckpointWeights`] serves each component's tensors under their diffusers names from the
//!    memory-mapped file (rows of a fused projection, 1x1 convolutions as linear weights), converting
//!    fp16/bf16 to the compute dtype.
//!
//! Pickle checkpoints (`.ckpt`, `.pt`, `.bin`, `.pth`) are refused: unpickling runs arbitrary code.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::pipeline::clip::{ClipActivation, ClipTextConfig};
use crate::pipeline::scheduler::{PredictionType, SchedulerConfig};
use crate::pipeline::unet::UnetConfig;
use crate::pipeline::vae::VaeConfig;
use crate::pipeline::weights::{read_safetensors_header, SafetensorsHeader, TensorInfo};
use crate::pipeline::{PipelineError, PipelineResult};

/// Prefix of the UNet's tensors in an LDM checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of the VAE's tensors.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// Prefix of SD 1.x's CLIP text encoder (transformers layout inside).
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// Prefix of SD 2.x's OpenCLIP text encoder.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";

/// File extensions of PyTorch pickle checkpoints, which attend refuses to open.
pub const PICKLE_EXTENSIONS: [&str; 4] = ["ckpt", "pt", "pth", "bin"];

/// The error for a pickle checkpoint: why attend will not open it and how to convert it.
pub fn pickle_refusal(path: &Path) -> PipelineError {
    PipelineError::BadFile {
        path: path.to_path_buf(),
        reason: format!(
            "a PyTorch pickle checkpoint; attend never unpickles (loading a pickle runs arbitrary code \
             from the file). Convert it once, where you trust it, to .safetensors: python -c \"import \
             torch, safetensors.torch as st; sd = torch.load('{0}', map_location='cpu', weights_only=True); \
             sd = sd.get('state_dict', sd); st.save_file({{k: v.contiguous() for k, v in sd.items() if \
             hasattr(v, 'contiguous')}}, '{1}')\"",
            path.display(),
            path.with_extension("safetensors").display()
        ),
    }
}

/// True when `path`'s extension is one of [`PICKLE_EXTENSIONS`] (any case).
pub fn is_pickle_path(path: &Path) -> bool {
    path.extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| {
            PICKLE_EXTENSIONS
                .iter()
                .any(|pickle| extension.eq_ignore_ascii_case(pickle))
        })
}

/// Parses a prediction type as diffusers names it (`epsilon`, `v_prediction`, `sample`; `v` and
/// `v-prediction` are accepted too).
pub fn parse_prediction_type(text: &str) -> Result<PredictionType, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "epsilon" | "eps" => Ok(PredictionType::Epsilon),
        "v_prediction" | "v-prediction" | "v" => Ok(PredictionType::VPrediction),
        "sample" => Ok(PredictionType::Sample),
        other => Err(format!(
            "unknown prediction type `{other}`; expected epsilon, v_prediction or sample"
        )),
    }
}

/// The diffusers name of a prediction type.
pub fn prediction_type_name(prediction: PredictionType) -> &'static str {
    match prediction {
        PredictionType::Epsilon => "epsilon",
        PredictionType::VPrediction => "v_prediction",
        PredictionType::Sample => "sample",
    }
}

/// Which Stable Diffusion generation a checkpoint belongs to, from its shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFamily {
    /// SD 1.x: OpenAI CLIP ViT-L text encoder, 768-wide context, convolutional projections.
    Sd1,
    /// SD 2.x (and SD-Turbo): OpenCLIP ViT-H text encoder, 1024-wide context, linear projections.
    Sd2,
}

impl ModelFamily {
    /// A short name for messages (`SD 1.x`, `SD 2.x`).
    pub fn label(self) -> &'static str {
        match self {
            Self::Sd1 => "SD 1.x",
            Self::Sd2 => "SD 2.x",
        }
    }

    /// The tokenizer's pad token: `<|endoftext|>` for SD 1.x, `!` for SD 2.x's OpenCLIP.
    pub fn pad_token(self) -> &'static str {
        match self {
            Self::Sd1 => "<|endoftext|>",
            Self::Sd2 => "!",
        }
    }
}

/// One of the three networks in a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    /// The denoiser.
    Unet,
    /// The autoencoder.
    Vae,
    /// The text encoder.
    TextEncoder,
}

impl Component {
    /// The component's name in messages.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unet => "UNet",
            Self::Vae => "VAE",
            Self::TextEncoder => "text encoder",
        }
    }
}

/// Where one diffusers parameter comes from in the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSource {
    /// The tensor's name in the checkpoint.
    pub checkpoint_name: String,
    /// For a fused projection: this parameter is part `index` of `count` equal row blocks.
    pub part: Option<(usize, usize)>,
}

/// A checkpoint's tensors renamed: per component, diffusers name -> source.
#[derive(Clone, Debug, Default)]
pub struct CheckpointLayout {
    /// UNet parameters.
    pub unet: BTreeMap<String, TensorSource>,
    /// VAE parameters.
    pub vae: BTreeMap<String, TensorSource>,
    /// Text-encoder parameters (with the `text_model.` prefix).
    pub text_encoder: BTreeMap<String, TensorSource>,
    /// True when the text encoder is OpenCLIP (`cond_stage_model.model.*`).
    pub open_clip: bool,
    /// Checkpoint tensors no model uses (buffers, EMA copies, OpenCLIP's last layer and projection).
    pub ignored: Vec<String>,
}

/// Tensors outside the three components that checkpoints commonly carry and attend does not need.
fn is_known_extra(name: &str) -> bool {
    const BUFFERS: [&str; 12] = [
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ];
    BUFFERS.contains(&name)
        || name == "lvlb_weights"
        || name == "logvar"
        || name.starts_with("model_ema.")
}

/// The layout error: the file, the tensor and what was expected.
fn unknown_layout(path: &Path, reason: String) -> PipelineError {
    PipelineError::BadWeights {
        path: path.to_path_buf(),
        reason: format!("unknown checkpoint layout: {reason}"),
    }
}

/// Splits `a.b.c` into its first segment and the rest.
fn split_first(name: &str) -> Option<(&str, &str)> {
    name.split_once('.')
}

/// Parses the leading `N.` of `name`, returning `N` and the rest.
fn split_index(name: &str) -> Option<(usize, &str)> {
    let (index, rest) = split_first(name)?;
    Some((index.parse().ok()?, rest))
}

/// LDM resnet parameter names -> diffusers (`in_layers.0` -> `norm1`, ...).
fn rename_unet_resnet(rest: &str) -> Option<String> {
    const RULES: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    RULES.iter().find_map(|(ldm, diffusers)| {
        rest.strip_prefix(ldm)
            .map(|tail| format!("{diffusers}{tail}"))
    })
}

/// The UNet's block structure, counted from its LDM tensor names.
#[derive(Clone, Copy, Debug)]
struct UnetBlocks {
    /// Resnets per down block.
    layers_per_block: usize,
}

impl UnetBlocks {
    fn count(names: &[&str], path: &Path) -> PipelineResult<Self> {
        let mut downsamplers = BTreeSet::new();
        let mut input_blocks = BTreeSet::new();
        let mut output_blocks = BTreeSet::new();
        for name in names {
            if let Some(rest) = name.strip_prefix("input_blocks.") {
                if let Some((index, tail)) = split_index(rest) {
                    input_blocks.insert(index);
                    if tail.starts_with("0.op.") {
                        downsamplers.insert(index);
                    }
                }
            } else if let Some(rest) = name.strip_prefix("output_blocks.") {
                if let Some((index, _)) = split_index(rest) {
                    output_blocks.insert(index);
                }
            }
        }
        let block_count = downsamplers.len() + 1;
        let per_up_block = output_blocks.len() / block_count;
        let consistent = per_up_block >= 2
            && output_blocks.len() == block_count * per_up_block
            && input_blocks.len() == block_count * per_up_block
            && output_blocks.iter().copied().eq(0..output_blocks.len())
            && input_blocks.iter().copied().eq(0..input_blocks.len());
        if !consistent {
            return Err(unknown_layout(
                path,
                format!(
                    "the UNet has {} input blocks, {} output blocks and {} downsamplers, which is not \
                     the SD 1.x/2.x block structure",
                    input_blocks.len(),
                    output_blocks.len(),
                    downsamplers.len()
                ),
            ));
        }
        Ok(Self {
            layers_per_block: per_up_block - 1,
        })
    }

    /// The diffusers name of one UNet tensor (its name without [`UNET_PREFIX`]).
    fn rename(self, name: &str) -> Option<String> {
        let stride = self.layers_per_block + 1;
        if let Some(tail) = name.strip_prefix("time_embed.0.") {
            return Some(format!("time_embedding.linear_1.{tail}"));
        }
        if let Some(tail) = name.strip_prefix("time_embed.2.") {
            return Some(format!("time_embedding.linear_2.{tail}"));
        }
        if let Some(tail) = name.strip_prefix("out.0.") {
            return Some(format!("conv_norm_out.{tail}"));
        }
        if let Some(tail) = name.strip_prefix("out.2.") {
            return Some(format!("conv_out.{tail}"));
        }
        if let Some(tail) = name.strip_prefix("input_blocks.0.0.") {
            return Some(format!("conv_in.{tail}"));
        }
        if let Some(rest) = name.strip_prefix("input_blocks.") {
            let (index, rest) = split_index(rest)?;
            let (block, layer) = ((index - 1) / stride, (index - 1) % stride);
            let (sub, tail) = split_index(rest)?;
            return match (layer < self.layers_per_block, sub) {
                (true, 0) => rename_unet_resnet(tail)
                    .map(|tail| format!("down_blocks.{block}.resnets.{layer}.{tail}")),
                (true, 1) => Some(format!("down_blocks.{block}.attentions.{layer}.{tail}")),
                (false, 0) => tail
                    .strip_prefix("op.")
                    .map(|tail| format!("down_blocks.{block}.downsamplers.0.conv.{tail}")),
                _ => None,
            };
        }
        if let Some(rest) = name.strip_prefix("middle_block.") {
            let (sub, tail) = split_index(rest)?;
            return match sub {
                0 | 2 => rename_unet_resnet(tail)
                    .map(|tail| format!("mid_block.resnets.{}.{tail}", sub / 2)),
                1 => Some(format!("mid_block.attentions.0.{tail}")),
                _ => None,
            };
        }
        if let Some(rest) = name.strip_prefix("output_blocks.") {
            let (index, rest) = split_index(rest)?;
            let (block, layer) = (index / stride, index % stride);
            let (sub, tail) = split_index(rest)?;
            if sub == 0 {
                return rename_unet_resnet(tail)
                    .map(|tail| format!("up_blocks.{block}.resnets.{layer}.{tail}"));
            }
            if let Some(tail) = tail.strip_prefix("conv.") {
                return Some(format!("up_blocks.{block}.upsamplers.0.conv.{tail}"));
            }
            return Some(format!("up_blocks.{block}.attentions.{layer}.{tail}"));
        }
        None
    }
}

/// LDM VAE resnet and attention names -> diffusers.
fn rename_vae_inner(rest: &str) -> Option<String> {
    const RULES: [(&str, &str); 10] = [
        ("norm1.", "norm1."),
        ("conv1.", "conv1."),
        ("norm2.", "norm2."),
        ("conv2.", "conv2."),
        ("nin_shortcut.", "conv_shortcut."),
        ("norm.", "group_norm."),
        ("q.", "to_q."),
        ("k.", "to_k."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ];
    RULES.iter().find_map(|(ldm, diffusers)| {
        rest.strip_prefix(ldm)
            .map(|tail| format!("{diffusers}{tail}"))
    })
}

/// The diffusers name of one VAE tensor (without [`VAE_PREFIX`]); `decoder_levels` are the indices
/// of the decoder's `up.N` levels present, ascending.
fn rename_vae(name: &str, decoder_levels: &[usize]) -> Option<String> {
    for (ldm, diffusers) in [
        ("quant_conv.", "quant_conv."),
        ("post_quant_conv.", "post_quant_conv."),
    ] {
        if let Some(tail) = name.strip_prefix(ldm) {
            return Some(format!("{diffusers}{tail}"));
        }
    }
    let (part, rest) = split_first(name)?;
    if part != "encoder" && part != "decoder" {
        return None;
    }
    for (ldm, diffusers) in [
        ("conv_in.", "conv_in."),
        ("conv_out.", "conv_out."),
        ("norm_out.", "conv_norm_out."),
    ] {
        if let Some(tail) = rest.strip_prefix(ldm) {
            return Some(format!("{part}.{diffusers}{tail}"));
        }
    }
    if let Some(mid) = rest.strip_prefix("mid.") {
        let (which, tail) = split_first(mid)?;
        let target = match which {
            "block_1" => "resnets.0",
            "block_2" => "resnets.1",
            "attn_1" => "attentions.0",
            _ => return None,
        };
        return rename_vae_inner(tail).map(|tail| format!("{part}.mid_block.{target}.{tail}"));
    }
    let (levels_name, level, tail) = if let Some(down) = rest.strip_prefix("down.") {
        let (level, tail) = split_index(down)?;
        ("down_blocks", level, tail)
    } else if let Some(up) = rest.strip_prefix("up.") {
        let (index, tail) = split_index(up)?;
        // The decoder's levels are stored deepest first; diffusers counts from the deepest. Ranking
        // the indices present (not `count - 1 - index`) also reads files whose level numbers start
        // above 0, as diffusers' own conversion script writes for VAEs with fewer than 4 levels.
        let rank = decoder_levels.iter().position(|&level| level == index)?;
        ("up_blocks", decoder_levels.len() - 1 - rank, tail)
    } else {
        return None;
    };
    if let Some(block) = tail.strip_prefix("block.") {
        let (resnet, tail) = split_index(block)?;
        return rename_vae_inner(tail)
            .map(|tail| format!("{part}.{levels_name}.{level}.resnets.{resnet}.{tail}"));
    }
    let sampler = if levels_name == "down_blocks" {
        ("downsample.conv.", "downsamplers")
    } else {
        ("upsample.conv.", "upsamplers")
    };
    tail.strip_prefix(sampler.0)
        .map(|tail| format!("{part}.{levels_name}.{level}.{}.0.conv.{tail}", sampler.1))
}

/// How an OpenCLIP tensor maps: to one parameter, to three fused rows, or nowhere.
enum OpenClipTarget {
    One(String),
    Fused([String; 3]),
    Ignored,
}

/// The diffusers name(s) of one OpenCLIP tensor (without [`OPEN_CLIP_PREFIX`]).
fn rename_open_clip(name: &str) -> Option<OpenClipTarget> {
    use OpenClipTarget::{Fused, Ignored, One};
    match name {
        "token_embedding.weight" => {
            return Some(One("text_model.embeddings.token_embedding.weight".into()))
        }
        "positional_embedding" => {
            return Some(One("text_model.embeddings.position_embedding.weight".into()))
        }
        "text_projection" | "logit_scale" | "attn_mask" => return Some(Ignored),
        _ => {}
    }
    if let Some(tail) = name.strip_prefix("ln_final.") {
        return Some(One(format!("text_model.final_layer_norm.{tail}")));
    }
    let (layer, tail) = split_index(name.strip_prefix("transformer.resblocks.")?)?;
    // SD 2.x conditions on the penultimate layer of OpenCLIP ViT-H: diffusers drops layer 23.
    if layer == 23 {
        return Some(Ignored);
    }
    let prefix = format!("text_model.encoder.layers.{layer}");
    let fused = |kind: &str| {
        Fused(
            ["q", "k", "v"]
                .map(|projection| format!("{prefix}.self_attn.{projection}_proj.{kind}")),
        )
    };
    Some(match tail {
        "attn.in_proj_weight" => fused("weight"),
        "attn.in_proj_bias" => fused("bias"),
        _ => {
            const RULES: [(&str, &str); 5] = [
                ("ln_1.", "layer_norm1."),
                ("ln_2.", "layer_norm2."),
                ("attn.out_proj.", "self_attn.out_proj."),
                ("mlp.c_fc.", "mlp.fc1."),
                ("mlp.c_proj.", "mlp.fc2."),
            ];
            let renamed = RULES.iter().find_map(|(ldm, diffusers)| {
                tail.strip_prefix(ldm)
                    .map(|rest| format!("{prefix}.{diffusers}{rest}"))
            })?;
            One(renamed)
        }
    })
}

impl CheckpointLayout {
    /// Renames the tensors of a checkpoint (name -> header info) to attend's parameter names.
    /// `path` names the file in errors: an unknown tensor under a component prefix, a missing
    /// component, or a file in another layout (diffusers component file, SDXL).
    pub fn from_tensors(
        tensors: &BTreeMap<String, TensorInfo>,
        path: &Path,
    ) -> PipelineResult<Self> {
        let names: Vec<&str> = tensors.keys().map(String::as_str).collect();
        let unet_names: Vec<&str> = names
            .iter()
            .filter_map(|name| name.strip_prefix(UNET_PREFIX))
            .collect();
        if unet_names.is_empty() {
            return Err(Self::no_unet_error(&names, path));
        }
        let blocks = UnetBlocks::count(&unet_names, path)?;
        let decoder_levels: Vec<usize> = names
            .iter()
            .filter_map(|name| name.strip_prefix(VAE_PREFIX)?.strip_prefix("decoder.up."))
            .filter_map(|rest| split_index(rest).map(|(level, _)| level))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();

        let mut layout = Self::default();
        let plain = |name: &str| TensorSource {
            checkpoint_name: name.to_string(),
            part: None,
        };
        for &name in &names {
            if let Some(rest) = name.strip_prefix(UNET_PREFIX) {
                let renamed = blocks.rename(rest).ok_or_else(|| {
                    unknown_layout(
                        path,
                        format!("UNet tensor `{name}` matches no SD 1.x/2.x rule"),
                    )
                })?;
                layout.unet.insert(renamed, plain(name));
            } else if let Some(rest) = name.strip_prefix(VAE_PREFIX) {
                let renamed = rename_vae(rest, &decoder_levels).ok_or_else(|| {
                    unknown_layout(path, format!("VAE tensor `{name}` matches no SD VAE rule"))
                })?;
                layout.vae.insert(renamed, plain(name));
            } else if let Some(rest) = name.strip_prefix(CLIP_PREFIX) {
                if rest.ends_with("position_ids") {
                    layout.ignored.push(name.to_string());
                    continue;
                }
                let renamed = if rest.starts_with("text_model.") {
                    rest.to_string()
                } else {
                    format!("text_model.{rest}")
                };
                layout.text_encoder.insert(renamed, plain(name));
            } else if let Some(rest) = name.strip_prefix(OPEN_CLIP_PREFIX) {
                layout.open_clip = true;
                match rename_open_clip(rest) {
                    Some(OpenClipTarget::One(renamed)) => {
                        layout.text_encoder.insert(renamed, plain(name));
                    }
                    Some(OpenClipTarget::Fused(parts)) => {
                        for (index, renamed) in parts.into_iter().enumerate() {
                            layout.text_encoder.insert(
                                renamed,
                                TensorSource {
                                    checkpoint_name: name.to_string(),
                                    part: Some((index, 3)),
                                },
                            );
                        }
                    }
                    Some(OpenClipTarget::Ignored) => layout.ignored.push(name.to_string()),
                    None => {
                        return Err(unknown_layout(
                            path,
                            format!("OpenCLIP tensor `{name}` matches no rule"),
                        ))
                    }
                }
            } else {
                // Buffers, EMA weights and anything else outside the three networks.
                if !is_known_extra(name) && name.starts_with("cond_stage_model.") {
                    return Err(unknown_layout(
                        path,
                        format!("text encoder tensor `{name}` is neither CLIP nor OpenCLIP"),
                    ));
                }
                layout.ignored.push(name.to_string());
            }
        }
        if layout.vae.is_empty() {
            return Err(unknown_layout(
                path,
                format!(
                    "no VAE tensors ({VAE_PREFIX}*): attend needs the full pipeline in one file"
                ),
            ));
        }
        if layout.text_encoder.is_empty() {
            return Err(unknown_layout(
                path,
                format!(
                    "no text encoder tensors ({CLIP_PREFIX}* or {OPEN_CLIP_PREFIX}*): attend needs \
                     the full pipeline in one file"
                ),
            ));
        }
        Ok(layout)
    }

    fn no_unet_error(names: &[&str], path: &Path) -> PipelineError {
        let has = |prefix: &str| names.iter().any(|name| name.starts_with(prefix));
        let reason = if has("conditioner.embedders.") {
            "an SDXL checkpoint; attend loads SD 1.x and 2.x".to_string()
        } else if has("down_blocks.") || has("conv_in.") || has("encoder.down_blocks.") {
            "a single diffusers component (diffusers names, no model.diffusion_model.*); load its \
             model folder (the one with model_index.json) instead"
                .to_string()
        } else if has("text_model.") || has("encoder.layers.") {
            "a text encoder alone; attend needs the full pipeline in one file".to_string()
        } else {
            format!(
                "no UNet tensors ({UNET_PREFIX}*) among its {} tensors: not an SD 1.x/2.x checkpoint",
                names.len()
            )
        };
        unknown_layout(path, reason)
    }

    /// The parameters of one component.
    pub fn component(&self, component: Component) -> &BTreeMap<String, TensorSource> {
        match component {
            Component::Unet => &self.unet,
            Component::Vae => &self.vae,
            Component::TextEncoder => &self.text_encoder,
        }
    }

    /// Diffusers name -> shape for one component (fused rows divided).
    pub fn shapes(
        &self,
        component: Component,
        tensors: &BTreeMap<String, TensorInfo>,
    ) -> BTreeMap<String, Vec<usize>> {
        self.component(component)
            .iter()
            .filter_map(|(name, source)| {
                let info = tensors.get(&source.checkpoint_name)?;
                Some((name.clone(), source_shape(&info.shape, source.part)))
            })
            .collect()
    }
}

/// The shape of a parameter taken from a stored tensor (one row block of a fused one).
fn source_shape(stored: &[usize], part: Option<(usize, usize)>) -> Vec<usize> {
    let mut shape = stored.to_vec();
    if let (Some((_, count)), Some(rows)) = (part, shape.first_mut()) {
        *rows /= count;
    }
    shape
}

/// Everything a single file does not say in words: the configs read off its shapes.
#[derive(Clone, Debug)]
pub struct CheckpointConfigs {
    /// SD 1.x or 2.x.
    pub family: ModelFamily,
    /// The UNet's config (diffusers' `unet/config.json`).
    pub unet: UnetConfig,
    /// The VAE's config.
    pub vae: VaeConfig,
    /// The text encoder's config.
    pub text_encoder: ClipTextConfig,
    /// SD's scheduler settings with the inferred (or given) prediction type.
    pub scheduler: SchedulerConfig,
    /// The tokenizer's pad token for this family.
    pub pad_token: String,
}

/// Reads a dimension of a parameter, or fails naming the parameter.
fn dim_of(
    shapes: &BTreeMap<String, Vec<usize>>,
    name: &str,
    dim: usize,
    component: Component,
    path: &Path,
) -> PipelineResult<usize> {
    shapes
        .get(name)
        .and_then(|shape| shape.get(dim).copied())
        .ok_or_else(|| {
            unknown_layout(
                path,
                format!(
                    "the {} has no parameter `{name}` (or it has fewer than {} dimensions)",
                    component.label(),
                    dim + 1
                ),
            )
        })
}

/// How many distinct `N` follow `prefix` (`down_blocks.` -> blocks) among the names.
fn count_indices<'a>(names: impl Iterator<Item = &'a String>, prefix: &str) -> usize {
    names
        .filter_map(|name| split_index(name.strip_prefix(prefix)?).map(|(index, _)| index))
        .collect::<BTreeSet<_>>()
        .len()
}

/// Head count for an attention of `width` channels with `head_width`-wide heads; widths below or not
/// divisible by it (tiny test models) fall back to one head per 8 channels, or one head.
fn heads_for(width: usize, head_width: usize) -> usize {
    if width >= head_width && width.is_multiple_of(head_width) {
        width / head_width
    } else if width.is_multiple_of(8) && width >= 8 {
        width / 8
    } else {
        1
    }
}

impl CheckpointConfigs {
    /// Infers the configs of a renamed checkpoint (see the module docs for the rules).
    /// `prediction` overrides the prediction-type heuristic.
    pub fn infer(
        layout: &CheckpointLayout,
        tensors: &BTreeMap<String, TensorInfo>,
        prediction: Option<PredictionType>,
        path: &Path,
    ) -> PipelineResult<Self> {
        let unet = layout.shapes(Component::Unet, tensors);
        let vae = layout.shapes(Component::Vae, tensors);
        let text = layout.shapes(Component::TextEncoder, tensors);
        let unet_dim = |name: &str, dim: usize| dim_of(&unet, name, dim, Component::Unet, path);

        // UNet.
        let block_count = count_indices(unet.keys(), "down_blocks.");
        let layers_per_block = count_indices(unet.keys(), "down_blocks.0.resnets.");
        let channels = (0..block_count)
            .map(|block| unet_dim(&format!("down_blocks.{block}.resnets.0.conv2.weight"), 0))
            .collect::<PipelineResult<Vec<_>>>()?;
        let down_attends: Vec<bool> = (0..block_count)
            .map(|block| {
                unet.contains_key(&format!("down_blocks.{block}.attentions.0.proj_in.weight"))
            })
            .collect();
        let up_attends: Vec<bool> = (0..block_count)
            .map(|block| {
                unet.contains_key(&format!("up_blocks.{block}.attentions.0.proj_in.weight"))
            })
            .collect();
        let mid_attends = unet.contains_key("mid_block.attentions.0.proj_in.weight");
        let Some(proj_in) = unet
            .iter()
            .find(|(name, _)| name.ends_with("attentions.0.proj_in.weight"))
        else {
            return Err(unknown_layout(
                path,
                "the UNet has no attention layers".to_string(),
            ));
        };
        let linear_projection = proj_in.1.len() == 2;
        let Some(context_width) = unet
            .iter()
            .find(|(name, _)| name.ends_with("attn2.to_k.weight"))
            .and_then(|(_, shape)| shape.get(1).copied())
        else {
            return Err(unknown_layout(
                path,
                "the UNet has no cross-attention (attn2.to_k)".to_string(),
            ));
        };
        let transformer_layers: Vec<usize> = (0..block_count)
            .map(|block| {
                count_indices(
                    unet.keys(),
                    &format!("down_blocks.{block}.attentions.0.transformer_blocks."),
                )
                .max(1)
            })
            .collect();
        let family = if context_width == 1024 || linear_projection || layout.open_clip {
            ModelFamily::Sd2
        } else {
            ModelFamily::Sd1
        };
        // diffusers: SD 2.x shapes (a 1024-wide context) mean v-prediction unless told otherwise.
        let prediction = prediction.unwrap_or(if context_width == 1024 {
            PredictionType::VPrediction
        } else {
            PredictionType::Epsilon
        });
        let heads: serde_json::Value = match family {
            ModelFamily::Sd1 => serde_json::json!(8),
            ModelFamily::Sd2 => serde_json::json!(channels
                .iter()
                .map(|&width| heads_for(width, 64))
                .collect::<Vec<_>>()),
        };
        let transformer_layers_json = if transformer_layers
            .iter()
            .all(|&n| n == transformer_layers[0])
        {
            serde_json::json!(transformer_layers[0])
        } else {
            serde_json::json!(transformer_layers)
        };
        let sample_size = if family == ModelFamily::Sd2 && prediction == PredictionType::VPrediction
        {
            96
        } else {
            64
        };
        let unet_json = serde_json::json!({
            "sample_size": sample_size,
            "in_channels": unet_dim("conv_in.weight", 1)?,
            "out_channels": unet_dim("conv_out.weight", 0)?,
            "down_block_types": down_attends.iter().map(|&attends| if attends { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect::<Vec<_>>(),
            "up_block_types": up_attends.iter().map(|&attends| if attends { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect::<Vec<_>>(),
            "mid_block_type": if mid_attends { serde_json::json!("UNetMidBlock2DCrossAttn") } else { serde_json::Value::Null },
            "block_out_channels": channels,
            "layers_per_block": layers_per_block,
            "cross_attention_dim": context_width,
            "attention_head_dim": heads,
            "transformer_layers_per_block": transformer_layers_json,
            "use_linear_projection": linear_projection,
            "upcast_attention": family == ModelFamily::Sd2,
            "norm_num_groups": 32,
        });
        let unet_config = UnetConfig::from_json(&unet_json.to_string(), path)?;

        // VAE.
        let vae_dim = |name: &str, dim: usize| dim_of(&vae, name, dim, Component::Vae, path);
        let vae_levels = count_indices(vae.keys(), "encoder.down_blocks.");
        let vae_channels = (0..vae_levels)
            .map(|level| {
                vae_dim(
                    &format!("encoder.down_blocks.{level}.resnets.0.conv2.weight"),
                    0,
                )
            })
            .collect::<PipelineResult<Vec<_>>>()?;
        let vae_json = serde_json::json!({
            "in_channels": vae_dim("encoder.conv_in.weight", 1)?,
            "out_channels": vae_dim("decoder.conv_out.weight", 0)?,
            "latent_channels": vae_dim("decoder.conv_in.weight", 1)?,
            "block_out_channels": vae_channels,
            "layers_per_block": count_indices(vae.keys(), "encoder.down_blocks.0.resnets."),
            "down_block_types": vec!["DownEncoderBlock2D"; vae_levels],
            "up_block_types": vec!["UpDecoderBlock2D"; vae_levels],
            "norm_num_groups": 32,
            "scaling_factor": 0.18215,
            "use_quant_conv": vae.contains_key("quant_conv.weight"),
            "use_post_quant_conv": vae.contains_key("post_quant_conv.weight"),
            "mid_block_add_attention": vae.contains_key("encoder.mid_block.attentions.0.to_q.weight"),
        });
        let vae_config = VaeConfig::from_json(&vae_json.to_string(), path)?;

        // Text encoder.
        let text_dim =
            |name: &str, dim: usize| dim_of(&text, name, dim, Component::TextEncoder, path);
        let hidden_size = text_dim("text_model.embeddings.token_embedding.weight", 1)?;
        let text_encoder = ClipTextConfig {
            vocab_size: text_dim("text_model.embeddings.token_embedding.weight", 0)?,
            hidden_size,
            intermediate_size: text_dim("text_model.encoder.layers.0.mlp.fc1.weight", 0)?,
            num_hidden_layers: count_indices(text.keys(), "text_model.encoder.layers."),
            num_attention_heads: heads_for(hidden_size, 64),
            max_position_embeddings: text_dim(
                "text_model.embeddings.position_embedding.weight",
                0,
            )?,
            hidden_act: match family {
                ModelFamily::Sd1 => ClipActivation::QuickGelu,
                ModelFamily::Sd2 => ClipActivation::Gelu,
            },
            layer_norm_eps: 1e-5,
        };

        let scheduler = sd_scheduler_config(prediction, path)?;
        Ok(Self {
            family,
            unet: unet_config,
            vae: vae_config,
            text_encoder,
            scheduler,
            pad_token: family.pad_token().to_string(),
        })
    }
}

/// Stable Diffusion's own scheduler settings (DDIM, scaled-linear betas 0.00085..0.012, leading
/// spacing, offset 1) with `prediction`; `path` names the model in an error.
pub fn sd_scheduler_config(
    prediction: PredictionType,
    path: &Path,
) -> PipelineResult<SchedulerConfig> {
    let scheduler_json = serde_json::json!({
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": false,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": prediction_type_name(prediction),
    });
    SchedulerConfig::from_json_str(&scheduler_json.to_string()).map_err(|err| {
        PipelineError::BadConfig {
            path: path.to_path_buf(),
            reason: format!("SD scheduler defaults: {err:?}"),
        }
    })
}

/// An opened single-file checkpoint: its checked header, renamed layout and inferred configs.
#[derive(Clone, Debug)]
pub struct SingleFileCheckpoint {
    header: SafetensorsHeader,
    /// The tensors renamed to attend's names.
    pub layout: CheckpointLayout,
    /// The configs read off the shapes.
    pub configs: CheckpointConfigs,
}

impl SingleFileCheckpoint {
    /// Opens `path`: refuses pickles, checks the safetensors header (a truncated file fails here),
    /// renames the tensors and infers the configs. Reads no weights.
    pub fn open(path: &Path, prediction: Option<PredictionType>) -> PipelineResult<Self> {
        if is_pickle_path(path) {
            return Err(pickle_refusal(path));
        }
        let header = read_safetensors_header(path)?;
        let layout = CheckpointLayout::from_tensors(&header.tensors, path)?;
        let configs = CheckpointConfigs::infer(&layout, &header.tensors, prediction, path)?;
        Ok(Self {
            header,
            layout,
            configs,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.header.path
    }

    /// Name, dtype and shape of every tensor in the file.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.header.tensors
    }

    /// The memory-mapped file, shared by the components' weight sources.
    pub fn map(&self) -> PipelineResult<CheckpointWeights> {
        let mapped = crate::pipeline::weights::map_files(&[self.path()])?;
        Ok(CheckpointWeights {
            mapped: Arc::new(mapped),
            path: self.path().to_path_buf(),
        })
    }
}

/// The mapped tensors of a single-file checkpoint.
#[derive(Clone)]
pub struct CheckpointWeights {
    mapped: Arc<candle_core::safetensors::MmapedSafetensors>,
    path: PathBuf,
}

impl CheckpointWeights {
    /// A `VarBuilder` serving one component's parameters under their diffusers names, converted to
    /// `dtype`; a missing or wrong-shape parameter is an error naming it and the file.
    pub fn var_builder(
        &self,
        checkpoint: &SingleFileCheckpoint,
        component: Component,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        let sources = checkpoint
            .layout
            .component(component)
            .iter()
            .map(|(name, source)| {
                let stored = checkpoint
                    .tensors()
                    .get(&source.checkpoint_name)
                    .map(|info| info.shape.clone())
                    .unwrap_or_default();
                (name.clone(), (source.clone(), stored))
            })
            .collect();
        let backend = RenamedTensors {
            weights: self.clone(),
            sources: Arc::new(sources),
            component,
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// The file, for errors.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A `VarBuilder` backend over one component of a checkpoint.
struct RenamedTensors {
    weights: CheckpointWeights,
    /// Diffusers name -> (source, stored shape).
    sources: Arc<HashMap<String, (TensorSource, Vec<usize>)>>,
    component: Component,
}

impl RenamedTensors {
    fn load(
        &self,
        name: &str,
        shape: Option<&[usize]>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some((source, stored)) = self.sources.get(name) else {
            return Err(candle_core::Error::Msg(format!(
                "the {} parameter `{name}` has no tensor in {}",
                self.component.label(),
                self.weights.path.display()
            )));
        };
        let available = source_shape(stored, source.part);
        let target = shape.map_or_else(|| available.clone(), <[usize]>::to_vec);
        let count = |dims: &[usize]| dims.iter().product::<usize>();
        // A 1x1 convolution stored where a linear weight is wanted (the VAE's attention) only differs
        // by trailing unit dimensions.
        let squeezable = available.len() > target.len()
            && available[..target.len()] == target[..]
            && available[target.len()..].iter().all(|&dim| dim == 1);
        if available != target && !(squeezable && count(&available) == count(&target)) {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{}` (the {} parameter `{name}`) has shape {available:?} in {} but the model \
                 expects {target:?}",
                source.checkpoint_name,
                self.component.label(),
                self.weights.path.display()
            )));
        }
        let mut tensor = self.weights.mapped.load(&source.checkpoint_name, device)?;
        if let Some((index, parts)) = source.part {
            let rows = stored.first().copied().unwrap_or(0) / parts;
            tensor = tensor.narrow(0, index * rows, rows)?;
        }
        tensor.reshape(target)?.to_dtype(dtype)
    }
}

impl SimpleBackend for RenamedTensors {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, Some(shape.dims()), dtype, device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, None, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.sources.contains_key(name)
    }
}
