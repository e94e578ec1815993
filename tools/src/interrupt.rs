//! What lsmctl undoes when it is interrupted (SIGINT, SIGTERM, SIGHUP): the work trees of a
//! conversion, the sandbox of a trace bake. One signal thread per process: at the first signal
//! it runs every registered cleanup, the last registered first, then exits with 128 + the
//! signal. One thread rather than one per user, so that no user's cleanup is cut short by
//! another's exit.
//!
//! Concurrency: cleanups run on the signal thread while the rest of the process goes on; each
//! one synchronizes with the threads whose work it undoes (see its module). The main thread,
//! whose work a cleanup may have just pulled from under it, must not end the process first
//! (with its own exit status, or before a cleanup is done): `main` calls
//! [`wait_if_interrupted`] before it exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

/// Cleanups run at a signal, in registration order reversed.
static CLEANUPS: Mutex<Vec<fn(i32)>> = Mutex::new(Vec::new());
static THREAD: Once = Once::new();
/// A signal arrived: the signal thread is running the cleanups and will exit the process.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Once a signal arrived, never returns: the signal thread finishes the cleanups and exits
/// with 128 + the signal. Otherwise returns at once.
pub fn wait_if_interrupted() {
    while INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::park();
    }
}

/// Runs `cleanup(signal)` at the first SIGINT, SIGTERM or SIGHUP (once per registration; a
/// function registered twice runs once). `what` names the caller in the warning printed when
/// the signal handlers cannot be installed — then nothing is undone on a signal.
pub fn on_interrupt(what: &str, cleanup: fn(i32)) {
    {
        let mut c = CLEANUPS.lock().unwrap_or_else(|p| p.into_inner());
        if !c.contains(&cleanup) {
            c.push(cleanup);
        }
    }
    THREAD.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{what}: cannot install signal handlers ({e}); an interruption may leave work behind");
                return;
            }
        };
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                INTERRUPTED.store(true, Ordering::SeqCst);
                let cleanups = CLEANUPS.lock().unwrap_or_else(|p| p.into_inner()).clone();
                for c in cleanups.iter().rev() {
                    c(sig);
                }
                std::process::exit(128 + sig);
            }
        });
    });
}
