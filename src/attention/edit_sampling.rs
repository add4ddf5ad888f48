//! Prompt-to-Prompt sampling: the source prompt's image and the edited prompt's image from the same
//! noise, the edited one steered by [`PromptToPrompt`] (see [`crate::attention::p2p`]).
//!
//! Two ways to run, with the same result up to floating-point batching effects:
//! - **batch** ([`generate_edit`] with `replay: false`): one loop, UNet batch
//!   `[uncond_src, uncond_edit, cond_src, cond_edit]`, as google/prompt-to-prompt does;
//! - **replay** ([`record_source`], then [`generate_edited_branch`] as often as the edit changes): the
//!   source runs alone while a [`SourceRecorder`] keeps its attention and latents; the edited prompt
//!   then runs alone and reads them back. The editor uses this to re-run only the edited branch.
//!   An edit that leaves the first steps alone (a reweight whose window opens at step `k`) copies
//!   the source's latents of steps `< k` from the recording instead of sampling them
//!   ([`EditedBranchRun::first_edited_step`]).
//!
//! Each row keeps its own scheduler and noise generator, so the source row of a batch run follows
//! exactly the steps of a plain [`crate::pipeline::sampling::generate`] of the source prompt (ancestral noise included), and
//! the edited row draws the same ancestral noise a plain run of the edited prompt would.
//!
//! Local blend acts on the edited latents after every step from its start on:
//! `x_edit = x_src + mask * (x_edit - x_src)`.

use std::sync::Arc;

use candle_core::Tensor;

use crate::analysis::alignment::{PromptAlignment, PromptLayout};
use crate::analysis::edit_spec::{BlendMask, EditSpec};
use crate::attention::p2p::{
    PromptToPrompt, RecordConfig, SourceMode, SourceRecorder, SourceRecording,
};
use crate::hook::CancelToken;
use crate::hook::{AttentionProcessor, AttentionSite, ChainedProcessors};
use crate::pipeline::inversion::{invert_observed, Inversion, InversionProgress, InversionRequest};
use crate::pipeline::limits::RunCapture;
use crate::pipeline::model::StableDiffusion;
use crate::pipeline::rng::NoiseRng;
use crate::pipeline::sampling::{
    decode_to_unit_range, denoise_step, encode_prompt_batch, prepare_run, prepare_run_with,
    replay_unconditional, row_scheduler, run_to_end, start_row, to_rgb8, DenoiseRow, DenoiseStep,
    GenerateOutput, GenerateRequest, PreparedRun, RgbImage, RowRole, Sampler, StepwiseRun,
};
use crate::pipeline::scheduler::SchedulerKind;
use crate::pipeline::tokenizer::PromptTokens;
use crate::pipeline::{PipelineError, PipelineResult};

/// What to generate: the source run's settings (its `prompt` is the source prompt) and the edit.
#[derive(Clone, Debug)]
pub struct EditRequest {
    /// Source prompt, negative prompt, seed, steps, guidance, size, scheduler, initial noise.
    pub generate: GenerateRequest,
    /// The edited prompt and the Prompt-to-Prompt controls.
    pub spec: EditSpec,
    /// Run the source first and replay its attention into an edited-only run, instead of one batch.
    pub replay: bool,
}

/// Which run a step report belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditBranch {
    /// Batch mode: both prompts stepped together.
    Both,
    /// Replay mode, first run: the source alone.
    Source,
    /// Replay mode, second run: the edited prompt alone.
    Edited,
}

/// Sent after every denoising step.
#[derive(Clone, Debug)]
pub struct EditStepReport {
    /// Which run.
    pub branch: EditBranch,
    /// The step just finished, 0-based.
    pub step_index: usize,
    /// Steps of the run.
    pub step_count: usize,
    /// The timestep the UNet saw.
    pub timestep: f64,
    /// Source latents after the step, `[1, channels, h, w]` ([`EditBranch::Both`] and
    /// [`EditBranch::Source`]).
    pub source_latents: Option<Tensor>,
    /// Edited latents after the step and its local blend, `[1, channels, h, w]`
    /// ([`EditBranch::Both`] and [`EditBranch::Edited`]).
    pub edited_latents: Option<Tensor>,
    /// The local-blend mask applied at this step, if one was.
    pub blend_mask: Option<BlendMask>,
    /// [`EditBranch::Edited`]: the step was not sampled; its latents are the recorded source's,
    /// which the edit does not change before [`EditedBranchRun::first_edited_step`].
    pub reused_source: bool,
}

/// Processors that watch one run each (for heat maps, export). Each sees its own run as a plain
/// `[uncond, cond]` batch (`[cond]` without guidance) after the edit, whatever the mode; what they
/// return is ignored (they cannot change the attention).
#[derive(Default)]
pub struct EditObservers<'a> {
    /// Watches the source prompt's run.
    pub source: Option<&'a mut dyn AttentionProcessor>,
    /// Watches the edited prompt's run.
    pub edited: Option<&'a mut dyn AttentionProcessor>,
}

/// The result of an edit.
#[derive(Clone, Debug)]
pub struct EditOutput {
    /// The source prompt's run.
    pub source: GenerateOutput,
    /// The edited prompt's run.
    pub edited: GenerateOutput,
    /// The alignment the edit used.
    pub alignment: PromptAlignment,
    /// Per step: the local-blend mask applied after it (`None` before the blend start or without
    /// local blend).
    pub blend_masks: Vec<Option<BlendMask>>,
    /// Replay mode: the source's recording, to run further edits of the same source.
    pub recording: Option<Arc<SourceRecording>>,
}

/// Runs an edit (batch or replay, see the module docs).
pub fn generate_edit(
    model: &StableDiffusion,
    request: &EditRequest,
    observers: EditObservers<'_>,
    on_step: &mut dyn FnMut(&EditStepReport) -> PipelineResult<()>,
    cancel: &CancelToken,
) -> PipelineResult<EditOutput> {
    if request.replay {
        let (source, recording) = record_source(
            model,
            &request.generate,
            RecordConfig {
                self_max_queries: request.spec.self_replace.max_queries,
                batch_item: 0,
            },
            observers.source,
            on_step,
            cancel,
        )?;
        let branch = generate_edited_branch(
            model,
            &request.generate,
            &request.spec,
            Arc::clone(&recording),
            observers.edited,
            on_step,
            cancel,
        )?;
        return Ok(EditOutput {
            source,
            edited: branch.edited,
            alignment: branch.alignment,
            blend_masks: branch.blend_masks,
            recording: Some(recording),
        });
    }
    generate_edit_batch(model, request, observers, on_step, cancel)
}

/// Replay mode, first run: a plain [`crate::pipeline::sampling::generate`] of the source prompt that records what
/// [`generate_edited_branch`] needs (attention per step and layer, latents per step).
pub fn record_source(
    model: &StableDiffusion,
    request: &GenerateRequest,
    record: RecordConfig,
    observer: Option<&mut dyn AttentionProcessor>,
    on_step: &mut dyn FnMut(&EditStepReport) -> PipelineResult<()>,
    cancel: &CancelToken,
) -> PipelineResult<(GenerateOutput, Arc<SourceRecording>)> {
    let capture = RunCapture::none().with_replay_recording(record.self_max_queries);
    let source = prepare_run_with(model, request, &capture)?;
    let mut run = SourceRecordingRun::new(model, source, record)?;
    run_to_end(&mut run, observer, on_step, cancel)?;
    run.finish()
}

/// Replay mode, first run, one step per call (see [`Sampler`]): the source prompt sampled as a
/// plain run while a [`SourceRecorder`] keeps its attention and latents.
pub struct SourceRecordingRun<'model> {
    sampler: Sampler<'model>,
    recorder: SourceRecorder,
}

impl<'model> SourceRecordingRun<'model> {
    /// Starts recording the run `source` describes.
    pub fn new(
        model: &'model StableDiffusion,
        source: PreparedRun,
        record: RecordConfig,
    ) -> PipelineResult<Self> {
        Ok(Self {
            sampler: Sampler::new(model, source)?,
            recorder: SourceRecorder::new(record),
        })
    }

    /// Lets every hooked attention layer check `cancel` (see [`Sampler::with_cancel`]).
    #[must_use]
    pub fn with_cancel(mut self, cancel: CancelToken) -> Self {
        self.sampler = self.sampler.with_cancel(cancel);
        self
    }

    /// The run being recorded.
    pub fn run(&self) -> &PreparedRun {
        self.sampler.run()
    }

    /// The next step, `observer` watching it beside the recorder; `None` after the last.
    pub fn step(
        &mut self,
        observer: Option<&mut (dyn AttentionProcessor + '_)>,
    ) -> PipelineResult<Option<EditStepReport>> {
        let report = {
            let mut chain = ChainedProcessors::with_observer(&mut self.recorder, observer);
            self.sampler.step(Some(&mut chain))?
        };
        let Some(report) = report else {
            return Ok(None);
        };
        self.recorder
            .recording_mut()
            .record_latents(report.step_index, &report.latents);
        Ok(Some(EditStepReport {
            branch: EditBranch::Source,
            step_index: report.step_index,
            step_count: report.step_count,
            timestep: report.timestep,
            source_latents: Some(report.latents),
            edited_latents: None,
            blend_mask: None,
            reused_source: false,
        }))
    }

    /// The source's image and its recording.
    pub fn finish(self) -> PipelineResult<(GenerateOutput, Arc<SourceRecording>)> {
        Ok((self.sampler.finish()?, self.recorder.finish()))
    }
}

/// The edited prompt's run of a replay.
#[derive(Clone, Debug)]
pub struct EditedBranch {
    /// The edited prompt's run.
    pub edited: GenerateOutput,
    /// The alignment the edit used.
    pub alignment: PromptAlignment,
    /// Per step: the local-blend mask applied after it.
    pub blend_masks: Vec<Option<BlendMask>>,
}

/// Replay mode, second run: the edited prompt alone, its attention steered by the source's
/// `recording` (from [`record_source`] with the same `request`: seed, steps, size, scheduler).
pub fn generate_edited_branch(
    model: &StableDiffusion,
    request: &GenerateRequest,
    spec: &EditSpec,
    recording: Arc<SourceRecording>,
    observer: Option<&mut dyn AttentionProcessor>,
    on_step: &mut dyn FnMut(&EditStepReport) -> PipelineResult<()>,
    cancel: &CancelToken,
) -> PipelineResult<EditedBranch> {
    let mut run = EditedBranchRun::new(model, &prepare_run(model, request)?, spec, recording)?
        .with_cancel(cancel.clone());
    run_to_end(&mut run, observer, on_step, cancel)?;
    run.finish()
}

/// Replay mode, second run, one step per call (see [`Sampler`]).
pub struct EditedBranchRun<'model> {
    model: &'model StableDiffusion,
    setup: RunSetup,
    /// The source run's request (guidance, the inversion it replays).
    request: GenerateRequest,
    recording: Arc<SourceRecording>,
    p2p: PromptToPrompt,
    /// `[negative, edited]` with guidance, `[edited]` without.
    text_embeddings: Tensor,
    row: DenoiseRow,
    latents_per_step: Vec<Tensor>,
    blend_masks: Vec<Option<BlendMask>>,
    /// Checked by every hooked attention layer ([`EditedBranchRun::with_cancel`]).
    cancel: Option<CancelToken>,
    /// Steps before this one are copied from the recording (see [`Self::first_edited_step`]).
    first_edited_step: usize,
}

impl<'model> EditedBranchRun<'model> {
    /// Prepares the edit `spec` of the recorded `source` run (only the edited prompt is
    /// tokenised here; `source` was prepared once by [`prepare_run`]).
    pub fn new(
        model: &'model StableDiffusion,
        source: &PreparedRun,
        spec: &EditSpec,
        recording: Arc<SourceRecording>,
    ) -> PipelineResult<Self> {
        let setup = RunSetup::new(model, source, spec)?;
        if recording.step_count() != setup.step_count {
            return Err(PipelineError::InvalidArgument {
                name: "source recording",
                reason: format!(
                    "it has {} steps, the edited run {}; record the source with the same settings",
                    recording.step_count(),
                    setup.step_count
                ),
            });
        }
        let p2p = setup.processor(spec, SourceMode::Replay(Arc::clone(&recording)))?;
        let text_embeddings = encode_prompt_batch(
            model,
            &[&setup.edit_tokens],
            &setup.negative_tokens,
            setup.guided,
        )?;
        let row = setup.row(model, &source.request, RowRole::Edited)?.0;
        let first_edited_step = first_edited_step(&setup, &source.request, spec, &p2p);
        Ok(Self {
            model,
            request: source.request.clone(),
            latents_per_step: Vec::with_capacity(setup.step_count),
            blend_masks: Vec::with_capacity(setup.step_count),
            setup,
            recording,
            p2p,
            text_embeddings,
            row,
            cancel: None,
            first_edited_step,
        })
    }

    /// The first step the edit can change: the steps before it are the source's own (their
    /// latents are copied from the recording, bit for bit, and no UNet runs for them). 0 unless the
    /// edit provably leaves those steps alone (see the private `first_edited_step`: same tokens,
    /// no reweight open yet, DDIM or Euler, no inversion, no word blend).
    pub fn first_edited_step(&self) -> usize {
        self.first_edited_step
    }

    /// Samples every step, even those [`Self::first_edited_step`] would copy from the recording
    /// (to compare the two, or to time the full branch).
    #[must_use]
    pub fn sampling_every_step(mut self) -> Self {
        self.first_edited_step = 0;
        self
    }

    /// Lets every hooked attention layer check `cancel` (see [`Sampler::with_cancel`]).
    #[must_use]
    pub fn with_cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// The edited prompt's tokens.
    pub fn edit_tokens(&self) -> &PromptTokens {
        &self.setup.edit_tokens
    }

    /// The word alignment the edit uses.
    pub fn alignment(&self) -> &PromptAlignment {
        self.p2p.alignment()
    }

    /// The next step, `observer` watching the edited run; `None` after the last.
    pub fn step(
        &mut self,
        observer: Option<&mut (dyn AttentionProcessor + '_)>,
    ) -> PipelineResult<Option<EditStepReport>> {
        let step_index = self.latents_per_step.len();
        let Some(&timestep) = self.setup.timesteps.get(step_index) else {
            return Ok(None);
        };
        let step = DenoiseStep {
            step_index,
            step_count: self.setup.step_count,
            timestep,
            guidance: self.request.guidance,
            guided: self.setup.guided,
            cancel: self.cancel.clone(),
            unconditional: replay_unconditional(&self.request, step_index)?,
        };
        let reused_source = step_index < self.first_edited_step;
        if reused_source {
            // The source's own step: its schedulers keep no state between steps, so the next
            // step only needs these latents.
            self.row.latents = self.recorded_latents(step_index)?;
        } else {
            let mut chain = ChainedProcessors::with_observer(&mut self.p2p, observer);
            denoise_step(
                self.model,
                std::slice::from_mut(&mut self.row),
                &step,
                &self.text_embeddings,
                Some(&mut chain),
            )?;
            chain.step_finished(step_index)?;
        }
        let source_latents = self.recorded_latents(step_index)?;
        // (On a reused step this blends the source with itself: the latents stay the source's.)
        let mask = blend_row(&mut self.p2p, &step, &source_latents, &mut self.row)?;
        self.latents_per_step.push(self.row.latents.clone());
        self.blend_masks.push(mask.clone());
        Ok(Some(EditStepReport {
            branch: EditBranch::Edited,
            step_index,
            step_count: self.setup.step_count,
            timestep,
            source_latents: None,
            edited_latents: Some(self.row.latents.clone()),
            blend_mask: mask,
            reused_source,
        }))
    }

    /// The source's latents after step `step_index`, `[1, channels, h, w]`, on the row's device.
    fn recorded_latents(&self, step_index: usize) -> PipelineResult<Tensor> {
        let Some(latents) = self.recording.latents_after_step(step_index) else {
            return Err(PipelineError::InvalidArgument {
                name: "source recording",
                reason: format!("no source latents after step {step_index}"),
            });
        };
        Ok(latents.to_device(self.row.latents.device())?)
    }

    /// The edited image, the alignment and the masks applied.
    pub fn finish(self) -> PipelineResult<EditedBranch> {
        let edited = self.setup.output(
            self.model,
            self.row.latents,
            self.latents_per_step,
            self.setup.edit_tokens.clone(),
        )?;
        Ok(EditedBranch {
            edited,
            alignment: self.p2p.alignment().clone(),
            blend_masks: self.blend_masks,
        })
    }
}

/// The first step of an edited branch that can differ from its source, so that the steps before
/// it can be copied from the recording. Those steps are the source's own exactly when the edited
/// prompt is the source prompt token for token (only reweights), no reweighted token's cross
/// window is open yet ([`PromptToPrompt::first_reweighted_step`]), the scheduler keeps no state
/// and draws no noise between steps (DDIM, Euler), no inversion is replayed (its edited row steps
/// differently from the source row) and no local blend collects word maps (they are summed over
/// every step). Otherwise 0: every step is sampled.
fn first_edited_step(
    setup: &RunSetup,
    request: &GenerateRequest,
    spec: &EditSpec,
    p2p: &PromptToPrompt,
) -> usize {
    let stateless_scheduler = matches!(
        setup.scheduler_kind,
        SchedulerKind::Ddim | SchedulerKind::Euler
    );
    let word_blend = spec
        .local_blend
        .as_ref()
        .is_some_and(|blend| blend.mask.is_none());
    if !stateless_scheduler
        || request.inversion.is_some()
        || word_blend
        || setup.edit_tokens != setup.source_tokens
    {
        return 0;
    }
    p2p.first_reweighted_step(setup.step_count)
}

/// Batch mode: both prompts in one loop.
fn generate_edit_batch(
    model: &StableDiffusion,
    request: &EditRequest,
    observers: EditObservers<'_>,
    on_step: &mut dyn FnMut(&EditStepReport) -> PipelineResult<()>,
    cancel: &CancelToken,
) -> PipelineResult<EditOutput> {
    // Both prompts in one UNet batch.
    let capture = RunCapture::none().with_prompts(2);
    let source = prepare_run_with(model, &request.generate, &capture)?;
    // The request as prepared: with an inversion to replay, on its DDIM and negative prompt.
    let generate_request = &source.request;
    let setup = RunSetup::new(model, &source, &request.spec)?;
    let mut p2p = setup.processor(&request.spec, SourceMode::Batch)?;
    let text_embeddings = encode_prompt_batch(
        model,
        &[&setup.source_tokens, &setup.edit_tokens],
        &setup.negative_tokens,
        setup.guided,
    )?;
    let (source_row, rng_after_noise) = setup.row(model, generate_request, RowRole::Source)?;
    let edit_row = DenoiseRow {
        latents: source_row.latents.clone(),
        scheduler: row_scheduler(model, generate_request, RowRole::Edited)?,
        rng: rng_after_noise,
    };
    let mut rows = [source_row, edit_row];
    let mut source_view = observers.source.map(|inner| ItemView {
        inner,
        item: 0,
        items: 2,
    });
    let mut edited_view = observers.edited.map(|inner| ItemView {
        inner,
        item: 1,
        items: 2,
    });
    let mut source_per_step = Vec::with_capacity(setup.step_count);
    let mut edited_per_step = Vec::with_capacity(setup.step_count);
    let mut blend_masks = Vec::with_capacity(setup.step_count);
    for (step_index, &timestep) in setup.timesteps.iter().enumerate() {
        if cancel.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
        let step = setup.step(generate_request, step_index, timestep, cancel)?;
        {
            let mut processors: Vec<&mut dyn AttentionProcessor> = vec![&mut p2p];
            if let Some(view) = source_view.as_mut() {
                processors.push(view);
            }
            if let Some(view) = edited_view.as_mut() {
                processors.push(view);
            }
            let mut chain = ChainedProcessors::new(processors);
            denoise_step(model, &mut rows, &step, &text_embeddings, Some(&mut chain))?;
            chain.step_finished(step_index)?;
        }
        let [source, edited] = &mut rows;
        let mask = blend_row(&mut p2p, &step, &source.latents, edited)?;
        source_per_step.push(source.latents.clone());
        edited_per_step.push(edited.latents.clone());
        on_step(&EditStepReport {
            branch: EditBranch::Both,
            step_index,
            step_count: setup.step_count,
            timestep,
            source_latents: Some(source.latents.clone()),
            edited_latents: Some(edited.latents.clone()),
            blend_mask: mask.clone(),
            reused_source: false,
        })?;
        blend_masks.push(mask);
    }
    let [source_row, edit_row] = rows;
    let source = setup.output(
        model,
        source_row.latents,
        source_per_step,
        setup.source_tokens.clone(),
    )?;
    let edited = setup.output(
        model,
        edit_row.latents,
        edited_per_step,
        setup.edit_tokens.clone(),
    )?;
    Ok(EditOutput {
        source,
        edited,
        alignment: p2p.alignment().clone(),
        blend_masks,
        recording: None,
    })
}

/// Applies the local blend to `edited` after `step`; returns the mask used.
fn blend_row(
    p2p: &mut PromptToPrompt,
    step: &DenoiseStep,
    source_latents: &Tensor,
    edited: &mut DenoiseRow,
) -> PipelineResult<Option<BlendMask>> {
    match p2p.blend_edit_latents(
        step.step_index,
        step.step_count,
        source_latents,
        &edited.latents,
    )? {
        Some(blended) => {
            edited.latents = blended;
            Ok(p2p.latest_mask().cloned())
        }
        None => Ok(None),
    }
}

/// What both modes prepare the same way.
struct RunSetup {
    latent_shape: [usize; 4],
    timesteps: Vec<f64>,
    step_count: usize,
    scheduler_kind: SchedulerKind,
    guided: bool,
    source_tokens: PromptTokens,
    edit_tokens: PromptTokens,
    negative_tokens: PromptTokens,
    warnings: Vec<String>,
}

impl RunSetup {
    /// The edit of `source` (checked, tokenised and scheduled once by [`prepare_run`]): only the
    /// edited prompt is tokenised here.
    fn new(model: &StableDiffusion, source: &PreparedRun, spec: &EditSpec) -> PipelineResult<Self> {
        let edit_tokens = model
            .tokenizer
            .encode_prompt_like(&spec.edit_prompt, &source.prompt_tokens)?;
        let mut warnings = source.warnings.clone();
        warnings.extend(
            edit_tokens
                .warning()
                .map(|warning| format!("edited {warning}")),
        );
        Ok(Self {
            latent_shape: source.latent_shape,
            step_count: source.step_count(),
            timesteps: source.timesteps.clone(),
            scheduler_kind: source.scheduler_kind,
            guided: source.request.uses_guidance(),
            source_tokens: source.prompt_tokens.clone(),
            edit_tokens,
            negative_tokens: source.negative_tokens.clone(),
            warnings,
        })
    }

    fn processor(&self, spec: &EditSpec, mode: SourceMode) -> PipelineResult<PromptToPrompt> {
        PromptToPrompt::new(
            spec,
            &PromptLayout {
                tokens: &self.source_tokens.tokens,
                words: &self.source_tokens.words,
            },
            &PromptLayout {
                tokens: &self.edit_tokens.tokens,
                words: &self.edit_tokens.words,
            },
            self.source_tokens.ids.len(),
            mode,
        )
    }

    /// A row in `role` at the run's start (the request's noise, or its inversion's `z*_T`), and
    /// the noise generator's state after drawing it.
    fn row(
        &self,
        model: &StableDiffusion,
        request: &GenerateRequest,
        role: RowRole,
    ) -> PipelineResult<(DenoiseRow, NoiseRng)> {
        start_row(model, request, self.latent_shape, role)
    }

    fn step(
        &self,
        request: &GenerateRequest,
        step_index: usize,
        timestep: f64,
        cancel: &CancelToken,
    ) -> PipelineResult<DenoiseStep> {
        Ok(DenoiseStep {
            step_index,
            step_count: self.step_count,
            timestep,
            guidance: request.guidance,
            guided: self.guided,
            cancel: Some(cancel.clone()),
            unconditional: replay_unconditional(request, step_index)?,
        })
    }

    fn output(
        &self,
        model: &StableDiffusion,
        latents: Tensor,
        latents_per_step: Vec<Tensor>,
        prompt_tokens: PromptTokens,
    ) -> PipelineResult<GenerateOutput> {
        let image_f32 = decode_to_unit_range(model, &latents)?;
        let image = to_rgb8(&image_f32)?;
        Ok(GenerateOutput {
            image,
            image_f32,
            latents_per_step: Tensor::stack(&latents_per_step, 0)?,
            timesteps: self.timesteps.clone(),
            scheduler: self.scheduler_kind,
            prompt_tokens,
            negative_tokens: self.negative_tokens.clone(),
            warnings: self.warnings.clone(),
        })
    }
}

/// Shows one prompt's rows of a multi-prompt batch to an observer as a plain run:
/// `[uncond_item, cond_item]` with guidance, `[item]` without.
struct ItemView<'a> {
    inner: &'a mut dyn AttentionProcessor,
    /// Which prompt of the batch.
    item: usize,
    /// Prompts in the batch.
    items: usize,
}

impl AttentionProcessor for ItemView<'_> {
    /// A batch of another size goes to [`ItemView::process_probabilities`], which names it.
    fn wants_probabilities(&self, site: &AttentionSite) -> bool {
        let halves = if site.cfg { 2 } else { 1 };
        site.batch != halves * self.items
            || self.inner.wants_probabilities(&AttentionSite {
                batch: halves,
                ..site.clone()
            })
    }

    fn process_probabilities(
        &mut self,
        site: &AttentionSite,
        probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let halves = if site.cfg { 2 } else { 1 };
        if site.batch != halves * self.items {
            candle_core::bail!(
                "edit observer: {} has a batch of {}, expected {} prompts x {halves}",
                site.module_path(),
                site.batch,
                self.items
            );
        }
        let heads = site.heads;
        let mut parts = Vec::with_capacity(halves);
        for half in 0..halves {
            parts.push(probs.narrow(0, (half * self.items + self.item) * heads, heads)?);
        }
        let view = Tensor::cat(&parts, 0)?;
        let view_site = AttentionSite {
            batch: halves,
            ..site.clone()
        };
        self.inner.process_probabilities(&view_site, &view)?;
        Ok(None)
    }

    /// The observer's item of the view (`[uncond, cond]` halves) as a row of the whole batch.
    fn observed_head_mean(&self, site: &AttentionSite) -> Option<usize> {
        let halves = if site.cfg { 2 } else { 1 };
        let half = self.inner.observed_head_mean(&AttentionSite {
            batch: halves,
            ..site.clone()
        })?;
        (half < halves).then_some(half * self.items + self.item)
    }

    fn head_mean_sum(&mut self, site: &AttentionSite) -> candle_core::Result<Option<&mut [f32]>> {
        let halves = if site.cfg { 2 } else { 1 };
        self.inner.head_mean_sum(&AttentionSite {
            batch: halves,
            ..site.clone()
        })
    }

    fn step_finished(&mut self, step_index: usize) -> candle_core::Result<()> {
        self.inner.step_finished(step_index)
    }
}

impl StepwiseRun for SourceRecordingRun<'_> {
    type Report = EditStepReport;

    fn next_step(
        &mut self,
        observer: Option<&mut (dyn AttentionProcessor + '_)>,
    ) -> PipelineResult<Option<EditStepReport>> {
        self.step(observer)
    }
}

impl StepwiseRun for EditedBranchRun<'_> {
    type Report = EditStepReport;

    fn next_step(
        &mut self,
        observer: Option<&mut (dyn AttentionProcessor + '_)>,
    ) -> PipelineResult<Option<EditStepReport>> {
        self.step(observer)
    }
}

/// A given image inverted, with its source branch recorded for edits (see [`invert_recording_source`]).
#[derive(Clone, Debug)]
pub struct InvertedSource {
    /// The inversion.
    pub inversion: Arc<Inversion>,
    /// The request that replays it (the caller's request with the inversion's steps, guidance,
    /// seed, size and DDIM): what [`generate_edited_branch`] takes.
    pub request: GenerateRequest,
    /// The source branch's run: the image's reconstruction.
    pub source: GenerateOutput,
    /// The source branch's recording, as [`record_source`] of `request` makes it.
    pub recording: Arc<SourceRecording>,
    /// True when the inversion's own pass was the source branch (the exact methods, `direct` and
    /// `ddpm`), false when the source ran separately after the inversion.
    pub recorded_while_inverting: bool,
}

/// Inverts `image` with `inversion` and records the source branch of later edits: for the exact
/// methods (`direct`, `ddpm`) the inversion's pass down from `z*_T` feeds the UNet the very
/// latents the replay's source row would (same embeddings, batch layout, guidance), so the
/// recorder rides on that pass ([`invert_observed`]) and no separate source run is made: one UNet
/// pass fewer per edit (for `direct` a pass of the prompt's half alone), with a recording and
/// source latents bit-identical to [`record_source`]'s.
/// Other methods invert, then run [`record_source`].
///
/// `request` is the replay's template: its prompt must be the inversion's prompt and its size
/// the image's; steps, guidance, seed, scheduler and the inversion are set from `inversion`.
pub fn invert_recording_source(
    model: &StableDiffusion,
    image: &RgbImage,
    inversion: &InversionRequest,
    request: &GenerateRequest,
    record: RecordConfig,
    on_step: &mut dyn FnMut(&InversionProgress) -> PipelineResult<()>,
    cancel: &CancelToken,
) -> PipelineResult<InvertedSource> {
    if request.prompt != inversion.prompt {
        return Err(PipelineError::InvalidArgument {
            name: "source prompt",
            reason: format!(
                "{:?} is not the prompt the image is inverted with ({:?})",
                request.prompt, inversion.prompt
            ),
        });
    }
    let mut recorder = SourceRecorder::new(record);
    let (inverted, pass) = invert_observed(
        model,
        image,
        inversion,
        Some(&mut recorder),
        on_step,
        cancel,
    )?;
    let mut replay = request.clone();
    replay.steps = inverted.request.steps;
    replay.guidance = inverted.request.guidance;
    replay.seed = inverted.request.seed;
    (replay.width, replay.height) = inverted.size_px;
    replay.scheduler = Some(SchedulerKind::Ddim);
    replay.inversion = Some(Arc::clone(&inverted));
    let Some(pass) = pass else {
        let (source, recording) =
            record_source(model, &replay, record, None, &mut |_| Ok(()), cancel)?;
        return Ok(InvertedSource {
            inversion: inverted,
            request: replay,
            source,
            recording,
            recorded_while_inverting: false,
        });
    };
    let capture = RunCapture::none().with_replay_recording(record.self_max_queries);
    let prepared = prepare_run_with(model, &replay, &capture)?;
    let step_count = prepared.step_count();
    for step_index in 0..step_count {
        recorder
            .recording_mut()
            .record_latents(step_index, &pass.latents_per_step.get(step_index)?);
    }
    let final_latents = pass.latents_per_step.get(step_count - 1)?;
    let image_f32 = decode_to_unit_range(model, &final_latents)?;
    let source = GenerateOutput {
        image: to_rgb8(&image_f32)?,
        image_f32,
        latents_per_step: pass.latents_per_step,
        timesteps: prepared.timesteps,
        scheduler: prepared.scheduler_kind,
        prompt_tokens: prepared.prompt_tokens,
        negative_tokens: prepared.negative_tokens,
        warnings: prepared.warnings,
    };
    Ok(InvertedSource {
        inversion: inverted,
        request: replay,
        source,
        recording: recorder.finish(),
        recorded_while_inverting: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::heatmap::UnetPlace;
    use crate::attention::store::{AttentionStore, StoreConfig};
    use crate::hook::AttentionKind;

    fn site(batch: usize, cfg: bool) -> AttentionSite {
        AttentionSite {
            place: UnetPlace::Up,
            block_index: 0,
            attention_index: 0,
            layer_index: 0,
            kind: AttentionKind::Cross,
            query_h: 2,
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
    fn an_item_view_names_its_observers_row_of_the_whole_batch() {
        let mut store = AttentionStore::new(StoreConfig::new(3));
        let mut view = ItemView {
            inner: &mut store,
            item: 1,
            items: 2,
        };
        // Halves-major batches: [uncond 0, uncond 1, cond 0, cond 1] with guidance.
        assert_eq!(view.observed_head_mean(&site(4, true)), Some(3));
        assert!(!view.wants_probabilities(&site(4, true)));
        assert_eq!(view.observed_head_mean(&site(2, false)), Some(1));
        // A batch of another size goes to the probability stage, which names it.
        assert!(view.wants_probabilities(&site(6, true)));
        let probs = Tensor::zeros(
            (12, 4, 3),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap_or_else(|error| panic!("{error}"));
        let error = view
            .process_probabilities(&site(6, true), &probs)
            .unwrap_err();
        assert!(error.to_string().contains("batch of 6"), "{error}");
    }
}
