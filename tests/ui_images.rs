//! Real images in the editor, driven through egui_kittest with the fake engine: dropping an image,
//! inverting it (progress, cancel, input / reconstruction), generating and editing on it, exports,
//! sessions that embed it, and bad files and values.

// The helpers below are test code too; `allow-unwrap-in-tests` only covers `#[test]` functions.
#![allow(clippy::unwrap_used)]

mod common;
mod ui_common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use attend::analysis::export::write_png_rgb;
use attend::analysis::image::image_hash;
use attend::ui::{DialogPurpose, EditorApp, EditorOptions, EngineKind, RunOutcome, Session};
use attend::worker::{EngineFactory, FakeEngine, FakeEngineConfig, StepGate};
use egui_kittest::kittest::Queryable as _;
use egui_kittest::Harness;

const TIMEOUT: Duration = Duration::from_secs(30);
const DESCRIPTION: &str = "a red circle and a blue square";
const EDIT_PROMPT: &str = "a red square and a blue square";

fn harness_with(config: FakeEngineConfig) -> Harness<'static, EditorApp> {
    let factory: EngineFactory = Arc::new(move || Box::new(FakeEngine::new(config.clone())));
    let options = EditorOptions {
        steps: Some(4),
        engine: EngineKind::Fake,
        ..EditorOptions::default()
    };
    let app = EditorApp::new(options, None, None, factory).unwrap();
    ui_common::harness_of(app, egui::vec2(1400.0, 1000.0))
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

/// A 96 x 64 picture (wider than the fake model's 64 x 64, so it is cropped): a red disc and a blue
/// square on grey.
fn write_picture(folder: &Path) -> PathBuf {
    let (width, height) = (96, 64);
    let mut pixels = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
            let rgb = if (fx - 0.4).powi(2) + (fy - 0.4).powi(2) < 0.02 {
                [220, 40, 40]
            } else if (0.55..0.7).contains(&fx) && (0.5..0.8).contains(&fy) {
                [40, 70, 220]
            } else {
                [120, 120, 130]
            };
            pixels.extend_from_slice(&rgb);
        }
    }
    let path = folder.join("picture.png");
    write_png_rgb(&path, width, height, &pixels, None).unwrap();
    path
}

/// Types `text` into the text field labelled `label`, replacing what it held.
fn type_into(harness: &mut Harness<'static, EditorApp>, label: &str, text: &str) {
    harness.get_by_label(label).focus();
    harness.step();
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    harness.get_by_label(label).type_text(text);
    harness.run_steps(2);
}

fn inverted(app: &EditorApp) -> bool {
    app.inversion().is_some() && !app.is_inverting()
}

fn last_status(app: &EditorApp) -> String {
    app.status_messages()
        .last()
        .map(|message| message.text.clone())
        .unwrap_or_default()
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

fn wrote(path: &Path) -> impl Fn(&EditorApp) -> bool {
    let text = format!("Wrote {}", path.display());
    move |app: &EditorApp| app.status_messages().iter().any(|m| m.text == text)
}

/// Drops the picture, describes it and inverts it (the fake engine, no gate).
fn open_and_invert(harness: &mut Harness<'static, EditorApp>, picture: &Path) {
    model_loaded(harness);
    ui_common::drop_file(harness, picture);
    run_until(harness, "the image", EditorApp::image_open);
    type_into(harness, "Describe the image", DESCRIPTION);
    harness.get_by_label("Invert").click();
    run_until(harness, "the inversion", inverted);
}

#[test]
fn a_dropped_image_is_fitted_inverted_generated_on_and_exported() {
    let folder = tempfile::tempdir().unwrap();
    let picture = write_picture(folder.path());
    let export_path = folder.path().join("export.png");
    let mut harness = harness_with(FakeEngineConfig::default());
    answer_dialogs(
        &mut harness,
        vec![(DialogPurpose::ExportImage, export_path.clone())],
    );
    model_loaded(&mut harness);
    harness.get_by_label("Prompt");

    ui_common::drop_file(&mut harness, &picture);
    run_until(&mut harness, "the fitted image", |app| {
        app.fitted_image().is_some()
    });
    let (fitted, hash) = harness.state().fitted_image().unwrap();
    assert_eq!(
        (fitted.width, fitted.height),
        (64, 64),
        "fitted to the model's size"
    );
    assert_eq!(hash, image_hash(fitted));
    // The prompt box asks for a description; the fit is shown.
    harness.get_by_label("Describe the image");
    assert!(harness.query_by_label("Prompt").is_none());
    harness.get_by_label_contains("96x64 px -> 64x64 px, cropped");

    // Inverting without a description: a red error naming the value, nothing sent.
    type_into(&mut harness, "Describe the image", "   ");
    harness.get_by_label("Invert").click();
    harness.run_steps(2);
    let error = harness.state().image_error().unwrap().to_owned();
    assert!(error.contains("image description"), "{error}");
    assert!(!harness.state().is_inverting());
    assert_eq!(harness.query_all_by_label(error.as_str()).count(), 2);

    type_into(&mut harness, "Describe the image", DESCRIPTION);
    harness.get_by_label("Invert").click();
    run_until(&mut harness, "the inversion", inverted);
    let (source, reconstruction, psnr_db) = {
        let (source, reconstruction, psnr) = harness.state().inversion().unwrap();
        (source.clone(), reconstruction.clone(), psnr)
    };
    assert!(psnr_db > 40.0, "{psnr_db}");
    assert_eq!(source.inversion.prompt, DESCRIPTION);
    assert_eq!(source.inversion.method, "direct", "the default method");
    assert!(harness.state().image_error().is_none());
    harness.get_by_label_contains("Reconstruction PSNR");
    harness.get_by_label("input").click();
    harness.run_steps(2);
    harness.get_by_label("reconstruction").click();
    harness.run_steps(2);

    // Generate replays the inversion: the run is the image's, with heat maps on it.
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the replay", ui_common::finished);
    harness.run_steps(2);
    let app = harness.state();
    let run = app.run_view().unwrap();
    assert_eq!(run.params.source_image.as_deref(), Some(&source));
    assert_eq!(run.final_image.as_ref(), Some(&reconstruction));
    assert_eq!(app.word_heatmaps().len(), 7, "one heat map per word");
    assert!(
        app.canvas_image_rect().is_some(),
        "the canvas shows the run"
    );

    harness.get_by_label("Export image...").click();
    run_until(&mut harness, "the export", wrote(&export_path));
    let exported = image::open(&export_path).unwrap().to_rgb8();
    assert_eq!(exported.into_raw(), reconstruction.pixels);
}

#[test]
fn generate_on_an_image_not_yet_inverted_inverts_first() {
    let folder = tempfile::tempdir().unwrap();
    let picture = write_picture(folder.path());
    let mut harness = harness_with(FakeEngineConfig::default());
    model_loaded(&mut harness);
    ui_common::drop_file(&mut harness, &picture);
    run_until(&mut harness, "the image", EditorApp::image_open);
    type_into(&mut harness, "Describe the image", DESCRIPTION);
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the inversion, then the replay", |app| {
        ui_common::finished(app)
            && app
                .run_view()
                .is_some_and(|run| run.params.source_image.is_some())
    });
    assert!(harness.state().inversion().is_some());
}

#[test]
fn an_image_given_at_start_is_inverted_and_replayed_once_the_model_loads() {
    let folder = tempfile::tempdir().unwrap();
    let picture = write_picture(folder.path());
    let factory: EngineFactory =
        Arc::new(|| Box::new(FakeEngine::new(FakeEngineConfig::default())));
    let options = EditorOptions {
        prompt: Some(DESCRIPTION.to_owned()),
        steps: Some(3),
        generate: true,
        image: Some(picture),
        engine: EngineKind::Fake,
        ..EditorOptions::default()
    };
    let app = EditorApp::new(options, None, None, factory).unwrap();
    let mut harness = ui_common::harness_of(app, egui::vec2(1400.0, 1000.0));
    run_until(&mut harness, "the replay", |app| {
        ui_common::finished(app)
            && app
                .run_view()
                .is_some_and(|run| run.params.source_image.is_some())
    });
    let app = harness.state();
    assert_eq!(app.run_view().unwrap().params.steps, 3);
    assert_eq!(
        app.run_view().unwrap().final_image.as_ref(),
        Some(app.inversion().unwrap().1)
    );
}

#[test]
fn edit_mode_swaps_a_word_on_the_image() {
    let folder = tempfile::tempdir().unwrap();
    let picture = write_picture(folder.path());
    let export_path = folder.path().join("edited.png");
    let mut harness = harness_with(FakeEngineConfig::default());
    answer_dialogs(
        &mut harness,
        vec![(DialogPurpose::ExportImage, export_path.clone())],
    );
    open_and_invert(&mut harness, &picture);
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the replay", ui_common::finished);
    let reconstruction = harness.state().inversion().unwrap().1.clone();

    harness.get_by_label("Edit mode").click();
    harness.step();
    assert_eq!(harness.state().edit_spec().edit_prompt, DESCRIPTION);
    type_into(&mut harness, "Edit prompt", EDIT_PROMPT);
    harness.get_by_label("Run edit").click();
    run_until(&mut harness, "the edit", |app| {
        ui_common::finished(app)
            && app
                .edit_run_view()
                .is_some_and(|run| matches!(run.outcome, RunOutcome::Finished { .. }))
    });
    let app = harness.state();
    let source = app.run_view().unwrap();
    assert!(
        source.params.source_image.is_some(),
        "the edit's source is the image"
    );
    assert_eq!(source.final_image.as_ref(), Some(&reconstruction));
    let edited = app.edit_run_view().unwrap();
    assert_eq!(edited.params.prompt, EDIT_PROMPT);
    let edited_image = edited.final_image.clone().unwrap();
    assert_ne!(
        edited_image, reconstruction,
        "the swapped word changed the image"
    );
    let changed = app.edit_info().unwrap();
    assert!(changed
        .words
        .iter()
        .any(|pair| pair.change == attend::worker::WordChange::Swapped));
    // A swap on an inverted image starts from the inverted-image defaults: local blend on the
    // swapped words, the self-attention window of an inverted image.
    let spec = app.edit_spec();
    let blend = spec.local_blend.as_ref().expect("the swap blends locally");
    assert_eq!(blend.words.len(), 2, "{:?}", blend.words);
    assert!(
        blend.words.iter().all(|word| {
            let word = word.rsplit(':').next().unwrap_or_default();
            let word = word.split('#').next().unwrap_or_default();
            word != "red" && (DESCRIPTION.contains(word) || EDIT_PROMPT.contains(word))
        }),
        "{:?}",
        blend.words
    );
    assert_eq!(
        spec.reweights
            .iter()
            .map(|reweight| (reweight.word.as_str(), reweight.scale))
            .collect::<Vec<_>>(),
        [(
            "square#1",
            attend::worker::INVERTED_IMAGE_SWAP.swapped_word_weight
        )]
    );
    assert_eq!(
        spec.self_replace.window,
        attend::worker::INVERTED_IMAGE_SWAP
            .self_replace(spec.self_replace)
            .window
    );

    harness.get_by_label("Export image...").click();
    run_until(&mut harness, "the export", wrote(&export_path));
    let exported = image::open(&export_path).unwrap().to_rgb8();
    assert_eq!((exported.width(), exported.height()), (64, 64));
}

#[test]
fn the_inversion_shows_progress_and_cancels() {
    let folder = tempfile::tempdir().unwrap();
    let picture = write_picture(folder.path());
    let gate = StepGate::new();
    let mut harness = harness_with(FakeEngineConfig {
        step_gate: Some(gate.clone()),
        ..FakeEngineConfig::default()
    });
    model_loaded(&mut harness);
    ui_common::drop_file(&mut harness, &picture);
    run_until(&mut harness, "the image", EditorApp::image_open);
    type_into(&mut harness, "Describe the image", DESCRIPTION);
    gate.allow(2);
    harness.get_by_label("Invert").click();
    ui_common::run_until_within(&mut harness, "the progress bar", TIMEOUT, |app| {
        app.is_inverting()
    });
    let mut seen = false;
    for _ in 0..2000 {
        harness.step();
        if harness
            .query_by_label_contains("direct: inverting 2/4")
            .is_some()
        {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(seen, "the progress bar says the method, phase and steps");
    harness.get_by_label("Cancel inversion").click();
    run_until(&mut harness, "the cancel", |app| !app.is_inverting());
    assert_eq!(
        last_status(harness.state()),
        "Inversion cancelled after 2 step(s)"
    );
    assert!(harness.state().inversion().is_none());
    assert!(harness.state().image_open(), "the image stays open");
}

#[test]
fn a_session_embeds_the_image_and_reopens_the_same_pixels() {
    let folder = tempfile::tempdir().unwrap();
    let picture = write_picture(folder.path());
    let session_path = folder.path().join("session.json");
    let mut harness = harness_with(FakeEngineConfig::default());
    answer_dialogs(
        &mut harness,
        vec![(DialogPurpose::SaveSession, session_path.clone())],
    );
    open_and_invert(&mut harness, &picture);
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the replay", ui_common::finished);
    let (hash, reconstruction) = {
        let app = harness.state();
        (
            app.fitted_image().unwrap().1.to_owned(),
            app.inversion().unwrap().1.clone(),
        )
    };
    harness.get_by_label("File").click();
    harness.run_steps(3);
    harness.get_by_label("Save session...").click();
    run_until(&mut harness, "the session", wrote(&session_path));
    let session = Session::load(&session_path).unwrap();
    let saved = session.image.clone().unwrap();
    assert_eq!(saved.hash, hash);
    assert_eq!(image_hash(&saved.decode().unwrap()), hash);

    // Another editor opens it: the same pixels, inverted again and replayed.
    let mut reopened = harness_with(FakeEngineConfig::default());
    answer_dialogs(
        &mut reopened,
        vec![(DialogPurpose::OpenSession, session_path.clone())],
    );
    model_loaded(&mut reopened);
    reopened.get_by_label("File").click();
    reopened.run_steps(3);
    reopened.get_by_label("Open session...").click();
    run_until(&mut reopened, "the reopened replay", |app| {
        ui_common::finished(app)
            && app
                .run_view()
                .is_some_and(|run| run.params.source_image.is_some())
    });
    let app = reopened.state();
    assert_eq!(app.fitted_image().unwrap().1, hash);
    assert_eq!(
        app.run_view().unwrap().final_image.as_ref(),
        Some(&reconstruction)
    );

    // A session whose embedded pixels were changed: the image is left out, with the reason.
    let mut tampered = session;
    tampered.image.as_mut().unwrap().hash = "0000000000000000".to_owned();
    let tampered_path = folder.path().join("tampered.json");
    std::fs::write(&tampered_path, tampered.to_json()).unwrap();
    answer_dialogs(
        &mut reopened,
        vec![(DialogPurpose::OpenSession, tampered_path)],
    );
    reopened.get_by_label("File").click();
    reopened.run_steps(3);
    reopened.get_by_label("Open session...").click();
    run_until(&mut reopened, "the tampered session", |app| {
        app.status_messages()
            .iter()
            .any(|message| message.text.contains("pixels changed"))
    });
    assert!(!reopened.state().image_open());
}

#[test]
fn a_reloaded_model_forgets_the_inversion_and_generate_inverts_again() {
    let folder = tempfile::tempdir().unwrap();
    let picture = write_picture(folder.path());
    let mut harness = harness_with(FakeEngineConfig::default());
    open_and_invert(&mut harness, &picture);
    harness.get_by_label("Bundled model").click();
    run_until(&mut harness, "the reload", |app| {
        app.loaded_model().is_some() && app.inversion().is_none()
    });
    assert!(harness.state().image_open(), "the image stays open");
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the inversion, then the replay", |app| {
        ui_common::finished(app)
            && app
                .run_view()
                .is_some_and(|run| run.params.source_image.is_some())
    });
    assert!(harness.state().inversion().is_some());
}

#[test]
fn closing_the_image_goes_back_to_noise() {
    let folder = tempfile::tempdir().unwrap();
    let picture = write_picture(folder.path());
    let mut harness = harness_with(FakeEngineConfig::default());
    open_and_invert(&mut harness, &picture);
    harness.get_by_label("Close image").click();
    harness.run_steps(2);
    assert!(!harness.state().image_open());
    harness.get_by_label("Prompt");
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "a noise run", ui_common::finished);
    assert!(harness
        .state()
        .run_view()
        .unwrap()
        .params
        .source_image
        .is_none());
}

#[test]
fn bad_files_are_named_in_red_and_the_editor_stays_usable() {
    let folder = tempfile::tempdir().unwrap();
    let picture = write_picture(folder.path());
    let text = folder.path().join("notes.png");
    std::fs::write(&text, "not an image at all").unwrap();
    let truncated = folder.path().join("truncated.png");
    let bytes = std::fs::read(&picture).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    // A valid PNG header that claims 40000 x 40000 pixels (over the decompression-bomb limit).
    let huge = folder.path().join("huge.png");
    std::fs::write(&huge, common::png_header_only(40_000, 40_000)).unwrap();
    let missing = folder.path().join("missing.png");

    let mut harness = harness_with(FakeEngineConfig::default());
    model_loaded(&mut harness);
    for path in [&text, &truncated, &huge, &missing] {
        ui_common::drop_file(&mut harness, path);
        run_until(&mut harness, "the read", |app| !app.is_reading_image());
        harness.run_steps(2);
        let app = harness.state();
        assert!(!app.image_open(), "{}", path.display());
        let message = last_status(app);
        assert!(
            message.starts_with("Cannot open image: ")
                && message.contains(&path.display().to_string()),
            "{message}"
        );
    }
    // A bad file dropped on an open image: the image stays, the panel says why in red.
    ui_common::drop_file(&mut harness, &picture);
    run_until(&mut harness, "the image", EditorApp::image_open);
    ui_common::drop_file(&mut harness, &text);
    run_until(&mut harness, "the read", |app| !app.is_reading_image());
    harness.run_steps(2);
    assert!(harness.state().image_open());
    let error = harness.state().image_error().unwrap().to_owned();
    assert!(error.contains("notes.png"), "{error}");
    // In the image panel and on the status line.
    assert_eq!(harness.query_all_by_label(error.as_str()).count(), 2);

    // The editor still works.
    harness.get_by_label("Close image").click();
    harness.run_steps(2);
    type_into(&mut harness, "Prompt", "a circle");
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "a run after the errors", ui_common::finished);
}

#[test]
fn an_a1111_png_fills_the_description_and_settings_from_its_parameters() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("a1111.png");
    let parameters = "a red circle and a blue square\nNegative prompt: blurry\n\
                      Steps: 12, Sampler: DDIM, CFG scale: 5.5, Seed: 4242, Size: 64x64, Model: x";
    write_png_rgb(&path, 64, 64, &vec![128; 64 * 64 * 3], Some(parameters)).unwrap();
    let mut harness = harness_with(FakeEngineConfig::default());
    model_loaded(&mut harness);
    ui_common::drop_file(&mut harness, &path);
    run_until(&mut harness, "the image", EditorApp::image_open);
    let params = &harness.state().settings().params;
    assert_eq!(params.prompt, "a red circle and a blue square");
    assert_eq!(params.negative_prompt, "blurry");
    assert_eq!((params.seed, params.steps), (4242, 12));
    assert!((params.guidance - 5.5).abs() < 1e-9, "{}", params.guidance);
    let status = last_status(harness.state());
    assert!(status.contains("with its parameters"), "{status}");
    // A PNG without parameters keeps the settings and asks for a description.
    let plain = write_picture(folder.path());
    ui_common::drop_file(&mut harness, &plain);
    run_until(&mut harness, "the second image", |app| {
        last_status(app).contains("describe it")
    });
    assert_eq!(harness.state().settings().params.seed, 4242);
}
