//! Real images in [`FakeEngine`]: a deterministic stand-in for inversion. Inverting takes one gated
//! step per inversion step; the "reconstruction" is the image with its two lowest bits of every byte
//! scrambled (a PSNR near 45 dB); a run that names the image denoises from noise to that
//! reconstruction, and edits paint the changed words' blobs over it.

use crate::analysis::image::image_hash;
use crate::hook::CancelToken;
use crate::worker::backend::{
    check_inversion_request, psnr_db, InversionCacheKey, InversionOutput, RunObserver,
};
use crate::worker::error::EngineError;
use crate::worker::fake::{mix, resolve_params, unit, FakeEngine, FAKE_SIZE_MULTIPLE_PX};
use crate::worker::plain::RgbImage;
use crate::worker::protocol::{GenerateParams, InversionParams, ModelInfo, SourceImage};

/// An inversion the fake keeps.
#[derive(Clone, Debug)]
pub(crate) struct FakeInversion {
    /// The reconstruction runs replay towards.
    reconstruction: RgbImage,
    /// Its PSNR against the input, dB.
    psnr_db: f64,
}

/// The fake reconstruction of `image`: every byte's two lowest bits replaced by a hash of its
/// position.
fn fake_reconstruction(image: &RgbImage) -> RgbImage {
    let pixels = image
        .pixels
        .iter()
        .enumerate()
        .map(|(index, &value)| (value & !3) | (mix(index as u64) & 3) as u8)
        .collect();
    RgbImage {
        width: image.width,
        height: image.height,
        pixels,
    }
}

/// `image` at `progress` (0..1] of a run: noise fading into it (the image itself at 1).
pub(super) fn fade_in(image: &RgbImage, progress: f32, seed: u64) -> RgbImage {
    if progress >= 1.0 {
        return image.clone();
    }
    let noise_amount = 1.0 - progress;
    let pixels = image
        .pixels
        .iter()
        .enumerate()
        .map(|(index, &value)| {
            let noise = unit(mix(seed ^ mix(index as u64))) * 255.0;
            (f32::from(value) * progress + noise * noise_amount).clamp(0.0, 255.0) as u8
        })
        .collect();
    RgbImage {
        width: image.width,
        height: image.height,
        pixels,
    }
}

impl FakeEngine {
    /// How many images this engine inverted (a cached inversion does not count).
    pub fn inversions_computed(&self) -> u64 {
        self.inversions_computed
    }

    fn inversion_key(&self, image_hash: &str, params: &InversionParams) -> InversionCacheKey {
        InversionCacheKey {
            image_hash: image_hash.to_owned(),
            model_name: self
                .model
                .as_ref()
                .map(|model| model.name.clone())
                .unwrap_or_default(),
            params: params.clone(),
        }
    }

    /// The reconstruction a run of `params` replays, if it names an inverted image.
    pub(super) fn replayed_image(&self, params: &GenerateParams) -> Option<RgbImage> {
        let source = params.source_image.as_ref()?;
        let key = self.inversion_key(&source.image_hash, &source.inversion);
        self.inversions
            .get(&key)
            .map(|inversion| inversion.reconstruction.clone())
    }

    /// Resolves a run's parameters as the real engine does: a run that names a real image takes
    /// the inversion's prompt, steps, guidance, the image's size and DDIM; an image the engine
    /// does not hold is an error.
    pub(super) fn resolve_run(
        &self,
        params: &GenerateParams,
        model: &ModelInfo,
    ) -> Result<GenerateParams, EngineError> {
        let Some(source) = &params.source_image else {
            return resolve_params(params, model);
        };
        let Some(image) = self.replayed_image(params) else {
            return Err(EngineError::Unavailable(format!(
                "image {} is not inverted with these settings on this model (method {}, {} steps): \
                 invert it again",
                source.image_hash, source.inversion.method, source.inversion.steps
            )));
        };
        let inversion = &source.inversion;
        let replay = GenerateParams {
            prompt: inversion.prompt.clone(),
            steps: inversion.steps,
            guidance: inversion.guidance,
            scheduler: Some("ddim".to_owned()),
            width_px: Some(image.width),
            height_px: Some(image.height),
            ..params.clone()
        };
        resolve_params(&replay, model)
    }

    /// [`crate::worker::Engine::invert`] for the fake engine (see the module docs).
    pub(super) fn invert_image(
        &mut self,
        image: &RgbImage,
        params: &InversionParams,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<InversionOutput, EngineError> {
        check_inversion_request(image, params)?;
        if self.model.is_none() {
            return Err(EngineError::NoModel);
        }
        for (name, size) in [("image width", image.width), ("image height", image.height)] {
            if size % FAKE_SIZE_MULTIPLE_PX != 0 || size > 4096 {
                return Err(EngineError::InvalidArgument {
                    name,
                    reason: format!(
                        "{size} px is not a positive multiple of {FAKE_SIZE_MULTIPLE_PX} (at most 4096)"
                    ),
                });
            }
        }
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
        for step in 0..params.steps {
            self.begin_step(cancel)?;
            observer.inversion_progress("inverting", step + 1, params.steps)?;
        }
        let reconstruction = fake_reconstruction(image);
        let psnr = psnr_db(image, &reconstruction).unwrap_or(0.0);
        self.inversions_computed += 1;
        self.inversions.insert(
            key,
            FakeInversion {
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
}
