//! One writer per upper layer: an exclusive `flock` on the `lock` file in its directory, held
//! for as long as the layer is open for writing. Two writers would each append from their own
//! idea of the log's end and destroy each other's records; `flock` is released by the kernel
//! when the holder exits, even on `kill -9`, so a crashed daemon never leaves a stale lock and a
//! takeover by the next daemon succeeds exactly when the old one is gone.
//!
//! The holder writes who it is into the file (program name and pid) so that the refusal can
//! name it. Read-only opens take no lock and change nothing.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;

use rustix::fs::{flock, FlockOperation};

use crate::error::{Error, Result};

/// File name of the lock inside an upper layer directory.
pub const LOCK_FILE: &str = "lock";

/// The held lock; dropping it (closing the file) releases it.
#[derive(Debug)]
pub(crate) struct WriterLock {
    _file: File,
}

impl WriterLock {
    /// Takes the lock of the upper layer in `dir` without waiting; fails naming the holder.
    pub(crate) fn acquire(dir: &Path, layer: &str) -> Result<WriterLock> {
        let path = dir.join(LOCK_FILE);
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("{layer}/{LOCK_FILE}"), 0, e))?;
        match flock(&f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut holder = String::new();
                // Best effort: the holder may be rewriting it right now.
                let _ = f.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(Error::Locked {
                    layer: layer.to_string(),
                    holder: if holder.is_empty() {
                        "another process (it holds the lock file's flock)".into()
                    } else {
                        holder.to_string()
                    },
                });
            }
            Err(e) => {
                return Err(Error::io(
                    format!("{layer}/{LOCK_FILE}"),
                    0,
                    std::io::Error::from(e),
                ))
            }
        }
        let who = format!("{} (pid {})\n", program_name(), std::process::id());
        f.set_len(0)
            .and_then(|_| f.rewind())
            .and_then(|_| f.write_all(who.as_bytes()))
            .map_err(|e| Error::io(format!("{layer}/{LOCK_FILE}"), 0, e))?;
        Ok(WriterLock { _file: f })
    }
}

fn program_name() -> String {
    std::env::args()
        .next()
        .as_deref()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unknown program".into())
}
