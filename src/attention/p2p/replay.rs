//! Replay mode: the source run's attention and latents, recorded for edited-only runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{bail, DType, Tensor};

use super::check_shape;
use crate::analysis::heatmap::UnetPlace;
use crate::hook::{AttentionKind, AttentionProcessor, AttentionSite};

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
    /// [`crate::analysis::edit_spec::SelfReplace::max_queries`] the replay may use). Default 256
    /// (16x16).
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
    fn wants_probabilities(&self, site: &AttentionSite) -> bool {
        site.kind == AttentionKind::Cross
            || site.queries() <= self.recording.config.self_max_queries
    }

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
