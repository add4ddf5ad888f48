//! The editor and models: dropping a checkpoint file or model folder onto the window loads it;
//! dropped images are left alone; a failed load keeps the previous model; the products choice
//! loads the model again with it (fake engine).

#![allow(clippy::unwrap_used)]

mod ui_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use attend::ui::{EditorApp, EditorOptions, EngineKind};
use attend::worker::{EngineFactory, FakeEngine, FakeEngineConfig, ModelSource, Products};
use egui_kittest::Harness;

const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Dropped(PathBuf);

impl egui::DroppedFile for Dropped {
    fn path(&self) -> &Path {
        &self.0
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|error| error.to_string())
    }
}

fn harness() -> Harness<'static, EditorApp> {
    let factory: EngineFactory =
        Arc::new(|| Box::new(FakeEngine::new(FakeEngineConfig::default())));
    let options = EditorOptions {
        engine: EngineKind::Fake,
        ..EditorOptions::default()
    };
    let app = EditorApp::new(options, None, None, factory).unwrap();
    let mut harness = ui_common::harness_of(app, egui::vec2(1280.0, 820.0));
    ui_common::run_until_within(&mut harness, "the bundled model", TIMEOUT, |app| {
        app.loaded_model()
            .is_some_and(|info| info.source == ModelSource::Bundled)
    });
    harness
}

fn drop_file(harness: &mut Harness<'static, EditorApp>, path: &Path) {
    harness
        .input_mut()
        .dropped_files
        .push(Arc::new(Dropped(path.to_path_buf())));
    harness.step();
}

#[test]
fn dropping_a_checkpoint_loads_it_and_images_are_left_alone() {
    let temp = tempfile::tempdir().unwrap();
    let image = temp.path().join("photo.png");
    std::fs::write(&image, b"png").unwrap();
    let checkpoint = temp.path().join("my-model.safetensors");
    std::fs::write(&checkpoint, b"weights").unwrap();
    let mut harness = harness();

    drop_file(&mut harness, &image);
    for _ in 0..5 {
        harness.step();
    }
    assert_eq!(
        harness.state().loaded_model().unwrap().source,
        ModelSource::Bundled
    );

    drop_file(&mut harness, &checkpoint);
    ui_common::run_until_within(&mut harness, "the dropped checkpoint", TIMEOUT, |app| {
        app.loaded_model()
            .is_some_and(|info| info.source == ModelSource::File(checkpoint.clone()))
    });
    assert_eq!(harness.state().loaded_model().unwrap().name, "my-model");
}

#[test]
fn a_dropped_folder_that_fails_keeps_the_previous_model() {
    let temp = tempfile::tempdir().unwrap();
    let not_a_model = temp.path().join("not-a-model");
    std::fs::create_dir(&not_a_model).unwrap();
    let mut harness = harness();
    drop_file(&mut harness, &not_a_model);
    ui_common::run_until_within(&mut harness, "the load error", TIMEOUT, |app| {
        app.status_messages()
            .iter()
            .any(|message| message.text.contains("model_index.json"))
    });
    assert_eq!(
        harness.state().loaded_model().unwrap().source,
        ModelSource::Bundled
    );
}

#[test]
fn choosing_the_products_loads_the_model_again_with_them() {
    use egui_kittest::kittest::Queryable as _;
    let mut harness = harness();
    assert_eq!(harness.state().settings().products, Products::ModelDefault);
    // The bundled model's default is bf16.
    assert!(harness.state().loaded_model().unwrap().bf16_products);
    harness.get_by_label("Products").click();
    for _ in 0..3 {
        harness.step();
    }
    harness.get_by_label("f32 (exact)").click();
    ui_common::run_until_within(&mut harness, "f32 products", TIMEOUT, |app| {
        app.loaded_model().is_some_and(|info| !info.bf16_products)
    });
    assert_eq!(harness.state().settings().products, Products::F32);
    assert_eq!(
        harness.state().loaded_model().unwrap().source,
        ModelSource::Bundled
    );
}
