//! Several processors on one hook.

use candle_core::Tensor;

use crate::hook::{
    AttentionProcessor, AttentionSite, LayerAttention, QueryKeyValue, SharedGroupNorm,
};

/// Runs several processors in turn on every layer, each seeing the probabilities the previous one
/// returned (e.g. Prompt-to-Prompt then an attention store that records what was used).
pub struct ChainedProcessors<'a> {
    processors: Vec<&'a mut dyn AttentionProcessor>,
}

impl<'a> ChainedProcessors<'a> {
    /// The processors, called in this order.
    pub fn new(processors: Vec<&'a mut dyn AttentionProcessor>) -> Self {
        Self { processors }
    }

    /// `first`, then `observer` when there is one (a processor and what watches its result).
    pub fn with_observer<'observer: 'a>(
        first: &'a mut dyn AttentionProcessor,
        observer: Option<&'a mut (dyn AttentionProcessor + 'observer)>,
    ) -> Self {
        let mut processors = vec![first];
        if let Some(observer) = observer {
            processors.push(observer);
        }
        Self::new(processors)
    }
}

impl AttentionProcessor for ChainedProcessors<'_> {
    /// True when one processor wants the probabilities, or when two observe head means (the
    /// fused kernel adds one to one sum): then every processor gets
    /// [`AttentionProcessor::process_probabilities`].
    fn wants_probabilities(&self, site: &AttentionSite) -> bool {
        let observers = self
            .processors
            .iter()
            .filter(|processor| processor.observed_head_mean(site).is_some())
            .count();
        observers > 1
            || self
                .processors
                .iter()
                .any(|processor| processor.wants_probabilities(site))
    }

    fn observed_head_mean(&self, site: &AttentionSite) -> Option<usize> {
        self.processors
            .iter()
            .find_map(|processor| processor.observed_head_mean(site))
    }

    /// The item one processor replaces, when the others read at most that item's head mean (a
    /// processor that wants the probabilities, or observes another item, needs them computed).
    fn replaced_item(&self, site: &AttentionSite) -> Option<usize> {
        let mut replacing = self
            .processors
            .iter()
            .enumerate()
            .filter_map(|(index, processor)| Some((index, processor.replaced_item(site)?)));
        let (replacer, item) = replacing.next()?;
        if replacing.next().is_some() {
            return None;
        }
        let others_fit = self
            .processors
            .iter()
            .enumerate()
            .filter(|&(index, _)| index != replacer)
            .all(|(_, processor)| {
                !processor.wants_probabilities(site)
                    && processor
                        .observed_head_mean(site)
                        .is_none_or(|observed| observed == item)
            });
        others_fit.then_some(item)
    }

    /// The probabilities of the one processor that replaces an item.
    fn replacement_probabilities(&mut self, site: &AttentionSite) -> candle_core::Result<Tensor> {
        match self
            .processors
            .iter_mut()
            .find(|processor| processor.replaced_item(site).is_some())
        {
            Some(processor) => processor.replacement_probabilities(site),
            None => candle_core::bail!(
                "{}: no processor of the chain replaces an item's probabilities",
                site.module_path()
            ),
        }
    }

    /// The sum of the one processor that observes the head mean.
    fn head_mean_sum(&mut self, site: &AttentionSite) -> candle_core::Result<Option<&mut [f32]>> {
        match self
            .processors
            .iter_mut()
            .find(|processor| processor.observed_head_mean(site).is_some())
        {
            Some(processor) => processor.head_mean_sum(site),
            None => Ok(None),
        }
    }

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

    fn wants_queries_keys_values(&self, site: &AttentionSite) -> bool {
        self.processors
            .iter()
            .any(|processor| processor.wants_queries_keys_values(site))
    }

    fn process_queries_keys_values(
        &mut self,
        site: &AttentionSite,
        projections: &QueryKeyValue,
    ) -> candle_core::Result<Option<QueryKeyValue>> {
        let mut current: Option<QueryKeyValue> = None;
        for processor in &mut self.processors {
            if !processor.wants_queries_keys_values(site) {
                continue;
            }
            let input = current.as_ref().unwrap_or(projections);
            if let Some(replaced) = processor.process_queries_keys_values(site, input)? {
                current = Some(replaced);
            }
        }
        Ok(current)
    }

    fn wants_attention_output(&self, site: &AttentionSite) -> bool {
        self.processors
            .iter()
            .any(|processor| processor.wants_attention_output(site))
    }

    /// The first processor that wants the output computes it (the others see the layer as any
    /// other stage-less layer).
    fn compute_attention_output(
        &mut self,
        site: &AttentionSite,
        projections: &QueryKeyValue,
        layer: &dyn LayerAttention,
    ) -> candle_core::Result<Option<Tensor>> {
        for processor in &mut self.processors {
            if processor.wants_attention_output(site) {
                return processor.compute_attention_output(site, projections, layer);
            }
        }
        Ok(None)
    }

    /// The first processor's sharing that shares anything.
    fn shared_group_norm(&self, batch: usize, cfg: bool) -> Option<SharedGroupNorm> {
        self.processors
            .iter()
            .find_map(|processor| processor.shared_group_norm(batch, cfg))
    }

    fn step_finished(&mut self, step_index: usize) -> candle_core::Result<()> {
        for processor in &mut self.processors {
            processor.step_finished(step_index)?;
        }
        Ok(())
    }
}
