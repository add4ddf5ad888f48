//! Opt-in wall-clock accounting of the models' stages (`attend bench unet --profile`).
//!
//! Off by default: then [`measure`] costs one relaxed atomic load. When on, each measured stage
//! adds its elapsed time and call count under a label (for example `conv3x3 winograd 320->320
//! @32x32`). Stages are measured at the top of the layer that runs them and never nest, so the
//! labels' times add up (the rest of a call is everything unlabelled).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<String, StageTotal>> = Mutex::new(BTreeMap::new());

/// Time and calls accumulated under one label.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTotal {
    /// How many times the stage ran.
    pub calls: u64,
    /// Its summed wall time.
    pub elapsed: Duration,
}

/// Turns accounting on or off (it is process-wide).
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether accounting is on.
pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Runs `stage`, adding its wall time under the label made by `label` when accounting is on
/// (the label is only built then).
pub fn measure<T>(label: impl FnOnce() -> String, stage: impl FnOnce() -> T) -> T {
    if !is_enabled() {
        return stage();
    }
    let start = Instant::now();
    let result = stage();
    let elapsed = start.elapsed();
    let mut totals = TOTALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let total = totals.entry(label()).or_default();
    total.calls += 1;
    total.elapsed += elapsed;
    result
}

/// Takes the accumulated totals (label -> total), leaving none.
pub fn take_totals() -> BTreeMap<String, StageTotal> {
    std::mem::take(
        &mut *TOTALS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_only_when_enabled() {
        // The switch is process-wide: while it is on, other tests' layers running in parallel may
        // add their own labels, so only this test's labels are checked.
        take_totals();
        assert_eq!(measure(|| "profile test: off".to_string(), || 3), 3);
        assert!(!take_totals().contains_key("profile test: off"));
        set_enabled(true);
        for _ in 0..2 {
            measure(
                || "profile test: stage".to_string(),
                || std::thread::sleep(Duration::from_millis(2)),
            );
        }
        set_enabled(false);
        let totals = take_totals();
        let stage = totals["profile test: stage"];
        assert_eq!(stage.calls, 2);
        assert!(stage.elapsed >= Duration::from_millis(4));
        assert!(!take_totals().contains_key("profile test: stage"));
    }
}
