//! Edit mode of [`PipelineEngine`]: Prompt-to-Prompt in replay mode. The source run is recorded once
//! ([`SourceRecordingRun`]: attention and latents per step) and kept with the parameters it was made
//! with; every later edit of the same source runs only the edited branch ([`EditedBranchRun`]),
//! from the first step the edit changes (the steps before it are the source's: their frames carry
//! the source's latents and maps).

use std::str::FromStr as _;
use std::sync::Arc;

use crate::analysis::edit_spec::{BlendMask, EditSpec};
use crate::analysis::heatmap::StepCross;
use crate::attention::edit_sampling::{EditStepReport, EditedBranchRun, SourceRecordingRun};
use crate::attention::p2p::{RecordConfig, SourceRecording};
use crate::attention::store::{AttentionStore, StoreConfig};
use crate::hook::CancelToken;
use crate::pipeline::inversion::Inversion;
use crate::pipeline::limits::{
    available_memory, check_run_fits, estimate_run_memory, ModelFootprint, RunCapture,
};
use crate::pipeline::model::StableDiffusion;
use crate::pipeline::sampling::{
    latent_preview, prepare_run_with, GenerateOutput, GenerateRequest, PreparedRun,
};
use crate::pipeline::scheduler::SchedulerKind;
use crate::worker::backend::{EditRunOutput, RunObserver, RunOutput};
use crate::worker::engine::{
    drive_with_store, prompt_info, step_frame, LatestRun, PipelineEngine, StepPlace,
};
use crate::worker::error::EngineError;
use crate::worker::protocol::{
    Branch, EditInfo, GenerateParams, PromptInfo, StepFrame, StepTiming,
};

/// The recorded source of the edits, and what it was made from.
pub(super) struct EditSource {
    /// The source's parameters with defaults resolved: an edit reuses the recording only when its
    /// own resolved parameters are equal.
    params: GenerateParams,
    /// Largest self-attention query count recorded.
    self_max_queries: usize,
    /// Attention and latents of every step.
    recording: Arc<SourceRecording>,
    /// The cross-attention maps each step of the source reported: the frames of the edited steps
    /// copied from the source (see [`EditedBranchRun::first_edited_step`]) carry them.
    step_cross: Vec<Arc<StepCross>>,
}

/// Resolves a run's parameters (size, scheduler defaults) and prepares the run once: checked,
/// tokenised and scheduled, so it can be reported before its first step. Returns the prepared run,
/// and the parameters with the defaults filled in.
pub(super) fn prepare(
    model: &StableDiffusion,
    params: &GenerateParams,
    inversion: Option<&Arc<Inversion>>,
) -> Result<(PreparedRun, GenerateParams), EngineError> {
    let requested_kind = params
        .scheduler
        .as_deref()
        .map(SchedulerKind::from_str)
        .transpose()?;
    let (default_width, default_height) = model.default_size_px();
    let request = GenerateRequest {
        prompt: params.prompt.clone(),
        negative_prompt: params.negative_prompt.clone(),
        seed: params.seed,
        steps: params.steps,
        guidance: params.guidance,
        width: params.width_px.unwrap_or(default_width),
        height: params.height_px.unwrap_or(default_height),
        scheduler: requested_kind,
        init_latents: None,
        preview: true,
        inversion: inversion.cloned(),
    };
    let token_count = model
        .tokenizer
        .encode_prompt(&request.prompt)?
        .token_count();
    let run = prepare_run_with(model, &request, &store_capture(token_count))?;
    let resolved = GenerateParams {
        scheduler: Some(run.scheduler_kind.name().to_owned()),
        width_px: Some(request.width),
        height_px: Some(request.height),
        ..params.clone()
    };
    Ok((run, resolved))
}

/// What the engine's attention store keeps of a run whose prompt has `token_count` tokens.
fn store_capture(token_count: usize) -> RunCapture {
    RunCapture::store(token_count, StoreConfig::default().self_max_side)
}

/// The frame of an edit step: the store's maps of the step, a preview of the branch's latents.
fn edit_step_frame(
    model: &StableDiffusion,
    store: &AttentionStore,
    report: &EditStepReport,
    timing: StepTiming,
) -> Result<StepFrame, EngineError> {
    let latents = report
        .edited_latents
        .as_ref()
        .or(report.source_latents.as_ref());
    let preview = match latents {
        Some(latents) => latent_preview(latents, model.is_pixel_space())?,
        None => Default::default(),
    };
    let place = StepPlace {
        step_index: report.step_index,
        step_count: report.step_count,
        timestep: report.timestep,
    };
    Ok(step_frame(store, place, preview, timing))
}

impl PipelineEngine {
    /// [`crate::worker::Engine::generate_edit`] for the real engine (see the module docs).
    pub(super) fn run_edit(
        &mut self,
        params: &GenerateParams,
        spec: Option<&EditSpec>,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<EditRunOutput, EngineError> {
        let Some(model) = &self.model else {
            return Err(EngineError::NoModel);
        };
        let (params, inversion) = self.replay_of(params)?;
        let (run, resolved) = prepare(model, &params, inversion.as_ref())?;
        // The edited branch needs the source's facts after the source run took the prepared run.
        let source_run = run.clone();
        let wanted_queries = spec.map_or(16 * 16, |spec| spec.self_replace.max_queries);
        let reusable = spec.is_some()
            && self.edit_source.as_ref().is_some_and(|source| {
                source.params == resolved && source.self_max_queries >= wanted_queries
            });
        let mut source_output = None;
        if reusable {
            // The recorded source stands for this run; nothing of it is sampled again.
        } else {
            // The recording comes on top of what `prepare` checked.
            let self_max_queries = wanted_queries.max(16 * 16);
            let capture = store_capture(run.prompt_tokens.token_count())
                .with_replay_recording(self_max_queries);
            let memory =
                estimate_run_memory(&ModelFootprint::of_model(model), &run.request, &capture);
            check_run_fits(&memory, &available_memory())?;
            self.edit_source = None;
            observer.started(Branch::Source, &resolved, prompt_info(&run), None)?;
            let mut store = AttentionStore::new(StoreConfig::new(run.prompt_tokens.token_count()));
            let words = run.prompt_tokens.words.clone();
            let tokens = run.prompt_tokens.tokens.clone();
            let image_size = (run.request.height, run.request.width);
            let record = RecordConfig {
                self_max_queries,
                batch_item: 0,
            };
            let mut step_cross = Vec::with_capacity(run.step_count());
            let result = record_with_store(
                model,
                run,
                record,
                &mut store,
                &mut step_cross,
                observer,
                cancel,
            );
            let self_attention_grids = store.self_attention_resolutions();
            self.latest_run = Some(LatestRun {
                store,
                words,
                tokens,
                image_size,
            });
            let (output, recording) = result?;
            self.source_recordings += 1;
            self.edit_source = Some(EditSource {
                params: resolved.clone(),
                self_max_queries,
                recording,
                step_cross,
            });
            let source = RunOutput {
                image: output.image,
                self_attention_grids,
            };
            observer.source_finished(&source)?;
            source_output = Some(source);
        }
        let Some(spec) = spec else {
            return Ok(EditRunOutput {
                source: source_output,
                edited: None,
                blend_mask: None,
            });
        };
        let Some((recording, source_cross)) = self
            .edit_source
            .as_ref()
            .map(|source| (Arc::clone(&source.recording), source.step_cross.clone()))
        else {
            return Err(EngineError::Unavailable(
                "the source recording is missing".to_owned(),
            ));
        };

        // The edited branch.
        let mut branch =
            EditedBranchRun::new(model, &source_run, spec, recording)?.with_cancel(cancel.clone());
        let edit_tokens = branch.edit_tokens();
        let alignment = branch.alignment();
        observer.started(
            Branch::Edited,
            &GenerateParams {
                prompt: spec.edit_prompt.clone(),
                ..resolved.clone()
            },
            PromptInfo {
                words: edit_tokens.words.clone(),
                tokens: edit_tokens.tokens.clone(),
                warnings: edit_tokens
                    .warning()
                    .map(|warning| format!("edited {warning}"))
                    .into_iter()
                    .collect(),
            },
            Some(EditInfo {
                kind: alignment.kind,
                words: alignment.words.clone(),
                source_reused: reusable,
                source_recordings: self.source_recordings,
            }),
        )?;
        let mut store = AttentionStore::new(StoreConfig::new(edit_tokens.token_count()));
        drive_with_store(&mut branch, &mut store, cancel, |report, store, timing| {
            let mut frame = edit_step_frame(model, store, report, timing)?;
            if report.reused_source {
                // No UNet ran: the step's attention is the source's (the same prompt, unchanged).
                if let Some(cross) = source_cross.get(report.step_index) {
                    frame.cross = Arc::clone(cross);
                }
            }
            Ok(observer.step(Branch::Edited, frame, report.blend_mask.clone())?)
        })?;
        let branch = branch.finish()?;
        let blend_mask: Option<BlendMask> =
            branch.blend_masks.iter().rev().flatten().next().cloned();
        Ok(EditRunOutput {
            source: source_output,
            edited: Some(branch.edited.image),
            blend_mask,
        })
    }
}

/// Records the source run with `store` watching it, sending a frame after every step (its
/// cross-attention also kept in `step_cross`) and answering the probe between steps.
fn record_with_store(
    model: &StableDiffusion,
    run: PreparedRun,
    record: RecordConfig,
    store: &mut AttentionStore,
    step_cross: &mut Vec<Arc<StepCross>>,
    observer: &mut dyn RunObserver,
    cancel: &CancelToken,
) -> Result<(GenerateOutput, Arc<SourceRecording>), EngineError> {
    let mut recording = SourceRecordingRun::new(model, run, record)?.with_cancel(cancel.clone());
    drive_with_store(&mut recording, store, cancel, |report, store, timing| {
        let frame = edit_step_frame(model, store, report, timing)?;
        step_cross.push(Arc::clone(&frame.cross));
        observer.step(Branch::Source, frame, None)?;
        super::answer_self_attention_query(&mut *observer, store)
    })?;
    Ok(recording.finish()?)
}
