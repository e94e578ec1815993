//! Progress for long work, on stderr: on a terminal a bar per job (bytes, rate, time left; jobs
//! running at once — a batch conversion — each get their own line); otherwise a percentage line
//! at each tenth, so a log file shows that work is moving. Silent with `--quiet`.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// All bars of this process, so concurrent jobs draw on separate lines.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// Reports progress of a job of known size.
pub struct Progress {
    what: String,
    total: u64,
    next_tenth: u64,
    start: Instant,
    quiet: bool,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A reporter for `what` over `total` bytes.
    pub fn new(what: impl Into<String>, total: u64, quiet: bool) -> Self {
        let what = what.into();
        let bar = (!quiet && total > 0 && std::io::stderr().is_terminal()).then(|| {
            let b = bars().add(ProgressBar::new(total));
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message(what.clone());
            b
        });
        Progress {
            what,
            total,
            next_tenth: 1,
            start: Instant::now(),
            quiet,
            bar,
        }
    }

    /// Reports that `done` bytes are done.
    pub fn update(&mut self, done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
            if done >= self.total {
                b.finish();
            }
            return;
        }
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
