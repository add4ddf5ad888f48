//! The worker thread's protocol, driven with the fake engine: event order, supersede, cancel before
//! the next step, panic recovery, model-load failures and plain exports. Runs that must stop at a
//! known step are held by the fake's step gate, so the tests count steps and never measure time.

// The helpers below are test code too; `allow-unwrap-in-tests` only covers `#[test]` functions.
#![allow(clippy::unwrap_used)]

mod worker_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use attend::worker::{
    Branch, Command, Event, FakeEngineConfig, GenerateParams, Heatmap, ModelSource, PngExport,
    Products, RgbImage, SelfAttentionSpan, WorkerHandle,
};
use worker_common::{
    events_until_steps, is_step_of, load_bundled, next_event, next_event_of, spawn_fake as spawn,
    spawn_gated, step_count,
};

/// The seed of every run here.
const SEED: u64 = 7;

fn params(prompt: &str, steps: usize) -> GenerateParams {
    worker_common::params(prompt, steps, SEED)
}

/// Collects events until the end of plain run `run_id` (Finished / Cancelled / Failed).
fn events_until_end_of(worker: &WorkerHandle, run_id: u64) -> Vec<Event> {
    worker_common::events_until_end_of(worker, run_id, Branch::Source)
}

#[test]
fn a_run_reports_started_then_each_step_in_order_then_finished() {
    let mut worker = spawn(FakeEngineConfig::default());
    let wakes = Arc::new(AtomicUsize::new(0));
    let wakes_in_waker = Arc::clone(&wakes);
    worker.set_waker(move || {
        wakes_in_waker.fetch_add(1, Ordering::SeqCst);
    });
    load_bundled(&worker);
    let run_id = worker.generate(params("a red circle", 5)).unwrap();
    let events = events_until_end_of(&worker, run_id);
    assert_eq!(events.len(), 7, "Started + 5 steps + Finished: {events:?}");
    let Event::Started {
        branch: Branch::Source,
        prompt,
        params,
        edit: None,
        ..
    } = &events[0]
    else {
        panic!(
            "first event must be Started of the source, got {:?}",
            events[0]
        );
    };
    assert_eq!(prompt.words.len(), 3);
    assert_eq!(
        params.width_px,
        Some(64),
        "defaults are resolved in Started"
    );
    for (expected_index, event) in events[1..6].iter().enumerate() {
        let Event::Step {
            run_id: id,
            branch: Branch::Source,
            frame,
            blend_mask: None,
        } = event
        else {
            panic!("expected a source Step without a mask, got {event:?}");
        };
        assert_eq!(*id, run_id);
        assert_eq!(frame.step_index, expected_index);
        assert_eq!(frame.step_count, 5);
        assert!(frame.preview.is_consistent());
        assert_eq!(frame.cross.step_index, expected_index);
        for group in &frame.cross.groups {
            assert_eq!(group.data.len(), prompt.tokens.len() * group.h * group.w);
        }
    }
    let Event::Finished {
        branch: Branch::Source,
        image,
        blend_mask: None,
        ..
    } = &events[6]
    else {
        panic!(
            "last event must be Finished of the source, got {:?}",
            events[6]
        );
    };
    assert_eq!((image.width, image.height), (64, 64));
    // One wake-up per event (ModelLoaded + the 7 run events).
    assert!(wakes.load(Ordering::SeqCst) >= 8);
}

#[test]
fn the_same_parameters_give_the_same_image() {
    let mut worker = spawn(FakeEngineConfig::default());
    load_bundled(&worker);
    let first = worker.generate(params("a blue square", 3)).unwrap();
    let first_events = events_until_end_of(&worker, first);
    let second = worker.generate(params("a blue square", 3)).unwrap();
    let second_events = events_until_end_of(&worker, second);
    let image = |events: &[Event]| match events.last() {
        Some(Event::Finished { image, .. }) => image.clone(),
        other => panic!("expected Finished, got {other:?}"),
    };
    assert_eq!(image(&first_events), image(&second_events));
}

#[test]
fn a_new_generate_supersedes_the_running_one_before_its_next_step() {
    let (mut worker, gate) = spawn_gated();
    load_bundled(&worker);
    let first = worker.generate(params("a red circle", 50)).unwrap();
    gate.allow(1);
    events_until_steps(&worker, first, Branch::Source, 1);
    // The first run now waits before its second step. The permit given after the supersede would
    // let it take that step if it did not check its cancel token first.
    let second = worker.generate(params("a green triangle", 3)).unwrap();
    gate.allow(1);
    match next_event_of(&worker, first) {
        Event::Cancelled { steps_done, .. } => assert_eq!(steps_done, 1),
        other => panic!("expected the first run to be cancelled, got {other:?}"),
    }
    gate.allow(2);
    let second_events = events_until_end_of(&worker, second);
    assert!(matches!(second_events.first(), Some(Event::Started { .. })));
    assert!(matches!(second_events.last(), Some(Event::Finished { .. })));
    assert_eq!(step_count(&second_events, second), 3);
    assert!(second_events
        .iter()
        .all(|event| event.run_id() == Some(second)));
}

#[test]
fn queued_generates_only_run_the_latest() {
    let (mut worker, gate) = spawn_gated();
    load_bundled(&worker);
    // No step can start before all three are sent.
    let ids: Vec<u64> = (0..3)
        .map(|index| worker.generate(params(&format!("word{index}"), 4)).unwrap())
        .collect();
    gate.allow(4);
    for &id in &ids[..2] {
        let events = events_until_end_of(&worker, id);
        assert!(
            matches!(events.last(), Some(Event::Cancelled { steps_done: 0, .. })),
            "run {id} should be superseded before any step: {events:?}"
        );
        assert_eq!(step_count(&events, id), 0);
    }
    let events = events_until_end_of(&worker, ids[2]);
    assert!(matches!(events.last(), Some(Event::Finished { .. })));
    assert_eq!(step_count(&events, ids[2]), 4);
}

#[test]
fn cancel_stops_the_run_before_its_next_step() {
    let (mut worker, gate) = spawn_gated();
    load_bundled(&worker);
    let run_id = worker.generate(params("a red circle", 40)).unwrap();
    gate.allow(2);
    events_until_steps(&worker, run_id, Branch::Source, 2);
    worker.cancel().unwrap();
    // A run that did not check its cancel token would take this permit for a third step.
    gate.allow(1);
    match next_event_of(&worker, run_id) {
        Event::Cancelled { steps_done, .. } => assert_eq!(steps_done, 2),
        other => panic!("expected Cancelled and no further step, got {other:?}"),
    }
    // The worker is still usable, and the cancelled run left the permit to it.
    let next = worker.generate(params("a square", 2)).unwrap();
    gate.allow(1);
    let events = events_until_end_of(&worker, next);
    assert!(matches!(events.last(), Some(Event::Finished { .. })));
    assert_eq!(step_count(&events, next), 2);
}

#[test]
fn a_panic_in_the_engine_is_reported_and_the_worker_restarts() {
    let mut worker = spawn(FakeEngineConfig {
        panic_word: Some("explode".to_owned()),
        ..FakeEngineConfig::default()
    });
    load_bundled(&worker);
    let run_id = worker.generate(params("please explode now", 5)).unwrap();
    let events = events_until_end_of(&worker, run_id);
    match events.last() {
        Some(Event::Failed { message, .. }) => assert!(message.contains("panicked"), "{message}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    match next_event(&worker) {
        Event::WorkerRestarted { message } => assert!(message.contains("panic word")),
        other => panic!("expected WorkerRestarted, got {other:?}"),
    }
    // The last model is reloaded on the fresh engine.
    assert!(matches!(next_event(&worker), Event::ModelLoaded { .. }));
    let next = worker.generate(params("a calm square", 3)).unwrap();
    let events = events_until_end_of(&worker, next);
    assert!(matches!(events.last(), Some(Event::Finished { .. })));
}

/// The products of the next [`Event::ModelLoaded`]: bf16 or not.
fn loaded_with_bf16(worker: &WorkerHandle) -> bool {
    match next_event(worker) {
        Event::ModelLoaded { info } => info.bf16_products,
        other => panic!("expected ModelLoaded, got {other:?}"),
    }
}

#[test]
fn a_load_takes_the_chosen_products_and_a_restart_keeps_them() {
    let mut worker = spawn(FakeEngineConfig {
        panic_word: Some("explode".to_owned()),
        ..FakeEngineConfig::default()
    });
    // The model's default: bf16 for the bundled model.
    worker.load_model(ModelSource::Bundled).unwrap();
    assert!(loaded_with_bf16(&worker));
    worker
        .load_model_with(ModelSource::Bundled, Products::F32)
        .unwrap();
    assert!(!loaded_with_bf16(&worker));
    // A panic reloads the model on a fresh engine with the products it had.
    let run_id = worker.generate(params("please explode now", 3)).unwrap();
    let _ = events_until_end_of(&worker, run_id);
    assert!(matches!(next_event(&worker), Event::WorkerRestarted { .. }));
    assert!(!loaded_with_bf16(&worker));
    worker
        .load_model_with(ModelSource::Bundled, Products::Bf16)
        .unwrap();
    assert!(loaded_with_bf16(&worker));
}

#[test]
fn a_bad_model_folder_keeps_the_previous_model() {
    let mut worker = spawn(FakeEngineConfig::default());
    load_bundled(&worker);
    let missing = std::env::temp_dir().join("attend-no-such-model-folder");
    worker
        .load_model(ModelSource::Folder(missing.clone()))
        .unwrap();
    match next_event(&worker) {
        Event::ModelLoadFailed { source, message } => {
            assert_eq!(source, ModelSource::Folder(missing));
            assert!(message.contains("model_index.json"), "{message}");
        }
        other => panic!("expected ModelLoadFailed, got {other:?}"),
    }
    let run_id = worker.generate(params("still works", 2)).unwrap();
    let events = events_until_end_of(&worker, run_id);
    assert!(matches!(events.last(), Some(Event::Finished { .. })));
}

#[test]
fn generating_without_a_model_fails_cleanly() {
    let mut worker = spawn(FakeEngineConfig::default());
    let run_id = worker.generate(params("nothing loaded", 2)).unwrap();
    let events = events_until_end_of(&worker, run_id);
    match events.last() {
        Some(Event::Failed { message, .. }) => assert!(message.contains("no model")),
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[test]
fn self_attention_of_the_latest_run_is_plain_rows_that_sum_to_one() {
    let mut worker = spawn(FakeEngineConfig::default());
    load_bundled(&worker);
    let run_id = worker.generate(params("a red circle", 2)).unwrap();
    let events = events_until_end_of(&worker, run_id);
    let Some(Event::Finished {
        self_attention_grids,
        ..
    }) = events.last()
    else {
        panic!("expected Finished");
    };
    let (grid_h, grid_w) = self_attention_grids[0];
    worker
        .send(Command::RequestSelfAttention {
            run_id,
            grid_h,
            grid_w,
            span: SelfAttentionSpan::LatestStep,
        })
        .unwrap();
    match next_event(&worker) {
        Event::SelfAttention { map: Some(map), .. } => {
            let queries = grid_h * grid_w;
            assert_eq!(map.data.len(), queries * queries);
            for row in map.data.chunks(queries) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            }
        }
        other => panic!("expected a self-attention map, got {other:?}"),
    }
}

#[test]
fn png_exports_are_written_whole_or_not_at_all() {
    let worker = spawn(FakeEngineConfig::default());
    let folder = tempfile::tempdir().unwrap();
    let good = folder.path().join("image.png");
    let bad = folder.path().join("no-such-folder").join("image.png");
    let image = RgbImage {
        width: 4,
        height: 2,
        pixels: (0..24).collect(),
    };
    worker
        .send(Command::ExportPngs {
            files: vec![
                PngExport {
                    path: good.clone(),
                    image: image.clone(),
                    parameters: Some("a prompt\nSteps: 1".to_owned()),
                },
                PngExport {
                    path: bad.clone(),
                    image,
                    parameters: None,
                },
            ],
        })
        .unwrap();
    assert!(matches!(next_event(&worker), Event::Exported { path } if path == good));
    match next_event(&worker) {
        Event::ExportFailed { path, message } => {
            assert_eq!(path, bad);
            assert!(!message.is_empty());
        }
        other => panic!("expected ExportFailed, got {other:?}"),
    }
    let decoded = image::open(&good).unwrap().to_rgb8();
    assert_eq!(decoded.dimensions(), (4, 2));
    assert_eq!(decoded.as_raw()[..6], [0, 1, 2, 3, 4, 5]);
    let leftovers: Vec<_> = std::fs::read_dir(folder.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "only the finished PNG is left: {leftovers:?}"
    );
}

#[test]
fn attention_export_writes_the_latest_finished_run_as_safetensors() {
    let mut worker = spawn(FakeEngineConfig::default());
    load_bundled(&worker);
    let run_id = worker.generate(params("a red circle", 3)).unwrap();
    let events = events_until_end_of(&worker, run_id);
    assert!(matches!(events.last(), Some(Event::Finished { .. })));
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("maps.safetensors");
    let heatmaps: Vec<Heatmap> = ["a", "red", "circle"]
        .iter()
        .map(|word| Heatmap {
            word: (*word).to_owned(),
            h: 8,
            w: 8,
            data: vec![0.5; 64],
            peak: 1.0,
            floor: 0.0,
        })
        .collect();
    worker
        .send(Command::ExportAttention {
            run_id,
            path: path.clone(),
            word_heatmaps: heatmaps,
        })
        .unwrap();
    assert!(matches!(next_event(&worker), Event::Exported { path: written } if written == path));
    let bytes = std::fs::read(&path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(tensors.tensor("word_heatmaps").unwrap().shape(), [3, 8, 8]);
    // 3 steps, 5 tokens (start, 3 words, end), the fake's 16x16 grid.
    assert_eq!(
        tensors.tensor("cross.16x16").unwrap().shape(),
        [3, 5, 16, 16]
    );

    // A stale run id is refused, and nothing is written.
    let stale = folder.path().join("stale.safetensors");
    worker
        .send(Command::ExportAttention {
            run_id: run_id + 100,
            path: stale.clone(),
            word_heatmaps: Vec::new(),
        })
        .unwrap();
    assert!(matches!(next_event(&worker), Event::ExportFailed { .. }));
    assert!(!stale.exists());
}

/// The real engine over the candle pipeline, on the tiny SD 1.x fixture (random weights, 32 px).
#[test]
fn the_pipeline_engine_streams_steps_maps_and_exports_for_a_tiny_model() {
    let model_dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1");
    let mut worker = WorkerHandle::spawn(attend::worker::pipeline_engine_factory()).unwrap();
    worker
        .load_model(ModelSource::Folder(model_dir.clone()))
        .unwrap();
    let info = match next_event(&worker) {
        Event::ModelLoaded { info } => info,
        other => panic!("expected ModelLoaded, got {other:?}"),
    };
    assert_eq!((info.default_width_px, info.default_height_px), (32, 32));
    // A checkpoint folder multiplies in f32 unless bf16 is asked for (and the CPU has it).
    assert!(!info.bf16_products);
    assert_eq!(
        info.bf16_products_available,
        attend::kernels::bf16_supported()
    );
    worker
        .load_model_with(ModelSource::Folder(model_dir.clone()), Products::Bf16)
        .unwrap();
    match next_event(&worker) {
        Event::ModelLoaded { info } => {
            assert_eq!(info.bf16_products, attend::kernels::bf16_supported());
        }
        other => panic!("expected ModelLoaded, got {other:?}"),
    }
    worker
        .load_model_with(ModelSource::Folder(model_dir.clone()), Products::F32)
        .unwrap();
    assert!(matches!(next_event(&worker), Event::ModelLoaded { .. }));
    let run_id = worker
        .generate(GenerateParams {
            prompt: "a photo of a cat wearing sunglasses".to_owned(),
            steps: 3,
            seed: 3,
            ..GenerateParams::default()
        })
        .unwrap();
    let events = events_until_end_of(&worker, run_id);
    let Event::Started {
        branch: Branch::Source,
        prompt,
        params,
        ..
    } = &events[0]
    else {
        panic!("expected Started of the source, got {:?}", events[0]);
    };
    assert_eq!(params.scheduler.as_deref(), Some("ddim"));
    assert_eq!(prompt.words.len(), 7);
    let token_count = prompt.tokens.len();
    let steps: Vec<_> = events
        .iter()
        .filter_map(|event| match event {
            Event::Step { frame, .. } => Some(frame),
            _ => None,
        })
        .collect();
    assert_eq!(steps.len(), 3);
    for frame in &steps {
        assert!(frame.preview.is_consistent() && frame.preview.width > 0);
        assert!(
            !frame.cross.groups.is_empty(),
            "every step carries cross-attention maps"
        );
        for group in &frame.cross.groups {
            assert_eq!(group.token_count, token_count);
            assert_eq!(group.data.len(), token_count * group.h * group.w);
            // Each pixel's attention over the kept tokens sums to at most 1 (softmax over 77 keys).
            let cells = group.h * group.w;
            let total: f32 = (0..token_count)
                .map(|token| group.data[token * cells])
                .sum();
            assert!(total <= 1.0 + 1e-4, "{total}");
        }
    }
    let Some(Event::Finished {
        image,
        self_attention_grids,
        ..
    }) = events.last()
    else {
        panic!("expected Finished, got {:?}", events.last());
    };
    assert_eq!((image.width, image.height), (32, 32));
    assert!(!self_attention_grids.is_empty());
    let (grid_h, grid_w) = self_attention_grids[0];
    worker
        .send(Command::RequestSelfAttention {
            run_id,
            grid_h,
            grid_w,
            span: SelfAttentionSpan::MeanOverSteps,
        })
        .unwrap();
    match next_event(&worker) {
        Event::SelfAttention { map: Some(map), .. } => {
            let queries = grid_h * grid_w;
            assert_eq!(map.data.len(), queries * queries);
            let worst = map
                .data
                .chunks(queries)
                .map(|row| (row.iter().sum::<f32>() - 1.0).abs())
                .fold(0.0f32, f32::max);
            eprintln!("self-attention {grid_h}x{grid_w}: rows sum to 1 within {worst:.2e}");
            assert!(worst < 1e-4);
        }
        other => panic!("expected a self-attention map, got {other:?}"),
    }
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("maps.safetensors");
    worker
        .send(Command::ExportAttention {
            run_id,
            path: path.clone(),
            word_heatmaps: Vec::new(),
        })
        .unwrap();
    assert!(matches!(next_event(&worker), Event::Exported { .. }));
    let bytes = std::fs::read(&path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<String> = tensors.names().into_iter().map(str::to_owned).collect();
    assert!(
        names.iter().any(|name| name.starts_with("cross.")),
        "{names:?}"
    );
}

#[test]
fn the_probe_is_answered_during_a_run_after_the_next_step() {
    let (mut worker, gate) = spawn_gated();
    load_bundled(&worker);
    let run_id = worker.generate(params("a red circle", 12)).unwrap();
    gate.allow(2);
    events_until_steps(&worker, run_id, Branch::Source, 2);
    worker
        .send(Command::RequestSelfAttention {
            run_id,
            grid_h: 16,
            grid_w: 16,
            span: SelfAttentionSpan::LatestStep,
        })
        .unwrap();
    // The worker takes the request after the second step (if it had not looked yet) or after the
    // third: it answers at that step boundary while the run waits at the gate.
    gate.allow(1);
    let mut before_answer = Vec::new();
    let answer = loop {
        match next_event(&worker) {
            Event::SelfAttention {
                run_id: answered,
                map,
            } => break (answered, map),
            event => {
                assert!(
                    is_step_of(&event, run_id, Branch::Source),
                    "only a step may come before the answer: {event:?}"
                );
                before_answer.push(event);
            }
        }
    };
    assert!(
        before_answer.len() <= 1,
        "answered at the next step boundary: {before_answer:?}"
    );
    match answer {
        (answered, Some(map)) => {
            assert_eq!(answered, run_id);
            assert_eq!(map.data.len(), 256 * 256);
        }
        other => panic!("expected a map, got {other:?}"),
    }
    // The run goes on after the answer.
    gate.allow(9);
    let events = events_until_end_of(&worker, run_id);
    assert_eq!(step_count(&events, run_id), 10 - before_answer.len());
    assert!(matches!(events.last(), Some(Event::Finished { .. })));
}
