//! The layering rules of the README's Architecture section, checked on the source:
//! - each layer (a folder or file of `src/`) imports, by `crate::` path, only itself and the layers
//!   below it, so no two layers import each other and nothing reaches up;
//! - `ui`, `analysis`, `scenes` and `hook`'s plain neighbours stay free of what they must not know
//!   (candle in `ui`/`analysis`/`scenes`, egui/eframe/wgpu outside `ui`);
//! - the worker's channel messages (`protocol.rs`, `plain.rs`) hold no tensors;
//! - threads are named (no bare `std::thread::spawn` in the library).
//!
//! The checker itself is tested on planted violations, so a rule that stops matching fails here.

// Test helpers outside `#[test]` functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The library's layers from the bottom up: a layer may use the layers of lower rank (and itself).
/// Layers of equal rank are independent of each other.
const LAYERS: &[(&str, u32)] = &[
    ("scenes", 0),
    ("kernels", 0),
    ("analysis", 1),
    ("hook", 2),
    ("pipeline", 3),
    ("attention", 4),
    ("worker", 5),
    ("ui", 6),
];

fn rank(layer: &str) -> Option<u32> {
    LAYERS
        .iter()
        .find(|(name, _)| *name == layer)
        .map(|(_, rank)| *rank)
}

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

/// Source text without comment lines (doc comments may name other layers).
fn code_without_comments(text: &str) -> String {
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The layer a file under `src/` belongs to: its first path component, without `.rs`.
fn layer_of(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_owned())
}

/// Every top-level module named after `crate::` in `code`, including grouped imports
/// (`use crate::{analysis::X, hook::Y}`).
fn crate_modules_used(code: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut rest = code;
    while let Some(start) = rest.find("crate::") {
        // `attend_crate::` or `mycrate::` are other paths.
        let preceded_by_ident = rest[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[start + "crate::".len()..];
        if preceded_by_ident {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    used.insert(name);
                }
            }
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            used.insert(name);
        }
    }
    used
}

/// The layering violations of one file of layer `layer`.
fn layer_violations(file: &str, layer: &str, code: &str) -> Vec<String> {
    let Some(own_rank) = rank(layer) else {
        return Vec::new();
    };
    crate_modules_used(code)
        .into_iter()
        .filter(|used| used != layer)
        .filter_map(|used| match rank(&used) {
            Some(used_rank) if used_rank < own_rank => None,
            Some(used_rank) => Some(format!(
                "{file} ({layer}, rank {own_rank}) uses crate::{used} (rank {used_rank}): a layer may only use layers below it"
            )),
            None => Some(format!("{file} ({layer}) uses crate::{used}, which is no layer")),
        })
        .collect()
}

/// The library's files as (path relative to `src/`, layer, code without comments).
fn library_files() -> Vec<(String, String, String)> {
    let src = src();
    rust_files(&src)
        .into_iter()
        .filter_map(|path| {
            let relative = path.strip_prefix(&src).unwrap().to_path_buf();
            let layer = layer_of(&relative)?;
            let code = code_without_comments(&std::fs::read_to_string(&path).unwrap());
            Some((relative.display().to_string(), layer, code))
        })
        .collect()
}

#[test]
fn every_library_file_belongs_to_a_layer() {
    let edge = ["lib", "main", "cli"];
    let unknown: Vec<String> = library_files()
        .into_iter()
        .filter(|(_, layer, _)| rank(layer).is_none() && !edge.contains(&layer.as_str()))
        .map(|(file, layer, _)| format!("{file}: `{layer}` is not in LAYERS"))
        .collect();
    assert!(unknown.is_empty(), "{unknown:#?}");
}

#[test]
fn layers_use_only_the_layers_below_them() {
    let found: Vec<String> = library_files()
        .into_iter()
        .flat_map(|(file, layer, code)| layer_violations(&file, &layer, &code))
        .collect();
    assert!(found.is_empty(), "{found:#?}");
}

/// Files of the given layers whose code contains one of `forbidden`.
fn text_violations(layers: &[&str], forbidden: &[&str]) -> Vec<String> {
    library_files()
        .into_iter()
        .filter(|(_, layer, _)| layers.contains(&layer.as_str()))
        .flat_map(|(file, _, code)| {
            forbidden
                .iter()
                .filter(|pattern| code.contains(*pattern))
                .map(|pattern| format!("{file} uses `{pattern}`"))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn plain_layers_never_use_candle() {
    let found = text_violations(&["ui", "analysis", "scenes"], &["candle"]);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn only_ui_uses_egui() {
    let not_ui: Vec<&str> = LAYERS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| *name != "ui")
        .chain(["cli"])
        .collect();
    let found = text_violations(&not_ui, &["egui", "eframe", "wgpu"]);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn no_tensor_crosses_the_worker_channels() {
    let mut found = Vec::new();
    for file in ["protocol.rs", "plain.rs"] {
        let code = code_without_comments(
            &std::fs::read_to_string(src().join("worker").join(file)).unwrap(),
        );
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
fn threads_are_named() {
    let found: Vec<String> = library_files()
        .into_iter()
        .filter(|(_, _, code)| code.contains("thread::spawn("))
        .map(|(file, _, _)| file)
        .collect();
    assert!(
        found.is_empty(),
        "use std::thread::Builder with a name: {found:#?}"
    );
}

// --- The checker on planted violations ------------------------------------------------------------

#[test]
fn checker_flags_a_layer_reaching_up() {
    let found = layer_violations(
        "analysis/heatmap.rs",
        "analysis",
        "use crate::pipeline::PipelineError;\nfn f() {}",
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("crate::pipeline"), "{found:?}");
}

#[test]
fn checker_flags_two_layers_importing_each_other() {
    // A cycle needs one import that goes up; either direction of hook <-> pipeline is caught.
    let down = layer_violations(
        "pipeline/unet/mod.rs",
        "pipeline",
        "use crate::hook::AttentionHook;",
    );
    let up = layer_violations("hook/mod.rs", "hook", "use crate::pipeline::PipelineError;");
    assert!(down.is_empty(), "{down:?}");
    assert_eq!(up.len(), 1, "{up:?}");
}

#[test]
fn checker_reads_grouped_and_inline_paths() {
    let code = "use crate::{analysis::WordSpan, worker::Command};\nlet x = crate::ui::f();\n";
    let used = crate_modules_used(code);
    assert_eq!(
        used.into_iter().collect::<Vec<_>>(),
        ["analysis", "ui", "worker"]
    );
    let found = layer_violations("attention/store.rs", "attention", code);
    assert_eq!(found.len(), 2, "{found:?}");
    // Same-rank layers are independent too.
    let found = layer_violations("kernels/mod.rs", "kernels", "use crate::scenes::Scene;");
    assert_eq!(found.len(), 1, "{found:?}");
    // Comment lines are not code.
    let code = code_without_comments("//! see crate::ui\nuse crate::analysis::X;");
    assert!(layer_violations("hook/mod.rs", "hook", &code).is_empty());
}
