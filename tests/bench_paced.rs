//! `attend bench unet --paced`, the side of the call-by-call comparison with diffusers
//! (`scripts/bench_unet_paced.py`) that attend runs: `ready` after the warm-up call, then one timed
//! call per line of standard input, each call's seconds on a line of its own.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};

fn paced_bench() -> std::process::Child {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1");
    Command::new(env!("CARGO_BIN_EXE_attend"))
        .args(["bench", "unet", "--model", model.to_str().unwrap()])
        .args(["--width", "64", "--height", "64", "--iters", "3", "--paced"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn each_line_runs_one_timed_call_and_closing_ends_early() {
    let mut bench = paced_bench();
    let mut stdin = bench.stdin.take().unwrap();
    let mut stdout = BufReader::new(bench.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    // A call answers only after its line: the driver decides when each one runs.
    for _ in 0..2 {
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
        line.clear();
        stdout.read_line(&mut line).unwrap();
        let seconds: f64 = line.trim().parse().unwrap();
        assert!(seconds > 0.0 && seconds < 60.0, "{line}");
    }
    // Two of the three calls, then standard input closes: the summary counts the two.
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(bench.wait().unwrap().success());
    assert!(rest.contains("over 2 calls"), "{rest}");
}

#[test]
fn closed_input_before_any_call_is_an_error() {
    let mut bench = paced_bench();
    drop(bench.stdin.take());
    let output = bench.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("standard input closed before the first timed call"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
