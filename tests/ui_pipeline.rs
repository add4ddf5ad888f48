//! The editor driven through egui_kittest with the real engine (candle pipeline): the bundled model
//! (`assets/attend-shapes`) and the tiny SD 1.x fixture (32 px, with a VAE). Prompt, Generate,
//! progress, one thumbnail per word, selecting a word, cancelling, exporting.

// The helpers below are test code too; `allow-unwrap-in-tests` only covers `#[test]` functions.
#![allow(clippy::unwrap_used)]

mod ui_common;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use attend::ui::{DialogPurpose, EditorApp, EditorOptions, EngineKind, RunOutcome};
use attend::worker::{bundled_model_dir, pipeline_engine_factory};
use egui_kittest::kittest::Queryable as _;
use egui_kittest::Harness;

const TIMEOUT: Duration = Duration::from_secs(300);

fn harness_for(model: Option<PathBuf>, prompt: &str, steps: usize) -> Harness<'static, EditorApp> {
    let options = EditorOptions {
        prompt: Some(prompt.to_owned()),
        steps: Some(steps),
        model,
        engine: EngineKind::Pipeline,
        ..EditorOptions::default()
    };
    let app = EditorApp::new(options, None, None, pipeline_engine_factory()).unwrap();
    ui_common::harness_of(app, egui::vec2(1280.0, 820.0))
}

fn run_until(
    harness: &mut Harness<'static, EditorApp>,
    what: &str,
    done: impl Fn(&EditorApp) -> bool,
) {
    ui_common::run_until_within(harness, what, TIMEOUT, done);
}

use ui_common::finished;

#[test]
fn the_bundled_model_generates_with_live_word_heatmaps_and_exports() {
    assert!(
        bundled_model_dir().join("model_index.json").is_file(),
        "the bundled model is missing at {}",
        bundled_model_dir().display()
    );
    let folder = tempfile::tempdir().unwrap();
    let image_path = folder.path().join("image.png");
    let attention_path = folder.path().join("maps.safetensors");
    let mut harness = harness_for(None, "", 6);
    let answers = Arc::new(vec![
        (DialogPurpose::ExportImage, image_path.clone()),
        (DialogPurpose::ExportAttention, attention_path.clone()),
    ]);
    harness
        .state_mut()
        .answer_dialogs_with(Box::new(move |purpose| {
            answers
                .iter()
                .find(|(wanted, _)| wanted == purpose)
                .map(|(_, path)| path.clone())
        }));
    run_until(&mut harness, "the bundled model", |app| {
        app.loaded_model().is_some()
    });
    // The bundled folder recommends its Prompt-to-Prompt self-attention setting for edits that
    // change words (model_index.json); an edit that changes no word keeps the reference's.
    let recommended = harness.state().loaded_model().unwrap().edit_self_replace;
    assert_eq!(
        (recommended.window.end, recommended.max_queries),
        (0.2, 32 * 32)
    );
    assert_eq!(
        harness.state().edit_spec().self_replace,
        attend::worker::SelfReplace::default()
    );
    harness.get_by_label("Prompt").focus();
    harness.step();
    harness
        .get_by_label("Prompt")
        .type_text("a red circle and a blue square");
    harness.step();
    let started = Instant::now();
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the run", finished);
    eprintln!(
        "bundled model: 6 steps in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    harness.run_steps(2);
    let app = harness.state();
    let run = app.run_view().unwrap();
    let word_count = run.prompt.words.len();
    assert_eq!(word_count, 7);
    assert_eq!(app.thumbnail_count(), word_count);
    let image = run.final_image.as_ref().unwrap();
    assert_eq!(
        (image.width, image.height),
        (64, 64),
        "the bundled model is 64 px, pixel space"
    );
    harness.get_by_label_contains("done: 6/6 steps");

    harness.get_by_label("square").click();
    harness.run_steps(2);
    let square = harness
        .state()
        .run_view()
        .unwrap()
        .prompt
        .words
        .iter()
        .position(|word| word.text == "square");
    assert_eq!(harness.state().selected_word(), square);

    harness.get_by_label("Export image...").click();
    run_until(&mut harness, "the image", |app| {
        image_path.is_file() && !app.is_generating()
    });
    harness.get_by_label("Export attention maps...").click();
    run_until(&mut harness, "the maps", |_| attention_path.is_file());
    let decoded = image::open(&image_path).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (64, 64));
    let bytes = std::fs::read(&attention_path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        tensors.tensor("word_heatmaps").unwrap().shape()[0],
        word_count
    );
}

#[test]
fn a_tiny_sd1_run_can_be_cancelled_and_regenerated() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1");
    let mut harness = harness_for(Some(model), "a photo of a cat", 200);
    run_until(&mut harness, "tiny-sd1", |app| app.loaded_model().is_some());
    // A checkpoint without `_attend_edit_defaults` gets the reference's self-attention setting.
    assert_eq!(
        harness.state().loaded_model().unwrap().edit_self_replace,
        attend::worker::SelfReplace::default()
    );
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "a few steps", |app| {
        app.run_view().is_some_and(|run| run.steps.len() >= 3)
    });
    harness.get_by_label("Cancel").click();
    run_until(&mut harness, "the cancellation", |app| {
        app.run_view()
            .is_some_and(|run| matches!(run.outcome, RunOutcome::Cancelled { .. }))
    });
    // The worker's count of the steps made is the UI's: every step arrived, none after the end.
    let run = harness.state().run_view().unwrap();
    let RunOutcome::Cancelled { steps_done } = run.outcome else {
        unreachable!("waited for the cancellation");
    };
    eprintln!("tiny-sd1: cancelled after {steps_done} of 200 steps");
    assert!((3..200).contains(&steps_done));
    assert_eq!(run.steps.len(), steps_done);
    // Steps typed in the panel apply to the next run.
    harness.get_by_label("Steps").focus();
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    harness.get_by_label("Steps").type_text("4");
    harness.key_press(egui::Key::Enter);
    harness.run_steps(2);
    assert_eq!(harness.state().settings().params.steps, 4);
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the second run", finished);
    let run = harness.state().run_view().unwrap();
    assert_eq!(run.steps.len(), 4);
    assert_eq!(harness.state().thumbnail_count(), run.prompt.words.len());
    let image = run.final_image.as_ref().unwrap();
    assert_eq!((image.width, image.height), (32, 32));

    // A folder that is not a model: an error that names what is missing, and tiny-sd1 stays loaded.
    let not_a_model = tempfile::tempdir().unwrap();
    let answer = not_a_model.path().to_path_buf();
    harness
        .state_mut()
        .answer_dialogs_with(Box::new(move |purpose| {
            (*purpose == DialogPurpose::OpenModelFolder).then(|| answer.clone())
        }));
    harness.get_by_label("Open model folder...").click();
    run_until(&mut harness, "the load error", |app| {
        app.status_messages()
            .last()
            .is_some_and(|message| message.text.starts_with("Could not load"))
    });
    let error = harness
        .state()
        .status_messages()
        .last()
        .unwrap()
        .text
        .clone();
    eprintln!("{error}");
    assert!(
        error.contains("model_index.json") && error.contains("keeping tiny-sd1"),
        "{error}"
    );
    harness.get_by_label("Generate").click();
    run_until(
        &mut harness,
        "a run with tiny-sd1 after the error",
        finished,
    );
}
