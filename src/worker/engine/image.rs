//! Real images in [`PipelineEngine`]: inverting an image ([`crate::pipeline::inversion::invert`]),
//! keeping the latest inversions, and handing a run that names its image
//! ([`GenerateParams::source_image`]) the inversion to replay.

use std::str::FromStr as _;
use std::sync::Arc;

use crate::analysis::image::image_hash;
use crate::hook::CancelToken;
use crate::pipeline::inversion::{invert_observed, Inversion, InversionMethod, InversionRequest};
use crate::pipeline::sampling::{decode_to_unit_range, run_to_end, to_rgb8, Sampler};
use crate::pipeline::PipelineError;
use crate::worker::backend::{
    check_inversion_request, psnr_db, InversionCacheKey, InversionOutput, RunObserver,
};
use crate::worker::engine::{edit, PipelineEngine};
use crate::worker::error::{Disconnected, EngineError};
use crate::worker::plain::RgbImage;
use crate::worker::protocol::{GenerateParams, InversionParams, SourceImage};

/// An inversion the engine keeps, with what its request answered.
pub(super) struct CachedInversion {
    /// The inversion (tensors stay on the worker).
    inversion: Arc<Inversion>,
    /// The fitted image's size `(width, height)` in pixels.
    size_px: (usize, usize),
    /// The image regenerated from it.
    reconstruction: RgbImage,
    /// PSNR of the reconstruction against the input, dB.
    psnr_db: f64,
}

impl std::fmt::Debug for CachedInversion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedInversion")
            .field("size_px", &self.size_px)
            .field("psnr_db", &self.psnr_db)
            .finish_non_exhaustive()
    }
}

/// `params` as a run that replays `inversion` of an image of `size_px` takes them: the inversion's
/// prompt, steps and guidance, the image's size and the DDIM scheduler (the inversion's timesteps).
fn replay_params(
    params: &GenerateParams,
    inversion: &InversionParams,
    size_px: (usize, usize),
) -> GenerateParams {
    GenerateParams {
        prompt: inversion.prompt.clone(),
        steps: inversion.steps,
        guidance: inversion.guidance,
        scheduler: Some("ddim".to_owned()),
        width_px: Some(size_px.0),
        height_px: Some(size_px.1),
        ..params.clone()
    }
}

impl PipelineEngine {
    /// How many images this engine inverted (a cached inversion does not count), for tests.
    pub fn inversions_computed(&self) -> u64 {
        self.inversions_computed
    }

    /// The cache key of `source` on the loaded model.
    fn inversion_key(&self, image_hash: &str, params: &InversionParams) -> InversionCacheKey {
        InversionCacheKey {
            image_hash: image_hash.to_owned(),
            model_name: self
                .model
                .as_ref()
                .map(|model| model.name().to_owned())
                .unwrap_or_default(),
            params: params.clone(),
        }
    }

    /// The parameters a run of `params` samples with, and the inversion it replays when it names a
    /// real image: an image the engine does not hold (never inverted, dropped from the cache or
    /// inverted on another model) is an error that says to invert it again.
    pub(super) fn replay_of(
        &self,
        params: &GenerateParams,
    ) -> Result<(GenerateParams, Option<Arc<Inversion>>), EngineError> {
        let Some(source) = &params.source_image else {
            return Ok((params.clone(), None));
        };
        let key = self.inversion_key(&source.image_hash, &source.inversion);
        let Some(cached) = self.inversions.get(&key) else {
            return Err(EngineError::Unavailable(format!(
                "image {} is not inverted with these settings on this model (method {}, {} steps): \
                 invert it again",
                source.image_hash, source.inversion.method, source.inversion.steps
            )));
        };
        Ok((
            replay_params(params, &source.inversion, cached.size_px),
            Some(Arc::clone(&cached.inversion)),
        ))
    }

    /// [`crate::worker::Engine::invert`] for the real engine: the inversion, then the
    /// reconstruction (the exact methods' known source branch, decoded; for the others one replay
    /// with the image's prompt), reported step by step.
    pub(super) fn invert_image(
        &mut self,
        image: &RgbImage,
        params: &InversionParams,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<InversionOutput, EngineError> {
        check_inversion_request(image, params)?;
        let Some(model) = &self.model else {
            return Err(EngineError::NoModel);
        };
        let method = InversionMethod::from_str(&params.method)?;
        let source = SourceImage {
            image_hash: image_hash(image),
            inversion: params.clone(),
        };
        let key = self.inversion_key(&source.image_hash, params);
        if let Some(cached) = self.inversions.get(&key) {
            return Ok(InversionOutput {
                source,
                reconstruction: cached.reconstruction.clone(),
                psnr_db: cached.psnr_db,
                cached: true,
            });
        }
        let request = InversionRequest {
            prompt: params.prompt.clone(),
            method,
            steps: params.steps,
            guidance: params.guidance,
            seed: params.seed,
        };
        // An observer that can no longer report stops the pipeline; the error is told apart after.
        let mut disconnected: Option<Disconnected> = None;
        let inverted = invert_observed(
            model,
            image,
            &request,
            None,
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
        let (inversion, source_pass) = inverted?;
        let size_px = (image.width, image.height);
        // The reconstruction: the source branch the exact methods already know, or the replay of
        // the inversion with its own prompt.
        let reconstruction = match source_pass {
            Some(pass) => {
                let steps = pass.latents_per_step.dim(0).map_err(PipelineError::from)?;
                let latents = pass
                    .latents_per_step
                    .get(steps - 1)
                    .map_err(PipelineError::from)?;
                to_rgb8(&decode_to_unit_range(model, &latents)?)?
            }
            None => self.replay_reconstruction(model, params, &inversion, observer, cancel)?,
        };
        let psnr = psnr_db(image, &reconstruction).unwrap_or(0.0);
        self.inversions_computed += 1;
        self.inversions.insert(
            key,
            CachedInversion {
                inversion,
                size_px,
                reconstruction: reconstruction.clone(),
                psnr_db: psnr,
            },
        );
        Ok(InversionOutput {
            source,
            reconstruction,
            psnr_db: psnr,
            cached: false,
        })
    }

    /// The image a replay of `inversion` with its own prompt regenerates, reported as the
    /// inversion's `"reconstructing"` phase.
    fn replay_reconstruction(
        &self,
        model: &crate::pipeline::model::StableDiffusion,
        params: &InversionParams,
        inversion: &Arc<Inversion>,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<RgbImage, EngineError> {
        let mut disconnected: Option<Disconnected> = None;
        let size_px = inversion.size_px;
        let run_params = replay_params(&GenerateParams::default(), params, size_px);
        let (run, _) = edit::prepare(model, &run_params, Some(inversion))?;
        let step_count = run.step_count();
        let mut sampler = Sampler::new(model, run)?.with_cancel(cancel.clone());
        let mut steps_done = 0;
        let replayed = run_to_end(
            &mut sampler,
            None,
            &mut |_report| {
                steps_done += 1;
                observer
                    .inversion_progress("reconstructing", steps_done, step_count)
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
        replayed?;
        Ok(sampler.finish()?.image)
    }
}
