//! Edits that keep up with a moving slider: a burst of edits runs only its latest (the others end
//! cancelled, superseded) and gives the image a single edit with the same settings gives; an edit
//! whose reweight window opens at step `k` copies the source's steps `< k` bit for bit instead of
//! sampling them. With the real engine on the bundled model, and with the fake engine where a
//! step gate holds the first edit so the burst is deterministic.

// The helpers below are test code too; `allow-unwrap-in-tests` only covers `#[test]` functions.
#![allow(clippy::unwrap_used)]

mod worker_common;

use std::sync::Arc;

use attend::analysis::edit_spec::{CrossWindow, EditSpec, Reweight, StepWindow};
use attend::attention::edit_sampling::{record_source, EditStepReport, EditedBranchRun};
use attend::attention::p2p::RecordConfig;
use attend::hook::CancelToken;
use attend::pipeline::model::{LoadOptions, StableDiffusion};
use attend::pipeline::sampling::{prepare_run, run_to_end, GenerateRequest};
use attend::pipeline::weights::WeightVariant;
use attend::worker::{
    bundled_model_dir, pipeline_engine_factory, Branch, EngineFactory, Event, FakeEngine,
    FakeEngineConfig, RgbImage, WorkerHandle,
};
use candle_core::Tensor;
use worker_common::{events_until_end_of, load_bundled, next_event, spawn_gated};

const PROMPT: &str = "a red circle and a blue square";
const STEPS: usize = 4;
const SEED: u64 = 5;
const BURST: usize = 10;

/// The slider's edit: "blue" weighted by `scale`, its window opening at `window_start`.
fn weight_edit(scale: f32, window_start: f64) -> EditSpec {
    EditSpec {
        cross_window: CrossWindow::uniform(StepWindow::new(window_start, 1.0)),
        reweights: vec![Reweight {
            word: "blue".to_owned(),
            scale,
        }],
        ..EditSpec::new(PROMPT)
    }
}

/// Records the source of run `run_id` (an edit without a spec) and waits for its end.
fn record(worker: &mut WorkerHandle) {
    let params = worker_common::params(PROMPT, STEPS, SEED);
    let run = worker.generate_edit(params, None).unwrap();
    let events = events_until_end_of(worker, run, Branch::Source);
    assert!(
        matches!(events.last(), Some(Event::Finished { .. })),
        "the source was recorded: {:?}",
        events.last()
    );
}

/// Sends `specs` as one burst of edits of the recorded source; returns their run ids.
fn send_burst(worker: &mut WorkerHandle, specs: &[EditSpec]) -> Vec<u64> {
    let params = worker_common::params(PROMPT, STEPS, SEED);
    specs
        .iter()
        .map(|spec| {
            worker
                .generate_edit(params.clone(), Some(spec.clone()))
                .unwrap()
        })
        .collect()
}

/// How the runs of a burst ended: per run, `Some(image)` for a finished edit, `None` when
/// cancelled. Waits until every run ended.
fn burst_outcomes(worker: &WorkerHandle, runs: &[u64]) -> Vec<Option<RgbImage>> {
    let mut outcomes: Vec<Option<Option<RgbImage>>> = vec![None; runs.len()];
    while outcomes.iter().any(Option::is_none) {
        let event = next_event(worker);
        let Some(index) = event
            .run_id()
            .and_then(|run_id| runs.iter().position(|&run| run == run_id))
        else {
            continue;
        };
        match event {
            Event::Finished {
                branch: Branch::Edited,
                image,
                ..
            } => outcomes[index] = Some(Some(image)),
            Event::Cancelled { .. } => outcomes[index] = Some(None),
            Event::Failed { message, .. } => panic!("edit {index} failed: {message}"),
            Event::Finished {
                branch: Branch::Source,
                ..
            } => panic!("edit {index} recorded the source again"),
            _ => {}
        }
    }
    outcomes.into_iter().flatten().collect()
}

/// The edited image of one edit `spec` of a freshly recorded source on a new worker.
fn single_edit(factory: EngineFactory, spec: &EditSpec) -> RgbImage {
    let mut worker = WorkerHandle::spawn(factory).unwrap();
    load_bundled(&worker);
    record(&mut worker);
    let runs = send_burst(&mut worker, std::slice::from_ref(spec));
    burst_outcomes(&worker, &runs).pop().flatten().unwrap()
}

/// Ten slider positions, the last one weighting "blue" by 2.
fn drag_positions() -> Vec<EditSpec> {
    (1..=BURST)
        .map(|position| weight_edit(1.0 + position as f32 / BURST as f32, 0.0))
        .collect()
}

/// Checks that only the last run of a burst finished, with the image of a single edit.
fn check_only_the_last_finishes(outcomes: &[Option<RgbImage>], single: &RgbImage) {
    let finished: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter_map(|(index, outcome)| outcome.is_some().then_some(index))
        .collect();
    assert_eq!(finished, vec![BURST - 1], "only the latest edit finishes");
    let last = outcomes[BURST - 1].as_ref().unwrap();
    assert_eq!(
        (last.width, last.height),
        (single.width, single.height),
        "same size as a single edit"
    );
    assert!(
        last.pixels == single.pixels,
        "the burst's edit is the image of a single edit with the same settings"
    );
}

#[test]
fn a_burst_of_edits_runs_only_the_latest_on_the_bundled_model() {
    let mut worker = WorkerHandle::spawn(pipeline_engine_factory()).unwrap();
    load_bundled(&worker);
    record(&mut worker);
    let positions = drag_positions();
    // Each send supersedes the edit before it (the handle cancels it before sending), so none of
    // the first nine can finish: a queued one never starts, a running one stops at its next check.
    let runs = send_burst(&mut worker, &positions);
    let outcomes = burst_outcomes(&worker, &runs);
    let single = single_edit(pipeline_engine_factory(), &positions[BURST - 1]);
    check_only_the_last_finishes(&outcomes, &single);
}

#[test]
fn a_burst_sent_while_an_edit_runs_supersedes_it_and_runs_only_the_latest() {
    let (mut worker, gate) = spawn_gated();
    load_bundled(&worker);
    gate.allow(STEPS);
    record(&mut worker);
    let positions = drag_positions();
    // The first edit starts its edited branch and waits at the gate before its first step.
    let first = send_burst(&mut worker, &positions[..1])[0];
    loop {
        if let Event::Started {
            run_id,
            branch: Branch::Edited,
            ..
        } = next_event(&worker)
        {
            if run_id == first {
                break;
            }
        }
    }
    let mut runs = vec![first];
    runs.extend(send_burst(&mut worker, &positions[1..]));
    gate.allow(STEPS);
    let outcomes = burst_outcomes(&worker, &runs);
    let fake: EngineFactory = Arc::new(|| Box::new(FakeEngine::new(FakeEngineConfig::default())));
    let single = single_edit(fake, &positions[BURST - 1]);
    check_only_the_last_finishes(&outcomes, &single);
}

fn bundled_model() -> StableDiffusion {
    let options = LoadOptions {
        variant: WeightVariant::Fp16,
        ..LoadOptions::default()
    };
    StableDiffusion::load(&bundled_model_dir(), &options).unwrap()
}

fn request(model: &StableDiffusion, steps: usize) -> GenerateRequest {
    GenerateRequest {
        steps,
        seed: SEED,
        ..GenerateRequest::new(model, PROMPT)
    }
}

/// The edited branch of `spec`, every step's report and the final latents.
fn edited_branch(
    model: &StableDiffusion,
    request: &GenerateRequest,
    spec: &EditSpec,
    recording: &Arc<attend::attention::p2p::SourceRecording>,
    every_step: bool,
) -> (usize, Vec<EditStepReport>) {
    let source = prepare_run(model, request).unwrap();
    let mut run = EditedBranchRun::new(model, &source, spec, Arc::clone(recording)).unwrap();
    if every_step {
        run = run.sampling_every_step();
    }
    let first_edited_step = run.first_edited_step();
    let mut reports = Vec::new();
    run_to_end(
        &mut run,
        None,
        &mut |report: &EditStepReport| {
            reports.push(report.clone());
            Ok(())
        },
        &CancelToken::new(),
    )
    .unwrap();
    (first_edited_step, reports)
}

fn values(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn an_edit_whose_window_opens_at_step_k_copies_the_source_steps_before_it() {
    let model = bundled_model();
    let steps = 6;
    let request = request(&model, steps);
    let (_, recording) = record_source(
        &model,
        &request,
        RecordConfig {
            self_max_queries: 16 * 16,
            batch_item: 0,
        },
        None,
        &mut |_| Ok(()),
        &CancelToken::new(),
    )
    .unwrap();
    // Cross windows count over steps + 1: floor(0.5 * 7) = 3.
    let spec = weight_edit(3.0, 0.5);
    let k = 3;
    let (first_edited_step, reports) = edited_branch(&model, &request, &spec, &recording, false);
    assert_eq!(first_edited_step, k);
    assert_eq!(reports.len(), steps);
    for report in &reports {
        let edited = values(report.edited_latents.as_ref().unwrap());
        let source = values(recording.latents_after_step(report.step_index).unwrap());
        if report.step_index < k {
            assert!(report.reused_source, "step {}", report.step_index);
            assert!(
                edited == source,
                "step {} is the source's, bit for bit",
                report.step_index
            );
        } else {
            assert!(!report.reused_source, "step {}", report.step_index);
        }
    }
    let last =
        |reports: &[EditStepReport]| values(reports[steps - 1].edited_latents.as_ref().unwrap());
    let source_last = values(recording.latents_after_step(steps - 1).unwrap());
    assert!(
        max_abs_diff(&last(&reports), &source_last) > 1e-3,
        "the reweight changes the steps from k on"
    );

    // Sampling every step gives the same edit: the copied steps are what the edited branch
    // computes for them (up to the summation order of the two attention paths).
    let (_, sampled) = edited_branch(&model, &request, &spec, &recording, true);
    for report in &sampled[..k] {
        let edited = values(report.edited_latents.as_ref().unwrap());
        let source = values(recording.latents_after_step(report.step_index).unwrap());
        let diff = max_abs_diff(&edited, &source);
        assert!(
            diff < 1e-4,
            "step {}: sampled differs by {diff}",
            report.step_index
        );
    }
    let diff = max_abs_diff(&last(&sampled), &last(&reports));
    assert!(diff < 1e-3, "final latents differ by {diff}");
}

#[test]
fn edits_that_change_the_first_step_sample_every_step() {
    let model = bundled_model();
    let request = request(&model, STEPS);
    let (_, recording) = record_source(
        &model,
        &request,
        RecordConfig {
            self_max_queries: 16 * 16,
            batch_item: 0,
        },
        None,
        &mut |_| Ok(()),
        &CancelToken::new(),
    )
    .unwrap();
    let source = prepare_run(&model, &request).unwrap();
    let first = |spec: &EditSpec| {
        EditedBranchRun::new(&model, &source, spec, Arc::clone(&recording))
            .unwrap()
            .first_edited_step()
    };
    // A weight from the first step, and a word swap (another prompt) with a late window.
    assert_eq!(first(&weight_edit(2.0, 0.0)), 0);
    let swap = EditSpec {
        cross_window: CrossWindow::uniform(StepWindow::new(0.5, 1.0)),
        ..EditSpec::new("a red square and a blue square")
    };
    assert_eq!(first(&swap), 0);
    // A weight of 1 changes nothing: every step is the source's.
    assert_eq!(first(&weight_edit(1.0, 0.0)), STEPS);
}
