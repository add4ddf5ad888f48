//! CLIP text encoder (transformers' `CLIPTextModel`), written for any batch size.
//!
//! Weight names follow the transformers state dict, with or without the `text_model.` prefix
//! (older checkpoints have it, files saved by transformers 5 do not):
//! `embeddings.token_embedding.weight`, `encoder.layers.N.self_attn.q_proj.weight`, ...,
//! `final_layer_norm.bias`. The `position_ids` buffer is not used.

use std::path::Path;

use candle_core::{DType, Device, Module as _, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

use crate::pipeline::{PipelineError, PipelineResult};

/// The activation of the encoder's MLP (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)`, used by OpenAI CLIP (SD 1.x).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU, used by OpenCLIP ViT-H (SD 2.x).
    #[serde(rename = "gelu")]
    Gelu,
}

impl ClipActivation {
    /// Applies the activation elementwise; any shape.
    fn apply(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Gelu => xs.gelu_erf(),
        }
    }
}

/// `text_encoder/config.json` of a diffusers model folder. Missing keys take transformers'
/// `CLIPTextConfig` defaults.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    /// Number of token embeddings (49408 for CLIP).
    pub vocab_size: usize,
    /// Width of the hidden states (768 SD1, 1024 SD2; default 512).
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer (default 2048).
    pub intermediate_size: usize,
    /// Number of transformer layers (default 12).
    pub num_hidden_layers: usize,
    /// Number of attention heads; must divide `hidden_size` (default 8).
    pub num_attention_heads: usize,
    /// Longest token sequence (77).
    pub max_position_embeddings: usize,
    /// MLP activation (default `quick_gelu`).
    pub hidden_act: ClipActivation,
    /// Epsilon of every layer norm (default 1e-5).
    pub layer_norm_eps: f64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipTextConfig {
    /// Reads and checks `text_encoder/config.json`; errors name the file and the offending key.
    pub fn from_file(path: &Path) -> PipelineResult<Self> {
        if !path.is_file() {
            return Err(PipelineError::Missing {
                what: "text encoder config",
                path: path.to_path_buf(),
            });
        }
        let bad_file = |reason: String| PipelineError::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|error| bad_file(error.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|error| bad_file(error.to_string()))?;
        Self::from_json_value(json, path)
    }

    /// Checks and converts the JSON of a text encoder config; `path` is only used in errors.
    pub fn from_json_value(json: serde_json::Value, path: &Path) -> PipelineResult<Self> {
        let bad_config = |reason: String| PipelineError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(activation) = json.get("hidden_act") {
            let supported = matches!(activation.as_str(), Some("quick_gelu" | "gelu"));
            if !supported {
                return Err(bad_config(format!(
                    "hidden_act {activation} is not supported (expected \"quick_gelu\" or \"gelu\")"
                )));
            }
        }
        let config: Self =
            serde_json::from_value(json).map_err(|error| bad_config(error.to_string()))?;
        config.check().map_err(bad_config)?;
        Ok(config)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Checks the values that the model's shapes depend on; the error names the key.
    fn check(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(format!("{key} must be positive"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "num_attention_heads {} does not divide hidden_size {}",
                self.num_attention_heads, self.hidden_size
            ));
        }
        Ok(())
    }
}

/// Multi-head self-attention of one encoder layer (`self_attn`).
#[derive(Clone, Debug)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, config: &ClipTextConfig) -> candle_core::Result<Self> {
        let width = config.hidden_size;
        Ok(Self {
            q_proj: candle_nn::linear(width, width, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(width, width, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(width, width, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(width, width, vb.pp("out_proj"))?,
            heads: config.num_attention_heads,
            head_dim: config.head_dim(),
        })
    }

    /// `[batch, seq, hidden]` -> `[batch, heads, seq, head_dim]`.
    fn split_heads(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, seq, _) = xs.dims3()?;
        xs.reshape((batch, seq, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `hidden_states`: `[batch, seq, hidden]`; `causal_mask`: `[seq, seq]` (0 or -inf).
    /// Returns `[batch, seq, hidden]`.
    fn forward(&self, hidden_states: &Tensor, causal_mask: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, seq, width) = hidden_states.dims3()?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let queries = self.split_heads(&self.q_proj.forward(hidden_states)?)?;
        let keys = self.split_heads(&self.k_proj.forward(hidden_states)?)?;
        let values = self.split_heads(&self.v_proj.forward(hidden_states)?)?;
        // `[batch, heads, seq, seq]`, softmax in f32 whatever the weights' dtype.
        let scores = (queries.matmul(&keys.t()?.contiguous()?)? * scale)?
            .to_dtype(DType::F32)?
            .broadcast_add(causal_mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(values.dtype())?;
        let context = probs
            .matmul(&values)?
            .transpose(1, 2)?
            .reshape((batch, seq, width))?;
        self.out_proj.forward(&context)
    }
}

/// The feed-forward block of one encoder layer (`mlp`).
#[derive(Clone, Debug)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: ClipActivation,
}

impl ClipMlp {
    fn new(vb: VarBuilder, config: &ClipTextConfig) -> candle_core::Result<Self> {
        Ok(Self {
            fc1: candle_nn::linear(config.hidden_size, config.intermediate_size, vb.pp("fc1"))?,
            fc2: candle_nn::linear(config.intermediate_size, config.hidden_size, vb.pp("fc2"))?,
            activation: config.hidden_act,
        })
    }

    /// `[batch, seq, hidden]` -> `[batch, seq, hidden]`.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = self.activation.apply(&self.fc1.forward(xs)?)?;
        self.fc2.forward(&hidden)
    }
}

/// One pre-norm transformer layer (`encoder.layers.N`).
#[derive(Clone, Debug)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, config: &ClipTextConfig) -> candle_core::Result<Self> {
        let width = config.hidden_size;
        let eps = config.layer_norm_eps;
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(width, eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(vb.pp("self_attn"), config)?,
            layer_norm2: candle_nn::layer_norm(width, eps, vb.pp("layer_norm2"))?,
            mlp: ClipMlp::new(vb.pp("mlp"), config)?,
        })
    }

    /// `[batch, seq, hidden]` -> `[batch, seq, hidden]`.
    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> candle_core::Result<Tensor> {
        let attended = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, causal_mask)?;
        let xs = (xs + attended)?;
        let fed_forward = self.mlp.forward(&self.layer_norm2.forward(&xs)?)?;
        xs + fed_forward
    }
}

/// The CLIP text transformer: token ids -> per-token embeddings for the UNet's cross-attention.
#[derive(Clone, Debug)]
pub struct ClipTextEncoder {
    token_embedding: Embedding,
    /// `[max_position_embeddings, hidden]`.
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    max_positions: usize,
    dtype: DType,
}

impl ClipTextEncoder {
    /// Builds the encoder from `vb` (weights looked up with their shapes; the `text_model.` prefix
    /// is used when the weights have it). Runs in `vb`'s dtype and device.
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> PipelineResult<Self> {
        config
            .check()
            .map_err(|reason| PipelineError::InvalidArgument {
                name: "text encoder config",
                reason,
            })?;
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let width = config.hidden_size;
        let embeddings = vb.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(config.vocab_size, width, embeddings.pp("token_embedding"))?;
        let position_embedding = embeddings
            .pp("position_embedding")
            .get((config.max_position_embeddings, width), "weight")?;
        let layers_vb = vb.pp("encoder").pp("layers");
        let layers = (0..config.num_hidden_layers)
            .map(|index| ClipEncoderLayer::new(layers_vb.pp(index), config))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm =
            candle_nn::layer_norm(width, config.layer_norm_eps, vb.pp("final_layer_norm"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            max_positions: config.max_position_embeddings,
            dtype: vb.dtype(),
        })
    }

    /// The dtype the encoder computes in (its weights' dtype).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `input_ids`: `[batch, seq]` integer ids (u32), `seq <= max_position_embeddings`.
    /// Returns `last_hidden_state` (after the final layer norm), `[batch, seq, hidden]`, in the
    /// encoder's dtype. Token `i` attends to tokens `0..=i` only (causal mask).
    pub fn forward(&self, input_ids: &Tensor) -> PipelineResult<Tensor> {
        let (_batch, seq) = input_ids
            .dims2()
            .map_err(|_| PipelineError::InvalidArgument {
                name: "input_ids",
                reason: format!("expected [batch, seq], got {:?}", input_ids.dims()),
            })?;
        if seq == 0 || seq > self.max_positions {
            return Err(PipelineError::InvalidArgument {
                name: "input_ids",
                reason: format!(
                    "sequence length {seq} must be between 1 and {}",
                    self.max_positions
                ),
            });
        }
        let positions = self.position_embedding.narrow(0, 0, seq)?;
        let mut hidden_states = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&positions)?;
        let causal_mask = causal_mask(seq, input_ids.device())?;
        for layer in &self.layers {
            hidden_states = layer.forward(&hidden_states, &causal_mask)?;
        }
        Ok(self.final_layer_norm.forward(&hidden_states)?)
    }
}

/// `[seq, seq]` f32: 0 where key `j <= i` (query `i`), `-inf` above the diagonal.
fn causal_mask(seq: usize, device: &Device) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = (0..seq)
        .flat_map(|query| {
            (0..seq).map(move |key| if key > query { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Tensor::from_vec(values, (seq, seq), device)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::kernels::test_support::max_abs_diff;

    fn tiny_config() -> ClipTextConfig {
        ClipTextConfig {
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            max_position_embeddings: 6,
            hidden_act: ClipActivation::Gelu,
            layer_norm_eps: 1e-5,
        }
    }

    /// Random weights for [`tiny_config`], named as in transformers' state dict.
    fn tiny_weights(prefix: &str) -> HashMap<String, Tensor> {
        let config = tiny_config();
        let (width, inner) = (config.hidden_size, config.intermediate_size);
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "embeddings.token_embedding.weight".into(),
                vec![config.vocab_size, width],
            ),
            (
                "embeddings.position_embedding.weight".into(),
                vec![config.max_position_embeddings, width],
            ),
            ("final_layer_norm.weight".into(), vec![width]),
            ("final_layer_norm.bias".into(), vec![width]),
        ];
        for layer in 0..config.num_hidden_layers {
            let name = |rest: &str| format!("encoder.layers.{layer}.{rest}");
            for projection in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                shapes.push((
                    name(&format!("self_attn.{projection}.weight")),
                    vec![width, width],
                ));
                shapes.push((name(&format!("self_attn.{projection}.bias")), vec![width]));
            }
            for norm in ["layer_norm1", "layer_norm2"] {
                shapes.push((name(&format!("{norm}.weight")), vec![width]));
                shapes.push((name(&format!("{norm}.bias")), vec![width]));
            }
            shapes.push((name("mlp.fc1.weight"), vec![inner, width]));
            shapes.push((name("mlp.fc1.bias"), vec![inner]));
            shapes.push((name("mlp.fc2.weight"), vec![width, inner]));
            shapes.push((name("mlp.fc2.bias"), vec![width]));
        }
        shapes
            .into_iter()
            .enumerate()
            .map(|(index, (name, shape))| {
                let count: usize = shape.iter().product();
                let values: Vec<f32> = (0..count)
                    .map(|i| (((i * 7 + index * 13) % 17) as f32 - 8.0) / 8.0)
                    .collect();
                let tensor = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
                (format!("{prefix}{name}"), tensor)
            })
            .collect()
    }

    fn encoder(prefix: &str, dtype: DType) -> ClipTextEncoder {
        let vb = VarBuilder::from_tensors(tiny_weights(prefix), dtype, &Device::Cpu);
        ClipTextEncoder::new(vb, &tiny_config()).unwrap()
    }

    fn ids() -> Tensor {
        Tensor::new(&[[1u32, 4, 2, 9, 0, 0], [1, 3, 3, 0, 0, 0]], &Device::Cpu).unwrap()
    }

    #[test]
    fn text_model_prefix_is_optional() {
        let plain = encoder("", DType::F32).forward(&ids()).unwrap();
        let prefixed = encoder("text_model.", DType::F32).forward(&ids()).unwrap();
        assert_eq!(plain.dims(), [2, 6, 8]);
        assert_eq!(max_abs_diff(&plain, &prefixed), 0.0);
    }

    #[test]
    fn causal_mask_hides_later_tokens() {
        let model = encoder("", DType::F32);
        let full = model.forward(&ids()).unwrap();
        let prefix = model.forward(&ids().narrow(1, 0, 3).unwrap()).unwrap();
        let diff = max_abs_diff(&full.narrow(1, 0, 3).unwrap(), &prefix);
        assert!(diff < 1e-6, "earlier tokens changed by later ones: {diff}");
    }

    #[test]
    fn half_precision_follows_single_precision() {
        let single = encoder("", DType::F32).forward(&ids()).unwrap();
        let half = encoder("", DType::F16).forward(&ids()).unwrap();
        assert_eq!(half.dtype(), DType::F16);
        let diff = max_abs_diff(&single, &half.to_dtype(DType::F32).unwrap());
        assert!(diff < 2e-2, "f16 vs f32: {diff}");
    }

    #[test]
    fn too_long_input_is_an_invalid_argument() {
        let too_long = Tensor::zeros((1, 7), DType::U32, &Device::Cpu).unwrap();
        let error = encoder("", DType::F32).forward(&too_long).unwrap_err();
        assert!(matches!(
            error,
            PipelineError::InvalidArgument {
                name: "input_ids",
                ..
            }
        ));
    }

    #[test]
    fn unsupported_activation_names_the_key_and_file() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("config.json");
        std::fs::write(&path, r#"{"hidden_size": 8, "hidden_act": "relu"}"#).unwrap();
        let error = ClipTextConfig::from_file(&path).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, PipelineError::BadConfig { .. }),
            "{message}"
        );
        assert!(message.contains("hidden_act"), "{message}");
        assert!(message.contains("config.json"), "{message}");
    }

    #[test]
    fn missing_keys_take_transformers_defaults() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"hidden_act": "gelu", "hidden_size": 1024, "num_attention_heads": 16}"#,
        )
        .unwrap();
        let config = ClipTextConfig::from_file(&path).unwrap();
        assert_eq!(config.hidden_act, ClipActivation::Gelu);
        assert_eq!(config.head_dim(), 64);
        assert_eq!(config.max_position_embeddings, 77);
        assert_eq!(config.num_hidden_layers, 12);
    }
}
