//! Real images over the worker channel: `Command::Invert` with its progress, result, cancel and
//! cache, runs and edits that name the inverted image (`GenerateParams::source_image`), and bad
//! inversion requests; with the fake engine, and once with the real engine on the bundled model.

// The helpers below are test code too; `allow-unwrap-in-tests` only covers `#[test]` functions.
#![allow(clippy::unwrap_used)]

mod worker_common;

use attend::analysis::image::image_hash;
use attend::worker::{
    Branch, EditSpec, Event, FakeEngineConfig, GenerateParams, InversionParams, RgbImage,
    SourceImage, WorkerHandle,
};
use worker_common::{
    events_until_end_of, events_until_inverted, load_bundled, next_event_of, spawn_fake,
    spawn_gated, test_picture,
};

const DESCRIPTION: &str = "a red circle and a blue square";

fn inversion(steps: usize) -> InversionParams {
    InversionParams {
        prompt: DESCRIPTION.to_owned(),
        steps,
        ..InversionParams::default()
    }
}

fn fake_worker() -> WorkerHandle {
    let worker = spawn_fake(FakeEngineConfig::default());
    load_bundled(&worker);
    worker
}

/// The `Inverted` event that ends `events`, or the test fails with what ended them instead.
fn inverted(events: &[Event]) -> (SourceImage, RgbImage, f64, bool) {
    match events.last() {
        Some(Event::Inverted {
            source,
            reconstruction,
            psnr_db,
            cached,
            ..
        }) => (source.clone(), reconstruction.clone(), *psnr_db, *cached),
        other => panic!("expected Inverted, got {other:?}"),
    }
}

/// `(phase, steps done, step count)` of the progress events in `events`.
fn progress_of(events: &[Event]) -> Vec<(String, usize, usize)> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::InversionProgress {
                phase,
                steps_done,
                step_count,
                ..
            } => Some((phase.clone(), *steps_done, *step_count)),
            _ => None,
        })
        .collect()
}

/// The message of the `Failed` event that ends `events`.
fn failure(events: &[Event]) -> String {
    match events.last() {
        Some(Event::Failed { message, .. }) => message.clone(),
        other => panic!("expected Failed, got {other:?}"),
    }
}

fn replay_params(source: &SourceImage) -> GenerateParams {
    GenerateParams {
        source_image: Some(Box::new(source.clone())),
        ..GenerateParams::default()
    }
}

#[test]
fn an_inversion_reports_each_step_then_the_reconstruction_and_is_kept() {
    let mut worker = fake_worker();
    let image = test_picture(64, 64);
    let run_id = worker.invert(image.clone(), inversion(5)).unwrap();
    let events = events_until_inverted(&worker, run_id);
    let progress = progress_of(&events);
    assert_eq!(
        progress,
        (1..=5)
            .map(|done| ("inverting".to_owned(), done, 5))
            .collect::<Vec<_>>()
    );
    let (source, reconstruction, psnr_db, cached) = inverted(&events);
    assert!(!cached);
    assert_eq!(source.image_hash, image_hash(&image));
    assert_eq!(source.inversion, inversion(5));
    assert_eq!((reconstruction.width, reconstruction.height), (64, 64));
    assert_ne!(
        reconstruction, image,
        "the fake reconstruction is close, not equal"
    );
    assert!(psnr_db.is_finite() && psnr_db > 40.0, "{psnr_db}");

    // The same image and settings: kept, no step runs again.
    let again = worker.invert(image.clone(), inversion(5)).unwrap();
    let events = events_until_inverted(&worker, again);
    assert!(progress_of(&events).is_empty(), "{events:?}");
    let (source_again, reconstruction_again, psnr_again, cached) = inverted(&events);
    assert!(cached);
    assert_eq!(
        (source_again, reconstruction_again, psnr_again),
        (source, reconstruction, psnr_db)
    );

    // Another method is another inversion.
    let other = InversionParams {
        method: "ddim".to_owned(),
        ..inversion(5)
    };
    let third = worker.invert(image, other).unwrap();
    let events = events_until_inverted(&worker, third);
    assert_eq!(progress_of(&events).len(), 5);
    assert!(!inverted(&events).3);
}

#[test]
fn a_run_that_names_the_image_replays_it_and_reports_its_settings() {
    let mut worker = fake_worker();
    let image = test_picture(64, 64);
    let run_id = worker.invert(image, inversion(4)).unwrap();
    let (source, reconstruction, _, _) = inverted(&events_until_inverted(&worker, run_id));

    // The panel's prompt and steps differ: the inversion's count.
    let run_id = worker
        .generate(GenerateParams {
            prompt: "something else".to_owned(),
            steps: 9,
            ..replay_params(&source)
        })
        .unwrap();
    let events = events_until_end_of(&worker, run_id, Branch::Source);
    let Some(Event::Started { params, .. }) = events.first() else {
        panic!("expected Started first, got {:?}", events.first());
    };
    assert_eq!(params.prompt, DESCRIPTION);
    assert_eq!(params.steps, 4);
    assert_eq!(params.scheduler.as_deref(), Some("ddim"));
    assert_eq!((params.width_px, params.height_px), (Some(64), Some(64)));
    assert_eq!(params.source_image.as_deref(), Some(&source));
    assert_eq!(worker_common::step_count(&events, run_id), 4);
    match events.last() {
        Some(Event::Finished { image, .. }) => assert_eq!(*image, reconstruction),
        other => panic!("expected Finished, got {other:?}"),
    }
}

#[test]
fn a_run_that_names_an_image_never_inverted_fails_and_says_to_invert() {
    let mut worker = fake_worker();
    let source = SourceImage {
        image_hash: "0123456789abcdef".to_owned(),
        inversion: inversion(4),
    };
    let run_id = worker.generate(replay_params(&source)).unwrap();
    let message = failure(&events_until_end_of(&worker, run_id, Branch::Source));
    assert!(message.contains("0123456789abcdef"), "{message}");
    assert!(message.contains("invert it again"), "{message}");
}

#[test]
fn an_edit_of_the_image_replays_it_once_and_swaps_a_word() {
    let mut worker = fake_worker();
    let image = test_picture(64, 64);
    let run_id = worker.invert(image, inversion(4)).unwrap();
    let (source, reconstruction, _, _) = inverted(&events_until_inverted(&worker, run_id));
    let params = replay_params(&source);
    let spec = EditSpec::new("a red square and a blue square");

    let run_id = worker
        .generate_edit(params.clone(), Some(spec.clone()))
        .unwrap();
    let events = events_until_end_of(&worker, run_id, Branch::Edited);
    let source_image = events.iter().find_map(|event| match event {
        Event::Finished {
            branch: Branch::Source,
            image,
            ..
        } => Some(image.clone()),
        _ => None,
    });
    assert_eq!(source_image, Some(reconstruction.clone()));
    let edited = match events.last() {
        Some(Event::Finished {
            branch: Branch::Edited,
            image,
            ..
        }) => image.clone(),
        other => panic!("expected the edited Finished, got {other:?}"),
    };
    assert_eq!((edited.width, edited.height), (64, 64));
    assert_ne!(edited, reconstruction, "the swapped word is painted in");

    // A second edit of the same image reuses the recorded source.
    let run_id = worker
        .generate_edit(
            params,
            Some(EditSpec::new("a red circle and a blue circle")),
        )
        .unwrap();
    let events = events_until_end_of(&worker, run_id, Branch::Edited);
    let reused = events.iter().find_map(|event| match event {
        Event::Started {
            edit: Some(info), ..
        } => Some(info.source_reused),
        _ => None,
    });
    assert_eq!(reused, Some(true));
    assert!(
        !events
            .iter()
            .any(|event| event.branch() == Some(Branch::Source)),
        "no source branch the second time"
    );
}

#[test]
fn cancelling_an_inversion_stops_it_at_a_step_and_keeps_nothing() {
    let (mut worker, gate) = spawn_gated();
    load_bundled(&worker);
    let image = test_picture(64, 64);
    let run_id = worker.invert(image.clone(), inversion(6)).unwrap();
    gate.allow(2);
    for done in 1..=2 {
        match next_event_of(&worker, run_id) {
            Event::InversionProgress { steps_done, .. } => assert_eq!(steps_done, done),
            other => panic!("expected progress, got {other:?}"),
        }
    }
    worker.cancel().unwrap();
    match next_event_of(&worker, run_id) {
        Event::Cancelled { steps_done, .. } => assert_eq!(steps_done, 2),
        other => panic!("expected Cancelled, got {other:?}"),
    }

    // Nothing was kept: the same request inverts again, step by step.
    let again = worker.invert(image, inversion(6)).unwrap();
    gate.allow(6);
    let events = events_until_inverted(&worker, again);
    assert_eq!(progress_of(&events).len(), 6);
    assert!(!inverted(&events).3);
}

#[test]
fn a_newer_run_supersedes_a_running_inversion() {
    let (mut worker, gate) = spawn_gated();
    load_bundled(&worker);
    let run_id = worker.invert(test_picture(64, 64), inversion(6)).unwrap();
    gate.allow(1);
    assert!(matches!(
        next_event_of(&worker, run_id),
        Event::InversionProgress { steps_done: 1, .. }
    ));
    let generate = worker
        .generate(worker_common::params("a circle", 2, 1))
        .unwrap();
    match next_event_of(&worker, run_id) {
        Event::Cancelled { steps_done, .. } => assert_eq!(steps_done, 1),
        other => panic!("expected Cancelled, got {other:?}"),
    }
    gate.allow(2);
    let events = events_until_end_of(&worker, generate, Branch::Source);
    assert!(matches!(events.last(), Some(Event::Finished { .. })));
}

#[test]
fn bad_inversion_requests_fail_with_the_value_named() {
    let mut worker = fake_worker();
    let image = test_picture(64, 64);
    let cases: Vec<(RgbImage, InversionParams, &str)> = vec![
        (
            image.clone(),
            InversionParams {
                prompt: "   ".to_owned(),
                ..inversion(4)
            },
            "image description",
        ),
        (
            image.clone(),
            InversionParams {
                method: "magic".to_owned(),
                ..inversion(4)
            },
            "null-text",
        ),
        (image.clone(), inversion(0), "inversion steps"),
        (
            image.clone(),
            InversionParams {
                guidance: f64::NAN,
                ..inversion(4)
            },
            "inversion guidance",
        ),
        (test_picture(70, 64), inversion(4), "image width"),
        (
            RgbImage {
                width: 64,
                height: 64,
                pixels: vec![0; 10],
            },
            inversion(4),
            "not an RGB image",
        ),
    ];
    for (image, params, expected) in cases {
        let run_id = worker.invert(image, params).unwrap();
        let message = failure(&events_until_inverted(&worker, run_id));
        assert!(message.contains(expected), "{expected}: {message}");
    }
    // The worker still serves.
    let run_id = worker.invert(image, inversion(2)).unwrap();
    assert!(!inverted(&events_until_inverted(&worker, run_id)).3);
}

#[test]
fn an_inversion_without_a_model_fails() {
    let mut worker = spawn_fake(FakeEngineConfig::default());
    let run_id = worker.invert(test_picture(64, 64), inversion(2)).unwrap();
    let message = failure(&events_until_inverted(&worker, run_id));
    assert!(message.contains("no model"), "{message}");
}

/// The real engine on the bundled model: invert with a few steps, replay, edit, and the cache.
#[test]
fn the_real_engine_inverts_replays_and_edits_an_image_on_the_bundled_model() {
    let mut worker =
        WorkerHandle::spawn(attend::worker::pipeline_engine_factory()).expect("worker starts");
    load_bundled(&worker);
    let image = test_picture(64, 64);
    let params = inversion(4);
    let run_id = worker.invert(image.clone(), params.clone()).unwrap();
    let events = events_until_inverted(&worker, run_id);
    // Direct inversion knows its source branch (the trajectory itself): the four inversion steps
    // are the only UNet work, with no replay for the reconstruction.
    let progress = progress_of(&events);
    assert_eq!(
        progress,
        (1..=4)
            .map(|done| ("inverting".to_string(), done, 4))
            .collect::<Vec<_>>(),
    );
    let (source, reconstruction, psnr_db, cached) = inverted(&events);
    assert!(!cached);
    assert_eq!((reconstruction.width, reconstruction.height), (64, 64));
    // Direct inversion keeps the source on its trajectory: on the bundled (pixel-space) model the
    // replay gives the image back exactly.
    assert!(psnr_db > 40.0, "PSNR {psnr_db} dB");

    // Kept: no step runs the second time.
    let again = worker.invert(image, params).unwrap();
    let events = events_until_inverted(&worker, again);
    assert!(progress_of(&events).is_empty());
    assert!(inverted(&events).3);

    // The replay regenerates the reconstruction, with attention maps for the heat maps.
    let run_id = worker.generate(replay_params(&source)).unwrap();
    let events = events_until_end_of(&worker, run_id, Branch::Source);
    assert_eq!(worker_common::step_count(&events, run_id), 4);
    let step_has_maps = events.iter().any(|event| match event {
        Event::Step { frame, .. } => !frame.cross.groups.is_empty(),
        _ => false,
    });
    assert!(step_has_maps);
    match events.last() {
        Some(Event::Finished { image, .. }) => assert_eq!(*image, reconstruction),
        other => panic!("expected Finished, got {other:?}"),
    }

    // An edit of it runs both branches.
    let run_id = worker
        .generate_edit(
            replay_params(&source),
            Some(EditSpec::new("a red square and a blue square")),
        )
        .unwrap();
    let events = events_until_end_of(&worker, run_id, Branch::Edited);
    assert!(
        matches!(
            events.last(),
            Some(Event::Finished {
                branch: Branch::Edited,
                ..
            })
        ),
        "{:?}",
        events.last()
    );
}
