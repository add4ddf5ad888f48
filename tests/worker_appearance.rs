//! Appearance transfer over the worker channel (`Command::AppearanceTransfer`): the events of a
//! transfer in order (inputs fitted, preparation, one step per output step with a preview, the
//! result with masks and correspondence), cancelling, bad requests; with the fake engine, and once
//! with the real engine on the bundled model.

// The helpers below are test code too; `allow-unwrap-in-tests` only covers `#[test]` functions.
#![allow(clippy::unwrap_used)]

mod worker_common;

use std::sync::Arc;
use std::time::Duration;

use attend::worker::{
    pipeline_engine_factory, AppearanceInput, AppearanceResult, AppearanceSettings,
    AppearanceTransferParams, AppearanceUpdate, Event, FakeEngineConfig, RgbImage, WorkerHandle,
};
use worker_common::{load_bundled, next_event_of, spawn_fake, spawn_gated, TIMEOUT};

/// A `width` x `height` picture of `background` with a `colour` square over the fractions
/// `(top, left, bottom, right)` of its size.
fn picture(
    (width, height): (usize, usize),
    background: [u8; 3],
    colour: [u8; 3],
    square: (f32, f32, f32, f32),
) -> RgbImage {
    let mut pixels = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let (fy, fx) = (y as f32 / height as f32, x as f32 / width as f32);
            let inside = (square.0..square.2).contains(&fy) && (square.1..square.3).contains(&fx);
            pixels.extend_from_slice(if inside { &colour } else { &background });
        }
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

/// A red square on grey (96 x 64: fitted to the model's 64 x 64) onto a green square on navy.
fn transfer(steps: usize) -> AppearanceTransferParams {
    AppearanceTransferParams {
        structure: AppearanceInput::Image(picture(
            (96, 64),
            [200, 200, 200],
            [210, 40, 40],
            (0.1, 0.3, 0.5, 0.55),
        )),
        structure_prompt: "a red square".to_owned(),
        appearance: AppearanceInput::Image(picture(
            (64, 64),
            [20, 20, 90],
            [40, 200, 40],
            (0.5, 0.5, 0.9, 0.9),
        )),
        appearance_prompt: "a green square".to_owned(),
        settings: AppearanceSettings {
            steps,
            ..AppearanceSettings::default()
        },
        seed: 3,
        fit: Default::default(),
    }
}

/// How long the real engine's transfer may go without an event: its preparation (two inversions
/// and a segmentation) reports nothing, and a loaded machine makes it slow. Only a hang fails.
const PREPARATION_TIMEOUT: Duration = Duration::from_secs(900);

/// The next event of `run_id` (others skipped), waiting up to `timeout` for each.
fn next_event_within(worker: &WorkerHandle, run_id: u64, timeout: Duration) -> Event {
    loop {
        let event = worker
            .events()
            .recv_timeout(timeout)
            .expect("no event from the worker within the timeout");
        if event.run_id() == Some(run_id) {
            return event;
        }
    }
}

/// The transfer's events until (and with) the one that ends it.
fn events_until_end(worker: &WorkerHandle, run_id: u64) -> Vec<Event> {
    events_until_end_within(worker, run_id, TIMEOUT)
}

/// [`events_until_end`], waiting up to `timeout` for each event.
fn events_until_end_within(worker: &WorkerHandle, run_id: u64, timeout: Duration) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let event = next_event_within(worker, run_id, timeout);
        let end = matches!(
            event,
            Event::Appearance {
                update: AppearanceUpdate::Finished(_),
                ..
            } | Event::Cancelled { .. }
                | Event::Failed { .. }
        );
        events.push(event);
        if end {
            return events;
        }
    }
}

fn updates(events: &[Event]) -> Vec<&AppearanceUpdate> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::Appearance { update, .. } => Some(update),
            _ => None,
        })
        .collect()
}

/// `(step_index, step_count)` of the step updates, in order.
fn steps(events: &[Event]) -> Vec<(usize, usize)> {
    updates(events)
        .into_iter()
        .filter_map(|update| match update {
            AppearanceUpdate::Step {
                step_index,
                step_count,
                preview,
                ..
            } => {
                assert!(preview.is_consistent() && preview.width > 0, "a preview");
                Some((*step_index, *step_count))
            }
            _ => None,
        })
        .collect()
}

fn result(events: &[Event]) -> &AppearanceResult {
    match events.last() {
        Some(Event::Appearance {
            update: AppearanceUpdate::Finished(result),
            ..
        }) => result,
        other => panic!("expected the transfer's result, got {other:?}"),
    }
}

fn failure(events: &[Event]) -> &str {
    match events.last() {
        Some(Event::Failed { message, .. }) => message,
        other => panic!("expected Failed, got {other:?}"),
    }
}

/// The common checks of a finished transfer: the inputs came first, fitted to 64 x 64; every
/// output step in order; the result's images at 64 x 64 and a correspondence over them.
fn check_finished(events: &[Event], settings: &AppearanceSettings) {
    let updates = updates(events);
    let inputs_at = updates
        .iter()
        .position(|update| matches!(update, AppearanceUpdate::Inputs { .. }))
        .expect("the inputs are reported");
    let first_step = updates
        .iter()
        .position(|update| matches!(update, AppearanceUpdate::Step { .. }))
        .expect("steps are reported");
    assert!(inputs_at < first_step, "the inputs come before the steps");
    let AppearanceUpdate::Inputs {
        structure,
        appearance,
    } = updates[inputs_at]
    else {
        unreachable!("found above");
    };
    assert_eq!((structure.width, structure.height), (64, 64));
    assert_eq!((appearance.width, appearance.height), (64, 64));
    let output_steps = settings.steps - settings.skip_steps();
    let expected: Vec<(usize, usize)> = (0..output_steps)
        .map(|index| (index, output_steps))
        .collect();
    assert_eq!(steps(events), expected);
    let result = result(events);
    for image in [
        &result.output,
        &result.structure_reconstruction,
        &result.appearance_reconstruction,
    ] {
        assert_eq!((image.width, image.height), (64, 64));
    }
    let correspondence = &result.correspondence;
    assert_eq!((correspondence.image_h, correspondence.image_w), (64, 64));
    assert!(!correspondence.is_empty(), "a correspondence was recorded");
    assert_eq!(correspondence.top_key.len(), correspondence.queries());
    let query = correspondence.query_at_pixel(20, 20).unwrap();
    let map = correspondence.map_for(query).unwrap();
    assert_eq!((map.h, map.w), (64, 64));
    let (y, x) = correspondence.top_pixel_for(query).unwrap();
    assert!(y < 64 && x < 64);
}

#[test]
fn a_fake_transfer_reports_inputs_steps_and_its_result() {
    let mut worker = spawn_fake(FakeEngineConfig::default());
    load_bundled(&worker);
    let params = transfer(12);
    let run_id = worker.appearance_transfer(params.clone()).unwrap();
    let events = events_until_end(&worker, run_id);
    check_finished(&events, &params.settings);
    let result = result(&events);
    assert_eq!(result.masks.structure.len(), result.masks.appearance.len());
    assert_eq!(result.masks.structure[0].label, "square");
}

#[test]
fn a_transfer_with_a_generated_input_reports_it() {
    let mut worker = spawn_fake(FakeEngineConfig::default());
    load_bundled(&worker);
    let params = AppearanceTransferParams {
        appearance: AppearanceInput::Generate,
        ..transfer(6)
    };
    let run_id = worker.appearance_transfer(params.clone()).unwrap();
    let events = events_until_end(&worker, run_id);
    let phases: Vec<&str> = updates(&events)
        .into_iter()
        .filter_map(|update| match update {
            AppearanceUpdate::Progress { phase, .. } => Some(phase.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(phases[0], "generating the appearance image");
    check_finished(&events, &params.settings);
}

#[test]
fn a_transfer_is_cancelled_between_steps() {
    let (mut worker, gate) = spawn_gated();
    load_bundled(&worker);
    gate.allow(3);
    let run_id = worker.appearance_transfer(transfer(20)).unwrap();
    let mut seen = 0;
    while seen < 3 {
        if let Event::Appearance {
            update: AppearanceUpdate::Step { .. },
            ..
        } = next_event_of(&worker, run_id)
        {
            seen += 1;
        }
    }
    worker.cancel().unwrap();
    let events = events_until_end(&worker, run_id);
    assert!(
        matches!(events.last(), Some(Event::Cancelled { steps_done: 3, .. })),
        "{:?}",
        events.last()
    );
}

#[test]
fn bad_requests_fail_with_the_value_named() {
    let mut worker = spawn_fake(FakeEngineConfig::default());
    load_bundled(&worker);
    let cases = [
        (
            AppearanceTransferParams {
                structure_prompt: "  ".to_owned(),
                ..transfer(6)
            },
            "structure prompt",
        ),
        (
            AppearanceTransferParams {
                appearance: AppearanceInput::Image(RgbImage {
                    width: 4,
                    height: 4,
                    pixels: vec![0; 5],
                }),
                ..transfer(6)
            },
            "appearance image",
        ),
        (
            AppearanceTransferParams {
                settings: AppearanceSettings {
                    skip_fraction: 1.5,
                    ..AppearanceSettings::default()
                },
                ..transfer(6)
            },
            "skip",
        ),
    ];
    for (params, named) in cases {
        let run_id = worker.appearance_transfer(params).unwrap();
        let events = events_until_end(&worker, run_id);
        let message = failure(&events);
        assert!(message.contains(named), "{named:?} not in {message:?}");
        assert!(steps(&events).is_empty(), "nothing ran");
    }
}

#[test]
fn the_real_engine_transfers_on_the_bundled_model() {
    let mut worker = WorkerHandle::spawn(Arc::clone(&pipeline_engine_factory())).unwrap();
    load_bundled(&worker);
    let params = transfer(4);
    let run_id = worker.appearance_transfer(params.clone()).unwrap();
    let events = events_until_end_within(&worker, run_id, PREPARATION_TIMEOUT);
    if let Some(Event::Failed { message, .. }) = events.last() {
        panic!("the transfer failed: {message}");
    }
    check_finished(&events, &params.settings);
    let result = result(&events);
    assert!(result.seconds > 0.0);
}
