//! Per-stage wall-clock times of a conversion, printed on stderr when `LSM_CONVERT_TIMING=1`
//! (for `benches/convert.sh` and for finding where the seconds go; README Benchmarks). Off, a
//! stage costs one `Instant::now()`; the output never depends on it.

use std::sync::OnceLock;
use std::time::Instant;

/// Whether `LSM_CONVERT_TIMING=1` is set (read once).
fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("LSM_CONVERT_TIMING").is_some_and(|v| v == "1"))
}

/// One timed stage: prints `convert timing: NAME S s` when dropped (if enabled).
pub struct Stage {
    name: String,
    start: Instant,
}

/// Starts timing `name` (built only when timing is on).
pub fn stage(name: impl FnOnce() -> String) -> Stage {
    Stage {
        name: if enabled() { name() } else { String::new() },
        start: Instant::now(),
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        if enabled() {
            eprintln!(
                "convert timing: {} {:.3} s",
                self.name,
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

/// Prints `convert timing: WHAT` (if enabled): an event between stages.
pub fn note(what: impl FnOnce() -> String) {
    if enabled() {
        eprintln!("convert timing: {}", what());
    }
}
