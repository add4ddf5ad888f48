//! Style sets in [`PipelineEngine`]: a [`StyleSetRun`] stepped with one [`AttentionStore`] per
//! image (each recording its image's conditional row), every image reported as its own
//! [`Branch::StyleImage`] with a preview per step, and every image's store kept so that the probe,
//! the Segments view and the attention export can read the image the UI selects.

use std::sync::Arc;
use std::time::Instant;

use crate::attention::store::{AttentionStore, StoreConfig};
use crate::attention::style_sampling::{
    check_style_set_fits, invert_reference_image, StyleReferenceImage, StyleSetRequest,
    StyleSetRun, REFERENCE_INVERSION_GUIDANCE,
};
use crate::hook::{AttentionProcessor, CancelToken, ChainedProcessors};
use crate::pipeline::limits::{available_memory, RunCapture};
use crate::pipeline::model::StableDiffusion;
use crate::pipeline::sampling::{latent_preview, GenerateRequest};
use crate::pipeline::PipelineError;
use crate::worker::backend::RunObserver;
use crate::worker::engine::{
    answer_self_attention_query, edit, prompt_info, step_frame, LatestRun, PipelineEngine,
    StepPlace,
};
use crate::worker::error::EngineError;
use crate::worker::plain::RgbImage;
use crate::worker::protocol::{Branch, PromptInfo, StepTiming};
use crate::worker::style_set::{
    check_style_set_params, swap_in_set_image, StyleSetOutput, StyleSetParams,
};

/// Every image's attention of the latest style set. The selected image's record is the engine's
/// latest run (its slot here is empty); selecting another swaps them.
pub(super) struct StyleSetRecord {
    /// Per image (reference first); `None` at `selected`.
    images: Vec<Option<LatestRun>>,
    /// The image whose record is the engine's latest run.
    selected: usize,
}

impl PipelineEngine {
    /// [`crate::worker::Engine::generate_style_set`] for the real engine (see the module docs).
    pub(super) fn run_style_set(
        &mut self,
        params: &StyleSetParams,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<StyleSetOutput, EngineError> {
        let Some(model) = &self.model else {
            return Err(EngineError::NoModel);
        };
        check_style_set_params(params)?;
        let mut reference_params = params.reference.clone();
        if params.reference_image.is_some() {
            // The reference follows the image's DDIM trajectory.
            reference_params.scheduler = Some("ddim".to_owned());
        }
        let (reference, resolved) = edit::prepare(model, &reference_params, None)?;
        let mut request = StyleSetRequest {
            generate: reference.request.clone(),
            target_prompts: params.target_prompts.clone(),
            sharing: params.sharing,
            reference_image: None,
        };
        let mut token_counts = vec![reference.prompt_tokens.token_count()];
        for prompt in &params.target_prompts {
            token_counts.push(model.tokenizer.encode_prompt(prompt)?.token_count());
        }
        let store_config = StoreConfig::default();
        let longest_prompt = token_counts.iter().copied().max().unwrap_or(0);
        let capture = RunCapture::store(longest_prompt, store_config.self_max_side);
        // The whole batch's memory is checked before anything is allocated (again by the run).
        check_style_set_fits(model, &request, &capture, &available_memory())?;
        if let Some(image) = &params.reference_image {
            request.reference_image = Some(invert_reference(
                model,
                image,
                &reference.request,
                observer,
                cancel,
            )?);
        }
        let mut run = StyleSetRun::new(model, &request, &capture)?.with_cancel(cancel.clone());
        let resolved_set = StyleSetParams {
            reference: resolved,
            ..params.clone()
        };
        let mut prompts = vec![prompt_info(run.reference_run())];
        prompts.extend(
            run.target_tokens()
                .iter()
                .enumerate()
                .map(|(index, tokens)| PromptInfo {
                    words: tokens.words.clone(),
                    tokens: tokens.tokens.clone(),
                    warnings: tokens
                        .warning()
                        .map(|warning| format!("target {} {warning}", index + 1))
                        .into_iter()
                        .collect(),
                }),
        );
        for (index, prompt) in prompts.iter().enumerate() {
            let image_params = resolved_set.image_params(index);
            observer.started(
                Branch::StyleImage(index),
                &image_params,
                prompt.clone(),
                None,
            )?;
        }
        let mut stores: Vec<AttentionStore> = token_counts
            .iter()
            .enumerate()
            .map(|(index, &token_count)| {
                AttentionStore::new(StoreConfig {
                    batch_item: index,
                    ..StoreConfig::new(token_count)
                })
            })
            .collect();
        // The probe reads the image selected last (the reference for a first set).
        let probed = self
            .style_set
            .as_ref()
            .map_or(0, |record| record.selected)
            .min(stores.len() - 1);
        let image_size = (reference.request.height, reference.request.width);
        let result = step_all(
            &mut run,
            &mut stores,
            model.is_pixel_space(),
            probed,
            observer,
            cancel,
        );
        let self_attention_grids: Vec<Vec<(usize, usize)>> = stores
            .iter()
            .map(AttentionStore::self_attention_resolutions)
            .collect();
        // The stores are kept even when the set stops early: their maps so far stay explorable.
        let mut records: Vec<Option<LatestRun>> = stores
            .into_iter()
            .zip(&prompts)
            .map(|(store, prompt)| {
                Some(LatestRun {
                    store,
                    words: prompt.words.clone(),
                    tokens: prompt.tokens.clone(),
                    image_size,
                })
            })
            .collect();
        self.latest_run = records[0].take();
        self.style_set = Some(StyleSetRecord {
            images: records,
            selected: 0,
        });
        result?;
        let output = run.finish()?;
        let images = std::iter::once(output.reference)
            .chain(output.targets)
            .map(|image| image.image)
            .collect();
        Ok(StyleSetOutput {
            images,
            self_attention_grids,
        })
    }

    /// [`crate::worker::Engine::select_style_image`] for the real engine.
    pub(super) fn select_image_of_set(&mut self, index: usize) -> Result<(), EngineError> {
        let Some(record) = self.style_set.as_mut() else {
            return Err(EngineError::Unavailable(
                "no style set has been generated".to_owned(),
            ));
        };
        swap_in_set_image(
            &mut record.images,
            &mut record.selected,
            &mut self.latest_run,
            index,
        )
    }
}

/// Inverts the reference `image` for a set sampled with `request` (its prompt and steps),
/// reporting each step as inversion progress. The image must have the run's size.
fn invert_reference(
    model: &StableDiffusion,
    image: &RgbImage,
    request: &GenerateRequest,
    observer: &mut dyn RunObserver,
    cancel: &CancelToken,
) -> Result<Arc<StyleReferenceImage>, EngineError> {
    if (image.width, image.height) != (request.width, request.height) {
        return Err(EngineError::InvalidArgument {
            name: "reference image",
            reason: format!(
                "{}x{} px, but the set is {}x{} px: fit the image to the run's size",
                image.width, image.height, request.width, request.height
            ),
        });
    }
    let mut disconnected = None;
    let inverted = invert_reference_image(
        model,
        image,
        &request.prompt,
        request.steps,
        REFERENCE_INVERSION_GUIDANCE,
        &mut |progress| {
            observer
                .inversion_progress(progress.phase, progress.steps_done, progress.step_count)
                .map_err(|lost| {
                    disconnected = Some(lost);
                    PipelineError::Cancelled
                })
        },
        cancel,
    );
    if let Some(lost) = disconnected {
        return Err(lost.into());
    }
    Ok(inverted?)
}

/// Steps `run` to its end with every image's store on the hook: the cancel token is checked
/// before every step; after each step every image's preview and maps go out (image order), then
/// the probe is answered from image `probed`'s store.
fn step_all(
    run: &mut StyleSetRun<'_>,
    stores: &mut [AttentionStore],
    pixel_space: bool,
    probed: usize,
    observer: &mut dyn RunObserver,
    cancel: &CancelToken,
) -> Result<(), EngineError> {
    let started_at = Instant::now();
    loop {
        if cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        let step_started = Instant::now();
        let report = {
            let observers: Vec<&mut dyn AttentionProcessor> = stores
                .iter_mut()
                .map(|store| store as &mut dyn AttentionProcessor)
                .collect();
            let mut chain = ChainedProcessors::new(observers);
            run.step(Some(&mut chain))?
        };
        let Some(report) = report else {
            return Ok(());
        };
        let timing = StepTiming {
            step_secs: step_started.elapsed().as_secs_f64(),
            elapsed_secs: started_at.elapsed().as_secs_f64(),
        };
        let place = StepPlace {
            step_index: report.step_index,
            step_count: report.step_count,
            timestep: report.timestep,
        };
        for (index, (store, latents)) in stores.iter().zip(&report.latents).enumerate() {
            let preview = latent_preview(latents, pixel_space)?;
            let frame = step_frame(store, place, preview, timing);
            observer.step(Branch::StyleImage(index), frame, None)?;
        }
        if let Some(store) = stores.get(probed) {
            answer_self_attention_query(&mut *observer, store)?;
        }
    }
}
