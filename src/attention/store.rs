//! [`AttentionStore`]: an [`AttentionProcessor`] that records attention for heat maps, probes and
//! export, without changing it.
//!
//! # What is kept
//! - **Cross-attention, every step**: for each (place, query grid) group, the conditional half's
//!   probabilities averaged over heads and over the group's layers, cut to the prompt's tokens:
//!   `[tokens, h, w]`. Memory grows with the steps: `token_count * Σ h·w` floats per step over the
//!   groups (one map per group, not per layer). SD 1.x at 512 px has groups down 64², 32², 16²,
//!   mid 8², up 16², 32², 64²: 10,816 cells, so 77 tokens take 3.3 MB per step and a 10-token prompt
//!   0.43 MB (50 steps: 165 MB and 22 MB).
//! - **Self-attention, bounded**: for query grids with `max(h, w) <= self_max_side`, per (place, grid)
//!   the `[h·w, h·w]` matrix averaged over heads and layers, for the latest step plus a running sum over
//!   steps, so memory does not grow with the steps: `2 * Σ (h·w)²` floats, 17.9 MB for SD 1.x at
//!   512 px with the default side 32 (down and up at 32² and 16², mid 8²).
//!
//! During a step each group's layers are summed into one plain `[queries, keys]` buffer: the fused
//! attention kernel adds its head mean straight into it
//! ([`AttentionProcessor::head_mean_sum`]), a layer that materialises its probabilities has them
//! averaged and added. Each group is turned into its map once, when the step is finished (at the
//! first call of the next step, or by [`AttentionStore::finish_step`]).

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::analysis::heatmap::UnetPlace;
use crate::analysis::heatmap::{CrossGroup, SelfAttentionMap, SelfAttentionSpan, StepCross};
use crate::hook::{AttentionKind, AttentionProcessor, AttentionSite};
use crate::kernels;
use crate::pipeline::PipelineResult;

/// What [`AttentionStore`] keeps.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreConfig {
    /// Tokens kept of each cross-attention map: the prompt's real tokens including the start and end
    /// token (the padding is dropped). Default 77 (all).
    pub token_count: usize,
    /// Self-attention is kept for query grids with `max(h, w) <= self_max_side`. Default 32, which
    /// skips the 64x64 layers of a 512 px image (a 4096 x 4096 matrix each).
    pub self_max_side: usize,
    /// Keep self-attention at all. Default true.
    pub keep_self: bool,
    /// Which item of the conditional half to record when it holds several prompts (Prompt-to-Prompt
    /// edits run alongside the source prompt). Default 0, the first prompt.
    pub batch_item: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            token_count: 77,
            self_max_side: 32,
            keep_self: true,
            batch_item: 0,
        }
    }
}

impl StoreConfig {
    /// Default settings keeping `token_count` tokens (start + prompt tokens + end).
    pub fn new(token_count: usize) -> Self {
        Self {
            token_count,
            ..Self::default()
        }
    }
}

/// (place, query grid height, query grid width).
type GroupKey = (UnetPlace, usize, usize);

/// Sum of the head-averaged maps of the layers of one group seen so far in the current step.
struct PendingSum {
    /// `[queries, keys]`: cross-attention's keys are the text's (all of them, cut to the prompt's
    /// tokens when the step is finished), self-attention's the queries.
    sum: Vec<f32>,
    keys: usize,
    layer_count: usize,
}

/// Self-attention of one (place, grid): the latest step and a running sum over steps.
struct SelfAccumulator {
    /// Step index of `latest_sum`.
    latest_step_index: usize,
    /// `[q, q]`: sum of the head-averaged layer maps of the latest step.
    latest_sum: Vec<f32>,
    /// Layer calls summed into `latest_sum`.
    latest_layer_count: usize,
    /// `[q, q]`: sum over all steps of the head-averaged layer maps.
    total_sum: Vec<f32>,
    /// Layer calls summed into `total_sum`.
    total_layer_count: usize,
    /// Steps summed into `total_sum`.
    step_count: usize,
}

/// Records attention maps during sampling (see the module docs for what and how much). It never
/// replaces the probabilities. Call [`AttentionStore::clear`] between runs.
pub struct AttentionStore {
    config: StoreConfig,
    /// Step whose maps are being accumulated in `pending_*`.
    current_step: Option<usize>,
    pending_cross: BTreeMap<GroupKey, PendingSum>,
    pending_self: BTreeMap<GroupKey, PendingSum>,
    steps: Vec<StepCross>,
    self_attention: BTreeMap<GroupKey, SelfAccumulator>,
}

impl AttentionStore {
    /// An empty store.
    pub fn new(config: StoreConfig) -> Self {
        Self {
            config,
            current_step: None,
            pending_cross: BTreeMap::new(),
            pending_self: BTreeMap::new(),
            steps: Vec::new(),
            self_attention: BTreeMap::new(),
        }
    }

    /// The settings it was made with.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Forgets everything (call before a new run).
    pub fn clear(&mut self) {
        *self = Self::new(self.config.clone());
    }

    /// True while maps of a step are accumulated but not yet converted (see [`Self::finish_step`]).
    pub fn has_pending_step(&self) -> bool {
        self.current_step.is_some()
    }

    /// Converts the maps of the step in progress into plain data, making them visible to the getters.
    /// Happens by itself at the first attention call of the next step; call it after the last UNet
    /// call of a step to see that step now (the worker does, after every step). Calling it in the
    /// middle of a step splits that step in two.
    pub fn finish_step(&mut self) -> PipelineResult<()> {
        Ok(self.convert_pending()?)
    }

    /// Completed steps' cross-attention, in the order they ran.
    pub fn steps(&self) -> &[StepCross] {
        &self.steps
    }

    /// The most recent completed step's cross-attention.
    pub fn latest_step(&self) -> Option<&StepCross> {
        self.steps.last()
    }

    /// The cross-attention of the step with this index (the latest if it ran more than once).
    pub fn step(&self, step_index: usize) -> Option<&StepCross> {
        self.steps
            .iter()
            .rev()
            .find(|step| step.step_index == step_index)
    }

    /// Query grids `(h, w)` with self-attention kept, ascending.
    pub fn self_attention_resolutions(&self) -> Vec<(usize, usize)> {
        let mut resolutions: Vec<(usize, usize)> = self
            .self_attention
            .keys()
            .map(|&(_, h, w)| (h, w))
            .collect();
        resolutions.sort_unstable();
        resolutions.dedup();
        resolutions
    }

    /// Self-attention at query grid `h x w`, averaged over heads, layers and the given places
    /// (weighted by layer count), for the latest step or as the mean over steps. `None` when nothing
    /// was kept there. For [`SelfAttentionSpan::LatestStep`], places whose latest map is older than
    /// the newest one are left out.
    pub fn self_attention(
        &self,
        h: usize,
        w: usize,
        places: &[UnetPlace],
        span: SelfAttentionSpan,
    ) -> Option<SelfAttentionMap> {
        let selected: Vec<&SelfAccumulator> = self
            .self_attention
            .iter()
            .filter(|(&(place, map_h, map_w), _)| {
                map_h == h && map_w == w && places.contains(&place)
            })
            .map(|(_, accumulator)| accumulator)
            .collect();
        let newest_step = selected
            .iter()
            .map(|accumulator| accumulator.latest_step_index)
            .max()?;
        let cells = h * w;
        let mut data = vec![0.0f32; cells * cells];
        let mut layer_count = 0usize;
        let mut step_count = 0usize;
        for accumulator in selected {
            let (sum, layers, steps) = match span {
                SelfAttentionSpan::LatestStep if accumulator.latest_step_index != newest_step => {
                    continue
                }
                SelfAttentionSpan::LatestStep => {
                    (&accumulator.latest_sum, accumulator.latest_layer_count, 1)
                }
                SelfAttentionSpan::MeanOverSteps => (
                    &accumulator.total_sum,
                    accumulator.total_layer_count,
                    accumulator.step_count,
                ),
            };
            data.iter_mut()
                .zip(sum)
                .for_each(|(total, value)| *total += value);
            layer_count += layers;
            step_count = step_count.max(steps);
        }
        if layer_count == 0 {
            return None;
        }
        let scale = 1.0 / layer_count as f32;
        data.iter_mut().for_each(|value| *value *= scale);
        Some(SelfAttentionMap {
            h,
            w,
            layer_count,
            step_count,
            data,
        })
    }

    /// Cross-attention of every completed step per query grid, for export: `(h, w)` ->
    /// `[steps, tokens, h, w]`, places and layers averaged (weighted by layer count). A step without
    /// maps at that grid contributes zeros.
    pub fn cross_by_resolution(&self) -> BTreeMap<(usize, usize), Vec<f32>> {
        let mut shapes: BTreeMap<(usize, usize), usize> = BTreeMap::new();
        for group in self.steps.iter().flat_map(|step| &step.groups) {
            shapes
                .entry((group.h, group.w))
                .or_insert(group.token_count);
        }
        let step_count = self.steps.len();
        let mut result = BTreeMap::new();
        for (&(h, w), &token_count) in &shapes {
            let step_size = token_count * h * w;
            let mut data = vec![0.0f32; step_count * step_size];
            for (step, out) in self.steps.iter().zip(data.chunks_exact_mut(step_size)) {
                let mut layers = 0usize;
                for group in step.groups.iter().filter(|group| {
                    (group.h, group.w) == (h, w)
                        && group.token_count == token_count
                        && group.data.len() == step_size
                }) {
                    let weight = group.layer_count as f32;
                    out.iter_mut()
                        .zip(&group.data)
                        .for_each(|(total, value)| *total += weight * value);
                    layers += group.layer_count;
                }
                if layers > 0 {
                    let scale = 1.0 / layers as f32;
                    out.iter_mut().for_each(|value| *value *= scale);
                }
            }
            result.insert((h, w), data);
        }
        result
    }

    /// Floats held as plain data (cross maps of all steps plus self-attention), to check the memory
    /// bound; the maps of the step in progress are not counted.
    pub fn stored_floats(&self) -> usize {
        let cross: usize = self
            .steps
            .iter()
            .flat_map(|step| &step.groups)
            .map(|group| group.data.len())
            .sum();
        let self_maps: usize = self
            .self_attention
            .values()
            .map(|map| map.latest_sum.len() + map.total_sum.len())
            .sum();
        cross + self_maps
    }

    /// Converts the pending tensors into a [`StepCross`] and the self-attention accumulators.
    fn convert_pending(&mut self) -> candle_core::Result<()> {
        let Some(step_index) = self.current_step.take() else {
            return Ok(());
        };
        let mut groups = Vec::with_capacity(self.pending_cross.len());
        for ((place, h, w), pending) in std::mem::take(&mut self.pending_cross) {
            // `[queries, keys]` sums -> `[tokens, queries]` means.
            let token_count = self.config.token_count.min(pending.keys);
            let scale = 1.0 / pending.layer_count.max(1) as f32;
            let mut data = Vec::with_capacity(token_count * h * w);
            for token in 0..token_count {
                data.extend(
                    pending
                        .sum
                        .iter()
                        .skip(token)
                        .step_by(pending.keys)
                        .map(|&value| value * scale),
                );
            }
            groups.push(CrossGroup {
                place,
                h,
                w,
                layer_count: pending.layer_count,
                token_count,
                data,
            });
        }
        if !groups.is_empty() {
            self.steps.push(StepCross { step_index, groups });
        }
        for (key, pending) in std::mem::take(&mut self.pending_self) {
            let latest_sum = pending.sum;
            let accumulator = self
                .self_attention
                .entry(key)
                .or_insert_with(|| SelfAccumulator {
                    latest_step_index: step_index,
                    latest_sum: Vec::new(),
                    latest_layer_count: 0,
                    total_sum: kernels::zeros(latest_sum.len()),
                    total_layer_count: 0,
                    step_count: 0,
                });
            if accumulator.total_sum.len() != latest_sum.len() {
                candle_core::bail!(
                    "attention store: self-attention at {}x{} changed size from {} to {} values",
                    key.1,
                    key.2,
                    accumulator.total_sum.len(),
                    latest_sum.len()
                );
            }
            kernels::add_slice_into(&mut accumulator.total_sum, &latest_sum);
            accumulator.total_layer_count += pending.layer_count;
            accumulator.step_count += 1;
            accumulator.latest_step_index = step_index;
            accumulator.latest_sum = latest_sum;
            accumulator.latest_layer_count = pending.layer_count;
        }
        Ok(())
    }

    /// Whether `site` (a self-attention layer) is one whose maps the store keeps.
    fn keeps_self_attention(&self, site: &AttentionSite) -> bool {
        self.config.keep_self && site.query_h.max(site.query_w) <= self.config.self_max_side
    }

    /// `[queries, keys]` f32: the recorded batch item's probabilities averaged over heads.
    fn head_mean(&self, site: &AttentionSite, probs: &Tensor) -> candle_core::Result<Tensor> {
        let (batch_heads, queries, keys) = probs.dims3()?;
        if batch_heads != site.batch * site.heads || queries != site.queries() || keys != site.keys
        {
            candle_core::bail!(
                "attention store: {} gave probabilities {:?}, expected [{} x {} heads, {}, {}]",
                site.module_path(),
                probs.dims(),
                site.batch,
                site.heads,
                site.queries(),
                site.keys
            );
        }
        let Some(item) = self.recorded_item(site) else {
            candle_core::bail!(
                "attention store: batch_item {} is outside the conditional half of a batch of {} at {}",
                self.config.batch_item,
                site.batch,
                site.module_path()
            );
        };
        kernels::mean_of_planes(&probs.narrow(0, item * site.heads, site.heads)?)
    }
}

impl AttentionStore {
    /// The batch row the store records at `site` (the configured item of the conditional half),
    /// `None` when it lies outside the batch.
    fn recorded_item(&self, site: &AttentionSite) -> Option<usize> {
        let first_recorded = if site.cfg { site.batch / 2 } else { 0 };
        Some(first_recorded + self.config.batch_item).filter(|&item| item < site.batch)
    }

    /// Whether the store keeps anything of `site`.
    fn keeps(&self, site: &AttentionSite) -> bool {
        match site.kind {
            AttentionKind::Cross => true,
            AttentionKind::SelfAttention => self.keeps_self_attention(site),
        }
    }

    /// The step's sum `[queries, keys]` of `site`'s group, counting one more layer in it: the
    /// recorded item's head mean at `site` is to be added to it. Finishes the previous step first
    /// when `site` is in a new one.
    fn layer_sum(&mut self, site: &AttentionSite) -> candle_core::Result<&mut [f32]> {
        if self.current_step != Some(site.step_index) {
            self.convert_pending()?;
            self.current_step = Some(site.step_index);
        }
        let key = (site.place, site.query_h, site.query_w);
        let pending = match site.kind {
            AttentionKind::Cross => &mut self.pending_cross,
            AttentionKind::SelfAttention => &mut self.pending_self,
        };
        let len = site.queries() * site.keys;
        let entry = pending.entry(key).or_insert_with(|| PendingSum {
            sum: kernels::zeros(len),
            keys: site.keys,
            layer_count: 0,
        });
        if entry.keys != site.keys || entry.sum.len() != len {
            candle_core::bail!(
                "attention store: {} has {} queries x {} keys, another layer of its group had {} \
                 values with {} keys",
                site.module_path(),
                site.queries(),
                site.keys,
                entry.sum.len(),
                entry.keys
            );
        }
        entry.layer_count += 1;
        Ok(&mut entry.sum)
    }
}

impl AttentionProcessor for AttentionStore {
    /// The store reads only head means, which the fused kernel computes: it wants the
    /// probabilities only where its batch item is missing (so that `process_probabilities` names
    /// the problem).
    fn wants_probabilities(&self, site: &AttentionSite) -> bool {
        self.keeps(site) && self.recorded_item(site).is_none()
    }

    fn observed_head_mean(&self, site: &AttentionSite) -> Option<usize> {
        self.recorded_item(site).filter(|_| self.keeps(site))
    }

    fn head_mean_sum(&mut self, site: &AttentionSite) -> candle_core::Result<Option<&mut [f32]>> {
        if !self.keeps(site) {
            return Ok(None);
        }
        self.layer_sum(site).map(Some)
    }

    fn process_probabilities(
        &mut self,
        site: &AttentionSite,
        probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if self.keeps(site) {
            let mean = self.head_mean(site, probs)?;
            kernels::add_into(self.layer_sum(site)?, &mean)?;
        }
        Ok(None)
    }

    /// Converts the finished step's sums into plain data, so that [`AttentionStore::latest_step`]
    /// shows it while the run goes on.
    fn step_finished(&mut self, _step_index: usize) -> candle_core::Result<()> {
        self.convert_pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn site(
        place: UnetPlace,
        kind: AttentionKind,
        side: usize,
        keys: usize,
        step_index: usize,
    ) -> AttentionSite {
        AttentionSite {
            place,
            block_index: 0,
            attention_index: 0,
            layer_index: 0,
            kind,
            query_h: side,
            query_w: side,
            heads: 2,
            keys,
            batch: 2,
            cfg: true,
            step_index,
            step_count: 4,
        }
    }

    /// `[batch * heads, queries, keys]` with `value(batch, head, query, key)`.
    fn probs(site: &AttentionSite, value: impl Fn(usize, usize, usize, usize) -> f32) -> Tensor {
        let (queries, keys) = (site.queries(), site.keys);
        let mut data = Vec::with_capacity(site.batch * site.heads * queries * keys);
        for batch in 0..site.batch {
            for head in 0..site.heads {
                for query in 0..queries {
                    for key in 0..keys {
                        data.push(value(batch, head, query, key));
                    }
                }
            }
        }
        Tensor::from_vec(data, (site.batch * site.heads, queries, keys), &Device::Cpu).unwrap()
    }

    /// Conditional-half value: dyadic fractions, so head means are exact in f32.
    fn conditional(head: usize, query: usize, key: usize) -> f32 {
        (head * 64 + query * 8 + key) as f32 / 256.0
    }

    #[test]
    fn cross_keeps_conditional_half_heads_averaged_exactly() {
        let mut store = AttentionStore::new(StoreConfig::new(3));
        let cross = site(UnetPlace::Down, AttentionKind::Cross, 2, 5, 0);
        let input = probs(&cross, |batch, head, query, key| {
            if batch == 0 {
                1000.0 // the unconditional half must be ignored
            } else {
                conditional(head, query, key)
            }
        });
        assert!(store
            .process_probabilities(&cross, &input)
            .unwrap()
            .is_none());
        assert!(store.steps().is_empty() && store.has_pending_step());
        store.finish_step().unwrap();

        let step = store.latest_step().unwrap();
        assert_eq!(step.step_index, 0);
        let group = &step.groups[0];
        assert_eq!(
            (
                group.place,
                group.h,
                group.w,
                group.layer_count,
                group.token_count
            ),
            (UnetPlace::Down, 2, 2, 1, 3)
        );
        let mut max_diff = 0.0f32;
        for token in 0..3 {
            for query in 0..4 {
                let expected = (conditional(0, query, token) + conditional(1, query, token)) / 2.0;
                max_diff = max_diff.max((group.data[token * 4 + query] - expected).abs());
            }
        }
        eprintln!("store head mean max abs diff: {max_diff:e}");
        assert_eq!(max_diff, 0.0);
    }

    #[test]
    fn layers_average_per_group_and_steps_split() {
        let mut store = AttentionStore::new(StoreConfig::new(2));
        for step in 0..2 {
            for layer_value in [0.25f32, 0.75] {
                let cross = site(UnetPlace::Up, AttentionKind::Cross, 1, 4, step);
                let input = probs(&cross, |_, _, _, _| layer_value + step as f32);
                store.process_probabilities(&cross, &input).unwrap();
            }
            let mid = site(UnetPlace::Mid, AttentionKind::Cross, 1, 4, step);
            store
                .process_probabilities(&mid, &probs(&mid, |_, _, _, _| 0.125))
                .unwrap();
        }
        // Step 0 was converted when step 1 began; step 1 waits for finish_step.
        assert_eq!(store.steps().len(), 1);
        store.finish_step().unwrap();
        assert_eq!(store.steps().len(), 2);

        let step1 = store.step(1).unwrap();
        let up = step1
            .groups
            .iter()
            .find(|group| group.place == UnetPlace::Up)
            .unwrap();
        assert_eq!(up.layer_count, 2);
        assert_eq!(up.data, vec![1.5, 1.5]);
        let mid = step1
            .groups
            .iter()
            .find(|group| group.place == UnetPlace::Mid)
            .unwrap();
        assert_eq!(mid.data, vec![0.125, 0.125]);

        // Export view: places averaged weighted by layer count: (2 * 1.5 + 0.125) / 3 at step 1.
        let by_resolution = store.cross_by_resolution();
        let data = &by_resolution[&(1, 1)];
        assert_eq!(data.len(), 2 * 2);
        assert!((data[0] - (2.0 * 0.5 + 0.125) / 3.0).abs() < 1e-6);
        assert!((data[2] - (2.0 * 1.5 + 0.125) / 3.0).abs() < 1e-6);
    }

    #[test]
    fn self_attention_latest_and_mean_with_size_limit() {
        let mut store = AttentionStore::new(StoreConfig {
            self_max_side: 2,
            ..StoreConfig::new(77)
        });
        for step in 0..3 {
            let small = site(UnetPlace::Down, AttentionKind::SelfAttention, 2, 4, step);
            let input = probs(&small, |batch, head, query, key| {
                if batch == 0 {
                    -1.0
                } else {
                    (step * 16 + query * 4 + key) as f32 + head as f32
                }
            });
            store.process_probabilities(&small, &input).unwrap();
            let large = site(UnetPlace::Down, AttentionKind::SelfAttention, 3, 9, step);
            store
                .process_probabilities(&large, &probs(&large, |_, _, _, _| 1.0))
                .unwrap();
        }
        store.finish_step().unwrap();
        assert_eq!(store.self_attention_resolutions(), vec![(2, 2)]);
        assert!(store.steps().is_empty(), "no cross-attention was given");

        let latest = store
            .self_attention(
                2,
                2,
                &[UnetPlace::Down, UnetPlace::Up],
                SelfAttentionSpan::LatestStep,
            )
            .unwrap();
        assert_eq!(
            (latest.layer_count, latest.step_count, latest.data.len()),
            (1, 1, 16)
        );
        // Heads 0 and 1 average to +0.5.
        assert_eq!(latest.data[5], (2 * 16 + 5) as f32 + 0.5);
        let mean = store
            .self_attention(2, 2, &[UnetPlace::Down], SelfAttentionSpan::MeanOverSteps)
            .unwrap();
        assert_eq!((mean.layer_count, mean.step_count), (3, 3));
        assert_eq!(mean.data[5], 16.0 + 5.0 + 0.5);
        assert!(store
            .self_attention(2, 2, &[UnetPlace::Up], SelfAttentionSpan::LatestStep)
            .is_none());
        assert_eq!(store.stored_floats(), 2 * 16);

        let mut without_self = AttentionStore::new(StoreConfig {
            keep_self: false,
            ..StoreConfig::default()
        });
        let small = site(UnetPlace::Down, AttentionKind::SelfAttention, 2, 4, 0);
        without_self
            .process_probabilities(&small, &probs(&small, |_, _, _, _| 1.0))
            .unwrap();
        without_self.finish_step().unwrap();
        assert!(without_self.self_attention_resolutions().is_empty());
    }

    #[test]
    fn wrong_shapes_and_batch_items_are_errors() {
        let mut store = AttentionStore::new(StoreConfig::new(3));
        let cross = site(UnetPlace::Down, AttentionKind::Cross, 2, 5, 0);
        let wrong = Tensor::zeros((3, 4, 5), DType::F32, &Device::Cpu).unwrap();
        let error = store.process_probabilities(&cross, &wrong).unwrap_err();
        assert!(
            error.to_string().contains("down_blocks.0.attentions.0"),
            "{error}"
        );

        let mut store = AttentionStore::new(StoreConfig {
            batch_item: 1,
            ..StoreConfig::new(3)
        });
        let error = store
            .process_probabilities(&cross, &probs(&cross, |_, _, _, _| 0.0))
            .unwrap_err();
        assert!(error.to_string().contains("batch_item 1"), "{error}");

        // Without CFG the whole batch is conditional: item 1 of 2 is valid.
        let plain = AttentionSite {
            cfg: false,
            ..cross
        };
        let input = probs(&plain, |batch, _, _, _| batch as f32);
        store.process_probabilities(&plain, &input).unwrap();
        store.finish_step().unwrap();
        assert!(store.latest_step().unwrap().groups[0]
            .data
            .iter()
            .all(|&value| value == 1.0));
    }
}
