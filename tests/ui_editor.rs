//! The editor driven through egui_kittest (AccessKit: widgets are found by their labels), with the
//! fake engine: typing a prompt, generating, progress, the token strip, selecting a word, cancelling,
//! exports, a bad model folder, a crashing engine, sessions and settings persistence, and bad input:
//! broken session files, a bad model on the command line, no file dialog, steps and guidance out
//! of range.
//!
//! These tests need no GPU: the canvas falls back to CPU composition. `tests/ui_render.rs` renders
//! through wgpu (lavapipe on CI).

// The helpers below are test code too; `allow-unwrap-in-tests` only covers `#[test]` functions.
#![allow(clippy::unwrap_used)]

mod ui_common;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use attend::ui::{
    DialogPurpose, EditorApp, EditorOptions, EditorSettings, EngineKind, RunOutcome, Session,
    StatusLevel, SETTINGS_STORAGE_KEY,
};
use attend::worker::{
    EngineFactory, FakeEngine, FakeEngineConfig, ModelSource, Products, StepGate,
};
use egui_kittest::kittest::{NodeT as _, Queryable as _};
use egui_kittest::Harness;

const TIMEOUT: Duration = Duration::from_secs(30);

fn fake_factory(config: FakeEngineConfig) -> EngineFactory {
    Arc::new(move || Box::new(FakeEngine::new(config.clone())))
}

fn options(prompt: &str) -> EditorOptions {
    EditorOptions {
        prompt: Some(prompt.to_owned()),
        steps: Some(6),
        engine: EngineKind::Fake,
        ..EditorOptions::default()
    }
}

fn harness_with(options: EditorOptions, config: FakeEngineConfig) -> Harness<'static, EditorApp> {
    let app = EditorApp::new(options, None, None, fake_factory(config)).unwrap();
    ui_common::harness_of(app, egui::vec2(1280.0, 820.0))
}

fn run_until(
    harness: &mut Harness<'static, EditorApp>,
    what: &str,
    done: impl Fn(&EditorApp) -> bool,
) {
    ui_common::run_until_within(harness, what, TIMEOUT, done);
}

fn model_loaded(harness: &mut Harness<'static, EditorApp>) {
    run_until(harness, "the model", |app| app.loaded_model().is_some());
}

use ui_common::finished;

fn last_status(app: &EditorApp) -> String {
    app.status_messages()
        .last()
        .map(|message| message.text.clone())
        .unwrap_or_default()
}

#[test]
fn typing_a_prompt_and_generating_fills_progress_and_one_thumbnail_per_word() {
    let mut harness = harness_with(options(""), FakeEngineConfig::default());
    model_loaded(&mut harness);
    harness.get_by_label("Prompt").focus();
    harness.step();
    harness
        .get_by_label("Prompt")
        .type_text("a red circle near a blue square");
    harness.step();
    assert_eq!(
        harness.state().settings().params.prompt,
        "a red circle near a blue square"
    );
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the run to finish", finished);
    harness.step();

    let app = harness.state();
    let run = app.run_view().unwrap();
    assert_eq!(run.steps.len(), 6);
    assert_eq!(run.prompt.words.len(), 7);
    assert_eq!(app.word_heatmaps().len(), 7);
    assert_eq!(app.thumbnail_count(), 7);
    // The progress bar reports the whole run.
    harness.get_by_label_contains("done: 6/6 steps");
    // One thumbnail button per word.
    for word in ["red", "circle", "near", "blue", "square"] {
        harness.get_by_label(word);
    }
    assert!(
        harness.state().canvas_heat().is_some(),
        "a word is selected by default"
    );
}

#[test]
fn progress_is_shown_while_running_and_steps_arrive_live() {
    // The engine takes a step only when the test allows it: after three steps the run is still
    // going, whatever the machine's speed.
    let gate = StepGate::new();
    let mut harness = harness_with(
        EditorOptions {
            steps: Some(30),
            ..options("a green triangle")
        },
        FakeEngineConfig {
            step_delay: Duration::ZERO,
            step_gate: Some(gate.clone()),
            ..FakeEngineConfig::default()
        },
    );
    model_loaded(&mut harness);
    harness.get_by_label("Generate").click();
    gate.allow(3);
    run_until(&mut harness, "three steps", |app| {
        app.run_view().is_some_and(|run| run.steps.len() == 3)
    });
    harness.step();
    assert!(harness.state().is_generating());
    harness.get_by_label_contains("step 3/30");
    harness.get_by_label_contains("ETA");
    let live_words = harness.state().thumbnail_count();
    assert_eq!(live_words, 3, "thumbnails exist during the run");
    gate.allow(27);
    run_until(&mut harness, "the end", finished);
    assert_eq!(harness.state().run_view().unwrap().steps.len(), 30);
}

#[test]
fn ctrl_enter_generates() {
    let mut harness = harness_with(options("a square"), FakeEngineConfig::default());
    model_loaded(&mut harness);
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Enter);
    run_until(&mut harness, "the run to finish", finished);
}

#[test]
fn clicking_a_word_selects_its_heatmap() {
    let mut harness = harness_with(
        options("a red circle and a blue square"),
        FakeEngineConfig::default(),
    );
    model_loaded(&mut harness);
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the run to finish", finished);
    harness.step();
    let words: Vec<String> = harness
        .state()
        .run_view()
        .unwrap()
        .prompt
        .words
        .iter()
        .map(|word| word.text.clone())
        .collect();
    for word in ["red", "square"] {
        let index = words.iter().position(|text| text == word).unwrap();
        harness.get_by_label(word).click();
        harness.run_steps(2);
        let app = harness.state();
        assert_eq!(app.selected_word(), Some(index));
        let (_, _, shown) = app.canvas_heat().unwrap();
        assert_eq!(
            shown,
            app.word_heatmaps()[index].data.as_slice(),
            "the canvas shows {word}"
        );
    }
    // Hovering a thumbnail shows its peak value.
    harness.get_by_label("circle").hover();
    harness.run_steps(6);
    harness.get_by_label_contains("circle: peak attention");
}

#[test]
fn cancel_mid_run_stops_before_the_next_step() {
    // Two steps are allowed; the third waits at the gate when Cancel is clicked, so the run must
    // stop after exactly two, and no step may arrive after it (even once more are allowed).
    let gate = StepGate::new();
    let mut harness = harness_with(
        EditorOptions {
            steps: Some(50),
            ..options("a slow circle")
        },
        FakeEngineConfig {
            step_delay: Duration::ZERO,
            step_gate: Some(gate.clone()),
            ..FakeEngineConfig::default()
        },
    );
    model_loaded(&mut harness);
    harness.get_by_label("Generate").click();
    gate.allow(2);
    run_until(&mut harness, "two steps", |app| {
        app.run_view().is_some_and(|run| run.steps.len() == 2)
    });
    harness.get_by_label("Cancel").click();
    run_until(&mut harness, "the cancellation", |app| {
        app.run_view()
            .is_some_and(|run| matches!(run.outcome, RunOutcome::Cancelled { .. }))
    });
    gate.allow(5);
    harness.run_steps(5);
    let run = harness.state().run_view().unwrap();
    assert_eq!(run.outcome, RunOutcome::Cancelled { steps_done: 2 });
    assert_eq!(run.steps.len(), 2);
    assert_eq!(last_status(harness.state()), "Cancelled after 2 step(s)");
    assert!(!harness.state().is_generating());
    harness.get_by_label_contains("cancelled after 2/50 steps");
}

/// Answers every dialog with a path chosen per purpose.
fn answer_dialogs(
    harness: &mut Harness<'static, EditorApp>,
    answers: Vec<(DialogPurpose, PathBuf)>,
) {
    let answers = Arc::new(Mutex::new(answers));
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
}

#[test]
fn exports_write_a_png_with_parameters_heatmaps_safetensors_and_a_session() {
    let folder = tempfile::tempdir().unwrap();
    let image_path = folder.path().join("image.png");
    let heatmap_path = folder.path().join("heat.png");
    let attention_path = folder.path().join("maps.safetensors");
    let session_path = folder.path().join("session.json");
    let words_folder = folder.path().join("words");
    std::fs::create_dir(&words_folder).unwrap();
    let mut harness = harness_with(options("a red circle"), FakeEngineConfig::default());
    answer_dialogs(
        &mut harness,
        vec![
            (DialogPurpose::ExportImage, image_path.clone()),
            (DialogPurpose::ExportHeatmapOverImage, heatmap_path.clone()),
            (DialogPurpose::ExportAttention, attention_path.clone()),
            (DialogPurpose::SaveSession, session_path.clone()),
            (DialogPurpose::ExportAllHeatmaps, words_folder.clone()),
        ],
    );
    model_loaded(&mut harness);
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the run to finish", finished);
    harness.step();

    let wrote = |path: &PathBuf| {
        let path = path.clone();
        move |app: &EditorApp| {
            app.status_messages()
                .iter()
                .any(|message| message.text == format!("Wrote {}", path.display()))
        }
    };
    harness.get_by_label("Export image...").click();
    run_until(&mut harness, "the image export", wrote(&image_path));
    harness
        .get_by_label("Export heat map over image...")
        .click();
    run_until(&mut harness, "the heat map export", wrote(&heatmap_path));
    harness.get_by_label("Export attention maps...").click();
    run_until(&mut harness, "the attention export", wrote(&attention_path));
    harness.get_by_label("Export all word heat maps...").click();
    run_until(
        &mut harness,
        "the word heat maps",
        wrote(&words_folder.join("02-circle.png")),
    );
    harness.get_by_label("File").click();
    harness.run_steps(3);
    harness.get_by_label("Save session...").click();
    run_until(&mut harness, "the session", wrote(&session_path));

    // The PNG decodes and carries the A1111 parameters.
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&image_path).unwrap(),
    ));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    assert_eq!((info.width, info.height), (64, 64));
    let parameters = info
        .uncompressed_latin1_text
        .iter()
        .find(|chunk| chunk.keyword == "parameters")
        .expect("parameters text chunk");
    assert!(
        parameters
            .text
            .starts_with("a red circle\nSteps: 6, Sampler: DDIM"),
        "{}",
        parameters.text
    );
    let heat = image::open(&heatmap_path).unwrap();
    assert_eq!((heat.width(), heat.height()), (64, 64));
    assert_eq!(std::fs::read_dir(&words_folder).unwrap().count(), 3);

    // The safetensors file holds the raw maps and the word heat maps.
    let bytes = std::fs::read(&attention_path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let words = tensors.tensor("word_heatmaps").unwrap();
    assert_eq!(words.shape(), [3, 64, 64], "word heat maps at image size");
    let cross = tensors.tensor("cross.16x16").unwrap();
    assert_eq!(cross.shape(), [6, 5, 16, 16]);

    let session = Session::load(&session_path).unwrap();
    assert_eq!(session.params.prompt, "a red circle");
    assert_eq!(
        session.params.width_px,
        Some(64),
        "the session spells out the size"
    );
}

#[test]
fn a_session_reopens_and_regenerates_the_same_image() {
    let folder = tempfile::tempdir().unwrap();
    let session_path = folder.path().join("session.json");
    let mut first = harness_with(options("two blue squares"), FakeEngineConfig::default());
    answer_dialogs(
        &mut first,
        vec![(DialogPurpose::SaveSession, session_path.clone())],
    );
    model_loaded(&mut first);
    // f32 products instead of the bundled model's bf16: the session keeps the choice.
    first.get_by_label("Products").click();
    first.run_steps(3);
    first.get_by_label("f32 (exact)").click();
    run_until(&mut first, "f32 products", |app| {
        app.loaded_model().is_some_and(|info| !info.bf16_products)
    });
    first.get_by_label("Generate").click();
    run_until(&mut first, "the first run", finished);
    first.get_by_label("File").click();
    first.run_steps(3);
    first.get_by_label("Save session...").click();
    run_until(&mut first, "the session", |app| {
        app.status_messages()
            .iter()
            .any(|message| message.text.starts_with("Wrote"))
    });
    let first_image = first
        .state()
        .run_view()
        .unwrap()
        .final_image
        .clone()
        .unwrap();

    let mut second = harness_with(
        EditorOptions {
            session: Some(session_path),
            engine: EngineKind::Fake,
            ..EditorOptions::default()
        },
        FakeEngineConfig::default(),
    );
    run_until(&mut second, "the regenerated run", finished);
    let second_app = second.state();
    assert_eq!(second_app.settings().params.prompt, "two blue squares");
    assert_eq!(second_app.settings().products, Products::F32);
    assert!(!second_app.loaded_model().unwrap().bf16_products);
    assert_eq!(
        second_app.run_view().unwrap().final_image.as_ref(),
        Some(&first_image)
    );
}

#[test]
fn a_bad_model_folder_shows_an_error_and_the_app_stays_usable() {
    let not_a_model = tempfile::tempdir().unwrap();
    let mut harness = harness_with(options("still usable"), FakeEngineConfig::default());
    answer_dialogs(
        &mut harness,
        vec![(
            DialogPurpose::OpenModelFolder,
            not_a_model.path().to_path_buf(),
        )],
    );
    model_loaded(&mut harness);
    let model_name = harness.state().loaded_model().unwrap().name.clone();
    // The button in the controls panel (the File menu is closed, so the label is unique).
    harness.get_by_label("Open model folder...").click();
    run_until(&mut harness, "the load error", |app| {
        app.status_messages()
            .iter()
            .any(|message| message.level == StatusLevel::Error)
    });
    harness.step();
    let error = last_status(harness.state());
    assert!(error.contains("model_index.json"), "{error}");
    assert!(error.contains(&format!("keeping {model_name}")), "{error}");
    harness.get_by_label_contains("model_index.json");
    assert_eq!(harness.state().loaded_model().unwrap().name, model_name);
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "a run with the previous model", finished);
}

#[test]
fn a_crashing_engine_is_reported_and_the_editor_recovers() {
    let mut harness = harness_with(
        options("please explode"),
        FakeEngineConfig {
            panic_word: Some("explode".to_owned()),
            ..FakeEngineConfig::default()
        },
    );
    model_loaded(&mut harness);
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the crash report", |app| {
        app.status_messages()
            .iter()
            .any(|message| message.text.contains("crashed"))
    });
    run_until(&mut harness, "the model to reload", |app| {
        app.loaded_model().is_some()
    });
    harness.state_mut();
    harness.get_by_label("Prompt").focus();
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    harness.get_by_label("Prompt").type_text("a calm circle");
    harness.step();
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "a run after the restart", finished);
}

#[test]
fn the_probe_picks_a_pixel_and_shows_its_self_attention() {
    let mut harness = harness_with(options("a red circle"), FakeEngineConfig::default());
    model_loaded(&mut harness);
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the run to finish", finished);
    harness.get_by_label("Probe self-attention").click();
    harness.step();
    click_canvas_at(&mut harness, egui::vec2(0.25, 0.75));
    let (y, x) = harness
        .state()
        .probe_point()
        .expect("the click picks a probe point");
    assert!(
        (y - 0.75).abs() < 0.02 && (x - 0.25).abs() < 0.02,
        "{y} {x}"
    );
    run_until(&mut harness, "the probe map", |app| {
        app.canvas_heat().is_some()
    });
    let (width, height, values) = harness.state().canvas_heat().unwrap();
    // The fake's self-attention is local: the probe map peaks near the probed cell.
    let peak = values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(index, _)| index)
        .unwrap();
    let (peak_y, peak_x) = (
        (peak / width) as f32 / height as f32,
        (peak % width) as f32 / width as f32,
    );
    eprintln!(
        "probe at ({y:.2}, {x:.2}) peaks at ({peak_y:.2}, {peak_x:.2}) on a {width}x{height} grid"
    );
    assert!((peak_y - y).abs() < 0.3 && (peak_x - x).abs() < 0.3);
}

/// Clicks the canvas image at `fraction` (x, y) of its size.
fn click_canvas_at(harness: &mut Harness<'static, EditorApp>, fraction: egui::Vec2) {
    let image_rect = harness.state().canvas_image_rect().unwrap();
    let target = image_rect.min + image_rect.size() * fraction;
    harness.hover_at(target);
    harness.step();
    for pressed in [true, false] {
        harness.event(egui::Event::PointerButton {
            pos: target,
            button: egui::PointerButton::Primary,
            pressed,
            modifiers: egui::Modifiers::NONE,
        });
        harness.step();
    }
}

#[test]
fn the_probe_works_while_a_run_goes_on() {
    // The run holds at the gate between steps; the worker answers a probe request after the step
    // that follows it, so one more step is allowed and the run then waits while the map is shown.
    let gate = StepGate::new();
    let config = FakeEngineConfig {
        step_delay: Duration::ZERO,
        step_gate: Some(gate.clone()),
        ..FakeEngineConfig::default()
    };
    let mut options = options("a red circle");
    options.steps = Some(40);
    let mut harness = harness_with(options, config);
    model_loaded(&mut harness);
    harness.get_by_label("Generate").click();
    gate.allow(2);
    run_until(&mut harness, "two steps", |app| {
        app.run_view().is_some_and(|run| run.steps.len() == 2)
    });
    harness.get_by_label("Probe self-attention").click();
    harness.step();
    click_canvas_at(&mut harness, egui::vec2(0.5, 0.5));
    harness.run_steps(2);
    assert!(
        harness.state().canvas_heat().is_none(),
        "no map before it was made"
    );
    gate.allow(1);
    run_until(&mut harness, "the probe map during the run", |app| {
        app.canvas_heat().is_some()
    });
    assert!(harness.state().is_generating());
    assert_eq!(harness.state().run_view().unwrap().steps.len(), 3);
    gate.allow(37);
    run_until(&mut harness, "the run to finish", finished);
    assert!(harness.state().canvas_heat().is_some());
}

/// An in-memory eframe storage.
#[derive(Default)]
struct MemoryStorage(std::collections::HashMap<String, String>);

impl eframe::Storage for MemoryStorage {
    fn get_string(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }

    fn set_string(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }

    fn remove_string(&mut self, key: &str) {
        self.0.remove(key);
    }

    fn flush(&mut self) {}
}

#[test]
fn settings_persist_through_eframe_storage() {
    let mut harness = harness_with(options("remember me"), FakeEngineConfig::default());
    model_loaded(&mut harness);
    harness.state_mut().view_settings_mut().opacity = 0.25;
    let mut storage = MemoryStorage::default();
    eframe::App::save(harness.state_mut(), &mut storage);
    let restored: EditorSettings = eframe::get_value(&storage, SETTINGS_STORAGE_KEY).unwrap();
    assert_eq!(restored.params.prompt, "remember me");
    assert_eq!(restored.view.opacity, 0.25);

    let app = EditorApp::new(
        EditorOptions {
            engine: EngineKind::Fake,
            ..EditorOptions::default()
        },
        Some(restored),
        None,
        fake_factory(FakeEngineConfig::default()),
    )
    .unwrap();
    assert_eq!(app.settings().params.prompt, "remember me");
}

#[test]
fn the_timeline_scrubs_back_to_earlier_steps() {
    let mut harness = harness_with(options("a red circle"), FakeEngineConfig::default());
    model_loaded(&mut harness);
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the run to finish", finished);
    harness.step();
    assert_eq!(harness.state().timeline_step(), Some(5));
    let final_peak = harness.state().word_heatmaps()[1].peak;
    harness
        .get_by_role_and_label(egui::accesskit::Role::Slider, "Step")
        .set_value_accesskit(2.0);
    harness.run_steps(2);
    assert_eq!(harness.state().timeline_step(), Some(2));
    let early_peak = harness.state().word_heatmaps()[1].peak;
    eprintln!("peak of 'red' summed over 6 steps {final_peak:.3}, over 3 steps {early_peak:.3}");
    assert!(early_peak < final_peak, "fewer steps are summed at step 2");
    // "This step only" shows that step's maps alone.
    harness.get_by_label("This step only").click();
    harness.run_steps(2);
    let single_peak = harness.state().word_heatmaps()[1].peak;
    assert!(single_peak < early_peak);
    // Back to the latest step.
    harness.get_by_label("Latest step").click();
    harness.run_steps(2);
    assert_eq!(harness.state().timeline_step(), Some(5));
}

/// The status line's labels in the window, found by `text`'s start.
fn status_label_rect(harness: &Harness<'static, EditorApp>, text: &str) -> egui::Rect {
    harness.get_by_label_contains(text).rect()
}

#[test]
fn a_bad_session_on_the_command_line_stays_on_the_status_line_after_the_model_loads() {
    let folder = tempfile::tempdir().unwrap();
    let empty = folder.path().join("empty.json");
    std::fs::write(&empty, "").unwrap();
    let garbage = folder.path().join("garbage.json");
    std::fs::write(&garbage, "\u{1}\u{2}not json at all").unwrap();
    let truncated = folder.path().join("truncated.json");
    std::fs::write(
        &truncated,
        r#"{"format": "attend-session-1", "params": {"prompt": "a"#,
    )
    .unwrap();
    let missing = folder.path().join("missing.json");
    for (path, expected) in [
        (&missing, "cannot read session"),
        (&empty, "is not valid"),
        (&garbage, "is not valid"),
        (&truncated, "is not valid"),
    ] {
        let mut harness = harness_with(
            EditorOptions {
                session: Some(path.clone()),
                engine: EngineKind::Fake,
                ..EditorOptions::default()
            },
            FakeEngineConfig::default(),
        );
        model_loaded(&mut harness);
        harness.step();
        // "Model loaded" came after the error; the error is still shown, in the window.
        assert!(last_status(harness.state()).starts_with("Model loaded"));
        harness.get_by_label_contains(expected);
        harness.get_by_label_contains(&path.display().to_string());
        assert!(!harness.state().is_generating(), "nothing runs");
    }
}

#[test]
fn a_long_error_wraps_inside_the_window_and_stays_until_the_next_action() {
    let long_name = format!("{}.json", "a-very-long-session-file-name".repeat(12));
    let missing = std::env::temp_dir().join(long_name);
    let mut harness = harness_with(
        EditorOptions {
            session: Some(missing),
            ..options("a circle")
        },
        FakeEngineConfig::default(),
    );
    model_loaded(&mut harness);
    harness.step();
    let rect = status_label_rect(&harness, "cannot read session");
    assert!(
        rect.max.x <= 1280.0 && rect.min.x >= 0.0,
        "the error fits the window's width: {rect:?}"
    );
    assert!(
        rect.height() > 30.0,
        "the error wraps onto several lines: {rect:?}"
    );
    // Generating is the next action: the error leaves the status line (it stays in the history).
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the run to finish", finished);
    harness.step();
    assert!(harness
        .query_by_label_contains("cannot read session")
        .is_none());
    assert!(harness
        .state()
        .status_messages()
        .iter()
        .any(|message| message.text.starts_with("cannot read session")));
}

#[test]
fn the_dismiss_button_hides_the_standing_error() {
    let mut harness = harness_with(
        EditorOptions {
            session: Some(PathBuf::from("/nonexistent/session.json")),
            ..options("a circle")
        },
        FakeEngineConfig::default(),
    );
    model_loaded(&mut harness);
    harness.step();
    harness.get_by_label_contains("cannot read session");
    harness.get_by_label("Dismiss").click();
    harness.run_steps(2);
    assert!(harness
        .query_by_label_contains("cannot read session")
        .is_none());
    harness.get_by_label_contains("Model loaded");
}

/// Saves the app's settings as eframe does on exit.
fn saved_settings(harness: &mut Harness<'static, EditorApp>) -> EditorSettings {
    let mut storage = MemoryStorage::default();
    eframe::App::save(harness.state_mut(), &mut storage);
    eframe::get_value(&storage, SETTINGS_STORAGE_KEY).unwrap()
}

fn load_error(app: &EditorApp) -> bool {
    app.status_messages()
        .iter()
        .any(|message| message.level == StatusLevel::Error)
}

#[test]
fn a_bad_model_on_the_command_line_is_not_remembered() {
    let not_a_model = tempfile::tempdir().unwrap();
    let mut harness = harness_with(
        EditorOptions {
            model: Some(not_a_model.path().to_path_buf()),
            ..options("a circle")
        },
        FakeEngineConfig::default(),
    );
    run_until(&mut harness, "the load error", load_error);
    harness.step();
    harness.get_by_label_contains("model_index.json");
    assert!(harness.state().loaded_model().is_none());
    let saved = saved_settings(&mut harness);
    assert_eq!(
        saved.model,
        ModelSource::Bundled,
        "the bad folder is forgotten"
    );

    // The next plain launch starts with the bundled model.
    let app = EditorApp::new(
        EditorOptions {
            engine: EngineKind::Fake,
            ..EditorOptions::default()
        },
        Some(saved),
        None,
        fake_factory(FakeEngineConfig::default()),
    )
    .unwrap();
    let mut next = ui_common::harness_of(app, egui::vec2(1280.0, 820.0));
    model_loaded(&mut next);
    assert_eq!(
        next.state().loaded_model().unwrap().source,
        ModelSource::Bundled
    );
    assert!(!load_error(next.state()));
}

#[test]
fn a_remembered_model_that_no_longer_loads_falls_back_to_the_bundled_one() {
    let gone = tempfile::tempdir().unwrap();
    let settings = EditorSettings {
        model: ModelSource::Folder(gone.path().join("deleted-model")),
        ..EditorSettings::default()
    };
    let app = EditorApp::new(
        EditorOptions {
            engine: EngineKind::Fake,
            generate: true,
            ..EditorOptions::default()
        },
        Some(settings),
        None,
        fake_factory(FakeEngineConfig::default()),
    )
    .unwrap();
    let mut harness = ui_common::harness_of(app, egui::vec2(1280.0, 820.0));
    run_until(&mut harness, "the bundled model's run", finished);
    harness.step();
    assert_eq!(
        harness.state().loaded_model().unwrap().source,
        ModelSource::Bundled
    );
    harness.get_by_label_contains("loading the bundled model instead");
}

#[test]
fn without_a_file_dialog_a_path_field_is_offered_for_exports_sessions_and_models() {
    let folder = tempfile::tempdir().unwrap();
    let image_path = folder.path().join("typed.png");
    let mut harness = harness_with(options("a red circle"), FakeEngineConfig::default());
    harness.state_mut().without_file_dialogs();
    model_loaded(&mut harness);
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the run to finish", finished);
    harness.step();

    // Export: the editor says why and offers the field.
    harness.get_by_label("Export image...").click();
    harness.run_steps(2);
    assert_eq!(
        harness.state().path_field_purpose(),
        Some(&DialogPurpose::ExportImage)
    );
    harness.get_by_label("No file dialog could open (one needs xdg-desktop-portal or zenity).");
    let field = harness.get_by_label("Path of the PNG to write the image to:");
    field.focus();
    harness.step();
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    harness
        .get_by_label("Path of the PNG to write the image to:")
        .type_text(&image_path.display().to_string());
    harness.step();
    harness.get_by_label("OK").click();
    run_until(&mut harness, "the typed export", |app| {
        app.status_messages()
            .iter()
            .any(|message| message.text == format!("Wrote {}", image_path.display()))
    });
    assert!(image_path.is_file());
    assert!(harness.state().path_field_purpose().is_none());

    // Save a session through the field, then open it through the field.
    let session_path = folder.path().join("typed-session.json");
    for (menu_item, purpose, label) in [
        (
            "Save session...",
            DialogPurpose::SaveSession,
            "Path of the session file to write:",
        ),
        (
            "Open session...",
            DialogPurpose::OpenSession,
            "Path of the session file to open:",
        ),
    ] {
        harness.get_by_label("File").click();
        harness.run_steps(3);
        harness.get_by_label(menu_item).click();
        harness.run_steps(2);
        assert_eq!(harness.state().path_field_purpose(), Some(&purpose));
        harness.get_by_label(label).focus();
        harness.step();
        harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
        harness
            .get_by_label(label)
            .type_text(&session_path.display().to_string());
        harness.step();
        harness.key_press(egui::Key::Enter);
        harness.run_steps(2);
        assert!(harness.state().path_field_purpose().is_none(), "{label}");
        if purpose == DialogPurpose::SaveSession {
            run_until(&mut harness, "the typed session", |app| {
                app.status_messages()
                    .iter()
                    .any(|message| message.text == format!("Wrote {}", session_path.display()))
            });
        }
    }
    run_until(&mut harness, "the reopened session's run", finished);

    // A model folder: Cancel closes the field and does nothing.
    harness.get_by_label("Open model folder...").click();
    harness.run_steps(2);
    assert_eq!(
        harness.state().path_field_purpose(),
        Some(&DialogPurpose::OpenModelFolder)
    );
    harness.get_by_label("Path of the diffusers model folder to open:");
    // The path field's Cancel (the controls' Cancel is the other one).
    harness
        .query_all_by_label("Cancel")
        .find(|button| !button.accesskit_node().is_disabled())
        .unwrap()
        .click();
    harness.run_steps(2);
    assert!(harness.state().path_field_purpose().is_none());
}

#[test]
fn steps_out_of_the_command_lines_range_are_shown_not_clamped_and_not_run() {
    let mut harness = harness_with(options("a circle"), FakeEngineConfig::default());
    model_loaded(&mut harness);
    let steps = || egui::accesskit::Role::SpinButton;
    harness
        .get_by_role_and_label(steps(), "Steps")
        .set_value_accesskit(1000.0);
    harness.run_steps(2);
    assert_eq!(
        harness.state().settings().params.steps,
        1000,
        "the CLI allows 1000"
    );
    assert!(harness.query_by_label_contains("out of range").is_none());

    harness
        .get_by_role_and_label(steps(), "Steps")
        .set_value_accesskit(5000.0);
    harness.run_steps(2);
    assert_eq!(harness.state().settings().params.steps, 5000, "not clamped");
    harness.get_by_label("steps 5000 is out of range: 1..=1000");
    harness.get_by_label("Generate").click();
    harness.run_steps(2);
    assert!(!harness.state().is_generating());
    assert!(harness.state().run_view().is_none());
    assert_eq!(
        last_status(harness.state()),
        "Not generating: steps 5000 is out of range: 1..=1000"
    );

    harness
        .get_by_role_and_label(steps(), "Steps")
        .set_value_accesskit(0.0);
    harness.run_steps(2);
    harness.get_by_label("steps 0 is out of range: 1..=1000");
}

#[test]
fn a_non_finite_guidance_is_shown_and_not_run() {
    let mut harness = harness_with(options("a circle"), FakeEngineConfig::default());
    model_loaded(&mut harness);
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        harness
            .get_by_role_and_label(egui::accesskit::Role::SpinButton, "Guidance")
            .set_value_accesskit(bad);
        harness.run_steps(2);
        let guidance = harness.state().settings().params.guidance;
        assert!(
            guidance.is_nan() == bad.is_nan() && (bad.is_nan() || guidance == bad),
            "kept as typed: {guidance} for {bad}"
        );
        // Next to the field.
        harness.get_by_label(&format!(
            "guidance {bad} is not a finite number (try 7.5; <= 1 disables it)"
        ));
        harness.get_by_label("Generate").click();
        harness.run_steps(2);
        assert!(!harness.state().is_generating());
        assert!(harness.state().run_view().is_none());
        assert!(
            last_status(harness.state()).starts_with("Not generating: guidance"),
            "{}",
            last_status(harness.state())
        );
    }
    harness
        .get_by_role_and_label(egui::accesskit::Role::SpinButton, "Guidance")
        .set_value_accesskit(7.5);
    harness.run_steps(2);
    assert!(harness
        .query_by_label("guidance -inf is not a finite number (try 7.5; <= 1 disables it)")
        .is_none());
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the run to finish", finished);
    harness.step();
    assert!(
        harness
            .query_by_label_contains("is not a finite number")
            .is_none(),
        "Generate was the next action: the error left the status line"
    );
}

#[test]
fn cancel_says_cancelling_at_once() {
    let gate = StepGate::new();
    let mut harness = harness_with(
        EditorOptions {
            steps: Some(50),
            ..options("a slow circle")
        },
        FakeEngineConfig {
            step_delay: Duration::ZERO,
            step_gate: Some(gate.clone()),
            ..FakeEngineConfig::default()
        },
    );
    model_loaded(&mut harness);
    harness.get_by_label("Generate").click();
    gate.allow(1);
    run_until(&mut harness, "one step", |app| {
        app.run_view().is_some_and(|run| run.steps.len() == 1)
    });
    harness.get_by_label("Cancel").click();
    harness.step();
    // The frame that applied Cancel says so, whatever the worker did meanwhile.
    assert!(harness
        .state()
        .status_messages()
        .iter()
        .any(|message| message.text == "Cancelling..."));
    run_until(&mut harness, "the cancellation", |app| {
        app.run_view()
            .is_some_and(|run| matches!(run.outcome, RunOutcome::Cancelled { .. }))
    });
}

#[test]
fn a_size_the_model_cannot_take_is_shown_not_clamped_or_rounded() {
    let mut harness = harness_with(options("a circle"), FakeEngineConfig::default());
    model_loaded(&mut harness);
    let width = |harness: &Harness<'static, EditorApp>| harness.state().settings().params.width_px;
    for (typed, problem) in [
        // (The fake model's sizes are multiples of 16 px.)
        (5000.0, "width 5000 px is out of range: 16..=4096"),
        (
            100.0,
            "width 100 px is not a multiple of 16 px (the model's latent scale); try 96 or 112",
        ),
    ] {
        harness
            .get_by_role_and_label(egui::accesskit::Role::SpinButton, "Size")
            .set_value_accesskit(typed);
        harness.run_steps(2);
        assert_eq!(width(&harness), Some(typed as usize), "kept as typed");
        harness.get_by_label(problem);
        harness.get_by_label("Generate").click();
        harness.run_steps(2);
        assert!(!harness.state().is_generating());
        assert_eq!(
            last_status(harness.state()),
            format!("Not generating: {problem}")
        );
    }
    harness
        .get_by_role_and_label(egui::accesskit::Role::SpinButton, "Size")
        .set_value_accesskit(96.0);
    harness.run_steps(2);
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the run to finish", finished);
}
