//! Style sets in [`FakeEngine`]: every image is a plain fake run of its own prompt and seed
//! (`seed + i`), stepped together and reported as [`Branch::StyleImage`]s; every image's run is
//! kept so that the probe and the Segments view can read the image the UI selects. A set of more
//! than [`FAKE_SET_MAX_PIXELS`] pixels (images times pixels per image) is refused as too large
//! for memory, as the real engine refuses sets that cannot fit.

use std::sync::Arc;
use std::time::Instant;

use crate::hook::CancelToken;
use crate::worker::backend::RunObserver;
use crate::worker::error::EngineError;
use crate::worker::fake::image::fade_in;
use crate::worker::fake::{
    blob_centre, cross_maps, fake_grids, resolve_params, self_attention_map, synthesise_image,
    tokenize, FakeEngine, FakeRun,
};
use crate::worker::plain::{CrossGroup, RgbImage, StepCross};
use crate::worker::protocol::{Branch, StepFrame, StepTiming};
use crate::worker::style_set::{
    check_style_set_params, swap_in_set_image, StyleSetOutput, StyleSetParams,
};

/// The most pixels a fake set may hold (all images together): eight 256 x 256 images.
pub const FAKE_SET_MAX_PIXELS: usize = 8 * 256 * 256;

/// Every image's run of the latest set; the selected image's is the engine's latest run (its slot
/// here is empty).
#[derive(Debug, Default)]
pub(super) struct FakeStyleSet {
    /// Per image (reference first); `None` at `selected`.
    images: Vec<Option<FakeRun>>,
    /// The image whose run is the engine's latest run.
    selected: usize,
}

impl FakeEngine {
    /// [`crate::worker::Engine::generate_style_set`] for the fake engine (see the module docs).
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
        let started_at = Instant::now();
        let reference = resolve_params(&params.reference, model)?;
        let width = reference.width_px.unwrap_or(model.default_width_px);
        let height = reference.height_px.unwrap_or(model.default_height_px);
        let set_pixels = params.image_count() * width * height;
        if set_pixels > FAKE_SET_MAX_PIXELS {
            return Err(EngineError::Pipeline(
                crate::pipeline::PipelineError::TooLarge {
                    what: format!(
                        "a set of {} images of {width}x{height} px",
                        params.image_count()
                    ),
                    reason: format!(
                        "{set_pixels} pixels in all, this engine holds at most \
                         {FAKE_SET_MAX_PIXELS}; use fewer target prompts or a smaller size"
                    ),
                },
            ));
        }
        if let Some(image) = &params.reference_image {
            if (image.width, image.height) != (width, height) {
                return Err(EngineError::InvalidArgument {
                    name: "reference image",
                    reason: format!(
                        "{}x{} px, but the set is {width}x{height} px: fit the image to the run's size",
                        image.width, image.height
                    ),
                });
            }
        }
        let resolved = StyleSetParams {
            reference,
            ..params.clone()
        };
        let mut runs = Vec::with_capacity(resolved.image_count());
        for index in 0..resolved.image_count() {
            let image_params = resolved.image_params(index);
            let prompt = tokenize(&image_params.prompt);
            let centres = prompt
                .words
                .iter()
                .enumerate()
                .map(|(word, span)| blob_centre(image_params.seed, &span.text, word))
                .collect();
            runs.push(FakeRun {
                centres,
                sigma: 0.5,
                self_grids: vec![(height / 8, width / 8), (height / 4, width / 4)],
                steps: Vec::with_capacity(image_params.steps),
                tokens: prompt.tokens.clone(),
                words: prompt.words.clone(),
                image_size: (height, width),
                // The reference image, when there is one, is what the reference denoises towards.
                background: (index == 0)
                    .then(|| params.reference_image.clone())
                    .flatten(),
            });
            observer.started(Branch::StyleImage(index), &image_params, prompt, None)?;
        }
        let probed = self
            .style_set
            .as_ref()
            .map_or(0, |set| set.selected)
            .min(runs.len() - 1);
        let result = self.step_set(&resolved, &mut runs, probed, observer, cancel, started_at);
        let self_attention_grids = runs.iter().map(|run| run.self_grids.clone()).collect();
        // What ran is kept, so a cancelled set can still be probed.
        let mut kept: Vec<Option<FakeRun>> = runs.into_iter().map(Some).collect();
        self.latest_run = kept[0].take().filter(|run| !run.steps.is_empty());
        self.style_set = Some(FakeStyleSet {
            images: kept,
            selected: 0,
        });
        Ok(StyleSetOutput {
            images: result?,
            self_attention_grids,
        })
    }

    /// Steps every image of the set together; returns the final images.
    fn step_set(
        &self,
        resolved: &StyleSetParams,
        runs: &mut [FakeRun],
        probed: usize,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
        started_at: Instant,
    ) -> Result<Vec<RgbImage>, EngineError> {
        let steps = resolved.reference.steps;
        let mut previews = Vec::new();
        for step_index in 0..steps {
            let step_started = Instant::now();
            self.begin_step(cancel)?;
            let progress = (step_index + 1) as f32 / steps as f32;
            previews.clear();
            for (index, run) in runs.iter_mut().enumerate() {
                let (height, width) = run.image_size;
                let token_count = run.tokens.len();
                run.sigma = 0.45 - 0.3 * progress;
                let groups = fake_grids(height, width)
                    .iter()
                    .map(|&(place, grid_h, grid_w, layer_count)| CrossGroup {
                        place,
                        h: grid_h,
                        w: grid_w,
                        layer_count,
                        token_count,
                        data: cross_maps(&run.centres, run.sigma, token_count, grid_h, grid_w),
                    })
                    .collect();
                let cross = Arc::new(StepCross { step_index, groups });
                run.steps.push(Arc::clone(&cross));
                let seed = resolved.image_params(index).seed;
                let preview = match &run.background {
                    Some(background) => fade_in(background, progress, seed),
                    None => {
                        synthesise_image(&run.centres, run.sigma, progress, seed, width, height)
                    }
                };
                let frame = StepFrame {
                    step_index,
                    step_count: steps,
                    timestep: 1000.0 * (1.0 - step_index as f64 / steps as f64),
                    preview: preview.clone(),
                    cross,
                    timing: StepTiming {
                        step_secs: step_started.elapsed().as_secs_f64(),
                        elapsed_secs: started_at.elapsed().as_secs_f64(),
                    },
                };
                observer.step(Branch::StyleImage(index), frame, None)?;
                previews.push(preview);
            }
            if let Some(query) = observer.take_self_attention_query() {
                let run = &runs[probed];
                let map = run
                    .self_grids
                    .contains(&(query.grid_h, query.grid_w))
                    .then(|| self_attention_map(run, query.grid_h, query.grid_w));
                observer.self_attention(query, map)?;
            }
        }
        Ok(std::mem::take(&mut previews))
    }

    /// [`crate::worker::Engine::select_style_image`] for the fake engine.
    pub(super) fn select_image_of_set(&mut self, index: usize) -> Result<(), EngineError> {
        let Some(set) = self.style_set.as_mut() else {
            return Err(EngineError::Unavailable(
                "no style set has been generated".to_owned(),
            ));
        };
        swap_in_set_image(
            &mut set.images,
            &mut set.selected,
            &mut self.latest_run,
            index,
        )
    }
}
