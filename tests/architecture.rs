//! The layering rules of the README's Architecture section, checked on the source text:
//! - `ui` never uses candle (it sees plain data only);
//! - nothing but `ui` uses egui / eframe / wgpu;
//! - `analysis` uses no candle (plain data);
//! - the worker's channel messages (`protocol.rs`, `plain.rs`) hold no tensors;
//! - the lower layers (`pipeline`, `attention`, `analysis`, `scenes`) never reach up into `worker` or `ui`;
//! - threads are named (no bare `std::thread::spawn` in the library).

// Test helpers outside `#[test]` functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The code of a file without line comments and doc comments (they may name other layers).
fn code_of(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn violations(dir: &Path, forbidden: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for file in rust_files(dir) {
        let code = code_of(&file);
        for pattern in forbidden {
            if code.contains(pattern) {
                found.push(format!("{} uses `{pattern}`", file.display()));
            }
        }
    }
    found
}

#[test]
fn ui_never_uses_candle() {
    let found = violations(&src().join("ui"), &["candle"]);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn only_ui_uses_egui() {
    let gui = ["egui", "eframe", "wgpu"];
    let mut found = Vec::new();
    for layer in [
        "pipeline",
        "attention",
        "analysis",
        "worker",
        "scenes.rs",
        "cli",
    ] {
        let path = src().join(layer);
        if path.is_dir() {
            found.extend(violations(&path, &gui));
        } else {
            let code = code_of(&path);
            found.extend(
                gui.iter()
                    .filter(|p| code.contains(*p))
                    .map(|p| format!("{} uses `{p}`", path.display())),
            );
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn analysis_is_plain_data() {
    let found = violations(&src().join("analysis"), &["candle"]);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn no_tensor_crosses_the_worker_channels() {
    let mut found = Vec::new();
    for file in ["protocol.rs", "plain.rs"] {
        let code = code_of(&src().join("worker").join(file));
        if code.contains("Tensor") || code.contains("candle") {
            found.push(file);
        }
    }
    assert!(
        found.is_empty(),
        "channel messages mention tensors: {found:?}"
    );
}

#[test]
fn lower_layers_do_not_reach_up() {
    let mut found = Vec::new();
    for layer in ["pipeline", "attention", "analysis"] {
        found.extend(violations(
            &src().join(layer),
            &["crate::worker", "crate::ui"],
        ));
    }
    let scenes = code_of(&src().join("scenes.rs"));
    for pattern in [
        "crate::pipeline",
        "crate::attention",
        "crate::analysis",
        "crate::worker",
        "crate::ui",
    ] {
        if scenes.contains(pattern) {
            found.push(format!("scenes.rs uses `{pattern}`"));
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn threads_are_named() {
    let found = violations(&src(), &["thread::spawn("]);
    assert!(
        found.is_empty(),
        "use std::thread::Builder with a name: {found:#?}"
    );
}
