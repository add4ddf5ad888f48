//! The editor's Appearance transfer mode, driven through egui_kittest with the fake engine: two
//! images opened (file dialog, and dropped on a slot), prompts typed, a transfer run to the end, the
//! correspondence probe clicked on the output, and the exports; cancelling; bad files and a
//! missing prompt.

// The helpers below are test code too; `allow-unwrap-in-tests` only covers `#[test]` functions.
#![allow(clippy::unwrap_used)]

mod ui_common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use attend::analysis::export::write_png_rgb;
use attend::analysis::image::read_image;
use attend::ui::{
    AppearancePane, DialogPurpose, EditorApp, EditorOptions, EngineKind, ModeKind, TransferOutcome,
};
use attend::worker::{AppearanceSlot, EngineFactory, FakeEngine, FakeEngineConfig, StepGate};
use egui_kittest::kittest::Queryable as _;
use egui_kittest::Harness;

const TIMEOUT: Duration = Duration::from_secs(30);
const GREY: [u8; 3] = [200, 200, 200];
const RED: [u8; 3] = [210, 40, 40];
const NAVY: [u8; 3] = [20, 20, 90];
const GREEN: [u8; 3] = [40, 200, 40];

fn harness_with(config: FakeEngineConfig) -> Harness<'static, EditorApp> {
    let factory: EngineFactory = Arc::new(move || Box::new(FakeEngine::new(config.clone())));
    let options = EditorOptions {
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

/// A `width` x `height` picture of `background` with a `colour` square over the fractions
/// `(top, left, bottom, right)` of its size.
fn write_picture(
    path: &Path,
    (width, height): (usize, usize),
    background: [u8; 3],
    colour: [u8; 3],
    square: (f32, f32, f32, f32),
) {
    let mut pixels = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let (fy, fx) = (y as f32 / height as f32, x as f32 / width as f32);
            let inside = (square.0..square.2).contains(&fy) && (square.1..square.3).contains(&fx);
            pixels.extend_from_slice(if inside { &colour } else { &background });
        }
    }
    write_png_rgb(path, width, height, &pixels, None).unwrap();
}

/// The structure (a red square top left on grey, 96 x 64: wider than the fake model's 64 x 64, so
/// it is cropped) and the appearance (a green square bottom right on navy).
fn write_pair(folder: &Path) -> (PathBuf, PathBuf) {
    let structure = folder.join("structure.png");
    let appearance = folder.join("appearance.png");
    // Cropped to the middle 64 columns: the square spans x 0.25..0.5 of the fitted image.
    write_picture(&structure, (96, 64), GREY, RED, (0.0, 0.33, 0.5, 0.5));
    write_picture(&appearance, (64, 64), NAVY, GREEN, (0.5, 0.5, 1.0, 1.0));
    (structure, appearance)
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

/// Types `text` into the text field labelled `label`, replacing what it held.
fn type_into(harness: &mut Harness<'static, EditorApp>, label: &str, text: &str) {
    harness.get_by_label(label).focus();
    harness.step();
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    if text.is_empty() {
        harness.key_press(egui::Key::Backspace);
    } else {
        harness.get_by_label(label).type_text(text);
    }
    harness.run_steps(2);
}

fn wrote(path: &Path) -> impl Fn(&EditorApp) -> bool {
    let text = format!("Wrote {}", path.display());
    move |app: &EditorApp| app.status_messages().iter().any(|m| m.text == text)
}

fn has_status(harness: &Harness<'static, EditorApp>, part: &str) -> bool {
    harness
        .state()
        .status_messages()
        .iter()
        .any(|message| message.text.contains(part))
}

/// Clicks `pane`'s image at `(y, x)` fractions of its size.
fn click_pane_at(harness: &mut Harness<'static, EditorApp>, pane: AppearancePane, at: (f32, f32)) {
    // (The layout settles first: the side panels' contents changed with the result.)
    harness.run_steps(3);
    let rect = harness.state().appearance_image_rect(pane).unwrap();
    let target = rect.min + rect.size() * egui::vec2(at.1, at.0);
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

/// Drops `path` on `pane` (the pointer over it, as when dragging from a file manager).
fn drop_on_pane(harness: &mut Harness<'static, EditorApp>, pane: AppearancePane, path: &Path) {
    let rect = harness.state().appearance_image_rect(pane).unwrap();
    harness.hover_at(rect.center());
    harness.step();
    ui_common::drop_file(harness, path);
}

/// The fake model loaded, Appearance transfer mode on, and both slots filled: the structure by
/// the file dialog, the appearance dropped on its slot; both prompts typed.
fn prepared(harness: &mut Harness<'static, EditorApp>, folder: &Path) {
    run_until(harness, "the model", |app| app.loaded_model().is_some());
    harness.get_by_label("Appearance transfer").click();
    harness.run_steps(2);
    assert_eq!(harness.state().mode(), ModeKind::AppearanceTransfer);
    let (structure, appearance) = write_pair(folder);
    answer_dialogs(
        harness,
        vec![(
            DialogPurpose::OpenAppearanceImage(AppearanceSlot::Structure),
            structure,
        )],
    );
    harness.get_by_label("Open structure image...").click();
    run_until(harness, "the structure image", |app| {
        app.appearance_transfer()
            .shown_image(AppearanceSlot::Structure)
            .is_some()
    });
    drop_on_pane(harness, AppearancePane::Appearance, &appearance);
    run_until(harness, "the appearance image", |app| {
        app.appearance_transfer()
            .shown_image(AppearanceSlot::Appearance)
            .is_some()
    });
    let mode = harness.state().appearance_transfer();
    assert_eq!(
        mode.shown_image(AppearanceSlot::Structure).unwrap().width,
        96,
        "the structure slot holds the structure file (as read)"
    );
    assert_eq!(
        mode.shown_image(AppearanceSlot::Appearance).unwrap().pixels[..3],
        NAVY,
        "the dropped file went to the slot it was dropped on"
    );
    type_into(harness, "Structure prompt", "a red square");
    type_into(harness, "Appearance prompt", "a green square");
}

fn pixel(image: &attend::worker::RgbImage, y: usize, x: usize) -> [u8; 3] {
    let at = (y * image.width + x) * 3;
    [image.pixels[at], image.pixels[at + 1], image.pixels[at + 2]]
}

#[test]
fn a_transfer_runs_streams_its_output_probes_and_exports() {
    let folder = tempfile::tempdir().unwrap();
    let mut harness = harness_with(FakeEngineConfig::default());
    prepared(&mut harness, folder.path());

    harness.get_by_label("Run transfer").click();
    run_until(&mut harness, "the transfer", |app| {
        app.appearance_transfer().finished()
    });
    let mode = harness.state().appearance_transfer();
    let run = mode.run().unwrap();
    let settings = &mode.settings;
    assert_eq!(
        run.steps_done,
        settings.steps - settings.skip_steps(),
        "every output step arrived"
    );
    assert!(run.preview.is_some(), "the output streamed a preview");
    let result = mode.result().unwrap();
    // Both inputs were fitted to the model's 64 x 64; the structure's square (fitted to rows
    // 0..32, columns 0..32 minus the crop) came out green on navy.
    let (structure, appearance) = run.inputs.as_ref().unwrap();
    assert_eq!((structure.width, structure.height), (64, 64));
    assert_eq!((appearance.width, appearance.height), (64, 64));
    assert_eq!((result.output.width, result.output.height), (64, 64));
    assert_eq!(pixel(&result.output, 8, 24), GREEN);
    assert_eq!(pixel(&result.output, 56, 56), NAVY);
    assert_eq!(result.masks.structure[0].label, "square");
    // The panes now show the fitted inputs.
    assert_eq!(
        mode.shown_image(AppearanceSlot::Structure).unwrap().width,
        64
    );

    // The probe: a click on the structure's square in the output attends inside the appearance's
    // square (bottom right), and the appearance pane shows its heat map.
    click_pane_at(&mut harness, AppearancePane::Output, (0.15, 0.35));
    let mode = harness.state().appearance_transfer();
    let (y, x) = mode.probe_point().unwrap();
    assert!(
        (y - 0.15).abs() < 0.05 && (x - 0.35).abs() < 0.05,
        "probed at {y}, {x}"
    );
    let (heatmap, (top_y, top_x)) = mode.probe_result().unwrap();
    assert!(
        top_y > 0.5 && top_x > 0.5,
        "the top match {top_y}, {top_x} lies in the appearance's square"
    );
    assert_eq!((heatmap.h, heatmap.w), (64, 64));
    let peak = heatmap
        .data
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(index, _)| index)
        .unwrap();
    assert!(
        peak / 64 >= 32 && peak % 64 >= 32,
        "the heat map peaks at {peak}"
    );
    harness.get_by_label("Show masks over the images").click();
    harness.run_steps(2);
    assert!(harness.state().appearance_transfer().masks_shown());

    // Exports: the output alone, then everything into a folder.
    let output_path = folder.path().join("output-alone.png");
    let all_folder = folder.path().join("all");
    std::fs::create_dir(&all_folder).unwrap();
    answer_dialogs(
        &mut harness,
        vec![
            (DialogPurpose::ExportAppearanceOutput, output_path.clone()),
            (DialogPurpose::ExportAppearanceAll, all_folder.clone()),
        ],
    );
    harness.get_by_label("Export output...").click();
    run_until(&mut harness, "the output's export", wrote(&output_path));
    let written = read_image(&output_path).unwrap();
    assert_eq!(
        written,
        harness
            .state()
            .appearance_transfer()
            .result()
            .unwrap()
            .output
    );
    harness.get_by_label("Export all to folder...").click();
    let last = all_folder.join("mask-appearance-background.png");
    run_until(&mut harness, "the folder's export", wrote(&last));
    for name in [
        "output.png",
        "structure.png",
        "appearance.png",
        "mask-structure-square.png",
        "mask-appearance-square.png",
    ] {
        assert!(all_folder.join(name).is_file(), "{name} was written");
    }
    // Nothing half-written is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&all_folder)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".png"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

#[test]
fn a_running_transfer_can_be_cancelled() {
    let folder = tempfile::tempdir().unwrap();
    let gate = StepGate::new();
    let mut harness = harness_with(FakeEngineConfig {
        step_gate: Some(gate.clone()),
        ..FakeEngineConfig::default()
    });
    prepared(&mut harness, folder.path());
    gate.allow(2);
    harness.get_by_label("Run transfer").click();
    run_until(&mut harness, "two steps", |app| {
        app.appearance_transfer()
            .run()
            .is_some_and(|run| run.steps_done == 2)
    });
    assert!(harness.state().appearance_transfer().is_running());
    harness.get_by_label("Cancel transfer").click();
    run_until(&mut harness, "the cancel", |app| {
        !app.appearance_transfer().is_running()
    });
    let run = harness.state().appearance_transfer().run().unwrap();
    assert_eq!(run.outcome, TransferOutcome::Cancelled { steps_done: 2 });
    assert!(run.result.is_none());
}

#[test]
fn bad_files_and_a_missing_prompt_are_clear_errors() {
    let folder = tempfile::tempdir().unwrap();
    let mut harness = harness_with(FakeEngineConfig::default());
    prepared(&mut harness, folder.path());

    // A file that is no image leaves the slot as it was, with the reason under it.
    let not_an_image = folder.path().join("notes.png");
    std::fs::write(&not_an_image, b"not a picture").unwrap();
    answer_dialogs(
        &mut harness,
        vec![(
            DialogPurpose::OpenAppearanceImage(AppearanceSlot::Appearance),
            not_an_image,
        )],
    );
    harness.get_by_label("Open appearance image...").click();
    run_until(&mut harness, "the read to fail", |app| {
        app.appearance_transfer()
            .slot(AppearanceSlot::Appearance)
            .error
            .is_some()
    });
    let mode = harness.state().appearance_transfer();
    let slot = mode.slot(AppearanceSlot::Appearance);
    assert!(
        slot.error.as_ref().unwrap().contains("notes.png"),
        "the error names the file: {:?}",
        slot.error
    );
    assert_eq!(
        mode.shown_image(AppearanceSlot::Appearance).unwrap().pixels[..3],
        NAVY,
        "the slot keeps its image"
    );

    // A missing prompt: nothing is sent, the status line says which prompt.
    type_into(&mut harness, "Appearance prompt", "");
    harness.get_by_label("Run transfer").click();
    harness.run_steps(2);
    assert!(harness.state().appearance_transfer().run().is_none());
    assert!(
        has_status(&harness, "appearance prompt"),
        "status: {:?}",
        harness.state().status_messages()
    );

    // An empty slot: the status line says how to fill it.
    harness.get_by_label("Clear structure").click();
    type_into(&mut harness, "Appearance prompt", "a green square");
    harness.get_by_label("Run transfer").click();
    harness.run_steps(2);
    assert!(harness.state().appearance_transfer().run().is_none());
    assert!(has_status(&harness, "choose the structure image"));

    // Generated from its prompt instead: the transfer runs and reports the generated input.
    harness
        .get_by_label("Generate structure from prompt")
        .click();
    harness.get_by_label("Run transfer").click();
    run_until(&mut harness, "the transfer", |app| {
        app.appearance_transfer().finished()
    });
    let run = harness.state().appearance_transfer().run().unwrap();
    assert_eq!(run.inputs.as_ref().unwrap().0.width, 64);
}
