//! Measures how long the UI takes to build each frame, for the p50/p99 numbers in the README.
//!
//! Set `ATTEND_FRAME_TIMES=path.csv` to log every frame's build time (milliseconds, one per line);
//! a summary is printed to stderr at exit.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Frame build times since the editor started.
#[derive(Debug, Default)]
pub struct FrameTimes {
    durations: Vec<Duration>,
    log_path: Option<PathBuf>,
    frame_started: Option<Instant>,
}

/// Percentiles of the frame build times.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrameTimeSummary {
    /// Frames measured.
    pub frames: usize,
    /// Median, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Slowest frame, milliseconds.
    pub max_ms: f64,
}

impl FrameTimes {
    /// Records frames; writes them to `log_path` on [`Self::finish`] when given.
    pub fn new(log_path: Option<PathBuf>) -> Self {
        Self {
            durations: Vec::new(),
            log_path,
            frame_started: None,
        }
    }

    /// Marks the start of a frame.
    pub fn begin_frame(&mut self) {
        self.frame_started = Some(Instant::now());
    }

    /// Marks the end of the frame begun last.
    pub fn end_frame(&mut self) {
        if let Some(started) = self.frame_started.take() {
            self.durations.push(started.elapsed());
        }
    }

    /// Percentiles so far, `None` before the first frame.
    pub fn summary(&self) -> Option<FrameTimeSummary> {
        if self.durations.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = self
            .durations
            .iter()
            .map(|duration| duration.as_secs_f64() * 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        let percentile = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
        Some(FrameTimeSummary {
            frames: ms.len(),
            p50_ms: percentile(0.5),
            p99_ms: percentile(0.99),
            max_ms: ms[ms.len() - 1],
        })
    }

    /// Writes the log (if asked for) and prints the summary to stderr.
    pub fn finish(&mut self) {
        let Some(path) = self.log_path.take() else {
            return;
        };
        let text: String = self
            .durations
            .iter()
            .map(|duration| format!("{:.3}\n", duration.as_secs_f64() * 1000.0))
            .collect();
        if let Err(error) = std::fs::write(&path, text) {
            eprintln!(
                "attend: cannot write frame times to {}: {error}",
                path.display()
            );
        }
        if let Some(summary) = self.summary() {
            eprintln!(
                "attend: {} frames, build time p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                summary.frames, summary.p50_ms, summary.p99_ms, summary.max_ms
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_sorted_times() {
        let mut times = FrameTimes::new(None);
        times.durations = (1..=100).map(Duration::from_millis).collect();
        let summary = times.summary().unwrap();
        assert_eq!(summary.frames, 100);
        assert!((summary.p50_ms - 51.0).abs() < 1e-6 || (summary.p50_ms - 50.0).abs() < 1e-6);
        assert!((summary.p99_ms - 99.0).abs() < 1e-6);
        assert!((summary.max_ms - 100.0).abs() < 1e-6);
    }
}
