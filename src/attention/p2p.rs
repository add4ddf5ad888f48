//! Prompt-to-Prompt (google/prompt-to-prompt, Hertz et al. 2022) as attention processors: the edited
//! prompt's attention is taken from the source prompt's, word by word.
//!
//! # The controls
//! | control | what the edited prompt's conditional attention becomes |
//! |---|---|
//! | replace / refine ([`crate::analysis::alignment`]) | cross: `alpha * (source @ mapping) + (1 - alpha) * own` per token |
//! | reweight ([`Reweight`](crate::analysis::edit_spec::Reweight)) | the above times a per-token scale (negative allowed, no renormalisation) |
//! | cross window ([`CrossWindow`](crate::analysis::edit_spec::CrossWindow)) | per token and step: the above inside the window, `own` outside |
//! | self window ([`SelfReplace`]) | self-attention of layers with at most `max_queries` queries: the source's, inside the window |
//! | local blend ([`LocalBlendConfig`]) | after each step from `start_fraction` of the steps: `x_edit = x_src + mask * (x_edit - x_src)` |
//!
//! Step windows follow the reference's arithmetic: the cross window of a run of `N` steps covers
//! steps `floor(start * (N + 1)) .. floor(end * (N + 1))` (the reference builds a table of `N + 1`
//! rows), the self window `floor(start * N) .. floor(end * N)`, and the local blend acts from step
//! `floor(start_fraction * N)` on.
//!
//! # Where the source's attention comes from ([`SourceMode`])
//! - **Batch**: the UNet batch holds `[uncond_src, uncond_edit, cond_src, cond_edit]` (without
//!   classifier-free guidance `[src, edit]`): both prompts denoise side by side from the same noise,
//!   as in the reference. Only the conditional edited item is changed.
//! - **Replay**: a [`SourceRecorder`] kept the source run's conditional attention (every cross layer
//!   and the self layers the self window may touch, every step, all heads); the edited prompt then runs
//!   alone (`[uncond_edit, cond_edit]`) and reads the source's attention from the recording. The editor
//!   uses this so that changing an edit re-runs only the edited branch.
//!
//! # Local blend
//! The processor sums, per step and per down/up cross-attention grid, the chosen words' maps of
//! both prompts (source words in the source's attention, edit words in the edited one, after the
//! edit), over heads and layers, cumulatively over the steps like the reference's attention store.
//! [`local_blend_mask`] turns them into the latent mask: 3x3 max-pool, nearest resize to the latent,
//! divide by the maximum, threshold (0.3), union of the two prompts, minus the subtract-words' mask.
//! The reference uses the five 16x16 layers of a 64x64 latent; attend uses the grid whose side is
//! nearest a quarter of the latent side (16 at 64), or the side the config names.
//!
//! Memory of a replay recording: `heads * queries * keys` floats per recorded layer and step; for
//! SD 1.x at 512 px about 77 MB per step (66 MB for the 16 cross layers with 77 keys, 11 MB for the
//! 16x16 and 8x8 self layers), 3.8 GB for 50 steps. The recording stays on the model's device.

mod blend;
mod replay;

pub use blend::{blend_latents, local_blend_mask, BlendWordMaps};
pub use replay::{RecordConfig, SourceRecorder, SourceRecording};

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{bail, Device, Tensor};

use crate::analysis::alignment::{
    align_prompts, split_prompt_scope, word_selector, word_token_indices, PromptAlignment,
    PromptLayout,
};
use crate::analysis::edit_spec::{BlendMask, EditSpec, LocalBlendConfig, SelfReplace, StepWindow};
pub use crate::analysis::edit_spec::{InvertedImageSwap, INVERTED_IMAGE_SWAP};
use crate::analysis::heatmap::UnetPlace;
use crate::analysis::WordSpan;
use crate::hook::{AttentionKind, AttentionProcessor, AttentionSite};
use crate::pipeline::{PipelineError, PipelineResult};

use blend::choose_grid;

/// Local-blend words of a word swap between two prompts of the same word count: each position
/// whose word differs, named in its own prompt alone (`source:circle`, `edit:square#2`, with the
/// occurrence where the text repeats, see [`word_selector`]), so the blend opens the old and the
/// new object's region and nothing else. Empty when the word counts differ or no word changed.
pub fn swapped_blend_words(source: &[WordSpan], edit: &[WordSpan]) -> Vec<String> {
    if source.len() != edit.len() {
        return Vec::new();
    }
    let mut words = Vec::new();
    for (index, (before, after)) in source.iter().zip(edit).enumerate() {
        if !before.text.eq_ignore_ascii_case(&after.text) {
            words.push(format!("source:{}", word_selector(source, index, edit)));
            words.push(format!("edit:{}", word_selector(edit, index, source)));
        }
    }
    words
}

/// Where the source prompt's attention comes from.
#[derive(Clone, Debug)]
pub enum SourceMode {
    /// The source runs in the same batch: `[uncond_src, uncond_edit, cond_src, cond_edit]` with CFG,
    /// `[src, edit]` without.
    Batch,
    /// The edited prompt runs alone (`[uncond_edit, cond_edit]`); the source's attention comes from
    /// a recording of its run.
    Replay(Arc<SourceRecording>),
}

/// Tensors made once per device from the plain mapping data.
#[derive(Debug)]
struct DeviceTensors {
    device: Device,
    /// `[keys, keys]` (source, edited).
    mapping: Tensor,
    /// `[keys]`.
    alphas: Tensor,
    /// `[keys]`, present when a reweight is set.
    equalizer: Option<Tensor>,
    /// `[keys, 2]` per prompt: columns (blend words, subtract words).
    source_blend_tokens: Tensor,
    edit_blend_tokens: Tensor,
}

/// Running sums of the blend words' maps at one grid.
#[derive(Debug)]
struct GridSums {
    /// `[queries, 2]`: (words, subtract words), summed over heads, layers and steps.
    source: Tensor,
    /// Same for the edited prompt.
    edit: Tensor,
    /// Number of (layer, head) maps summed per prompt.
    map_count: usize,
}

/// The Prompt-to-Prompt processor: edits the conditional edited item's attention (see the module
/// docs) and collects the local blend's maps.
#[derive(Debug)]
pub struct PromptToPrompt {
    alignment: PromptAlignment,
    identity_mapping: bool,
    fully_mapped: bool,
    /// Per edited token: its cross window.
    token_windows: Vec<StepWindow>,
    /// Per edited token: its scale, when any reweight is set.
    equalizer: Option<Vec<f32>>,
    self_replace: SelfReplace,
    mode: SourceMode,
    local_blend: Option<LocalBlendConfig>,
    /// Per edited/source token: 0/1 for (blend words, subtract words).
    source_blend_weights: Vec<[f32; 2]>,
    edit_blend_weights: Vec<[f32; 2]>,
    tensors: Option<DeviceTensors>,
    /// Step index of the cached window tensor and the tensor, `[keys]`.
    window_cache: Option<(usize, usize, Tensor)>,
    blend_sums: BTreeMap<(usize, usize), GridSums>,
    latest_mask: Option<BlendMask>,
}

impl PromptToPrompt {
    /// Builds the processor for `spec` between the source and edited prompts' tokens (`length`: the
    /// encoded length, 77 for CLIP). Fails when a replace is asked for prompts with different word
    /// counts, or a reweight, window or blend word is in neither prompt.
    pub fn new(
        spec: &EditSpec,
        source: &PromptLayout<'_>,
        edit: &PromptLayout<'_>,
        length: usize,
        mode: SourceMode,
    ) -> PipelineResult<Self> {
        let alignment = align_prompts(source, edit, length, spec.kind)?;
        let identity_mapping = alignment.mapping.is_identity();
        let fully_mapped = alignment.mapping.is_fully_mapped();

        let mut token_windows = vec![spec.cross_window.default; length];
        for (word, window) in &spec.cross_window.per_word {
            let tokens = word_token_indices(edit.words, word);
            if tokens.is_empty() {
                return Err(missing_word("cross-replace word", word, edit));
            }
            for token in tokens.into_iter().filter(|&token| token < length) {
                token_windows[token] = *window;
            }
        }

        let equalizer = if spec.reweights.is_empty() {
            None
        } else {
            let mut scales = vec![1.0f32; length];
            for reweight in &spec.reweights {
                let tokens = word_token_indices(edit.words, &reweight.word);
                if tokens.is_empty() {
                    return Err(missing_word("reweight word", &reweight.word, edit));
                }
                for token in tokens.into_iter().filter(|&token| token < length) {
                    scales[token] = reweight.scale;
                }
            }
            Some(scales)
        };

        let mut source_blend_weights = vec![[0.0f32; 2]; length];
        let mut edit_blend_weights = vec![[0.0f32; 2]; length];
        if let Some(blend) = &spec.local_blend {
            if blend.words.is_empty() && blend.mask.is_none() {
                return Err(PipelineError::InvalidArgument {
                    name: "local blend",
                    reason: "no words and no mask given".into(),
                });
            }
            for (column, words) in [(0, &blend.words), (1, &blend.subtract_words)] {
                for word in words {
                    let (in_source, in_edit, selector) = split_prompt_scope(word);
                    let lookup = |wanted: bool, words: &[WordSpan]| {
                        if wanted {
                            word_token_indices(words, selector)
                        } else {
                            Vec::new()
                        }
                    };
                    let source_tokens = lookup(in_source, source.words);
                    let edit_tokens = lookup(in_edit, edit.words);
                    if source_tokens.is_empty() && edit_tokens.is_empty() {
                        return Err(PipelineError::InvalidArgument {
                            name: "local blend word",
                            reason: format!(
                                "{word:?} is in neither prompt (source words: {}; edited: {})",
                                word_texts(source),
                                word_texts(edit)
                            ),
                        });
                    }
                    for token in source_tokens.into_iter().filter(|&token| token < length) {
                        source_blend_weights[token][column] = 1.0;
                    }
                    for token in edit_tokens.into_iter().filter(|&token| token < length) {
                        edit_blend_weights[token][column] = 1.0;
                    }
                }
            }
        }

        Ok(Self {
            alignment,
            identity_mapping,
            fully_mapped,
            token_windows,
            equalizer,
            self_replace: spec.self_replace,
            mode,
            local_blend: spec.local_blend.clone(),
            source_blend_weights,
            edit_blend_weights,
            tensors: None,
            window_cache: None,
            blend_sums: BTreeMap::new(),
            latest_mask: None,
        })
    }

    /// The alignment in use (kind, token mapping, word-to-word listing).
    pub fn alignment(&self) -> &PromptAlignment {
        &self.alignment
    }

    /// Batch or replay.
    pub fn mode(&self) -> &SourceMode {
        &self.mode
    }

    /// The local blend settings, if any.
    pub fn local_blend(&self) -> Option<&LocalBlendConfig> {
        self.local_blend.as_ref()
    }

    /// The mask of the latest blended step.
    pub fn latest_mask(&self) -> Option<&BlendMask> {
        self.latest_mask.as_ref()
    }

    /// Forgets the collected blend maps and mask (call before a new run with the same processor).
    pub fn reset(&mut self) {
        self.blend_sums.clear();
        self.latest_mask = None;
        self.window_cache = None;
    }

    /// Per edited token, 1 where its cross window is open at this step, else 0.
    pub fn cross_window_weights(&self, step_index: usize, step_count: usize) -> Vec<f32> {
        self.token_windows
            .iter()
            .map(|window| {
                if window.cross_steps(step_count).contains(&step_index) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// For an edit whose edited prompt is the source prompt itself (only reweights): the first step
    /// of a run of `step_count` steps whose attention the edit changes, i.e. the first step where a
    /// reweighted token (scale other than 1) has its cross window open; `step_count` when no step
    /// is changed. Before that step the edit replaces attention only with the source's own.
    pub fn first_reweighted_step(&self, step_count: usize) -> usize {
        let Some(scales) = &self.equalizer else {
            return step_count;
        };
        self.token_windows
            .iter()
            .zip(scales)
            .filter(|(_, &scale)| scale != 1.0)
            .map(|(window, _)| window.cross_steps(step_count))
            .filter(|steps| !steps.is_empty())
            .map(|steps| steps.start)
            .min()
            .unwrap_or(step_count)
    }

    /// True when layers with `queries` queries take the source's self-attention at this step.
    pub fn replaces_self_attention(
        &self,
        queries: usize,
        step_index: usize,
        step_count: usize,
    ) -> bool {
        queries <= self.self_replace.max_queries
            && self
                .self_replace
                .window
                .self_steps(step_count)
                .contains(&step_index)
    }

    /// The blend words' maps of both prompts at the grid the mask uses for a `latent_h x latent_w`
    /// latent: (source, edited). `None` before any down/up cross-attention was seen.
    pub fn blend_word_maps(
        &self,
        latent_h: usize,
        latent_w: usize,
    ) -> PipelineResult<Option<(BlendWordMaps, BlendWordMaps)>> {
        let Some(config) = &self.local_blend else {
            return Ok(None);
        };
        let Some(&(h, w)) =
            choose_grid(self.blend_sums.keys(), config.map_side, latent_h, latent_w)
        else {
            return Ok(None);
        };
        let Some(sums) = self.blend_sums.get(&(h, w)) else {
            return Ok(None);
        };
        let scale = 1.0 / sums.map_count.max(1) as f64;
        let to_maps = |sum: &Tensor| -> PipelineResult<BlendWordMaps> {
            let columns = sum
                .affine(scale, 0.0)?
                .t()?
                .contiguous()?
                .to_vec2::<f32>()?;
            let mut columns = columns.into_iter();
            let words = columns.next().unwrap_or_default();
            let subtract_words = columns.next().unwrap_or_default();
            Ok(BlendWordMaps {
                h,
                w,
                words,
                subtract_words,
            })
        };
        Ok(Some((to_maps(&sums.source)?, to_maps(&sums.edit)?)))
    }

    /// Batch mode, after each step: `latents` `[2, channels, h, w]` (source, edited); from the blend
    /// start on, the edited row becomes `x_src + mask * (x_edit - x_src)`. Returns the latents
    /// unchanged without local blend or before its start.
    pub fn blend_batch_latents(
        &mut self,
        step_index: usize,
        step_count: usize,
        latents: &Tensor,
    ) -> PipelineResult<Tensor> {
        let (batch, _, _, _) = latents.dims4()?;
        if batch != 2 {
            return Err(PipelineError::InvalidArgument {
                name: "latents",
                reason: format!("batch-mode local blend needs [source, edit] latents, got {batch}"),
            });
        }
        let source = latents.narrow(0, 0, 1)?;
        let edit = latents.narrow(0, 1, 1)?;
        match self.blend_edit_latents(step_index, step_count, &source, &edit)? {
            Some(blended) => Ok(Tensor::cat(&[&source, &blended], 0)?),
            None => Ok(latents.clone()),
        }
    }

    /// After step `step_index`: the edited latents `[1, channels, h, w]` blended with the source's
    /// (`x_src + mask * (x_edit - x_src)`), or `None` when no blend applies at this step.
    pub fn blend_edit_latents(
        &mut self,
        step_index: usize,
        step_count: usize,
        source: &Tensor,
        edit: &Tensor,
    ) -> PipelineResult<Option<Tensor>> {
        let Some(config) = self.local_blend.clone() else {
            return Ok(None);
        };
        if !config.is_active(step_index, step_count) {
            return Ok(None);
        }
        let (_, _, latent_h, latent_w) = edit.dims4()?;
        if let Some(user_mask) = &config.mask {
            let mask = user_blend_mask(user_mask, latent_h, latent_w)?;
            let blended = blend_latents(source, edit, &mask)?;
            self.latest_mask = Some(mask);
            return Ok(Some(blended));
        }
        let Some((source_maps, edit_maps)) = self.blend_word_maps(latent_h, latent_w)? else {
            return Err(PipelineError::InvalidArgument {
                name: "local blend",
                reason: "no down/up cross-attention maps were collected before the blend step"
                    .into(),
            });
        };
        let subtract = (!config.subtract_words.is_empty()).then_some(config.subtract_threshold);
        let mask = local_blend_mask(
            &source_maps,
            &edit_maps,
            latent_h,
            latent_w,
            config.threshold,
            subtract,
        );
        let blended = blend_latents(source, edit, &mask)?;
        self.latest_mask = Some(mask);
        Ok(Some(blended))
    }

    /// Builds (or reuses) the device tensors.
    fn device_tensors(&mut self, device: &Device) -> candle_core::Result<&DeviceTensors> {
        let stale = self
            .tensors
            .as_ref()
            .is_none_or(|tensors| !tensors.device.same_device(device));
        if stale {
            let mapping = &self.alignment.mapping;
            let length = mapping.length;
            let blend_matrix = |weights: &[[f32; 2]]| {
                Tensor::from_vec(
                    weights.iter().flatten().copied().collect::<Vec<f32>>(),
                    (length, 2),
                    device,
                )
            };
            self.tensors = Some(DeviceTensors {
                device: device.clone(),
                mapping: Tensor::from_vec(mapping.weights.clone(), (length, length), device)?,
                alphas: Tensor::from_vec(mapping.alphas.clone(), length, device)?,
                equalizer: self
                    .equalizer
                    .as_ref()
                    .map(|scales| Tensor::from_vec(scales.clone(), length, device))
                    .transpose()?,
                source_blend_tokens: blend_matrix(&self.source_blend_weights)?,
                edit_blend_tokens: blend_matrix(&self.edit_blend_weights)?,
            });
            self.window_cache = None;
        }
        match &self.tensors {
            Some(tensors) => Ok(tensors),
            None => bail!("prompt-to-prompt: device tensors missing"),
        }
    }

    /// The edited item's new cross-attention `[heads, queries, keys]`, or `None` when every token's
    /// window is closed at this step.
    fn edit_cross(
        &mut self,
        site: &AttentionSite,
        source: &Tensor,
        own: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let window = self.cross_window_weights(site.step_index, site.step_count);
        let all_open = window.iter().all(|&weight| weight == 1.0);
        if window.iter().all(|&weight| weight == 0.0) {
            return Ok(None);
        }
        let keys = own.dim(2)?;
        let mapped = self.map_source_cross(source)?;
        let mixed = if self.fully_mapped {
            mapped
        } else {
            let tensors = self.device_tensors(own.device())?;
            let own_share = own.broadcast_mul(&tensors.alphas.affine(-1.0, 1.0)?)?;
            mapped.broadcast_mul(&tensors.alphas)?.add(&own_share)?
        };
        let reweighted = self.reweight_cross(mixed)?;
        if all_open {
            return Ok(Some(reweighted));
        }
        let device = own.device().clone();
        let window_tensor = match &self.window_cache {
            Some((step, count, tensor))
                if *step == site.step_index && *count == site.step_count =>
            {
                tensor.clone()
            }
            _ => {
                let tensor = Tensor::from_vec(window, keys, &device)?;
                self.window_cache = Some((site.step_index, site.step_count, tensor.clone()));
                tensor
            }
        };
        let own_share = own.broadcast_mul(&window_tensor.affine(-1.0, 1.0)?)?;
        Ok(Some(
            reweighted.broadcast_mul(&window_tensor)?.add(&own_share)?,
        ))
    }

    /// Adds the blend words' maps of this layer to the running sums.
    fn collect_blend_maps(
        &mut self,
        site: &AttentionSite,
        source: &Tensor,
        edit: &Tensor,
    ) -> candle_core::Result<()> {
        if self.local_blend.is_none()
            || site.kind != AttentionKind::Cross
            || site.place == UnetPlace::Mid
        {
            return Ok(());
        }
        let (heads, queries, keys) = edit.dims3()?;
        let tensors = self.device_tensors(edit.device())?;
        let word_sums = |probs: &Tensor, tokens: &Tensor| -> candle_core::Result<Tensor> {
            probs
                .reshape((heads * queries, keys))?
                .matmul(tokens)?
                .reshape((heads, queries, 2))?
                .sum(0)
        };
        let source_sum = word_sums(source, &tensors.source_blend_tokens)?;
        let edit_sum = word_sums(edit, &tensors.edit_blend_tokens)?;
        match self.blend_sums.get_mut(&(site.query_h, site.query_w)) {
            Some(sums) => {
                sums.source = (&sums.source + &source_sum)?;
                sums.edit = (&sums.edit + &edit_sum)?;
                sums.map_count += heads;
            }
            None => {
                self.blend_sums.insert(
                    (site.query_h, site.query_w),
                    GridSums {
                        source: source_sum,
                        edit: edit_sum,
                        map_count: heads,
                    },
                );
            }
        }
        Ok(())
    }
}

impl PromptToPrompt {
    /// Whether the local blend reads `site`'s maps (down and up cross-attention).
    fn reads_blend_maps(&self, site: &AttentionSite) -> bool {
        self.local_blend.is_some()
            && site.kind == AttentionKind::Cross
            && site.place != UnetPlace::Mid
    }

    /// In replay mode, the edited item when its attention at `site` is made from the recorded
    /// source's alone: self-attention where it is replaced; cross-attention where every token's
    /// window is open, every edited token is mapped to the source's and the local blend does not
    /// read the layer. `None` elsewhere (the layer's own probabilities are needed, or nothing is
    /// replaced).
    fn replayed_item(&self, site: &AttentionSite) -> Option<usize> {
        let SourceMode::Replay(_) = &self.mode else {
            return None;
        };
        let first_conditional = if site.cfg { site.batch / 2 } else { 0 };
        if site.batch.checked_sub(first_conditional) != Some(1) {
            return None;
        }
        let from_source = match site.kind {
            AttentionKind::SelfAttention => {
                self.replaces_self_attention(site.queries(), site.step_index, site.step_count)
            }
            AttentionKind::Cross => {
                self.fully_mapped
                    && !self.reads_blend_maps(site)
                    && site.keys == self.alignment.mapping.length
                    && self
                        .cross_window_weights(site.step_index, site.step_count)
                        .iter()
                        .all(|&weight| weight == 1.0)
            }
        };
        from_source.then_some(first_conditional)
    }

    /// The recorded source's probabilities `[heads, queries, keys]` at `site` (replay mode).
    fn recorded_source(
        recording: &SourceRecording,
        site: &AttentionSite,
    ) -> candle_core::Result<Tensor> {
        let Some(recorded) = recording.probabilities(site) else {
            bail!(
                "prompt-to-prompt (replay mode): no recorded source attention for {} at step {} \
                 (record the source run with the same steps and size)",
                site.module_path(),
                site.step_index
            );
        };
        if recorded.dims() != [site.heads, site.queries(), site.keys] {
            bail!(
                "prompt-to-prompt (replay mode): recorded source attention for {} is {:?}, \
                 expected [{}, {}, {}]",
                site.module_path(),
                recorded.dims(),
                site.heads,
                site.queries(),
                site.keys
            );
        }
        Ok(recorded.clone())
    }

    /// The source's cross-attention `[heads, queries, keys]` mapped onto the edited prompt's
    /// tokens.
    fn map_source_cross(&mut self, source: &Tensor) -> candle_core::Result<Tensor> {
        if self.identity_mapping {
            return Ok(source.clone());
        }
        let (heads, queries, keys) = source.dims3()?;
        let tensors = self.device_tensors(source.device())?;
        source
            .reshape((heads * queries, keys))?
            .matmul(&tensors.mapping)?
            .reshape((heads, queries, keys))
    }

    /// Cross-attention `[heads, queries, keys]` of the edited prompt with the reweight's scales.
    fn reweight_cross(&mut self, attention: Tensor) -> candle_core::Result<Tensor> {
        match &self.device_tensors(attention.device())?.equalizer {
            Some(equalizer) => crate::kernels::scale_last_dim(&attention, equalizer),
            None => Ok(attention),
        }
    }

    /// The edited item's cross-attention where every token is mapped and its window open: the
    /// source's, mapped and reweighted.
    fn mapped_source_cross(&mut self, source: &Tensor) -> candle_core::Result<Tensor> {
        let mapped = self.map_source_cross(source)?;
        self.reweight_cross(mapped)
    }
}

impl AttentionProcessor for PromptToPrompt {
    /// Cross-attention while a token's window is open or the local blend reads it (word edits,
    /// blend maps); self-attention only where it is replaced.
    fn wants_probabilities(&self, site: &AttentionSite) -> bool {
        match site.kind {
            AttentionKind::Cross => {
                self.reads_blend_maps(site)
                    || self
                        .cross_window_weights(site.step_index, site.step_count)
                        .iter()
                        .any(|&weight| weight != 0.0)
            }
            AttentionKind::SelfAttention => {
                self.replaces_self_attention(site.queries(), site.step_index, site.step_count)
            }
        }
    }

    /// Replay mode, where the edited item's attention comes from the recorded source alone (see
    /// `replayed_item`): the layer then skips the item's own probabilities.
    fn replaced_item(&self, site: &AttentionSite) -> Option<usize> {
        self.replayed_item(site)
    }

    fn replacement_probabilities(&mut self, site: &AttentionSite) -> candle_core::Result<Tensor> {
        let SourceMode::Replay(recording) = &self.mode else {
            bail!(
                "prompt-to-prompt: {} replaces probabilities only in replay mode",
                site.module_path()
            );
        };
        let source = Self::recorded_source(recording, site)?;
        match site.kind {
            AttentionKind::SelfAttention => Ok(source),
            AttentionKind::Cross => self.mapped_source_cross(&source),
        }
    }

    fn process_probabilities(
        &mut self,
        site: &AttentionSite,
        probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        check_shape(site, probs, "prompt-to-prompt")?;
        let first_conditional = if site.cfg { site.batch / 2 } else { 0 };
        let conditional_items = site.batch - first_conditional;
        let heads = site.heads;
        let (edit_item, source) = match &self.mode {
            SourceMode::Batch => {
                if conditional_items != 2 {
                    bail!(
                        "prompt-to-prompt (batch mode): {} has a batch of {} (CFG: {}); expected the source and \
                         the edited prompt in each half",
                        site.module_path(),
                        site.batch,
                        site.cfg
                    );
                }
                let source = probs.narrow(0, first_conditional * heads, heads)?;
                (first_conditional + 1, Some(source))
            }
            SourceMode::Replay(recording) => {
                if conditional_items != 1 {
                    bail!(
                        "prompt-to-prompt (replay mode): {} has a batch of {} (CFG: {}); expected the edited \
                         prompt alone",
                        site.module_path(),
                        site.batch,
                        site.cfg
                    );
                }
                let needed = match site.kind {
                    AttentionKind::Cross => true,
                    AttentionKind::SelfAttention => self.replaces_self_attention(
                        site.queries(),
                        site.step_index,
                        site.step_count,
                    ),
                };
                let source = if needed {
                    Some(Self::recorded_source(recording, site)?.to_device(probs.device())?)
                } else {
                    None
                };
                (first_conditional, source)
            }
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let own = probs.narrow(0, edit_item * heads, heads)?;
        let edited = match site.kind {
            AttentionKind::Cross => {
                if site.keys != self.alignment.mapping.length {
                    bail!(
                        "prompt-to-prompt: {} has {} keys but the prompts were aligned over {} tokens",
                        site.module_path(),
                        site.keys,
                        self.alignment.mapping.length
                    );
                }
                self.edit_cross(site, &source, &own)?
            }
            AttentionKind::SelfAttention => self
                .replaces_self_attention(site.queries(), site.step_index, site.step_count)
                .then(|| source.clone()),
        };
        self.collect_blend_maps(site, &source, edited.as_ref().unwrap_or(&own))?;
        let Some(edited) = edited else {
            return Ok(None);
        };
        let mut parts = Vec::with_capacity(3);
        if edit_item > 0 {
            parts.push(probs.narrow(0, 0, edit_item * heads)?);
        }
        parts.push(edited);
        let after = site.batch - edit_item - 1;
        if after > 0 {
            parts.push(probs.narrow(0, (edit_item + 1) * heads, after * heads)?);
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    }
}

/// Checks `probs` against the site's `[batch * heads, queries, keys]`.
pub(super) fn check_shape(
    site: &AttentionSite,
    probs: &Tensor,
    who: &str,
) -> candle_core::Result<()> {
    let expected = [site.batch * site.heads, site.queries(), site.keys];
    if probs.dims() != expected {
        bail!(
            "{who}: {} gave probabilities {:?}, expected {:?}",
            site.module_path(),
            probs.dims(),
            expected
        );
    }
    Ok(())
}

/// A user's local-blend mask at latent resolution: the mean of the mask cells each latent cell
/// covers (the nearest cell when the mask is coarser than the latent), 1 where it is at least 0.5.
fn user_blend_mask(
    mask: &BlendMask,
    latent_h: usize,
    latent_w: usize,
) -> PipelineResult<BlendMask> {
    if mask.h == 0 || mask.w == 0 || mask.data.len() != mask.h * mask.w {
        return Err(PipelineError::InvalidArgument {
            name: "local blend mask",
            reason: format!(
                "a {}x{} mask needs {} values, it has {}",
                mask.h,
                mask.w,
                mask.h * mask.w,
                mask.data.len()
            ),
        });
    }
    let span = |cell: usize, cells: usize, size: usize| {
        let first = cell * size / cells;
        let last = ((cell + 1) * size).div_ceil(cells).max(first + 1).min(size);
        first..last
    };
    let mut data = Vec::with_capacity(latent_h * latent_w);
    for y in 0..latent_h {
        let rows = span(y, latent_h, mask.h);
        for x in 0..latent_w {
            let columns = span(x, latent_w, mask.w);
            let count = (rows.len() * columns.len()).max(1) as f32;
            let sum: f32 = rows
                .clone()
                .flat_map(|row| mask.data[row * mask.w..(row + 1) * mask.w][columns.clone()].iter())
                .sum();
            data.push(if sum / count >= 0.5 { 1.0 } else { 0.0 });
        }
    }
    Ok(BlendMask {
        h: latent_h,
        w: latent_w,
        data,
    })
}

fn missing_word(name: &'static str, word: &str, edit: &PromptLayout<'_>) -> PipelineError {
    PipelineError::InvalidArgument {
        name,
        reason: format!(
            "{word:?} is not a word of the edited prompt (its words: {})",
            word_texts(edit)
        ),
    }
}

fn word_texts(prompt: &PromptLayout<'_>) -> String {
    prompt
        .words
        .iter()
        .map(|word| word.text.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests;
