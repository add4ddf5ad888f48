//! Helpers shared by the egui_kittest editor tests: building the harness and stepping it until a
//! condition holds. (Each test binary uses a subset, hence `dead_code`.)

#![allow(dead_code, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use attend::ui::{EditorApp, RunOutcome};
use egui_kittest::Harness;

/// The editor in a kittest harness of `size` logical pixels, drawn through `EditorApp::frame_ui`.
pub fn harness_of(app: EditorApp, size: egui::Vec2) -> Harness<'static, EditorApp> {
    Harness::builder()
        .with_size(size)
        .build_ui_state(|ui, app: &mut EditorApp| app.frame_ui(ui), app)
}

/// Steps the harness until `done` holds (the worker runs on its own thread meanwhile); fails with
/// the status messages after `timeout`.
pub fn run_until_within(
    harness: &mut Harness<'static, EditorApp>,
    what: &str,
    timeout: Duration,
    done: impl Fn(&EditorApp) -> bool,
) {
    let started = Instant::now();
    loop {
        harness.step();
        if done(harness.state()) {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out waiting for {what}; status: {:?}",
            harness.state().status_messages()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The run on screen finished and nothing is generating.
pub fn finished(app: &EditorApp) -> bool {
    app.run_view()
        .is_some_and(|run| matches!(run.outcome, RunOutcome::Finished { .. }))
        && !app.is_generating()
}

/// A file dropped on the window in a test: a path on disk.
#[derive(Debug)]
pub struct DroppedPath(pub std::path::PathBuf);

impl egui::DroppedFile for DroppedPath {
    fn path(&self) -> &std::path::Path {
        &self.0
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|error| error.to_string())
    }
}

/// Drops `path` on the window (as a file manager does) and runs a frame.
pub fn drop_file(harness: &mut Harness<'static, EditorApp>, path: &std::path::Path) {
    harness
        .input_mut()
        .dropped_files
        .push(std::sync::Arc::new(DroppedPath(path.to_path_buf())));
    harness.step();
}
