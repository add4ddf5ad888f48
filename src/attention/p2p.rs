//! Prompt-to-Prompt (google/prompt-to-prompt, Hertz et al. 2022) as attention processors: the edited
//! prompt's attention is taken from the source prompt's, word by word.
//!
//! # The controls
//! | control | what the edited prompt's conditional attention becomes |
//! |---|---|
//! | replace / refine ([`crate::analysis::alignment`]) | cross: `alpha * (source @ mapping) + (1 - alpha) * own` per token |
//! | reweight ([`Reweight`]) | the above times a per-token scale (negative allowed, no renormalisation) |
//! | cross window ([`CrossWindow`]) | per token and step: the above inside the window, `own` outside |
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

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use candle_core::{bail, DType, Device, Tensor};

use crate::analysis::alignment::{
    align_prompts, word_token_indices, EditKind, PromptAlignment, PromptLayout,
};
use crate::analysis::heatmap::resize_nearest;
use crate::attention::{AttentionKind, AttentionProcessor, AttentionSite, UnetPlace};
use crate::pipeline::{PipelineError, PipelineResult};

/// A window of denoising steps, as fractions of the run (`0.0..=1.0`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepWindow {
    /// Fraction of the run where the window opens.
    pub start: f64,
    /// Fraction of the run where it closes (exclusive).
    pub end: f64,
}

impl StepWindow {
    /// The window from the first step to `end` (the reference's single-number form).
    pub fn until(end: f64) -> Self {
        Self { start: 0.0, end }
    }

    /// The window `start..end`.
    pub fn new(start: f64, end: f64) -> Self {
        Self { start, end }
    }

    /// Steps of a cross-attention window in a run of `step_count` steps:
    /// `floor(start * (N + 1)) .. floor(end * (N + 1))`, cut to `0..N`.
    pub fn cross_steps(&self, step_count: usize) -> Range<usize> {
        self.steps_over(step_count + 1, step_count)
    }

    /// Steps of a self-attention window (and of the local blend start) in a run of `step_count`
    /// steps: `floor(start * N) .. floor(end * N)`.
    pub fn self_steps(&self, step_count: usize) -> Range<usize> {
        self.steps_over(step_count, step_count)
    }

    fn steps_over(&self, table_rows: usize, step_count: usize) -> Range<usize> {
        let scaled = |fraction: f64| {
            let value = (fraction * table_rows as f64).floor();
            if value.is_nan() || value <= 0.0 {
                0
            } else {
                (value as usize).min(step_count)
            }
        };
        let start = scaled(self.start);
        start..scaled(self.end).max(start)
    }
}

/// The cross-attention replacement window: one for every token, with overrides for words of the
/// edited prompt (the reference's `{"default_": .., word: ..}` form).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CrossWindow {
    /// The window of every token without an override (including start, end and padding tokens).
    pub default: StepWindow,
    /// `(word of the edited prompt, window)`; every occurrence of the word gets the window.
    pub per_word: Vec<(String, StepWindow)>,
}

impl CrossWindow {
    /// The same window for every token.
    pub fn uniform(window: StepWindow) -> Self {
        Self {
            default: window,
            per_word: Vec::new(),
        }
    }
}

/// Self-attention replacement: inside the window, layers with at most `max_queries` queries take the
/// source's self-attention.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SelfReplace {
    /// Steps where the source's self-attention is used.
    pub window: StepWindow,
    /// Largest query count (`h * w`) of a layer that is replaced; 256 (16x16) in the reference.
    pub max_queries: usize,
}

impl Default for SelfReplace {
    fn default() -> Self {
        Self {
            window: StepWindow::until(0.4),
            max_queries: 16 * 16,
        }
    }
}

/// Scale the edited prompt's attention to a word (the reference's equalizer).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reweight {
    /// A word of the edited prompt; every occurrence is scaled.
    pub word: String,
    /// The factor; 1 changes nothing, 0 removes the word's attention, negative values invert it.
    pub scale: f32,
}

/// Local blend settings.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LocalBlendConfig {
    /// Words whose maps decide where the edited latent may change; each is looked up in both prompts
    /// (the source's occurrences in the source's attention, the edit's in the edited attention).
    pub words: Vec<String>,
    /// Words whose region must not change (optional).
    pub subtract_words: Vec<String>,
    /// Threshold on the max-normalised, max-pooled map. Default 0.3.
    pub threshold: f32,
    /// Threshold of the subtract-words' map (not pooled). Default 0.3.
    pub subtract_threshold: f32,
    /// The blend acts after each step from `floor(start_fraction * N)` on. Default 0.2.
    pub start_fraction: f64,
    /// Side of the cross-attention grid whose maps are used; `None`: the grid nearest a quarter of
    /// the latent side (16 for a 64x64 latent, as in the reference).
    pub map_side: Option<usize>,
}

impl Default for LocalBlendConfig {
    fn default() -> Self {
        Self {
            words: Vec::new(),
            subtract_words: Vec::new(),
            threshold: 0.3,
            subtract_threshold: 0.3,
            start_fraction: 0.2,
            map_side: None,
        }
    }
}

impl LocalBlendConfig {
    /// Default settings blending on these words.
    pub fn new(words: Vec<String>) -> Self {
        Self {
            words,
            ..Self::default()
        }
    }

    /// True when the blend acts after step `step_index` of a run of `step_count` steps.
    pub fn is_active(&self, step_index: usize, step_count: usize) -> bool {
        step_index
            >= StepWindow::until(self.start_fraction)
                .self_steps(step_count)
                .end
    }
}

/// Everything that defines an edit, as plain data (what a session file keeps).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EditSpec {
    /// The edited prompt.
    pub edit_prompt: String,
    /// Replace or refine; `None` infers it (same word count: replace).
    pub kind: Option<EditKind>,
    /// Cross-attention replacement window. Default `0.0..0.8`.
    pub cross_window: CrossWindow,
    /// Self-attention replacement. Default `0.0..0.4`, layers up to 16x16.
    pub self_replace: SelfReplace,
    /// Per-word scales applied after replace/refine.
    pub reweights: Vec<Reweight>,
    /// Local blend; `None` lets the whole image change.
    pub local_blend: Option<LocalBlendConfig>,
}

impl EditSpec {
    /// The reference's typical settings (cross 0.8, self 0.4, no reweight, no blend) for this prompt.
    pub fn new(edit_prompt: impl Into<String>) -> Self {
        Self {
            edit_prompt: edit_prompt.into(),
            kind: None,
            cross_window: CrossWindow::uniform(StepWindow::until(0.8)),
            self_replace: SelfReplace::default(),
            reweights: Vec::new(),
            local_blend: None,
        }
    }
}

/// A binary mask at latent resolution (1 where the edited latent may change).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BlendMask {
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
    /// `[h, w]`, row-major, 0 or 1.
    pub data: Vec<f32>,
}

impl BlendMask {
    /// Fraction of cells that are 1.
    pub fn coverage(&self) -> f32 {
        if self.data.is_empty() {
            return 0.0;
        }
        self.data.iter().sum::<f32>() / self.data.len() as f32
    }
}

/// The local blend's word maps of one prompt at one grid: means over heads, layers and the steps so
/// far.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BlendWordMaps {
    /// Grid rows.
    pub h: usize,
    /// Grid columns.
    pub w: usize,
    /// `[h, w]`: the blend words' attention summed over their tokens.
    pub words: Vec<f32>,
    /// `[h, w]`: the subtract-words' attention summed over their tokens (zeros without any).
    pub subtract_words: Vec<f32>,
}

/// The local-blend mask (see the module docs): per prompt, the words' map max-pooled 3x3, resized to
/// `latent_h x latent_w` (nearest), divided by its maximum and compared with `threshold`; the two
/// prompts' masks are united; when `subtract_threshold` is given, the subtract-words' maps (not
/// pooled, same normalisation) are united likewise and removed. A prompt whose map is all zero
/// contributes nothing.
pub fn local_blend_mask(
    source: &BlendWordMaps,
    edit: &BlendWordMaps,
    latent_h: usize,
    latent_w: usize,
    threshold: f32,
    subtract_threshold: Option<f32>,
) -> BlendMask {
    let cells = latent_h * latent_w;
    let region = |maps: &BlendWordMaps, data: &[f32], pool: bool, threshold: f32| -> Vec<bool> {
        if data.len() != maps.h * maps.w || data.is_empty() {
            return vec![false; cells];
        }
        let pooled = if pool {
            max_pool_3x3(data, maps.h, maps.w)
        } else {
            data.to_vec()
        };
        let resized = resize_nearest(&pooled, maps.h, maps.w, latent_h, latent_w);
        let max = resized.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max.is_nan() || max <= 0.0 {
            return vec![false; cells];
        }
        resized
            .iter()
            .map(|&value| value / max > threshold)
            .collect()
    };
    let mut mask: Vec<bool> = region(source, &source.words, true, threshold)
        .into_iter()
        .zip(region(edit, &edit.words, true, threshold))
        .map(|(in_source, in_edit)| in_source || in_edit)
        .collect();
    if let Some(subtract_threshold) = subtract_threshold {
        let source_sub = region(source, &source.subtract_words, false, subtract_threshold);
        let edit_sub = region(edit, &edit.subtract_words, false, subtract_threshold);
        for ((keep, in_source), in_edit) in mask.iter_mut().zip(source_sub).zip(edit_sub) {
            *keep = *keep && !(in_source || in_edit);
        }
    }
    BlendMask {
        h: latent_h,
        w: latent_w,
        data: mask
            .into_iter()
            .map(|inside| if inside { 1.0 } else { 0.0 })
            .collect(),
    }
}

/// 3x3 max-pool with stride 1; cells outside the grid are ignored (PyTorch pads with -inf).
fn max_pool_3x3(data: &[f32], h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![f32::NEG_INFINITY; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut best = f32::NEG_INFINITY;
            for ny in y.saturating_sub(1)..(y + 2).min(h) {
                for nx in x.saturating_sub(1)..(x + 2).min(w) {
                    best = best.max(data[ny * w + nx]);
                }
            }
            out[y * w + x] = best;
        }
    }
    out
}

/// `x_src + mask * (x_edit - x_src)`: `source` and `edit` `[1, channels, h, w]`, `mask` `[h, w]`
/// (broadcast over channels). Cells inside the mask take the edited latent, the others the source's,
/// both exactly.
pub fn blend_latents(source: &Tensor, edit: &Tensor, mask: &BlendMask) -> PipelineResult<Tensor> {
    let (_, _, h, w) = edit.dims4()?;
    if (mask.h, mask.w) != (h, w) || mask.data.len() != h * w {
        return Err(PipelineError::InvalidArgument {
            name: "local blend mask",
            reason: format!(
                "mask is {}x{} with {} values, latents are {h}x{w}",
                mask.h,
                mask.w,
                mask.data.len()
            ),
        });
    }
    if source.dims() != edit.dims() {
        return Err(PipelineError::InvalidArgument {
            name: "local blend latents",
            reason: format!(
                "source latents {:?} and edited latents {:?} differ in shape",
                source.dims(),
                edit.dims()
            ),
        });
    }
    // The mask is 0/1, so the blend is a selection; selecting keeps both sides bit-exact.
    let inside: Vec<u8> = mask
        .data
        .iter()
        .map(|&value| u8::from(value > 0.5))
        .collect();
    let inside = Tensor::from_vec(inside, (1, 1, h, w), edit.device())?
        .broadcast_as(edit.shape())?
        .contiguous()?;
    Ok(inside.where_cond(edit, source)?)
}

/// Identifies one attention layer (its [`AttentionSite`] without the per-call fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct LayerKey {
    place: UnetPlace,
    block_index: usize,
    attention_index: usize,
    layer_index: usize,
    kind: AttentionKind,
}

impl LayerKey {
    fn of(site: &AttentionSite) -> Self {
        Self {
            place: site.place,
            block_index: site.block_index,
            attention_index: site.attention_index,
            layer_index: site.layer_index,
            kind: site.kind,
        }
    }
}

/// What a [`SourceRecorder`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordConfig {
    /// Self-attention is kept for layers with at most this many queries (the largest
    /// [`SelfReplace::max_queries`] the replay may use). Default 256 (16x16).
    pub self_max_queries: usize,
    /// Which item of the conditional half is the source. Default 0.
    pub batch_item: usize,
}

impl Default for RecordConfig {
    fn default() -> Self {
        Self {
            self_max_queries: 16 * 16,
            batch_item: 0,
        }
    }
}

/// The source run's attention and latents, for replaying an edit without re-running the source.
#[derive(Debug, Default)]
pub struct SourceRecording {
    config: RecordConfig,
    /// `(step, layer)` -> `[heads, queries, keys]`, f32.
    probabilities: HashMap<(usize, LayerKey), Tensor>,
    /// Latents after each step, `[1, channels, h, w]`.
    latents: BTreeMap<usize, Tensor>,
    /// Steps of the run (from the sites seen).
    step_count: usize,
}

impl SourceRecording {
    /// The recorded `[heads, queries, keys]` probabilities of this layer at this step.
    pub fn probabilities(&self, site: &AttentionSite) -> Option<&Tensor> {
        self.probabilities
            .get(&(site.step_index, LayerKey::of(site)))
    }

    /// Keeps the source's latents after step `step_index` (`[1, channels, h, w]`), for local blend.
    pub fn record_latents(&mut self, step_index: usize, latents: &Tensor) {
        self.latents.insert(step_index, latents.clone());
    }

    /// The source's latents after step `step_index`.
    pub fn latents_after_step(&self, step_index: usize) -> Option<&Tensor> {
        self.latents.get(&step_index)
    }

    /// Steps of the recorded run (0 before anything was recorded).
    pub fn step_count(&self) -> usize {
        self.step_count
    }

    /// The settings it was recorded with.
    pub fn config(&self) -> &RecordConfig {
        &self.config
    }

    /// Number of `(step, layer)` probability tensors held.
    pub fn layer_step_count(&self) -> usize {
        self.probabilities.len()
    }

    /// Bytes held by the recorded probabilities and latents.
    pub fn stored_bytes(&self) -> usize {
        self.probabilities
            .values()
            .chain(self.latents.values())
            .map(|tensor| tensor.elem_count() * tensor.dtype().size_in_bytes())
            .sum()
    }
}

/// Records the source run's conditional attention (every cross layer, self layers up to
/// [`RecordConfig::self_max_queries`] queries, every step, all heads) without changing it.
#[derive(Debug, Default)]
pub struct SourceRecorder {
    recording: SourceRecording,
}

impl SourceRecorder {
    /// An empty recorder.
    pub fn new(config: RecordConfig) -> Self {
        Self {
            recording: SourceRecording {
                config,
                ..SourceRecording::default()
            },
        }
    }

    /// The recording so far (e.g. to add the latents after each step).
    pub fn recording_mut(&mut self) -> &mut SourceRecording {
        &mut self.recording
    }

    /// The finished recording, shareable between replays.
    pub fn finish(self) -> Arc<SourceRecording> {
        Arc::new(self.recording)
    }
}

impl AttentionProcessor for SourceRecorder {
    fn process_probabilities(
        &mut self,
        site: &AttentionSite,
        probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if site.kind == AttentionKind::SelfAttention
            && site.queries() > self.recording.config.self_max_queries
        {
            return Ok(None);
        }
        let first_conditional = if site.cfg { site.batch / 2 } else { 0 };
        let item = first_conditional + self.recording.config.batch_item;
        if item >= site.batch {
            bail!(
                "source recorder: batch_item {} is outside the conditional half of a batch of {} at {}",
                self.recording.config.batch_item,
                site.batch,
                site.module_path()
            );
        }
        check_shape(site, probs, "source recorder")?;
        // A copy, so the recording does not keep the whole batch's tensor alive.
        let kept = probs
            .narrow(0, item * site.heads, site.heads)?
            .to_dtype(DType::F32)?
            .copy()?;
        self.recording
            .probabilities
            .insert((site.step_index, LayerKey::of(site)), kept);
        self.recording.step_count = self.recording.step_count.max(site.step_count);
        Ok(None)
    }
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
            if blend.words.is_empty() {
                return Err(PipelineError::InvalidArgument {
                    name: "local blend",
                    reason: "no words given".into(),
                });
            }
            for (column, words) in [(0, &blend.words), (1, &blend.subtract_words)] {
                for word in words {
                    let source_tokens = word_token_indices(source.words, word);
                    let edit_tokens = word_token_indices(edit.words, word);
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
        let (heads, queries, keys) = own.dims3()?;
        let identity = self.identity_mapping;
        let fully_mapped = self.fully_mapped;
        let tensors = self.device_tensors(own.device())?;
        let mapped = if identity {
            source.clone()
        } else {
            source
                .reshape((heads * queries, keys))?
                .matmul(&tensors.mapping)?
                .reshape((heads, queries, keys))?
        };
        let mixed = if fully_mapped {
            mapped
        } else {
            let own_share = own.broadcast_mul(&tensors.alphas.affine(-1.0, 1.0)?)?;
            mapped.broadcast_mul(&tensors.alphas)?.add(&own_share)?
        };
        let reweighted = match &tensors.equalizer {
            Some(equalizer) => mixed.broadcast_mul(equalizer)?,
            None => mixed,
        };
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

impl AttentionProcessor for PromptToPrompt {
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
                    let Some(recorded) = recording.probabilities(site) else {
                        bail!(
                            "prompt-to-prompt (replay mode): no recorded source attention for {} at step {} \
                             (record the source run with the same steps and size)",
                            site.module_path(),
                            site.step_index
                        );
                    };
                    if recorded.dims() != [heads, site.queries(), site.keys] {
                        bail!(
                            "prompt-to-prompt (replay mode): recorded source attention for {} is {:?}, \
                             expected [{heads}, {}, {}]",
                            site.module_path(),
                            recorded.dims(),
                            site.queries(),
                            site.keys
                        );
                    }
                    Some(recorded.to_device(probs.device())?)
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

/// Runs several processors in turn on every layer, each seeing the probabilities the previous one
/// returned (e.g. [`PromptToPrompt`] then an attention store that records what was used).
pub struct ChainedProcessors<'a> {
    processors: Vec<&'a mut dyn AttentionProcessor>,
}

impl<'a> ChainedProcessors<'a> {
    /// The processors, called in this order.
    pub fn new(processors: Vec<&'a mut dyn AttentionProcessor>) -> Self {
        Self { processors }
    }
}

impl AttentionProcessor for ChainedProcessors<'_> {
    fn process_probabilities(
        &mut self,
        site: &AttentionSite,
        probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut current: Option<Tensor> = None;
        for processor in &mut self.processors {
            let input = current.as_ref().unwrap_or(probs);
            if let Some(replaced) = processor.process_probabilities(site, input)? {
                current = Some(replaced);
            }
        }
        Ok(current)
    }

    fn process_keys_values(
        &mut self,
        site: &AttentionSite,
        keys: &Tensor,
        values: &Tensor,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let mut current: Option<(Tensor, Tensor)> = None;
        for processor in &mut self.processors {
            let (input_keys, input_values) = match &current {
                Some((keys, values)) => (keys, values),
                None => (keys, values),
            };
            if let Some(replaced) = processor.process_keys_values(site, input_keys, input_values)? {
                current = Some(replaced);
            }
        }
        Ok(current)
    }
    fn step_finished(&mut self, step_index: usize) -> candle_core::Result<()> {
        for processor in &mut self.processors {
            processor.step_finished(step_index)?;
        }
        Ok(())
    }
}

/// The grid to build the blend mask from: the configured side, else the one nearest a quarter of the
/// latent side (ties: the larger grid).
fn choose_grid<'a>(
    grids: impl Iterator<Item = &'a (usize, usize)>,
    map_side: Option<usize>,
    latent_h: usize,
    latent_w: usize,
) -> Option<&'a (usize, usize)> {
    let target = map_side.unwrap_or(latent_h.max(latent_w) / 4).max(1);
    grids.min_by_key(|&&(h, w)| {
        let side = h.max(w);
        (side.abs_diff(target), std::cmp::Reverse(side))
    })
}

/// Checks `probs` against the site's `[batch * heads, queries, keys]`.
fn check_shape(site: &AttentionSite, probs: &Tensor, who: &str) -> candle_core::Result<()> {
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
