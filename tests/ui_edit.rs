//! Edit mode driven through egui_kittest (widgets found by their AccessKit labels) with the fake
//! engine: entering edit mode, the edited prompt and its alignment, word weights, windows, local
//! blend, side by side / swipe, and the edit in session files.

// The helpers below are test code too; `allow-unwrap-in-tests` only covers `#[test]` functions.
#![allow(clippy::unwrap_used)]

mod ui_common;
use std::sync::Arc;
use std::time::Duration;

use attend::ui::{CompareMode, EditorApp, EditorOptions, EngineKind, RunOutcome, Session};
use attend::worker::{EngineFactory, FakeEngine, FakeEngineConfig, SelfReplace, StepWindow};
use egui::accesskit::Role;
use egui_kittest::kittest::Queryable as _;
use egui_kittest::Harness;

const TIMEOUT: Duration = Duration::from_secs(30);
const SOURCE_PROMPT: &str = "a red circle and a blue square";
const EDIT_PROMPT: &str = "a red square and a blue square";

fn fake_factory() -> EngineFactory {
    Arc::new(|| Box::new(FakeEngine::new(FakeEngineConfig::default())))
}

fn harness_with(options: EditorOptions) -> Harness<'static, EditorApp> {
    let app = EditorApp::new(options, None, None, fake_factory()).unwrap();
    // Tall enough for the whole edit panel on screen (the left panel scrolls on smaller ones).
    ui_common::harness_of(app, egui::vec2(1400.0, 1100.0))
}

fn options(prompt: &str) -> EditorOptions {
    EditorOptions {
        prompt: Some(prompt.to_owned()),
        steps: Some(6),
        engine: EngineKind::Fake,
        ..EditorOptions::default()
    }
}

fn run_until(
    harness: &mut Harness<'static, EditorApp>,
    what: &str,
    done: impl Fn(&EditorApp) -> bool,
) {
    ui_common::run_until_within(harness, what, TIMEOUT, done);
}

fn source_finished(app: &EditorApp) -> bool {
    ui_common::finished(app)
}

fn edit_finished(app: &EditorApp) -> bool {
    source_finished(app)
        && app
            .edit_run_view()
            .is_some_and(|run| matches!(run.outcome, RunOutcome::Finished { .. }))
}

/// Loads the model, generates the source, enters edit mode and types the edited prompt.
fn source_then_edit_prompt(harness: &mut Harness<'static, EditorApp>) {
    run_until(harness, "the model", |app| app.loaded_model().is_some());
    harness.get_by_label("Generate").click();
    run_until(harness, "the source run", source_finished);
    harness.get_by_label("Edit mode").click();
    harness.step();
    assert!(harness.state().edit_mode());
    assert_eq!(
        harness.state().edit_spec().edit_prompt,
        SOURCE_PROMPT,
        "the edited prompt starts as the source prompt"
    );
    // No word changed yet (a reweight would keep the prompt): the reference's self-attention setting.
    assert_eq!(
        harness.state().edit_spec().self_replace,
        SelfReplace::default()
    );
    harness.get_by_label("Edit prompt").focus();
    harness.step();
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    harness.get_by_label("Edit prompt").type_text(EDIT_PROMPT);
    harness.step();
    assert_eq!(harness.state().edit_spec().edit_prompt, EDIT_PROMPT);
}

fn edited_pixels(app: &EditorApp) -> Vec<u8> {
    app.edit_run_view()
        .and_then(|run| run.final_image.clone())
        .unwrap()
        .pixels
}

#[test]
fn an_edit_shows_its_alignment_runs_only_the_edited_branch_and_follows_the_controls() {
    let mut harness = harness_with(options(SOURCE_PROMPT));
    source_then_edit_prompt(&mut harness);
    // A word changed: the (fake) bundled model's recommendation for such edits, as the real one has.
    let recommended = SelfReplace {
        window: StepWindow::until(0.2),
        max_queries: 32 * 32,
    };
    assert_eq!(harness.state().edit_spec().self_replace, recommended);

    // The alignment, word to word, before anything runs.
    harness.get_by_label("Alignment: Word swap");
    harness.get_by_label("circle -> square");

    harness.get_by_label("Run edit").click();
    run_until(&mut harness, "the first edit", edit_finished);
    harness.step();
    let info = harness.state().edit_info().unwrap().clone();
    assert_eq!(info.source_recordings, 1);
    let first_edit = edited_pixels(harness.state());
    let source = harness
        .state()
        .run_view()
        .unwrap()
        .final_image
        .clone()
        .unwrap();
    assert_ne!(first_edit, source.pixels, "the swap changes the image");

    // The token strip shows the edited prompt's words with their weights.
    assert_eq!(harness.state().thumbnail_count(), 7);
    harness
        .get_by_role_and_label(Role::Slider, "Weight of square")
        .set_value_accesskit(0.0);
    harness.step();
    let spec = harness.state().edit_spec().clone();
    assert_eq!(spec.reweights.len(), 1);
    assert_eq!(
        (spec.reweights[0].word.as_str(), spec.reweights[0].scale),
        ("square", 0.0)
    );
    // The changed edit re-runs the edited branch alone.
    run_until(&mut harness, "the reweighted edit", |app| {
        edit_finished(app) && app.edit_info().is_some_and(|info| info.source_reused)
    });
    assert_eq!(harness.state().edit_info().unwrap().source_recordings, 1);
    let reweighted = edited_pixels(harness.state());
    assert_ne!(reweighted, first_edit, "weight 0 removes the squares");

    // Windows.
    harness
        .get_by_role_and_label(Role::Slider, "Cross end")
        .set_value_accesskit(0.5);
    harness
        .get_by_role_and_label(Role::Slider, "Self end")
        .set_value_accesskit(0.3);
    harness.step();
    let spec = harness.state().edit_spec().clone();
    assert_eq!(spec.cross_window.default.end, 0.5);
    assert_eq!(spec.self_replace.window.end, 0.3);
    // Self layers: the run's self-attention grids are offered beside the model's recommendation.
    assert_eq!(spec.self_replace.max_queries, 32 * 32);
    harness.get_by_label("Self layers up to").click();
    harness.run_steps(2);
    harness.get_by_label("8x8 and coarser").click();
    harness.run_steps(2);
    assert_eq!(harness.state().edit_spec().self_replace.max_queries, 64);
    harness.get_by_label("Self layers up to").click();
    harness.run_steps(2);
    harness
        .get_all_by_label("16x16 and coarser")
        .last()
        .unwrap()
        .click();
    harness.run_steps(2);
    assert_eq!(harness.state().edit_spec().self_replace.max_queries, 256);

    // Local blend on the swapped word: a mask comes back and is drawn. "square" is repeated in the
    // edited prompt, so the checkbox names the first one alone, in the edited prompt only (the
    // source's first square is the blue one, which stays closed).
    harness.get_by_label("Blend circle / square").click();
    harness.step();
    let blend = harness.state().edit_spec().local_blend.clone().unwrap();
    assert_eq!(
        blend.words,
        vec!["circle".to_owned(), "edit:square#1".to_owned()]
    );
    run_until(&mut harness, "the blended edit", |app| {
        edit_finished(app) && app.edit_blend_mask().is_some()
    });
    let mask = harness.state().edit_blend_mask().unwrap().clone();
    assert!(mask.coverage() > 0.0 && mask.coverage() < 1.0, "{mask:?}");
    assert_eq!(harness.state().edit_info().unwrap().source_recordings, 1);

    // Side by side (default), then swipe with a draggable divider.
    assert_eq!(harness.state().edit_compare_mode(), CompareMode::SideBySide);
    harness.get_by_label("Swipe").click();
    harness.step();
    harness.step();
    assert_eq!(harness.state().edit_compare_mode(), CompareMode::Swipe);
    let divider = harness.get_by_label("Swipe divider").rect();
    let image = harness.state().canvas_image_rect().unwrap();
    harness.drag_at(divider.center());
    harness.step();
    let target = egui::pos2(image.min.x + 0.25 * image.width(), divider.center().y);
    harness.hover_at(target);
    harness.step();
    harness.drop_at(target);
    harness.step();
    let swipe = harness.state().edit_swipe_position();
    assert!((swipe - 0.25).abs() < 0.05, "divider at {swipe}");
    harness.get_by_label("Side by side").click();
    harness.step();
    assert_eq!(harness.state().edit_compare_mode(), CompareMode::SideBySide);

    // Heat maps of the source: the token strip goes back to the source's words.
    harness.get_by_label("Source").click();
    harness.step();
    harness.step();
    assert!(harness
        .query_by_role_and_label(Role::Slider, "Weight of square")
        .is_none());
    harness.get_by_label("Edited").click();
    harness.step();
    harness.step();
    harness.get_by_role_and_label(Role::Slider, "Weight of square");

    // Reset: the reference's windows with the model's recommended self-attention replacement.
    harness.get_by_label("Reset edit").click();
    harness.step();
    let spec = harness.state().edit_spec().clone();
    assert_eq!(spec.self_replace, recommended);
    assert_eq!(spec.cross_window.default, StepWindow::until(0.8));
    assert!(spec.reweights.is_empty() && spec.local_blend.is_none());
}

#[test]
fn a_session_keeps_the_edit_and_reopens_to_the_same_edited_image() {
    let mut harness = harness_with(options(SOURCE_PROMPT));
    source_then_edit_prompt(&mut harness);
    harness.get_by_label("Blend circle / square").click();
    harness.step();
    harness.get_by_label("Run edit").click();
    run_until(&mut harness, "the edit", edit_finished);
    harness
        .get_by_role_and_label(Role::Slider, "Weight of blue")
        .set_value_accesskit(2.0);
    harness.step();
    run_until(&mut harness, "the reweighted edit", |app| {
        edit_finished(app)
            && app.edit_info().is_some_and(|info| info.source_reused)
            && app
                .edit_spec()
                .reweights
                .iter()
                .any(|reweight| reweight.word == "blue")
    });
    let edited = edited_pixels(harness.state());
    let session = harness.state().current_session();
    let edit = session.edit.clone().unwrap();
    assert!(edit.enabled);
    assert_eq!(edit.spec, *harness.state().edit_spec());
    assert_eq!(edit.spec.reweights[0].scale, 2.0);

    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("edit.session.json");
    std::fs::write(&path, session.to_json()).unwrap();
    assert_eq!(Session::load(&path).unwrap(), session);

    // `attend --session F`: the same edited image comes back.
    let mut reopened = harness_with(EditorOptions {
        session: Some(path.clone()),
        engine: EngineKind::Fake,
        ..EditorOptions::default()
    });
    run_until(&mut reopened, "the reopened edit", edit_finished);
    assert!(reopened.state().edit_mode());
    assert_eq!(reopened.state().edit_spec(), harness.state().edit_spec());
    assert_eq!(edited_pixels(reopened.state()), edited);

    // A session's own self-attention setting wins over the model's recommendation.
    let mut value: serde_json::Value = serde_json::from_str(&session.to_json()).unwrap();
    value["edit"]["spec"]["self_replace"] = serde_json::json!({
        "window": {"start": 0.0, "end": 0.4},
        "max_queries": 256,
    });
    let reference = folder.path().join("reference.session.json");
    std::fs::write(&reference, value.to_string()).unwrap();
    let mut reopened = harness_with(EditorOptions {
        session: Some(reference),
        engine: EngineKind::Fake,
        ..EditorOptions::default()
    });
    run_until(&mut reopened, "the reopened edit", edit_finished);
    assert_eq!(
        reopened.state().edit_spec().self_replace,
        SelfReplace::default()
    );

    // Session files from before edit mode still load (no edit).
    let mut value: serde_json::Value = serde_json::from_str(&session.to_json()).unwrap();
    value.as_object_mut().unwrap().remove("edit");
    let old = folder.path().join("old.session.json");
    std::fs::write(&old, value.to_string()).unwrap();
    assert_eq!(Session::load(&old).unwrap().edit, None);
}

const NOTHING_TO_EDIT: &str =
    "Edit prompt = source prompt: nothing to edit (change a word or a word's weight)";

#[test]
fn ticking_edit_mode_starts_nothing_until_the_edit_changes_something() {
    let mut harness = harness_with(options(SOURCE_PROMPT));
    run_until(&mut harness, "the model", |app| {
        app.loaded_model().is_some()
    });
    harness.get_by_label("Generate").click();
    run_until(&mut harness, "the source run", source_finished);
    harness.get_by_label("Edit mode").click();
    harness.run_steps(5);
    assert!(harness.state().edit_mode());
    assert!(!harness.state().is_generating(), "no run starts");
    assert!(harness.state().edit_run_view().is_none());
    // The panel says why, and does not call the unchanged prompt a word swap.
    harness.get_by_label(NOTHING_TO_EDIT);
    harness.get_by_label("Alignment: no word changed");
    assert!(harness.query_by_label("Alignment: Word swap").is_none());
    // "Run edit" says so too, on the status line.
    harness.get_by_label("Run edit").click();
    harness.run_steps(2);
    assert!(!harness.state().is_generating());
    assert!(harness
        .state()
        .status_messages()
        .last()
        .is_some_and(|message| message.text == NOTHING_TO_EDIT));
    // A word's weight is an edit of the same prompt: it runs.
    harness
        .get_by_role_and_label(Role::Slider, "Weight of circle")
        .set_value_accesskit(2.0);
    harness.step();
    run_until(&mut harness, "the reweighted edit", edit_finished);
}

#[test]
fn a_typed_edit_prompt_says_how_to_run_it_and_runs_on_enter() {
    let mut harness = harness_with(options(SOURCE_PROMPT));
    source_then_edit_prompt(&mut harness);
    harness.run_steps(3);
    // Still typing: nothing runs, and the panel says how to run the edit.
    harness.get_by_label("Press Enter to run the edit");
    assert!(!harness.state().is_generating());
    assert!(harness.state().edit_run_view().is_none());
    harness.key_press(egui::Key::Enter);
    harness.step();
    assert!(harness
        .query_by_label("Press Enter to run the edit")
        .is_none());
    run_until(&mut harness, "the edit", edit_finished);
    assert_eq!(
        harness.state().edit_run_view().unwrap().params.prompt,
        EDIT_PROMPT
    );
}
