//! Appearance transfer in [`PipelineEngine`]: the inputs are generated (for a slot that asks for
//! it) and fitted to the model's size, then [`AppearanceTransferRun`] inverts both, segments them and
//! runs the output step by step; each step goes out with a preview of the output's latents, the
//! way a generation's steps do.

use std::sync::Arc;
use std::time::Instant;

use crate::attention::appearance_sampling::{AppearanceTransferRequest, AppearanceTransferRun};
use crate::hook::CancelToken;
use crate::pipeline::model::StableDiffusion;
use crate::pipeline::sampling::{generate, latent_preview, GenerateRequest};
use crate::worker::appearance::{
    check_appearance_params, fit_input, AppearanceInput, AppearanceResult, AppearanceSlot,
    AppearanceTransferParams, AppearanceUpdate,
};
use crate::worker::backend::RunObserver;
use crate::worker::engine::PipelineEngine;
use crate::worker::error::EngineError;
use crate::worker::plain::RgbImage;
use crate::worker::protocol::{GenerateParams, StepTiming};

impl PipelineEngine {
    /// [`crate::worker::Engine::appearance_transfer`] for the real engine (see the module docs).
    pub(super) fn transfer_appearance(
        &mut self,
        params: &AppearanceTransferParams,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<AppearanceResult, EngineError> {
        let started_at = Instant::now();
        check_appearance_params(params)?;
        let Some(model) = &self.model else {
            return Err(EngineError::NoModel);
        };
        let size_px = model.default_size_px();
        let mut images = Vec::with_capacity(2);
        for (slot, input, prompt, seed) in [
            (
                AppearanceSlot::Structure,
                &params.structure,
                &params.structure_prompt,
                params.seed,
            ),
            (
                AppearanceSlot::Appearance,
                &params.appearance,
                &params.appearance_prompt,
                params.seed.wrapping_add(1),
            ),
        ] {
            images.push(match input {
                AppearanceInput::Image(image) => fit_input(slot, image, size_px, params.fit)?,
                AppearanceInput::Generate => {
                    observer.appearance(AppearanceUpdate::Progress {
                        phase: format!("generating the {} image", slot.name()),
                        elapsed_secs: started_at.elapsed().as_secs_f64(),
                    })?;
                    generated_image(model, prompt, seed, size_px, cancel)?
                }
            });
        }
        let appearance = images.pop().unwrap_or_default();
        let structure = images.pop().unwrap_or_default();
        observer.appearance(AppearanceUpdate::Inputs {
            structure: structure.clone(),
            appearance: appearance.clone(),
        })?;
        observer.appearance(AppearanceUpdate::Progress {
            phase: "inverting both images and finding their objects".to_owned(),
            elapsed_secs: started_at.elapsed().as_secs_f64(),
        })?;
        let request = AppearanceTransferRequest {
            structure,
            structure_prompt: params.structure_prompt.clone(),
            appearance,
            appearance_prompt: params.appearance_prompt.clone(),
            settings: params.settings.clone(),
            seed: params.seed,
        };
        let mut run = AppearanceTransferRun::new(model, &request, cancel)?;
        let skipped = params.settings.skip_steps();
        loop {
            if cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            let step_started = Instant::now();
            let Some(report) = run.step()? else {
                break;
            };
            let preview = latent_preview(&report.output_latent, model.is_pixel_space())?;
            observer.appearance(AppearanceUpdate::Step {
                step_index: report.step_index.saturating_sub(skipped),
                step_count: report.step_count.saturating_sub(skipped),
                preview,
                timing: StepTiming {
                    step_secs: step_started.elapsed().as_secs_f64(),
                    elapsed_secs: started_at.elapsed().as_secs_f64(),
                },
            })?;
        }
        let output = run.finish()?;
        Ok(AppearanceResult {
            output: output.output,
            structure_reconstruction: output.structure_reconstruction,
            appearance_reconstruction: output.appearance_reconstruction,
            masks: output.masks,
            correspondence: Arc::new(output.correspondence),
            seconds: started_at.elapsed().as_secs_f64(),
            warnings: output.warnings,
        })
    }
}

/// `prompt` generated at `size_px` `(width, height)` with the editor's default steps and guidance.
fn generated_image(
    model: &StableDiffusion,
    prompt: &str,
    seed: u64,
    size_px: (usize, usize),
    cancel: &CancelToken,
) -> Result<RgbImage, EngineError> {
    let defaults = GenerateParams::default();
    let request = GenerateRequest {
        seed,
        steps: defaults.steps,
        guidance: defaults.guidance,
        width: size_px.0,
        height: size_px.1,
        ..GenerateRequest::new(model, prompt)
    };
    Ok(generate(model, &request, None, &mut |_| Ok(()), cancel)?.image)
}
