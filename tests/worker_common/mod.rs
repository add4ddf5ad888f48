//! Helpers shared by the worker tests (`worker_protocol`, `worker_edit`): starting workers, waiting
//! for events, counting a run's steps.
//!
//! Nothing here measures time: runs that a test must stop at a known step use the fake engine's
//! [`StepGate`], and a test waits for events with a generous timeout that only turns a hang into a
//! failure.

// Each test file uses its own part of the helpers.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use attend::worker::{
    Branch, Event, FakeEngine, FakeEngineConfig, GenerateParams, ModelSource, StepGate,
    WorkerHandle,
};

/// How long a test waits for the next event before it fails (the real engine's runs included).
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// A worker over a fake engine with `config`.
pub fn spawn_fake(config: FakeEngineConfig) -> WorkerHandle {
    WorkerHandle::spawn(Arc::new(move || Box::new(FakeEngine::new(config.clone()))))
        .expect("the worker thread starts")
}

/// A worker over a fake engine whose steps each wait for a permit from the returned gate.
pub fn spawn_gated() -> (WorkerHandle, StepGate) {
    let gate = StepGate::new();
    let worker = spawn_fake(FakeEngineConfig {
        step_gate: Some(gate.clone()),
        ..FakeEngineConfig::default()
    });
    (worker, gate)
}

/// The next event; fails the test when none comes within [`TIMEOUT`].
pub fn next_event(worker: &WorkerHandle) -> Event {
    worker
        .events()
        .recv_timeout(TIMEOUT)
        .expect("no event from the worker within the timeout")
}

/// The next event of run `run_id`, skipping other events.
pub fn next_event_of(worker: &WorkerHandle, run_id: u64) -> Event {
    loop {
        let event = next_event(worker);
        if event.run_id() == Some(run_id) {
            return event;
        }
    }
}

/// Loads the bundled model and checks the answer (the fake's and the real bundled model's default
/// size is 64 px).
pub fn load_bundled(worker: &WorkerHandle) {
    worker
        .load_model(ModelSource::Bundled)
        .expect("the command is sent");
    match next_event(worker) {
        Event::ModelLoaded { info } => assert_eq!(info.default_width_px, 64),
        other => panic!("expected ModelLoaded, got {other:?}"),
    }
}

/// Generation parameters with the given prompt, step count and seed (the rest default).
pub fn params(prompt: &str, steps: usize, seed: u64) -> GenerateParams {
    GenerateParams {
        prompt: prompt.to_owned(),
        steps,
        seed,
        ..GenerateParams::default()
    }
}

/// True for the event that ends run `run_id` whose last branch is `last`: that branch's
/// `Finished`, or the run's `Cancelled` or `Failed`.
pub fn ends_run(event: &Event, run_id: u64, last: Branch) -> bool {
    match event {
        Event::Finished {
            run_id: id, branch, ..
        } => *id == run_id && *branch == last,
        Event::Cancelled { run_id: id, .. } => *id == run_id,
        Event::Failed { run_id: id, .. } => *id == Some(run_id),
        _ => false,
    }
}

/// Collects events (of every run) until the event that ends `run_id` ([`ends_run`]), inclusive.
pub fn events_until_end_of(worker: &WorkerHandle, run_id: u64, last: Branch) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let event = next_event(worker);
        let end = ends_run(&event, run_id, last);
        events.push(event);
        if end {
            return events;
        }
    }
}

/// True for a `Step` of run `run_id` and `branch`.
pub fn is_step_of(event: &Event, run_id: u64, branch: Branch) -> bool {
    matches!(event, Event::Step { run_id: id, branch: b, .. } if *id == run_id && *b == branch)
}

/// Collects events until `count` steps of `branch` of run `run_id` have been reported, inclusive.
/// Fails the test if the run is cancelled, fails or finishes that branch first.
pub fn events_until_steps(
    worker: &WorkerHandle,
    run_id: u64,
    branch: Branch,
    count: usize,
) -> Vec<Event> {
    let mut events = Vec::new();
    let mut steps = 0;
    while steps < count {
        let event = next_event(worker);
        assert!(
            !ends_run(&event, run_id, branch),
            "run {run_id} ended after {steps} of the {count} awaited steps: {event:?}"
        );
        steps += usize::from(is_step_of(&event, run_id, branch));
        events.push(event);
    }
    events
}

/// How many of `events` are steps of run `run_id`, either branch.
pub fn step_count(events: &[Event], run_id: u64) -> usize {
    events
        .iter()
        .filter(|event| matches!(event, Event::Step { run_id: id, .. } if *id == run_id))
        .count()
}

/// True for the event that ends inversion request `run_id`: its `Inverted`, `Cancelled` or
/// `Failed`.
pub fn ends_inversion(event: &Event, run_id: u64) -> bool {
    match event {
        Event::Inverted { run_id: id, .. } | Event::Cancelled { run_id: id, .. } => *id == run_id,
        Event::Failed { run_id: id, .. } => *id == Some(run_id),
        _ => false,
    }
}

/// Collects events (of every request) until the event that ends inversion `run_id`, inclusive.
pub fn events_until_inverted(worker: &WorkerHandle, run_id: u64) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let event = next_event(worker);
        let end = ends_inversion(&event, run_id);
        events.push(event);
        if end {
            return events;
        }
    }
}

/// A deterministic test picture of `width` x `height` pixels: a red disc and a blue bar on a grey
/// gradient.
pub fn test_picture(width: usize, height: usize) -> attend::worker::RgbImage {
    let mut pixels = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
            let in_disc = (fx - 0.35).powi(2) + (fy - 0.4).powi(2) < 0.04;
            let in_bar = (0.6..0.85).contains(&fx) && (0.55..0.8).contains(&fy);
            let rgb = if in_disc {
                [220, 40, 40]
            } else if in_bar {
                [40, 70, 220]
            } else {
                let grey = 90 + (80.0 * fy) as u8;
                [grey, grey, grey.saturating_add(10)]
            };
            pixels.extend_from_slice(&rgb);
        }
    }
    attend::worker::RgbImage {
        width,
        height,
        pixels,
    }
}
