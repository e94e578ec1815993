//! Progress for long work, on stderr: a percentage line at each tenth, so a terminal and a log
//! file both show that work is moving. Silent with `--quiet`.

use std::time::Instant;

/// Reports progress of a job of known size.
pub struct Progress {
    what: String,
    total: u64,
    next_tenth: u64,
    start: Instant,
    quiet: bool,
}

impl Progress {
    /// A reporter for `what` over `total` bytes.
    pub fn new(what: impl Into<String>, total: u64, quiet: bool) -> Self {
        Progress {
            what: what.into(),
            total,
            next_tenth: 1,
            start: Instant::now(),
            quiet,
        }
    }

    /// Reports that `done` bytes are done.
    pub fn update(&mut self, done: u64) {
        if self.quiet || self.total == 0 {
            return;
        }
        while self.next_tenth <= 10 && done * 10 >= self.total * self.next_tenth {
            let secs = self.start.elapsed().as_secs_f64().max(1e-6);
            eprintln!(
                "{}: {:>3}% ({} MiB, {:.0} MiB/s)",
                self.what,
                self.next_tenth * 10,
                done >> 20,
                done as f64 / secs / (1 << 20) as f64
            );
            self.next_tenth += 1;
        }
    }
}
