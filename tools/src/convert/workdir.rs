//! Private, self-removing work trees for `convert`. An unpacked image holds whatever its layers
//! say: setuid binaries, device nodes, files with capabilities. Its tree is therefore created
//! mode 0700 (fresh: an existing path there is removed first and `mkdir` must create it, so no
//! one else's directory or symlink is ever used) and removed on every way out: return, error,
//! panic (by `Drop`), and SIGINT, SIGTERM or SIGHUP (by a signal thread).
//!
//! Concurrency: threads that add entries to a work tree call [`step`] around each change and
//! hold its guard (a shared lock) meanwhile. On a signal the signal thread marks the process as
//! stopping (new steps fail), takes the lock exclusively (so no entry is half-made or made after
//! the removal), kills child processes started with [`output`], removes every registered tree
//! and exits with 128 + the signal number. Steps never nest.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once, RwLock, RwLockReadGuard};

use crate::attach::PidFd;

/// Paths removed at a signal.
static TREES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Child processes killed at a signal, by pidfd (a reaped child's number may be reused).
static CHILDREN: Mutex<Vec<(u32, PidFd)>> = Mutex::new(Vec::new());
/// Shared by steps, exclusive for the signal thread.
static GATE: RwLock<()> = RwLock::new(());
static STOPPING: AtomicBool = AtomicBool::new(false);
static HANDLER: Once = Once::new();

fn lock<T>(m: &'static Mutex<T>) -> std::sync::MutexGuard<'static, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn install_handler() {
    HANDLER.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("convert: cannot install signal handlers ({e}); an interrupted conversion may leave its work tree");
                return;
            }
        };
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                STOPPING.store(true, Ordering::SeqCst);
                let _gate = GATE.write().unwrap_or_else(|p| p.into_inner());
                for (_, child) in lock(&CHILDREN).iter() {
                    let _ = child.signal(libc::SIGKILL);
                }
                for t in lock(&TREES).iter() {
                    remove(t);
                }
                eprintln!("convert: interrupted by signal {sig}; work trees removed");
                std::process::exit(128 + sig);
            }
        });
    });
}

fn remove(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// A path removed when this value drops or the process gets SIGINT/SIGTERM/SIGHUP.
pub struct WorkTree {
    path: PathBuf,
}

impl WorkTree {
    /// Creates `path` afresh, mode 0700 (anything already there is removed first).
    pub fn create(path: &Path) -> io::Result<WorkTree> {
        let tree = WorkTree::adopt(path);
        remove(path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let m = std::fs::symlink_metadata(path)?;
        if !m.is_dir() || m.mode() & 0o077 != 0 || m.uid() != unsafe_geteuid() {
            return Err(io::Error::other(format!(
                "{}: the work directory is not private (mode {:o})",
                path.display(),
                m.mode() & 0o7777
            )));
        }
        Ok(tree)
    }

    /// Takes charge of removing `path` (which the caller creates, or which may exist).
    pub fn adopt(path: &Path) -> WorkTree {
        install_handler();
        lock(&TREES).push(path.to_path_buf());
        WorkTree {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkTree {
    fn drop(&mut self) {
        let _gate = step();
        remove(&self.path);
        lock(&TREES).retain(|p| p != &self.path);
    }
}

/// A part of a work tree being removed on another thread, so that the removal (slow on a disk
/// mounted with `discard`: each freed extent is trimmed) overlaps work that no longer needs it.
pub struct Removal(std::thread::JoinHandle<()>);

impl Removal {
    /// Starts removing `path` (inside a [`WorkTree`], which still removes whatever is left,
    /// and at a signal everything).
    pub fn start(path: &Path) -> Removal {
        let p = path.to_path_buf();
        Removal(std::thread::spawn(move || remove(&p)))
    }

    /// Waits until the removal is done.
    pub fn wait(self) {
        let _ = self.0.join();
    }
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Permission to change a work tree until the guard drops; fails once a signal is stopping
/// the process.
pub fn step() -> io::Result<RwLockReadGuard<'static, ()>> {
    if STOPPING.load(Ordering::SeqCst) {
        return Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "conversion interrupted",
        ));
    }
    Ok(GATE.read().unwrap_or_else(|p| p.into_inner()))
}

/// `cmd.output()`, with the child killed if a signal stops the process meanwhile.
pub fn output(cmd: &mut Command) -> io::Result<Output> {
    let child = {
        let _gate = step()?;
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if let Ok(Some(pidfd)) = PidFd::open(child.id()) {
            lock(&CHILDREN).push((child.id(), pidfd));
        }
        child
    };
    let id = child.id();
    let out = child.wait_with_output();
    lock(&CHILDREN).retain(|(p, _)| *p != id);
    out
}
