//! Bad input at the command line: every case exits with a non-zero status and a message that names
//! the flag, file or value and what is wrong, never a panic, and leaves no partial output behind.
//!
//! The runs use the tiny SD1 fixture model (tests/fixtures/tiny-sd1), so the few cases that get as far
//! as loading the model stay fast.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1")
}

/// Runs `attend ARGS`, expects failure, returns stderr.
fn fails(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_attend"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "`attend {}` should fail; stderr:\n{stderr}",
        args.join(" ")
    );
    assert!(
        !stderr.contains("panicked"),
        "`attend {}` panicked:\n{stderr}",
        args.join(" ")
    );
    eprintln!("attend {}\n  -> {}", args.join(" "), stderr.trim());
    stderr
}

fn generate_args<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "generate", "--prompt", "a cat", "--model", model, "--steps", "2", "--quiet",
    ];
    args.extend_from_slice(extra);
    args
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn missing_model_folder_is_named() {
    let stderr = fails(&["generate", "--prompt", "x", "--model", "/no/such/model"]);
    assert!(stderr.contains("/no/such/model"), "{stderr}");
}

#[test]
fn incomplete_model_folder_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model_index.json"), "{}").unwrap();
    let model = dir.path().to_str().unwrap();
    let stderr = fails(&generate_args(model, &[]));
    assert!(stderr.contains(model), "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
}

#[test]
fn output_in_a_missing_folder_fails_before_the_run() {
    let model = tiny_model();
    let stderr = fails(&generate_args(
        model.to_str().unwrap(),
        &["--out", "/no/such/folder/x.png"],
    ));
    assert!(stderr.contains("/no/such/folder"), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
}

#[test]
fn output_path_that_is_a_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let stderr = fails(&generate_args(
        model.to_str().unwrap(),
        &["--attention-out", dir.path().to_str().unwrap()],
    ));
    assert!(stderr.contains(dir.path().to_str().unwrap()), "{stderr}");
    assert!(files_in(dir.path()).is_empty(), "nothing written");
}

#[test]
fn unknown_scheduler_lists_the_accepted_names() {
    let model = tiny_model();
    let stderr = fails(&generate_args(
        model.to_str().unwrap(),
        &["--scheduler", "pndm-fast"],
    ));
    assert!(stderr.contains("--scheduler"), "{stderr}");
    assert!(stderr.contains("pndm-fast"), "{stderr}");
    assert!(stderr.contains("dpmpp-2m"), "{stderr}");
}

#[test]
fn bad_sizes_and_steps_name_the_value() {
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("x.png");
    let png = png.to_str().unwrap();
    let stderr = fails(&generate_args(model, &["--width", "65", "--out", png]));
    assert!(stderr.contains("65"), "{stderr}");
    assert!(stderr.to_lowercase().contains("width"), "{stderr}");
    let stderr = fails(&[
        "generate", "--prompt", "x", "--model", model, "--steps", "0", "--out", png,
    ]);
    assert!(stderr.contains("steps"), "{stderr}");
    let stderr = fails(&generate_args(model, &["--guidance", "NaN", "--out", png]));
    assert!(stderr.contains("guidance"), "{stderr}");
    // A flag value that is not a number is clap's error, naming the flag.
    let stderr = fails(&generate_args(model, &["--seed", "minus-one"]));
    assert!(stderr.contains("--seed"), "{stderr}");
    assert!(
        files_in(out.path()).is_empty(),
        "no partial image left behind"
    );
}

#[test]
fn init_latents_that_are_not_safetensors_or_have_the_wrong_shape() {
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").unwrap();
    let stderr = fails(&generate_args(
        model,
        &["--init-latents", garbage.to_str().unwrap()],
    ));
    assert!(stderr.contains("--init-latents"), "{stderr}");
    assert!(stderr.contains("garbage.safetensors"), "{stderr}");

    // A valid file with a tensor of the wrong shape.
    let wrong = dir.path().join("wrong.safetensors");
    let values = vec![0u8; 4 * 3 * 5 * 5];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 3, 5, 5], &values)
            .unwrap();
    safetensors::serialize_to_file([("latents", view)], None, &wrong).unwrap();
    let stderr = fails(&generate_args(
        model,
        &["--init-latents", wrong.to_str().unwrap()],
    ));
    assert!(stderr.contains("latents"), "{stderr}");
    assert!(stderr.contains("[1, 3, 5, 5]"), "{stderr}");

    // A file without a `latents` tensor.
    let other = dir.path().join("other.safetensors");
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &values[..4])
        .unwrap();
    safetensors::serialize_to_file([("noise", view)], None, &other).unwrap();
    let stderr = fails(&generate_args(
        model,
        &["--init-latents", other.to_str().unwrap()],
    ));
    assert!(stderr.contains("no tensor named `latents`"), "{stderr}");
}

#[test]
fn edit_flags_with_bad_values_are_named() {
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap();
    let edit = |extra: &[&str]| {
        let mut args = vec![
            "edit",
            "--prompt",
            "a cat",
            "--edit-prompt",
            "a dog",
            "--model",
            model,
            "--steps",
            "2",
            "--out-dir",
            out_dir,
            "--quiet",
        ];
        args.extend_from_slice(extra);
        fails(&args)
    };
    let stderr = edit(&["--reweight", "cat"]);
    assert!(stderr.contains("--reweight"), "{stderr}");
    let stderr = edit(&["--reweight", "cat=lots"]);
    assert!(stderr.contains("lots"), "{stderr}");
    let stderr = edit(&["--cross-replace", "0.9:0.2"]);
    assert!(stderr.contains("0.9:0.2"), "{stderr}");
    let stderr = edit(&["--self-replace", "1.5"]);
    assert!(stderr.contains("1.5"), "{stderr}");
    let stderr = edit(&["--edit-kind", "morph"]);
    assert!(stderr.contains("morph"), "{stderr}");
    assert!(
        files_in(out.path()).is_empty(),
        "nothing written: {:?}",
        files_in(out.path())
    );
}

#[test]
fn segment_and_scene_flags_with_bad_values_are_named() {
    let out = tempfile::tempdir().unwrap();
    let stderr = fails(&[
        "segment",
        "--prompt",
        "a red circle",
        "--method",
        "spectral",
        "--out-dir",
        out.path().to_str().unwrap(),
    ]);
    assert!(stderr.contains("spectral"), "{stderr}");
    let stderr = fails(&[
        "scenes",
        "--count",
        "1",
        "--size",
        "8",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(stderr.contains("--size 8"), "{stderr}");
    let stderr = fails(&["bench", "unet", "--random-config", "/no/such/manifest.json"]);
    assert!(stderr.contains("/no/such/manifest.json"), "{stderr}");
}
