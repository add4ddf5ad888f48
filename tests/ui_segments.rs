//! The Segments view driven through egui_kittest with the fake engine (whose self-attention is
//! block-structured, one block per object word): switching to the view segments the finished run,
//! the segments carry prompt words, canvas clicks select / add / remove segments and update the mask,
//! changing the method re-segments, the mask, label map and segments JSON export to valid files.
//! One test drives the real engine (bundled model) through the worker.

// The helpers below are test code too; `allow-unwrap-in-tests` only covers `#[test]` functions.
#![allow(clippy::unwrap_used)]

mod ui_common;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attend::analysis::segment::{LabelledSegmentation, SegmentMethod, SegmentsFile};
use attend::ui::{CanvasView, DialogPurpose, EditorApp, EditorOptions, EngineKind, RunOutcome};
use attend::worker::{
    pipeline_engine_factory, Command, EngineFactory, Event, FakeEngine, FakeEngineConfig,
    GenerateParams, ModelSource, SegmentRequest, WorkerHandle,
};
use egui_kittest::kittest::Queryable as _;
use egui_kittest::Harness;

const TIMEOUT: Duration = Duration::from_secs(60);
const PROMPT: &str = "a red circle and a blue square";

fn harness() -> Harness<'static, EditorApp> {
    let config = FakeEngineConfig::default();
    let factory: EngineFactory = Arc::new(move || Box::new(FakeEngine::new(config.clone())));
    let options = EditorOptions {
        prompt: Some(PROMPT.to_owned()),
        steps: Some(6),
        seed: Some(7),
        engine: EngineKind::Fake,
        ..EditorOptions::default()
    };
    let app = EditorApp::new(options, None, None, factory).unwrap();
    ui_common::harness_of(app, egui::vec2(1280.0, 820.0))
}

fn run_until(
    harness: &mut Harness<'static, EditorApp>,
    what: &str,
    done: impl Fn(&EditorApp) -> bool,
) {
    ui_common::run_until_within(harness, what, TIMEOUT, done);
}

fn segmented(app: &EditorApp) -> bool {
    app.segmentation().is_some() && !app.is_segmenting()
}

/// Generates, switches to the Segments view and waits for the segmentation.
fn generate_and_segment() -> Harness<'static, EditorApp> {
    let mut harness = harness();
    run_until(&mut harness, "the model", |app| {
        app.loaded_model().is_some()
    });
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the run to finish", |app| {
        app.run_view()
            .is_some_and(|run| matches!(run.outcome, RunOutcome::Finished { .. }))
            && !app.is_generating()
    });
    harness.get_by_label("Segments").click();
    run_until(&mut harness, "the segmentation", segmented);
    harness.run_steps(2);
    harness
}

fn segmentation(harness: &Harness<'static, EditorApp>) -> LabelledSegmentation {
    harness.state().segmentation().unwrap().clone()
}

/// The id of the segment labelled `word`.
fn segment_labelled(segmentation: &LabelledSegmentation, word: &str) -> usize {
    segmentation
        .segments
        .iter()
        .find(|segment| segment.label == word)
        .unwrap_or_else(|| panic!("no segment labelled {word}: {:?}", segmentation.segments))
        .id
}

/// A pixel `(y, x)` well inside a segment: the one of its pixels nearest to its centroid.
fn pixel_inside(segmentation: &LabelledSegmentation, id: usize) -> (usize, usize) {
    let image = &segmentation.image;
    let pixels: Vec<(usize, usize)> = (0..image.h * image.w)
        .filter(|&index| image.labels[index] == id)
        .map(|index| (index / image.w, index % image.w))
        .collect();
    let count = pixels.len() as f32;
    let centre_y = pixels.iter().map(|p| p.0 as f32).sum::<f32>() / count;
    let centre_x = pixels.iter().map(|p| p.1 as f32).sum::<f32>() / count;
    *pixels
        .iter()
        .min_by(|a, b| {
            let distance = |p: &&(usize, usize)| {
                (p.0 as f32 - centre_y).powi(2) + (p.1 as f32 - centre_x).powi(2)
            };
            distance(a).total_cmp(&distance(b))
        })
        .unwrap()
}

/// Clicks the canvas on image pixel `(y, x)`, with Shift held when `shift`.
fn click_pixel(harness: &mut Harness<'static, EditorApp>, pixel: (usize, usize), shift: bool) {
    let (h, w) = {
        let image = &harness.state().segmentation().unwrap().image;
        (image.h, image.w)
    };
    let rect = harness.state().canvas_image_rect().unwrap();
    let target = rect.min
        + rect.size()
            * egui::vec2(
                (pixel.1 as f32 + 0.5) / w as f32,
                (pixel.0 as f32 + 0.5) / h as f32,
            );
    let modifiers = if shift {
        egui::Modifiers::SHIFT
    } else {
        egui::Modifiers::NONE
    };
    harness.hover_at(target);
    harness.step();
    for pressed in [true, false] {
        harness.event(egui::Event::PointerButton {
            pos: target,
            button: egui::PointerButton::Primary,
            pressed,
            modifiers,
        });
        harness.event(egui::Event::ModifiersChanged(modifiers));
        harness.step();
    }
    harness.event(egui::Event::ModifiersChanged(egui::Modifiers::NONE));
    harness.run_steps(2);
}

fn mask_value_at(app: &EditorApp, pixel: (usize, usize)) -> f32 {
    let mask = app.selected_segments_mask().unwrap();
    mask.data[pixel.0 * mask.w + pixel.1]
}

#[test]
fn the_segments_view_shows_segments_labelled_with_prompt_words() {
    let mut harness = generate_and_segment();
    assert_eq!(harness.state().canvas_view(), CanvasView::Segments);
    assert!(
        harness.state().canvas_heat().is_none(),
        "no word heat map over the segments"
    );
    let segmentation = segmentation(&harness);
    let labels: Vec<&str> = segmentation
        .segments
        .iter()
        .map(|segment| segment.label.as_str())
        .collect();
    eprintln!(
        "{} segments on {}x{}: {labels:?}",
        labels.len(),
        segmentation.grid.h,
        segmentation.grid.w
    );
    for segment in &segmentation.segments {
        eprintln!("  {segment:?}");
    }
    for row in segmentation.grid.labels.chunks(segmentation.grid.w) {
        eprintln!("  {row:?}");
    }
    for word in ["circle", "square", "background"] {
        assert!(labels.contains(&word), "{word} in {labels:?}");
    }
    assert_eq!(
        (segmentation.image.h, segmentation.image.w),
        (64, 64),
        "segment ids at image resolution"
    );
    // Every segment is scored against the object words of the prompt.
    for segment in &segmentation.segments {
        let words: Vec<&str> = segment.scores.iter().map(|s| s.word.as_str()).collect();
        assert_eq!(words, ["circle", "square"]);
    }
    let circle = &segmentation.segments[segment_labelled(&segmentation, "circle")];
    assert!(circle.label_score() > 0.5, "{circle:?}");
    // The list shows each segment with its label and score, and every word's score.
    harness.get_by_label(&format!(
        "{}: circle {:.2}",
        circle.id,
        circle.label_score()
    ));
    harness.get_by_label_contains(&format!("circle {:.2}, square", circle.scores[0].score));
    harness.step();
}

#[test]
fn canvas_clicks_select_add_and_remove_segments_and_the_mask_follows() {
    let mut harness = generate_and_segment();
    let segmentation = segmentation(&harness);
    let circle = segment_labelled(&segmentation, "circle");
    let square = segment_labelled(&segmentation, "square");
    let in_circle = pixel_inside(&segmentation, circle);
    let in_square = pixel_inside(&segmentation, square);
    assert!(harness.state().selected_segments_mask().is_none());

    click_pixel(&mut harness, in_circle, false);
    assert_eq!(harness.state().selected_segments(), [circle]);
    let mask = harness.state().selected_segments_mask().unwrap().clone();
    assert_eq!(
        (mask.h, mask.w),
        (64, 64),
        "the mask is at image resolution"
    );
    assert_eq!(mask_value_at(harness.state(), in_circle), 1.0);
    assert_eq!(mask_value_at(harness.state(), in_square), 0.0);
    let circle_pixels = segmentation.segments[circle].pixel_count;
    let covered = mask.covered_pixels();
    assert!(
        covered.abs_diff(circle_pixels) * 10 <= circle_pixels,
        "mask {covered} px vs segment {circle_pixels} px"
    );

    // Shift-click adds.
    click_pixel(&mut harness, in_square, true);
    assert_eq!(harness.state().selected_segments(), [circle, square]);
    assert_eq!(mask_value_at(harness.state(), in_square), 1.0);
    assert_eq!(mask_value_at(harness.state(), in_circle), 1.0);

    // A click on a selected segment removes it.
    click_pixel(&mut harness, in_circle, false);
    assert_eq!(harness.state().selected_segments(), [square]);
    assert_eq!(mask_value_at(harness.state(), in_circle), 0.0);

    // A plain click on another segment replaces the selection.
    click_pixel(&mut harness, in_circle, false);
    assert_eq!(harness.state().selected_segments(), [circle]);

    // Dilating grows the mask.
    harness
        .get_by_role_and_label(egui::accesskit::Role::SpinButton, "Dilate (px)")
        .set_value_accesskit(3.0);
    harness.run_steps(2);
    let dilated = harness.state().selected_segments_mask().unwrap();
    assert!(
        dilated.covered_pixels() > covered,
        "{} > {covered}",
        dilated.covered_pixels()
    );

    // The list toggles too.
    harness
        .get_by_label_contains(&format!("{square}: square"))
        .click();
    harness.run_steps(2);
    assert_eq!(harness.state().selected_segments(), [square]);

    // Use as local-blend mask hands the mask to the edit mode.
    let selected_mask = harness.state().selected_segments_mask().cloned();
    harness.get_by_label("Use as local-blend mask").click();
    harness.run_steps(2);
    let app = harness.state();
    assert_eq!(app.local_blend_mask(), selected_mask.as_ref());
    assert!(
        app.status_messages()
            .iter()
            .any(|message| message.text.contains("local blend")),
        "{:?}",
        app.status_messages()
    );
}

#[test]
fn changing_the_method_or_k_re_segments_without_a_new_run() {
    let mut harness = generate_and_segment();
    let run_id = harness.state().run_view().unwrap().run_id;
    assert_eq!(segmentation(&harness).method, SegmentMethod::KMeans);

    harness.get_by_label("DiffSeg").click();
    run_until(&mut harness, "the DiffSeg segmentation", |app| {
        segmented(app) && app.segmentation().unwrap().method == SegmentMethod::DiffSeg
    });
    let diffseg = segmentation(&harness);
    let labels: Vec<&str> = diffseg.segments.iter().map(|s| s.label.as_str()).collect();
    eprintln!("diffseg: {labels:?}");
    assert!(labels.contains(&"circle") && labels.contains(&"square"));
    // A lower threshold merges less: more segments.
    let diffseg_count = diffseg.segments.len();
    harness
        .get_by_role_and_label(egui::accesskit::Role::Slider, "DiffSeg threshold")
        .set_value_accesskit(0.05);
    run_until(&mut harness, "the finer DiffSeg segmentation", |app| {
        segmented(app) && app.segmentation().unwrap().segments.len() > diffseg_count
    });

    harness.get_by_label("KMeans").click();
    run_until(&mut harness, "the KMeans segmentation", |app| {
        segmented(app) && app.segmentation().unwrap().method == SegmentMethod::KMeans
    });
    harness
        .get_by_role_and_label(egui::accesskit::Role::Slider, "Clusters (k)")
        .set_value_accesskit(2.0);
    run_until(&mut harness, "the k = 2 segmentation", |app| {
        segmented(app) && app.segmentation().unwrap().segments.len() <= 2
    });
    assert_eq!(
        harness.state().run_view().unwrap().run_id,
        run_id,
        "no new diffusion run"
    );
}

/// Answers the three export dialogs with files in `folder`.
fn answer_exports(harness: &mut Harness<'static, EditorApp>, folder: &Path) -> [PathBuf; 3] {
    let paths = [
        folder.join("mask.png"),
        folder.join("labels.png"),
        folder.join("segments.json"),
    ];
    let answers = Arc::new(Mutex::new(vec![
        (DialogPurpose::ExportSegmentMask, paths[0].clone()),
        (DialogPurpose::ExportSegmentLabels, paths[1].clone()),
        (DialogPurpose::ExportSegmentsJson, paths[2].clone()),
    ]));
    harness
        .state_mut()
        .answer_dialogs_with(Box::new(move |purpose| {
            answers
                .lock()
                .unwrap()
                .iter()
                .find(|(wanted, _)| wanted == purpose)
                .map(|(_, path)| path.clone())
        }));
    paths
}

fn read_grey_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buffer).unwrap();
    assert_eq!(frame.color_type, png::ColorType::Grayscale);
    assert_eq!(frame.bit_depth, png::BitDepth::Eight);
    buffer.truncate(frame.buffer_size());
    (frame.width, frame.height, buffer)
}

#[test]
fn the_mask_label_map_and_segments_export_to_valid_files() {
    let folder = tempfile::tempdir().unwrap();
    let mut harness = generate_and_segment();
    let [mask_path, labels_path, json_path] = answer_exports(&mut harness, folder.path());
    let segmentation = segmentation(&harness);
    let circle = segment_labelled(&segmentation, "circle");
    click_pixel(&mut harness, pixel_inside(&segmentation, circle), false);
    let mask = harness.state().selected_segments_mask().unwrap().clone();

    let wrote = |path: &PathBuf| {
        let text = format!("Wrote {}", path.display());
        move |app: &EditorApp| {
            app.status_messages()
                .iter()
                .any(|message| message.text == text)
        }
    };
    harness.get_by_label("Export mask...").click();
    run_until(&mut harness, "the mask", wrote(&mask_path));
    harness.get_by_label("Export label map...").click();
    run_until(&mut harness, "the label map", wrote(&labels_path));
    harness.get_by_label("Export segments JSON...").click();
    run_until(&mut harness, "the segments", wrote(&json_path));

    // The mask: white on black at image size, white exactly where the mask is.
    let (width, height, pixels) = read_grey_png(&mask_path);
    assert_eq!((width, height), (64, 64));
    assert!(pixels.iter().all(|&value| value == 0 || value == 255));
    assert_eq!(
        pixels.iter().filter(|&&value| value == 255).count(),
        mask.covered_pixels()
    );
    assert!(mask.covered_pixels() > 0);

    // The label map: one segment id per pixel (palette indices in the overlay colours).
    let labels = attend::analysis::segment::read_label_map_png(&labels_path).unwrap();
    assert_eq!((labels.w, labels.h), (64, 64));
    assert_eq!(labels.labels, segmentation.image.labels);

    // The JSON: id, label, scores and pixel count of every segment.
    let text = std::fs::read_to_string(&json_path).unwrap();
    let file: SegmentsFile = serde_json::from_str(&text).unwrap();
    assert_eq!(file.prompt.as_deref(), Some(PROMPT));
    assert_eq!((file.width, file.height), (64, 64));
    assert_eq!(file.segments, segmentation.segments);
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let first = &value["segments"][0];
    for field in ["id", "label", "scores", "pixel_count"] {
        assert!(!first[field].is_null(), "{field} in {first}");
    }
    let total: usize = file.segments.iter().map(|s| s.pixel_count).sum();
    assert_eq!(total, 64 * 64);
    // Nothing else (no temporary files) is left in the folder.
    assert_eq!(std::fs::read_dir(folder.path()).unwrap().count(), 3);
}

fn next_event(worker: &WorkerHandle, timeout: Duration) -> Event {
    worker
        .events()
        .recv_timeout(timeout)
        .expect("the worker answers in time")
}

#[test]
fn the_pipeline_engine_segments_its_finished_run_with_prompt_words() {
    let mut worker = WorkerHandle::spawn(pipeline_engine_factory()).unwrap();
    worker.load_model(ModelSource::Bundled).unwrap();
    match next_event(&worker, Duration::from_secs(120)) {
        Event::ModelLoaded { .. } => {}
        other => panic!("expected the model, got {other:?}"),
    }
    let run_id = worker
        .generate(GenerateParams {
            prompt: PROMPT.to_owned(),
            seed: 7,
            steps: 6,
            ..GenerateParams::default()
        })
        .unwrap();
    loop {
        match next_event(&worker, Duration::from_secs(300)) {
            Event::Finished { .. } => break,
            Event::Failed { message, .. } => panic!("the run failed: {message}"),
            _ => {}
        }
    }
    for method in SegmentMethod::ALL {
        let mut request = SegmentRequest::default();
        request.settings.method = method;
        let started = Instant::now();
        worker
            .send(Command::Segment {
                run_id,
                request: request.clone(),
            })
            .unwrap();
        let segmentation = match next_event(&worker, Duration::from_secs(120)) {
            Event::Segmented {
                run_id: answered,
                request: answered_request,
                result,
                ..
            } => {
                assert_eq!(answered, run_id);
                assert_eq!(answered_request, request);
                result.unwrap()
            }
            other => panic!("expected Segmented, got {other:?}"),
        };
        let labels: Vec<&str> = segmentation
            .segments
            .iter()
            .map(|segment| segment.label.as_str())
            .collect();
        eprintln!(
            "{method}: {labels:?} on {}x{} in {:.0} ms",
            segmentation.grid.h,
            segmentation.grid.w,
            started.elapsed().as_secs_f64() * 1e3
        );
        assert_eq!(segmentation.method, method);
        assert_eq!((segmentation.image.h, segmentation.image.w), (64, 64));
        assert!(segmentation.segments.len() >= 2);
        assert!(
            labels
                .iter()
                .any(|label| *label == "circle" || *label == "square"),
            "a segment carries a prompt word: {labels:?}"
        );
        assert!(labels
            .iter()
            .all(|label| ["circle", "square", "background"].contains(label)));
        for segment in &segmentation.segments {
            let words: Vec<&str> = segment.scores.iter().map(|s| s.word.as_str()).collect();
            assert_eq!(words, ["circle", "square"]);
        }
    }
    // A run that is not the latest finished one is refused.
    worker
        .send(Command::Segment {
            run_id: run_id + 100,
            request: SegmentRequest::default(),
        })
        .unwrap();
    match next_event(&worker, Duration::from_secs(60)) {
        Event::Segmented { result, .. } => assert!(result.is_err()),
        other => panic!("expected Segmented, got {other:?}"),
    }
}
