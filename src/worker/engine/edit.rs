//! Edit mode of [`PipelineEngine`]: Prompt-to-Prompt in replay mode. The source run is recorded once
//! ([`record_source`]: attention and latents per step) and kept with the parameters it was made with;
//! every later edit of the same source runs only the edited branch ([`generate_edited_branch`]).

use std::cell::RefCell;
use std::rc::Rc;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Instant;

use crate::analysis::alignment::{align_prompts, PromptLayout};
use crate::analysis::heatmap::StepCross;
use crate::attention::p2p::{BlendMask, EditSpec, RecordConfig, SourceRecording};
use crate::attention::store::{AttentionStore, StoreConfig};
use crate::pipeline::edit_sampling::{generate_edited_branch, record_source, EditStepReport};
use crate::pipeline::model::StableDiffusion;
use crate::pipeline::sampling::{latent_preview, CancelToken, GenerateRequest};
use crate::pipeline::scheduler::{prepare_scheduler, SchedulerKind};
use crate::pipeline::tokenizer::PromptTokens;
use crate::pipeline::PipelineError;
use crate::worker::backend::{EditRunOutput, RunObserver, RunOutput};
use crate::worker::engine::{to_worker_image, LatestRun, PipelineEngine, SharedStore};
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
}

/// A run's request with everything resolved, and its prompt's tokens.
pub(super) struct PreparedRun {
    pub(super) request: GenerateRequest,
    pub(super) resolved: GenerateParams,
    pub(super) tokens: PromptTokens,
    pub(super) warnings: Vec<String>,
}

/// The request a run's parameters describe, with the defaults resolved (size, scheduler) and the
/// prompt tokenised, so the run can be reported before its first step.
pub(super) fn prepare(
    model: &StableDiffusion,
    params: &GenerateParams,
) -> Result<PreparedRun, EngineError> {
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
    };
    let prepared = prepare_scheduler(&model.scheduler_config, requested_kind, params.steps)?;
    let tokens = model.tokenizer.encode(&params.prompt)?;
    let mut warnings = prepared.warnings.clone();
    warnings.extend(tokens.warning());
    let resolved = GenerateParams {
        scheduler: Some(prepared.kind.name().to_owned()),
        width_px: Some(request.width),
        height_px: Some(request.height),
        ..params.clone()
    };
    Ok(PreparedRun {
        request,
        resolved,
        tokens,
        warnings,
    })
}

/// Closes the store's step and builds the step's frame.
fn step_frame(
    model: &StableDiffusion,
    store: &Rc<RefCell<AttentionStore>>,
    report: &EditStepReport,
    step_secs: f64,
    elapsed_secs: f64,
) -> Result<StepFrame, PipelineError> {
    let cross = {
        let mut store = store
            .try_borrow_mut()
            .map_err(|_| PipelineError::InvalidArgument {
                name: "attention store",
                reason: "busy during a step report".to_owned(),
            })?;
        store.finish_step()?;
        store.latest_step().cloned().unwrap_or_else(|| StepCross {
            step_index: report.step_index,
            groups: Vec::new(),
        })
    };
    let latents = report
        .edited_latents
        .as_ref()
        .or(report.source_latents.as_ref());
    let preview = match latents {
        Some(latents) => to_worker_image(latent_preview(latents, model.is_pixel_space())?),
        None => Default::default(),
    };
    Ok(StepFrame {
        step_index: report.step_index,
        step_count: report.step_count,
        timestep: report.timestep,
        preview,
        cross: Arc::new(cross),
        timing: StepTiming {
            step_secs,
            elapsed_secs,
        },
    })
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
        let started_at = Instant::now();
        let run = prepare(model, params)?;
        let wanted_queries = spec.map_or(16 * 16, |spec| spec.self_replace.max_queries);
        let reusable = spec.is_some()
            && self.edit_source.as_ref().is_some_and(|source| {
                source.params == run.resolved && source.self_max_queries >= wanted_queries
            });
        let mut source_output = None;
        if !reusable {
            self.edit_source = None;
            observer.started(
                Branch::Source,
                &run.resolved,
                PromptInfo {
                    words: run.tokens.words.clone(),
                    tokens: run.tokens.tokens.clone(),
                    warnings: run.warnings.clone(),
                },
                None,
            )?;
            let store = Rc::new(RefCell::new(AttentionStore::new(StoreConfig::new(
                run.tokens.token_count(),
            ))));
            self.latest_run = Some(LatestRun {
                store: Rc::clone(&store),
                words: run.tokens.words.clone(),
                tokens: run.tokens.tokens.clone(),
                image_size: (run.request.height, run.request.width),
            });
            let mut processor = SharedStore(Rc::clone(&store));
            let mut observer_error: Option<EngineError> = None;
            let mut step_started = Instant::now();
            let mut on_step = |report: &EditStepReport| -> Result<(), PipelineError> {
                let frame = step_frame(
                    model,
                    &store,
                    report,
                    step_started.elapsed().as_secs_f64(),
                    started_at.elapsed().as_secs_f64(),
                )?;
                step_started = Instant::now();
                let answered = observer
                    .step(Branch::Source, frame, None)
                    .map_err(EngineError::from)
                    .and_then(|()| super::answer_self_attention_query(&mut *observer, &store));
                answered.map_err(|error| {
                    observer_error = Some(error);
                    PipelineError::Cancelled
                })
            };
            let self_max_queries = wanted_queries.max(16 * 16);
            let result = record_source(
                model,
                &run.request,
                RecordConfig {
                    self_max_queries,
                    batch_item: 0,
                },
                Some(&mut processor),
                &mut on_step,
                cancel,
            );
            if let Some(error) = observer_error {
                return Err(error);
            }
            let (output, recording) = result?;
            self.source_recordings += 1;
            self.edit_source = Some(EditSource {
                params: run.resolved.clone(),
                self_max_queries,
                recording,
            });
            let source = RunOutput {
                image: to_worker_image(output.image),
                self_attention_grids: store
                    .try_borrow()
                    .map(|store| store.self_attention_resolutions())
                    .unwrap_or_default(),
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
        let Some(recording) = self
            .edit_source
            .as_ref()
            .map(|source| Arc::clone(&source.recording))
        else {
            return Err(EngineError::Unavailable(
                "the source recording is missing".to_owned(),
            ));
        };

        // The edited branch.
        let edit_started_at = Instant::now();
        let edit_tokens = model.tokenizer.encode(&spec.edit_prompt)?;
        let alignment = align_prompts(
            &PromptLayout {
                tokens: &run.tokens.tokens,
                words: &run.tokens.words,
            },
            &PromptLayout {
                tokens: &edit_tokens.tokens,
                words: &edit_tokens.words,
            },
            run.tokens.ids.len(),
            spec.kind,
        )?;
        observer.started(
            Branch::Edited,
            &GenerateParams {
                prompt: spec.edit_prompt.clone(),
                ..run.resolved.clone()
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
        let store = Rc::new(RefCell::new(AttentionStore::new(StoreConfig::new(
            edit_tokens.token_count(),
        ))));
        let mut processor = SharedStore(Rc::clone(&store));
        let mut observer_error: Option<EngineError> = None;
        let mut step_started = Instant::now();
        let mut on_step = |report: &EditStepReport| -> Result<(), PipelineError> {
            let frame = step_frame(
                model,
                &store,
                report,
                step_started.elapsed().as_secs_f64(),
                edit_started_at.elapsed().as_secs_f64(),
            )?;
            step_started = Instant::now();
            observer
                .step(Branch::Edited, frame, report.blend_mask.clone())
                .map_err(|error| {
                    observer_error = Some(error.into());
                    PipelineError::Cancelled
                })
        };
        let result = generate_edited_branch(
            model,
            &run.request,
            spec,
            recording,
            Some(&mut processor),
            &mut on_step,
            cancel,
        );
        if let Some(error) = observer_error {
            return Err(error);
        }
        let branch = result?;
        let blend_mask: Option<BlendMask> =
            branch.blend_masks.iter().rev().flatten().next().cloned();
        Ok(EditRunOutput {
            source: source_output,
            edited: Some(to_worker_image(branch.edited.image)),
            blend_mask,
        })
    }
}
