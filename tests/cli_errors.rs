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
    let stderr = fails(&[
        "bench",
        "unet",
        "--random-weights",
        "/no/such/manifest.json",
    ]);
    assert!(stderr.contains("/no/such/manifest.json"), "{stderr}");
}

/// Runs `attend ARGS`, expects success, returns stderr.
fn succeeds(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_attend"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "`attend {}` should succeed; stderr:\n{stderr}",
        args.join(" ")
    );
    stderr
}

/// `attend segment` on the bundled model with `extra` flags; the out-dir must not be left behind.
fn segment_fails(extra: &[&str]) -> String {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("segments");
    let mut args = vec![
        "segment",
        "--prompt",
        "a red circle and a blue square",
        "--out-dir",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let stderr = fails(&args);
    assert!(!out.exists(), "no out-dir left behind by {extra:?}");
    stderr
}

#[test]
fn segmentation_settings_out_of_range_name_the_flag_and_the_range() {
    for (extra, expected) in [
        (&["--k", "0"][..], &["--k", "at least 1"][..]),
        (&["--k", "-3"], &["--k", "at least 1"]),
        (&["--k", "18446744073709551615"], &["--k", "256"]),
        (&["--k", "1000"], &["--k", "256"]),
        (&["--n-init", "0"], &["--n-init", "at least 1"]),
        (&["--method", "diffseg", "--passes", "0"], &["--passes"]),
        (&["--passes", "1000"], &["--passes", "100"]),
        (
            &["--method", "diffseg", "--kl-threshold", "-1"],
            &["--kl-threshold", "-1"],
        ),
        (&["--kl-threshold", "NaN"], &["--kl-threshold"]),
        (&["--kl-relative", "inf"], &["--kl-relative"]),
        (
            &["--label-threshold", "-1"],
            &["--label-threshold", "0 to 1"],
        ),
        (
            &["--label-threshold", "2"],
            &["--label-threshold", "0 to 1"],
        ),
        (
            &["--label-threshold", "NaN"],
            &["--label-threshold", "0 to 1"],
        ),
        (
            &["--min-segment-fraction", "2"],
            &["--min-segment-fraction", "0 to 1"],
        ),
        (
            &["--merge-fraction", "-0.5"],
            &["--merge-fraction", "0 to 1"],
        ),
        (
            &["--dilate-px", "100000"],
            &["--dilate-px", "100000", "longer side"],
        ),
        (&["--dilate-px", "-100000"], &["--dilate-px", "longer side"]),
        (&["--feather-px", "-1"], &["--feather-px"]),
        (&["--feather-px", "NaN"], &["--feather-px"]),
        (&["--guidance", "NaN"], &["--guidance"]),
        (&["--steps", "-5"], &["--steps", "at least 1"]),
        (&["--steps", "0"], &["--steps", "at least 1"]),
        (&["--seed", "-1"], &["--seed", "0 or more"]),
        (&["--words", ","], &["--words", "no word"]),
    ] {
        let stderr = segment_fails(extra);
        for text in expected {
            assert!(stderr.contains(text), "{extra:?}: {text:?} in\n{stderr}");
        }
    }
}

#[test]
fn segment_words_not_in_the_prompt_are_refused_before_the_run() {
    let stderr = segment_fails(&["--words", "circle,zebra"]);
    assert!(stderr.contains("zebra"), "{stderr}");
    assert!(stderr.contains("circle, and, a, blue, square"), "{stderr}");
}

#[test]
fn segment_out_dir_that_is_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("taken");
    std::fs::write(&file, "keep").unwrap();
    let stderr = fails(&[
        "segment",
        "--prompt",
        "a red circle",
        "--out-dir",
        file.to_str().unwrap(),
    ]);
    assert!(stderr.contains("not a folder"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
}

#[test]
fn negative_and_zero_numbers_get_a_range_message() {
    let model = tiny_model();
    let model = model.to_str().unwrap();
    for (extra, flag, expected) in [
        (&["--steps", "-5"][..], "--steps", "at least 1"),
        (&["--width", "0"], "--width", "at least 1"),
        (&["--height", "-64"], "--height", "at least 1"),
        (&["--seed", "-1"], "--seed", "0 or more"),
        (&["--guidance", "-inf"], "--guidance", "finite"),
        (&["--guidance", "inf"], "--guidance", "finite"),
    ] {
        let mut args = vec!["generate", "--prompt", "a cat", "--model", model, "--quiet"];
        args.extend_from_slice(extra);
        let stderr = fails(&args);
        assert!(stderr.contains(flag), "{extra:?}: {stderr}");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
        assert!(!stderr.contains("unexpected argument"), "{stderr}");
    }
    let stderr = fails(&[
        "scenes",
        "--count",
        "-1",
        "--out",
        "/tmp/never-made-by-attend",
    ]);
    assert!(
        stderr.contains("--count") && stderr.contains("0 or more"),
        "{stderr}"
    );
    assert!(!Path::new("/tmp/never-made-by-attend").exists());
}

#[test]
fn a_model_path_that_is_a_file_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.txt");
    std::fs::write(&file, b"not a folder").unwrap();
    let file = file.to_str().unwrap();
    let stderr = fails(&generate_args(file, &[]));
    assert!(stderr.contains(file), "{stderr}");
    assert!(
        stderr.contains("not a model folder or a .safetensors checkpoint"),
        "{stderr}"
    );
    // A .safetensors file is read as a single-file checkpoint, and its flaw named.
    let checkpoint = dir.path().join("model.safetensors");
    std::fs::write(&checkpoint, b"not a folder").unwrap();
    let checkpoint = checkpoint.to_str().unwrap();
    let stderr = fails(&["bench", "unet", "--model", checkpoint, "--iters", "1"]);
    assert!(
        stderr.contains(checkpoint) && stderr.contains("not a safetensors file"),
        "{stderr}"
    );
}

#[test]
fn bench_sizes_are_checked_before_any_tensor() {
    let stderr = fails(&["bench", "unet", "--width", "0"]);
    assert!(
        stderr.contains("--width") && stderr.contains("at least 1"),
        "{stderr}"
    );
    let stderr = fails(&["bench", "unet", "--iters", "0"]);
    assert!(
        stderr.contains("--iters") && stderr.contains("at least 1"),
        "{stderr}"
    );
    let model = tiny_model();
    let stderr = fails(&[
        "bench",
        "unet",
        "--model",
        model.to_str().unwrap(),
        "--width",
        "12",
        "--height",
        "16",
        "--iters",
        "1",
    ]);
    assert!(stderr.contains("multiples of 8"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("shape"), "{stderr}");
}

#[test]
fn scenes_size_and_count_limits() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("scenes");
    let out_text = out.to_str().unwrap();
    let stderr = fails(&["scenes", "--size", "100000", "--out", out_text]);
    assert!(
        stderr.contains("--size 100000") && stderr.contains("4096"),
        "{stderr}"
    );
    let stderr = fails(&[
        "scenes",
        "--count",
        "18446744073709551615",
        "--start",
        "5",
        "--out",
        out_text,
    ]);
    assert!(stderr.contains("--start"), "{stderr}");
    let stderr = fails(&[
        "scenes",
        "--count",
        "100000000",
        "--size",
        "4096",
        "--format",
        "raw",
        "--out",
        out_text,
    ]);
    assert!(stderr.contains("GiB"), "{stderr}");
    assert!(!out.exists(), "no empty out-dir left behind");
}

#[cfg(unix)]
#[test]
fn special_files_as_outputs_are_refused_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("image.png");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let stderr = fails(&generate_args(model, &["--out", fifo.to_str().unwrap()]));
    assert!(stderr.contains("--out"), "{stderr}");
    assert!(stderr.contains("FIFO"), "{stderr}");
    let socket = dir.path().join("socket.safetensors");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let stderr = fails(&generate_args(
        model,
        &["--attention-out", socket.to_str().unwrap()],
    ));
    assert!(stderr.contains("socket"), "{stderr}");
    let stderr = fails(&generate_args(
        model,
        &["--trajectory-out", dir.path().to_str().unwrap()],
    ));
    assert!(stderr.contains("a folder"), "{stderr}");
    let stderr = fails(&generate_args(model, &["--out", "/dev/null"]));
    assert!(stderr.contains("character device"), "{stderr}");
    assert_eq!(
        files_in(dir.path()),
        vec!["image.png", "socket.safetensors"]
    );
}

#[cfg(unix)]
#[test]
fn an_output_through_a_symlink_writes_its_target_and_keeps_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target.png");
    std::fs::write(&target, b"old").unwrap();
    let link = dir.path().join("link.png");
    std::os::unix::fs::symlink("target.png", &link).unwrap();
    let model = tiny_model();
    succeeds(&generate_args(
        model.to_str().unwrap(),
        &["--out", link.to_str().unwrap()],
    ));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::read(&target).unwrap().starts_with(b"\x89PNG"));
    assert_eq!(files_in(dir.path()), vec!["link.png", "target.png"]);
}

#[test]
fn edit_values_out_of_range_leave_no_out_dir() {
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("new").join("edit");
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
            out.to_str().unwrap(),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let stderr = fails(&args);
        assert!(!root.path().join("new").exists(), "{extra:?} left a folder");
        stderr
    };
    let stderr = edit(&["--reweight", "cat=1e30"]);
    assert!(stderr.contains("-100 to 100"), "{stderr}");
    let stderr = edit(&["--reweight", "cat=NaN"]);
    assert!(stderr.contains("-100 to 100"), "{stderr}");
    let stderr = edit(&["--blend-map-side", "0", "--local-blend", "cat"]);
    assert!(
        stderr.contains("--blend-map-side") && stderr.contains("at least 1"),
        "{stderr}"
    );
    let stderr = edit(&["--blend-map-side", "1000", "--local-blend", "cat"]);
    assert!(
        stderr.contains("--blend-map-side") && stderr.contains("latent side"),
        "{stderr}"
    );
    let stderr = edit(&["--blend-threshold", "2"]);
    assert!(stderr.contains("--blend-threshold"), "{stderr}");
    let stderr = edit(&["--cross-replace", "-0.5"]);
    assert!(
        stderr.contains("--cross-replace") && stderr.contains("0..1"),
        "{stderr}"
    );
    let stderr = edit(&["--self-replace-max-side", "-4"]);
    assert!(stderr.contains("at least 1"), "{stderr}");
    let stderr = edit(&["--init-latents", "/no/such/latents.safetensors"]);
    assert!(stderr.contains("/no/such/latents.safetensors"), "{stderr}");
}

#[test]
fn eval_flags_are_checked_before_the_model_loads() {
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    let images = images.to_str().unwrap();
    let stderr = fails(&["eval-shapes", "--threshold", "2", "--images-out", images]);
    assert!(stderr.contains("--threshold"), "{stderr}");
    let stderr = fails(&["segment-eval", "--k", "0", "--images-out", images]);
    assert!(stderr.contains("--k"), "{stderr}");
    let stderr = fails(&[
        "edit-eval",
        "--reweight-scales",
        "0,1e9",
        "--images-out",
        images,
    ]);
    assert!(stderr.contains("--reweight-scales"), "{stderr}");
    let stderr = fails(&[
        "segment-eval",
        "--count",
        "1",
        "--json-out",
        root.path().to_str().unwrap(),
    ]);
    assert!(
        stderr.contains("--json-out") && stderr.contains("a folder"),
        "{stderr}"
    );
    assert_eq!(files_in(root.path()), Vec::<String>::new());
}

#[test]
fn unknown_prompt_words_get_a_warning() {
    let stderr = succeeds(&[
        "generate",
        "--prompt",
        "a red zebra",
        "--steps",
        "1",
        "--quiet",
    ]);
    assert!(stderr.contains("warning"), "{stderr}");
    assert!(stderr.contains("\"zebra\""), "{stderr}");
    assert!(!stderr.contains("\"red\""), "{stderr}");
}

#[test]
fn an_output_name_taken_by_a_folder_fails_before_the_run() {
    let out = tempfile::tempdir().unwrap();
    std::fs::create_dir(out.path().join("labels.png")).unwrap();
    let stderr = fails(&[
        "segment",
        "--prompt",
        "a red circle",
        "--steps",
        "1000",
        "--out-dir",
        out.path().to_str().unwrap(),
    ]);
    assert!(
        stderr.contains("labels.png") && stderr.contains("a folder"),
        "{stderr}"
    );
    assert_eq!(files_in(out.path()), vec!["labels.png"]);
}

#[test]
fn random_weights_from_a_bad_manifest_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.json");
    let out = dir.path().join("out.png");
    let message = fails(&[
        "generate",
        "--random-weights",
        missing.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(message.contains("absent.json"), "{message}");
    let no_unet = dir.path().join("no_unet.json");
    std::fs::write(&no_unet, r#"{"configs": {"text_encoder": {}, "vae": {}}}"#).unwrap();
    let message = fails(&[
        "generate",
        "--random-weights",
        no_unet.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(message.contains("no_unet.json"), "{message}");
    // Both a model and random weights: refused by the argument parser.
    let message = fails(&[
        "generate",
        "--random-weights",
        no_unet.to_str().unwrap(),
        "--model",
        tiny_model().to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(message.contains("--random-weights"), "{message}");
    assert!(!out.exists());
}
