//! The attention layer's shortcuts give what materialised probabilities give:
//! - the attention store reads only head means: alone, every layer it keeps runs the fused
//!   kernel, which adds the recorded item's mean over the heads to the store's sum on the way;
//!   beside a processor that wants the probabilities, the layers materialise them and the store
//!   averages them itself. Both ways give the same maps.
//! - a processor that replaces one batch item's probabilities without reading the layer's
//!   (Prompt-to-Prompt replaying its source) lets the layer skip that item's probabilities and
//!   keep the fused kernel for the others: the same image and the same stored maps as when it
//!   replaces them in the materialised probabilities.

// Test helpers outside `#[test]` functions unwrap too.
#![allow(clippy::unwrap_used)]

mod common;
use common::{generate_with_store, max_abs_diff};

use attend::attention::store::{AttentionStore, StoreConfig};
use attend::hook::{
    AttentionKind, AttentionProcessor, AttentionSite, CancelToken, ChainedProcessors,
};
use attend::kernels::ProductPrecision;
use attend::pipeline::model::{LoadOptions, StableDiffusion};
use attend::pipeline::sampling::{generate, GenerateRequest};
use attend::worker::bundled_model_dir;
use candle_core::Tensor;

const PROMPT: &str = "a red square and a blue circle on a yellow background";

/// Forwards everything to the store and counts which way each layer reached it.
struct Counting<'a> {
    store: &'a mut AttentionStore,
    head_means: usize,
    probabilities: usize,
}

impl AttentionProcessor for Counting<'_> {
    fn wants_probabilities(&self, site: &AttentionSite) -> bool {
        self.store.wants_probabilities(site)
    }

    fn process_probabilities(
        &mut self,
        site: &AttentionSite,
        probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.probabilities += 1;
        self.store.process_probabilities(site, probs)
    }

    fn observed_head_mean(&self, site: &AttentionSite) -> Option<usize> {
        self.store.observed_head_mean(site)
    }

    fn head_mean_sum(&mut self, site: &AttentionSite) -> candle_core::Result<Option<&mut [f32]>> {
        self.head_means += 1;
        self.store.head_mean_sum(site)
    }

    fn step_finished(&mut self, step_index: usize) -> candle_core::Result<()> {
        self.store.step_finished(step_index)
    }
}

/// Wants every layer's probabilities and keeps them as they are.
struct Materialise;

impl AttentionProcessor for Materialise {
    fn process_probabilities(
        &mut self,
        _site: &AttentionSite,
        _probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
}

/// A 3-step run with the store, alone or beside [`Materialise`]: the store and the number of
/// layer calls that reached it as head means and as probabilities.
fn run(model: &StableDiffusion, beside_materialise: bool) -> (AttentionStore, usize, usize) {
    let mut request = GenerateRequest::new(model, PROMPT);
    request.steps = 3;
    request.seed = 11;
    let token_count = model.tokenizer.encode_prompt(PROMPT).unwrap().token_count();
    let mut store = AttentionStore::new(StoreConfig::new(token_count));
    let mut counting = Counting {
        store: &mut store,
        head_means: 0,
        probabilities: 0,
    };
    let mut materialise = Materialise;
    let cancel = CancelToken::new();
    if beside_materialise {
        let mut chain = ChainedProcessors::new(vec![&mut materialise, &mut counting]);
        generate(model, &request, Some(&mut chain), &mut |_| Ok(()), &cancel).unwrap();
    } else {
        generate(
            model,
            &request,
            Some(&mut counting),
            &mut |_| Ok(()),
            &cancel,
        )
        .unwrap();
    }
    let (head_means, probabilities) = (counting.head_means, counting.probabilities);
    store.finish_step().unwrap();
    (store, head_means, probabilities)
}

#[test]
fn the_store_gets_the_same_maps_from_fused_head_means_as_from_probabilities() {
    let mut model = StableDiffusion::load(&bundled_model_dir(), &LoadOptions::default()).unwrap();
    model.unet.set_product_precision(ProductPrecision::F32);
    let (fused, head_means, probabilities) = run(&model, false);
    // 11 attention layers, cross and self each, per step; the store keeps all of them.
    assert_eq!((head_means, probabilities), (3 * 22, 0));
    let (materialised, head_means, probabilities) = run(&model, true);
    assert_eq!((head_means, probabilities), (0, 3 * 22));

    let (fused_cross, materialised_cross) = (
        fused.cross_by_resolution(),
        materialised.cross_by_resolution(),
    );
    assert_eq!(
        fused_cross.keys().collect::<Vec<_>>(),
        materialised_cross.keys().collect::<Vec<_>>()
    );
    for (grid, maps) in &fused_cross {
        let difference = max_abs_diff(maps, &materialised_cross[grid]);
        assert!(
            difference < 1e-4,
            "cross maps at {grid:?} differ by {difference}"
        );
    }
    let resolutions = fused.self_attention_resolutions();
    assert_eq!(resolutions, materialised.self_attention_resolutions());
    assert!(!resolutions.is_empty());
    let places = [
        attend::analysis::heatmap::UnetPlace::Down,
        attend::analysis::heatmap::UnetPlace::Mid,
        attend::analysis::heatmap::UnetPlace::Up,
    ];
    let span = attend::analysis::heatmap::SelfAttentionSpan::MeanOverSteps;
    for (h, w) in resolutions {
        let a = fused.self_attention(h, w, &places, span).unwrap();
        let b = materialised.self_attention(h, w, &places, span).unwrap();
        let difference = max_abs_diff(&a.data, &b.data);
        assert!(
            difference < 1e-4,
            "self maps at {h}x{w} differ by {difference}"
        );
    }
}

/// Gives the conditional item of every cross-attention layer attention that grows along the
/// keys, `[heads, queries, keys]`: through [`AttentionProcessor::replaced_item`] when `skip`,
/// otherwise by replacing that item's part of the materialised probabilities.
struct ReplaceConditional {
    skip: bool,
    replaced: usize,
}

impl ReplaceConditional {
    fn probabilities(site: &AttentionSite) -> candle_core::Result<Tensor> {
        let ramp: Vec<f32> = (1..=site.keys).map(|key| key as f32).collect();
        let total: f32 = ramp.iter().sum();
        let row = Tensor::from_vec(ramp, (1, 1, site.keys), &candle_core::Device::Cpu)?;
        (row / f64::from(total))?
            .broadcast_as((site.heads, site.queries(), site.keys))?
            .contiguous()
    }
}

impl AttentionProcessor for ReplaceConditional {
    fn wants_probabilities(&self, site: &AttentionSite) -> bool {
        site.kind == AttentionKind::Cross
    }

    fn replaced_item(&self, site: &AttentionSite) -> Option<usize> {
        (self.skip && site.kind == AttentionKind::Cross).then_some(site.batch - 1)
    }

    fn replacement_probabilities(&mut self, site: &AttentionSite) -> candle_core::Result<Tensor> {
        self.replaced += 1;
        Self::probabilities(site)
    }

    fn process_probabilities(
        &mut self,
        site: &AttentionSite,
        probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.replaced += 1;
        let kept = probs.narrow(0, 0, (site.batch - 1) * site.heads)?;
        Ok(Some(Tensor::cat(&[kept, Self::probabilities(site)?], 0)?))
    }
}

#[test]
fn a_replaced_item_gives_the_same_image_and_maps_without_its_own_probabilities() {
    let mut model = StableDiffusion::load(&bundled_model_dir(), &LoadOptions::default()).unwrap();
    model.unet.set_product_precision(ProductPrecision::F32);
    let mut request = GenerateRequest::new(&model, PROMPT);
    request.steps = 3;
    request.seed = 5;
    let run = |skip: bool| {
        let token_count = model.tokenizer.encode_prompt(PROMPT).unwrap().token_count();
        let mut store = AttentionStore::new(StoreConfig::new(token_count));
        let mut replace = ReplaceConditional { skip, replaced: 0 };
        let mut chain = ChainedProcessors::new(vec![&mut replace, &mut store]);
        let output = generate(
            &model,
            &request,
            Some(&mut chain),
            &mut |_| Ok(()),
            &CancelToken::new(),
        )
        .unwrap();
        let replaced = replace.replaced;
        store.finish_step().unwrap();
        (output, store, replaced)
    };
    let (skipped, skipped_store, skipped_layers) = run(true);
    let (materialised, materialised_store, materialised_layers) = run(false);
    // 11 cross-attention layers per step, each replaced once either way.
    assert_eq!((skipped_layers, materialised_layers), (3 * 11, 3 * 11));
    let image_difference = max_abs_diff(&skipped.image_f32, &materialised.image_f32);
    assert!(
        image_difference < 1e-4,
        "images differ by {image_difference}"
    );
    // The replacement changes the image: the comparison above is not between two plain runs.
    let (plain, _) = generate_with_store(&model, &request);
    assert!(max_abs_diff(&plain.image_f32, &skipped.image_f32) > 1e-2);
    // The store records the replaced item's maps: the ramp, averaged over heads and layers.
    let (skipped_cross, materialised_cross) = (
        skipped_store.cross_by_resolution(),
        materialised_store.cross_by_resolution(),
    );
    assert!(!skipped_cross.is_empty());
    for (grid, maps) in &skipped_cross {
        let difference = max_abs_diff(maps, &materialised_cross[grid]);
        assert!(
            difference < 1e-5,
            "cross maps at {grid:?} differ by {difference}"
        );
    }
}
