//! Several processors on one hook.

use candle_core::Tensor;

use crate::attention::{AttentionProcessor, AttentionSite};

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
    fn wants_probabilities(&self, site: &AttentionSite) -> bool {
        self.processors
            .iter()
            .any(|processor| processor.wants_probabilities(site))
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
