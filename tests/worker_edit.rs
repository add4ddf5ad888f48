//! Edit mode through the worker protocol (`Command::GenerateEdit`): the source is recorded once and
//! reused by later edits, re-recorded when its parameters change; with the real engine on the
//! bundled model, and with the fake engine.

// The helpers below are test code too; `allow-unwrap-in-tests` only covers `#[test]` functions.
#![allow(clippy::unwrap_used)]

mod worker_common;

use std::sync::Arc;

use attend::worker::{
    pipeline_engine_factory, Branch, Command, CrossWindow, EditInfo, EditSpec, EngineFactory,
    Event, FakeEngine, FakeEngineConfig, GenerateParams, LocalBlendConfig, Reweight, RgbImage,
    SelfAttentionSpan, SelfReplace, StepWindow, WordChange, WorkerHandle,
};
use worker_common::{
    ends_run, events_until_end_of, events_until_steps, is_step_of, load_bundled, next_event,
    next_event_of, spawn_gated, step_count,
};

/// What one `GenerateEdit` reported.
#[derive(Debug, Default)]
struct EditEvents {
    source_started: usize,
    source_steps: usize,
    source_image: Option<RgbImage>,
    edit_info: Option<EditInfo>,
    edit_params: Option<GenerateParams>,
    edit_steps: usize,
    last_edit_step: Option<usize>,
    edited_image: Option<RgbImage>,
    masks: usize,
    cancelled: bool,
    failed: Option<String>,
}

/// Collects the events of `run_id` until its terminal event: the edited branch's `Finished` when
/// `expect_edit`, else the source's (or `Cancelled` / `Failed`). Events of other runs are ignored.
fn collect(worker: &WorkerHandle, run_id: u64, expect_edit: bool) -> EditEvents {
    let last = if expect_edit {
        Branch::Edited
    } else {
        Branch::Source
    };
    let mut seen = EditEvents::default();
    let events = events_until_end_of(worker, run_id, last);
    for event in events {
        if event.run_id() != Some(run_id) {
            continue;
        }
        match event {
            Event::Started {
                branch: Branch::Source,
                edit,
                ..
            } => {
                assert_eq!(edit, None, "the source has no edit info");
                seen.source_started += 1;
            }
            Event::Step {
                branch: Branch::Source,
                blend_mask,
                ..
            } => {
                assert_eq!(blend_mask, None, "the source has no blend mask");
                seen.source_steps += 1;
            }
            Event::Finished {
                branch: Branch::Source,
                image,
                ..
            } => seen.source_image = Some(image),
            Event::Started {
                branch: Branch::Edited,
                params,
                edit,
                ..
            } => {
                assert!(
                    edit.is_some(),
                    "the edited branch starts with its edit info"
                );
                seen.edit_info = edit;
                seen.edit_params = Some(params);
            }
            Event::Step {
                branch: Branch::Edited,
                frame,
                blend_mask,
                ..
            } => {
                assert!(
                    seen.last_edit_step
                        .is_none_or(|last| frame.step_index == last + 1),
                    "edited steps in order"
                );
                seen.last_edit_step = Some(frame.step_index);
                assert!(frame.preview.is_consistent());
                seen.edit_steps += 1;
                seen.masks += usize::from(blend_mask.is_some());
            }
            Event::Finished {
                branch: Branch::Edited,
                image,
                ..
            } => seen.edited_image = Some(image),
            Event::Cancelled { .. } => seen.cancelled = true,
            Event::Failed { message, .. } => seen.failed = Some(message),
            _ => {}
        }
    }
    seen
}

/// The seed of every source here.
const SEED: u64 = 3;

fn params(prompt: &str, steps: usize) -> GenerateParams {
    worker_common::params(prompt, steps, SEED)
}

/// Cross and self windows over the whole run: the edited prompt takes all of the source's attention.
fn full_windows(edit_prompt: &str) -> EditSpec {
    EditSpec {
        cross_window: CrossWindow::uniform(StepWindow::until(1.0)),
        self_replace: SelfReplace {
            window: StepWindow::until(1.0),
            max_queries: 16 * 16,
        },
        ..EditSpec::new(edit_prompt)
    }
}

fn differing_pixels(a: &RgbImage, b: &RgbImage) -> usize {
    assert_eq!((a.width, a.height), (b.width, b.height));
    a.pixels
        .iter()
        .zip(&b.pixels)
        .filter(|(x, y)| x != y)
        .count()
}

/// The protocol the editor relies on, for any engine: source recorded once, edits reuse it, a
/// parameter change records it again, an identity edit gives the source image.
fn source_is_recorded_once_and_reused(factory: EngineFactory, steps: usize) {
    let mut worker = WorkerHandle::spawn(factory).unwrap();
    load_bundled(&worker);
    let source = params("a red circle and a blue square", steps);

    // 1. A swap: the source is recorded (reported as a normal run), then the edited branch.
    let run = worker
        .generate_edit(
            source.clone(),
            Some(EditSpec::new("a red square and a blue square")),
        )
        .unwrap();
    let first = collect(&worker, run, true);
    assert_eq!(first.failed, None);
    assert_eq!(first.source_started, 1);
    assert_eq!(first.source_steps, steps);
    assert_eq!(first.edit_steps, steps);
    let info = first.edit_info.as_ref().unwrap();
    assert!(!info.source_reused);
    assert_eq!(info.source_recordings, 1);
    let edit_params = first.edit_params.as_ref().unwrap();
    assert_eq!(edit_params.prompt, "a red square and a blue square");
    assert_eq!(
        (edit_params.seed, edit_params.steps),
        (source.seed, source.steps)
    );
    assert!(
        edit_params.width_px.is_some() && edit_params.scheduler.is_some(),
        "the edited branch's parameters are resolved"
    );
    let swapped: Vec<(&str, &str)> = info
        .words
        .iter()
        .filter(|pair| pair.change == WordChange::Swapped)
        .map(|pair| (pair.source_text.as_str(), pair.edit_text.as_str()))
        .collect();
    assert_eq!(swapped.len(), 1, "{:?}", info.words);
    assert!(swapped[0].0.starts_with("circle") && swapped[0].1.starts_with("square"));
    let source_image = first.source_image.clone().unwrap();
    let swapped_image = first.edited_image.clone().unwrap();
    assert!(differing_pixels(&source_image, &swapped_image) > 0);

    // 2. A second, different edit (reweight + local blend): only the edited branch runs.
    let run = worker
        .generate_edit(
            source.clone(),
            Some(EditSpec {
                reweights: vec![Reweight {
                    word: "blue".to_owned(),
                    scale: 2.0,
                }],
                local_blend: Some(LocalBlendConfig {
                    start_fraction: 0.0,
                    ..LocalBlendConfig::new(vec!["circle".to_owned(), "square".to_owned()])
                }),
                ..EditSpec::new("a red square and a blue square")
            }),
        )
        .unwrap();
    let second = collect(&worker, run, true);
    assert_eq!(second.failed, None);
    assert_eq!(second.source_started, 0, "the source must not run again");
    assert_eq!(second.source_steps, 0);
    assert_eq!(second.edit_steps, steps);
    assert_eq!(
        second.masks, steps,
        "local blend reports its mask every step"
    );
    let info = second.edit_info.as_ref().unwrap();
    assert!(info.source_reused);
    assert_eq!(info.source_recordings, 1);

    // 3. Identical prompts with full windows: the edited image is the source image.
    let run = worker
        .generate_edit(
            source.clone(),
            Some(full_windows("a red circle and a blue square")),
        )
        .unwrap();
    let identity = collect(&worker, run, true);
    assert_eq!(identity.failed, None);
    assert_eq!(identity.source_started, 0);
    assert_eq!(identity.edit_info.as_ref().unwrap().source_recordings, 1);
    assert_eq!(
        differing_pixels(&source_image, identity.edited_image.as_ref().unwrap()),
        0,
        "an identity edit must reproduce the source image"
    );

    // 4. A changed source parameter (the seed) records the source again.
    let run = worker
        .generate_edit(
            GenerateParams {
                seed: 4,
                ..source.clone()
            },
            Some(EditSpec::new("a red square and a blue square")),
        )
        .unwrap();
    let reseeded = collect(&worker, run, true);
    assert_eq!(reseeded.failed, None);
    assert_eq!(reseeded.source_started, 1);
    let info = reseeded.edit_info.as_ref().unwrap();
    assert!(!info.source_reused);
    assert_eq!(info.source_recordings, 2);

    // 5. A bad edit fails with a message naming the word; the worker goes on.
    let run = worker
        .generate_edit(
            GenerateParams {
                seed: 4,
                ..source.clone()
            },
            Some(EditSpec {
                reweights: vec![Reweight {
                    word: "giraffe".to_owned(),
                    scale: 2.0,
                }],
                ..EditSpec::new("a red square and a blue square")
            }),
        )
        .unwrap();
    let failed = collect(&worker, run, true);
    assert!(
        failed
            .failed
            .as_deref()
            .is_some_and(|m| m.contains("giraffe")),
        "{failed:?}"
    );
}

#[test]
fn the_pipeline_engine_records_the_source_once_and_replays_edits() {
    source_is_recorded_once_and_reused(pipeline_engine_factory(), 4);
}

#[test]
fn the_fake_engine_records_the_source_once_and_replays_edits() {
    let factory: EngineFactory =
        Arc::new(|| Box::new(FakeEngine::new(FakeEngineConfig::default())));
    source_is_recorded_once_and_reused(factory, 5);
}

#[test]
fn an_edit_can_be_cancelled_and_a_record_only_run_finishes_like_a_generate() {
    let (mut worker, gate) = spawn_gated();
    load_bundled(&worker);
    let source = params("a green triangle", 6);
    // Record only (no edit): a normal run's events.
    let run = worker.generate_edit(source.clone(), None).unwrap();
    gate.allow(6);
    let recorded = collect(&worker, run, false);
    assert_eq!(recorded.failed, None);
    assert_eq!(recorded.source_started, 1);
    assert_eq!(recorded.source_steps, 6);
    assert!(recorded.source_image.is_some());
    assert!(recorded.edit_info.is_none());

    // An edit superseded by the next one stops before its next edited step; the next edit reuses
    // the source.
    let first = worker
        .generate_edit(source.clone(), Some(EditSpec::new("a green circle")))
        .unwrap();
    gate.allow(2);
    let before = events_until_steps(&worker, first, Branch::Edited, 2);
    assert_eq!(
        step_count(&before, first),
        2,
        "the recorded source is reused"
    );
    let second = worker
        .generate_edit(source, Some(EditSpec::new("a green square")))
        .unwrap();
    // A run that did not check its cancel token would take this permit for a third step.
    gate.allow(1);
    match next_event_of(&worker, first) {
        Event::Cancelled { steps_done, .. } => assert_eq!(steps_done, 2),
        other => panic!("expected the first edit to be cancelled, got {other:?}"),
    }
    gate.allow(5);
    let done = collect(&worker, second, true);
    assert!(done.edited_image.is_some(), "{done:?}");
    assert_eq!(done.edit_steps, 6);
    assert!(done.edit_info.unwrap().source_reused);
}

/// The self-attention probe is answered while an edit's source is being recorded (real engine),
/// at a step boundary, not only once the whole edit is done.
#[test]
fn the_probe_is_answered_while_the_source_of_an_edit_runs() {
    let mut worker = WorkerHandle::spawn(pipeline_engine_factory()).unwrap();
    load_bundled(&worker);
    let run_id = worker
        .generate_edit(
            params("a red circle and a blue square", 6),
            Some(EditSpec::new("a red square and a blue square")),
        )
        .unwrap();
    // Asked at once: the worker takes the request at its first look at the queue (when the
    // source starts or after one of its six steps).
    worker
        .send(Command::RequestSelfAttention {
            run_id,
            grid_h: 16,
            grid_w: 16,
            span: SelfAttentionSpan::LatestStep,
        })
        .unwrap();
    let mut before_answer = Vec::new();
    loop {
        let event = next_event(&worker);
        if let Event::SelfAttention { run_id: id, map } = &event {
            assert_eq!(*id, run_id);
            let map = map.as_ref().expect("16x16 self-attention is kept");
            assert_eq!(map.data.len(), 256 * 256);
            break;
        }
        assert!(
            !matches!(event, Event::Finished { .. }) && !ends_run(&event, run_id, Branch::Edited),
            "the probe was not answered during the source run: {event:?}"
        );
        before_answer.push(event);
    }
    assert!(
        before_answer
            .last()
            .is_some_and(|event| is_step_of(event, run_id, Branch::Source)),
        "answered right after a source step: {before_answer:?}"
    );
    let rest = collect(&worker, run_id, true);
    assert!(rest.edited_image.is_some(), "{rest:?}");
    assert_eq!(step_count(&before_answer, run_id) + rest.source_steps, 6);
}
