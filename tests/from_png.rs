//! `attend generate` with prompt syntax and `--from-png`: an image made from a weighted prompt with a
//! swap carries its settings, and `--from-png` regenerates it byte for byte; bad PNGs and prompts
//! fail with messages naming the file or the column.

// Test helpers outside `#[test]` functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use attend::analysis::png_parameters::read_png_parameters;

/// Runs `attend` with `args`; returns (success, stderr).
fn attend(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_attend"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn from_png_regenerates_a_weighted_swapped_prompt() {
    let folder = tempfile::tempdir().unwrap();
    let first = folder.path().join("first.png");
    let prompt = "a (red:1.4) circle and a [blue square:green star:0.5]";
    let (ok, stderr) = attend(&[
        "generate",
        "--prompt",
        prompt,
        "--steps",
        "3",
        "--seed",
        "11",
        "--guidance",
        "5",
        "--negative-prompt",
        "blurry",
        "--out",
        path_str(&first),
        "-q",
    ]);
    assert!(ok, "{stderr}");
    let parameters = read_png_parameters(&first).unwrap().unwrap();
    assert_eq!(parameters.prompt, prompt);
    assert_eq!(parameters.negative_prompt, "blurry");
    assert_eq!(parameters.steps, Some(3));
    assert_eq!(parameters.seed, Some(11));
    assert_eq!(parameters.cfg_scale, Some(5.0));
    assert_eq!(parameters.size_px, Some((64, 64)));

    let second = folder.path().join("second.png");
    let (ok, stderr) = attend(&[
        "generate",
        "--from-png",
        path_str(&first),
        "--out",
        path_str(&second),
        "-q",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        std::fs::read(&first).unwrap(),
        std::fs::read(&second).unwrap()
    );

    // A flag set away from its default overrides the PNG's value.
    let third = folder.path().join("third.png");
    let (ok, stderr) = attend(&[
        "generate",
        "--from-png",
        path_str(&first),
        "--seed",
        "12",
        "--out",
        path_str(&third),
        "-q",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(read_png_parameters(&third).unwrap().unwrap().seed, Some(12));
}

#[test]
fn bad_pngs_and_prompts_are_named() {
    let folder = tempfile::tempdir().unwrap();
    let not_png = folder.path().join("notes.png");
    std::fs::write(&not_png, "not a png").unwrap();
    let (ok, stderr) = attend(&["generate", "--from-png", path_str(&not_png)]);
    assert!(!ok);
    assert!(
        stderr.contains("notes.png") && stderr.contains("not a readable PNG"),
        "{stderr}"
    );

    let bare = folder.path().join("bare.png");
    attend::analysis::export::write_png_rgb(&bare, 1, 1, &[0, 0, 0], None).unwrap();
    let (ok, stderr) = attend(&["generate", "--from-png", path_str(&bare)]);
    assert!(!ok);
    assert!(
        stderr.contains("bare.png") && stderr.contains("no `parameters`"),
        "{stderr}"
    );

    let (ok, stderr) = attend(&["generate", "--prompt", "a (red circle", "--steps", "1"]);
    assert!(!ok);
    assert!(stderr.contains("unclosed `(` at column 3"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let (ok, stderr) = attend(&["generate", "--steps", "1"]);
    assert!(!ok);
    assert!(
        stderr.contains("--prompt") || stderr.contains("--from-png"),
        "{stderr}"
    );
}
