//! Style set mode driven through egui_kittest (widgets found by their AccessKit labels) with the
//! fake engine: adding and removing target prompts, refusing a set without targets, running a set
//! whose grid fills in, selecting an image (its maps on screen), and exporting every image.

// The helpers below are test code too; `allow-unwrap-in-tests` only covers `#[test]` functions.
#![allow(clippy::unwrap_used)]

mod ui_common;
use std::sync::Arc;
use std::time::Duration;

use attend::ui::{EditorApp, EditorOptions, EngineKind, ModeKind, RunOutcome};
use attend::worker::{Branch, EngineFactory, FakeEngine, FakeEngineConfig};
use egui_kittest::kittest::Queryable as _;
use egui_kittest::Harness;

const TIMEOUT: Duration = Duration::from_secs(30);
const REFERENCE_PROMPT: &str = "a red circle on a yellow background";

fn harness() -> Harness<'static, EditorApp> {
    let factory: EngineFactory =
        Arc::new(|| Box::new(FakeEngine::new(FakeEngineConfig::default())));
    let options = EditorOptions {
        prompt: Some(REFERENCE_PROMPT.to_owned()),
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

/// Types `prompt` into the new-target field and clicks "Add target".
fn add_target(harness: &mut Harness<'static, EditorApp>, prompt: &str) {
    harness.get_by_label("New target prompt").focus();
    harness.step();
    harness.get_by_label("New target prompt").type_text(prompt);
    harness.step();
    harness.get_by_label("Add target").click();
    harness.step();
    harness.step();
}

#[test]
fn a_style_set_runs_fills_its_grid_shows_each_images_maps_and_exports() {
    let mut harness = harness();
    run_until(&mut harness, "the model", |app| {
        app.loaded_model().is_some()
    });
    harness.get_by_label("Style set mode").click();
    harness.step();
    harness.step();
    assert_eq!(harness.state().mode(), ModeKind::StyleSet);

    // No targets yet: Generate says why, nothing runs, the editor stays usable.
    harness.get_by_label("Generate").click();
    harness.step();
    harness.step();
    let error = harness.state().style_set_error().unwrap().to_owned();
    assert!(error.contains("at least one target prompt"), "{error}");
    assert!(!harness.state().is_generating());

    add_target(&mut harness, "a blue square");
    add_target(&mut harness, "a green triangle");
    add_target(&mut harness, "a purple star");
    harness.get_by_label("Remove 2").click();
    harness.step();
    harness.step();
    assert!(
        harness.query_by_label("Remove 3").is_none(),
        "one target removed"
    );
    harness.get_by_label("Run set").click();
    run_until(&mut harness, "the style set", |app| {
        app.style_set_finished() && !app.is_generating()
    });
    let app = harness.state();
    assert_eq!(app.style_set_error(), None);
    let images = app.style_set_images();
    assert_eq!(images.len(), 3);
    let prompts: Vec<&str> = images
        .iter()
        .map(|image| image.as_ref().unwrap().params.prompt.as_str())
        .collect();
    assert_eq!(
        prompts,
        [REFERENCE_PROMPT, "a blue square", "a purple star"]
    );
    for image in images.iter().flatten() {
        assert_eq!(image.steps.len(), 4, "every image got every step's preview");
        assert!(matches!(image.outcome, RunOutcome::Finished { .. }));
    }
    // The reference is on screen first, with its words' maps.
    assert_eq!(app.run_view().unwrap().branch, Branch::StyleImage(0));
    assert!(app
        .word_heatmaps()
        .iter()
        .any(|map| map.word == "background"));

    // Clicking a target puts it on screen: its own words' maps.
    harness.get_by_label("Target 2").click();
    harness.step();
    harness.step();
    let app = harness.state();
    assert_eq!(app.style_set_selected(), 2);
    let shown = app.run_view().unwrap();
    assert_eq!(shown.branch, Branch::StyleImage(2));
    assert!(matches!(shown.outcome, RunOutcome::Finished { .. }));
    let words: Vec<&str> = app
        .word_heatmaps()
        .iter()
        .map(|map| map.word.as_str())
        .collect();
    assert!(words.contains(&"star"), "{words:?}");
    assert!(!words.contains(&"background"), "{words:?}");
    harness.get_by_label("Target 2 word maps");
    harness.get_by_label("Reference word maps");

    // Export all: reference.png, 1.png, 2.png and grid.png (three images wide).
    let folder = tempfile::tempdir().unwrap();
    let out = folder.path().join("set");
    // (The panel scrolls: the export row is below the sharing options.)
    harness.get_by_label("Export all").scroll_to_me();
    harness.step();
    harness.step();
    harness.get_by_label("Export folder").focus();
    harness.step();
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    harness.step();
    harness
        .get_by_label("Export folder")
        .type_text(&out.display().to_string());
    harness.step();
    harness.get_by_label("Export all").click();
    let names = ["reference.png", "1.png", "2.png", "grid.png"];
    run_until(&mut harness, "the exported files", |app| {
        let written = app
            .status_messages()
            .iter()
            .filter(|message| message.text.starts_with("Wrote "))
            .count();
        written >= names.len()
    });
    for name in names {
        let (width, height) = png_size(&out.join(name));
        let expected_width = if name == "grid.png" { 3 * 64 } else { 64 };
        assert_eq!((width, height), (expected_width, 64), "{name}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| !names.iter().any(|wanted| name == *wanted))
        .collect();
    assert!(leftovers.is_empty(), "nothing half-written: {leftovers:?}");
}

/// Width and height from a PNG's header.
fn png_size(path: &std::path::Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[1..4], b"PNG", "{} is a PNG", path.display());
    let number = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (number(16), number(20))
}
