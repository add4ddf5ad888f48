//! [`PromptWeights`]: the prompt syntax's word weights (`(word:1.3)`, see
//! [`crate::analysis::prompt_syntax`]) applied as attend applies every reweighting: the
//! conditional half's cross-attention probabilities of each weighted token are multiplied by its
//! weight, without renormalising (Prompt-to-Prompt's equalizer). The unconditional half is left
//! alone. A1111 instead scales the weighted tokens' text embeddings and restores the embedding's
//! mean; both strengthen (or weaken) a word, but attend's acts on the attention that the heat maps
//! show, so a weight of 1.3 shows as a 1.3 times stronger map.

use candle_core::{bail, Device, Tensor};

use crate::hook::{AttentionKind, AttentionProcessor, AttentionSite, ChainedProcessors};
use crate::pipeline::sampling::StepwiseRun;
use crate::pipeline::PipelineResult;

/// Multiplies the conditional cross-attention of every key by its weight (see the module docs).
#[derive(Debug)]
pub struct PromptWeights {
    /// Per key (token position of the encoded prompt): its weight.
    weights: Vec<f32>,
    /// `[keys]` on the device of the last call.
    tensor: Option<(Device, Tensor)>,
}

impl PromptWeights {
    /// The processor for these per-token weights (`PromptTokens::weights`, one per key); `None`
    /// when every weight is 1 (nothing to do, so the attention layers stay fused).
    pub fn new(weights: &[f32]) -> Option<Self> {
        weights.iter().any(|&weight| weight != 1.0).then(|| Self {
            weights: weights.to_vec(),
            tensor: None,
        })
    }

    /// The per-key weights.
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    fn weight_tensor(&mut self, device: &Device) -> candle_core::Result<&Tensor> {
        let stale = !matches!(&self.tensor, Some((cached, _)) if cached.same_device(device));
        if stale {
            let tensor = Tensor::new(self.weights.as_slice(), device)?;
            self.tensor = Some((device.clone(), tensor));
        }
        match &self.tensor {
            Some((_, tensor)) => Ok(tensor),
            None => bail!("prompt weights: no weight tensor"),
        }
    }
}

impl AttentionProcessor for PromptWeights {
    fn wants_probabilities(&self, site: &AttentionSite) -> bool {
        site.kind == AttentionKind::Cross
    }

    /// `probs` `[batch * heads, queries, keys]`: the conditional items (the second half with
    /// classifier-free guidance, every item without) times the weights `[keys]`.
    fn process_probabilities(
        &mut self,
        site: &AttentionSite,
        probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if site.kind != AttentionKind::Cross {
            return Ok(None);
        }
        if site.keys != self.weights.len() {
            bail!(
                "prompt weights: {} has {} keys but the prompt has {} token weights",
                site.module_path(),
                site.keys,
                self.weights.len()
            );
        }
        let conditional_start = if site.cfg { site.batch / 2 } else { 0 };
        let start_row = conditional_start * site.heads;
        let row_count = probs.dim(0)?;
        let weights = self
            .weight_tensor(probs.device())?
            .to_dtype(probs.dtype())?;
        let conditional = probs
            .narrow(0, start_row, row_count - start_row)?
            .broadcast_mul(&weights)?;
        if start_row == 0 {
            return Ok(Some(conditional));
        }
        let unconditional = probs.narrow(0, 0, start_row)?;
        Ok(Some(Tensor::cat(&[&unconditional, &conditional], 0)?))
    }
}

/// A run whose every step applies [`PromptWeights`] before the caller's processor (which then sees
/// the weighted attention), so a loop written for plain runs needs no change.
pub struct WeightedRun<R> {
    run: R,
    weights: Option<PromptWeights>,
}

impl<R> WeightedRun<R> {
    /// `run` with `weights` (`None`: the run as it is).
    pub fn new(run: R, weights: Option<PromptWeights>) -> Self {
        Self { run, weights }
    }

    /// The wrapped run (to finish it).
    pub fn into_inner(self) -> R {
        self.run
    }
}

impl<R: StepwiseRun> StepwiseRun for WeightedRun<R> {
    type Report = R::Report;

    fn next_step(
        &mut self,
        processor: Option<&mut (dyn AttentionProcessor + '_)>,
    ) -> PipelineResult<Option<R::Report>> {
        match &mut self.weights {
            Some(weights) => {
                let mut chain = ChainedProcessors::with_observer(weights, processor);
                self.run.next_step(Some(&mut chain))
            }
            None => self.run.next_step(processor),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::heatmap::UnetPlace;

    fn site(cfg: bool, batch: usize) -> AttentionSite {
        AttentionSite {
            place: UnetPlace::Down,
            block_index: 0,
            attention_index: 0,
            layer_index: 0,
            kind: AttentionKind::Cross,
            query_h: 1,
            query_w: 2,
            heads: 2,
            keys: 3,
            batch,
            cfg,
            step_index: 0,
            step_count: 1,
        }
    }

    #[test]
    fn all_ones_need_no_processor() {
        assert!(PromptWeights::new(&[1.0, 1.0]).is_none());
    }

    #[test]
    fn only_the_conditional_half_is_scaled_per_key() {
        let mut weights = PromptWeights::new(&[1.0, 2.0, 0.5]).unwrap();
        // [batch 2 * heads 2, queries 2, keys 3] of ones.
        let probs = Tensor::ones((4, 2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let out = weights
            .process_probabilities(&site(true, 2), &probs)
            .unwrap()
            .unwrap();
        let rows = out.to_vec3::<f32>().unwrap();
        assert_eq!(rows[0][1], [1.0, 1.0, 1.0]);
        assert_eq!(rows[1][0], [1.0, 1.0, 1.0]);
        assert_eq!(rows[2][0], [1.0, 2.0, 0.5]);
        assert_eq!(rows[3][1], [1.0, 2.0, 0.5]);
        // Without guidance every item is conditional.
        let probs = Tensor::ones((2, 2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let out = weights
            .process_probabilities(&site(false, 1), &probs)
            .unwrap()
            .unwrap();
        assert_eq!(out.to_vec3::<f32>().unwrap()[0][0], [1.0, 2.0, 0.5]);
    }

    #[test]
    fn a_key_count_other_than_the_weights_is_an_error() {
        let mut weights = PromptWeights::new(&[1.0, 2.0]).unwrap();
        let probs = Tensor::ones((4, 2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let error = weights
            .process_probabilities(&site(true, 2), &probs)
            .unwrap_err();
        assert!(error.to_string().contains("2 token weights"), "{error}");
    }
}
