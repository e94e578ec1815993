//! The pool lent to `blockfmt` for a read's parallel chunk loads ([`blockfmt::ParallelLoads`]):
//! the format crate starts no threads of its own.
//!
//! No deadlock: the caller is often a pool worker itself (a cold read), so it never just waits.
//! The tasks sit in a batch queue that the caller works through itself while helpers on the
//! pool take from it too; a task nobody else picked up is run by the caller, and the caller
//! only waits for tasks already running.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use blockfmt::LoadTask;
use parking_lot::{Condvar, Mutex};

use super::pool::{panic_message, WorkerPool};

/// [`blockfmt::ParallelLoads`] on a [`WorkerPool`].
pub struct PoolLoads(pub WorkerPool);

struct Batch {
    /// Tasks not started, and tasks not finished.
    state: Mutex<(VecDeque<LoadTask>, usize)>,
    done: Condvar,
}

impl Batch {
    /// Runs one task not yet started; false when none is left.
    fn run_one(&self) -> bool {
        let Some(task) = self.state.lock().0.pop_front() else {
            return false;
        };
        if let Err(p) = catch_unwind(AssertUnwindSafe(task)) {
            tracing::error!(
                panic = panic_message(&*p),
                "a chunk load panicked; the read reports its own error"
            );
        }
        let mut s = self.state.lock();
        s.1 -= 1;
        if s.1 == 0 {
            self.done.notify_all();
        }
        true
    }
}

impl blockfmt::ParallelLoads for PoolLoads {
    fn run_all(&self, tasks: Vec<LoadTask>) {
        let n = tasks.len();
        let batch = Arc::new(Batch {
            state: Mutex::new((tasks.into(), n)),
            done: Condvar::new(),
        });
        for _ in 1..n {
            let b = batch.clone();
            self.0.submit(move || {
                b.run_one();
            });
        }
        while batch.run_one() {}
        let mut s = batch.state.lock();
        while s.1 > 0 {
            batch.done.wait(&mut s);
        }
    }

    /// Queued on the pool; nobody waits for it (the pool contains a panic).
    fn spawn(&self, task: LoadTask) {
        self.0.submit(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockfmt::ParallelLoads;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every task runs before `run_all` returns, even when it is called from the pool's only
    /// worker (which then runs them all itself).
    #[test]
    fn runs_every_task_even_from_inside_a_busy_pool() {
        let pool = WorkerPool::new(1);
        let count = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let (p, c) = (pool.clone(), count.clone());
        pool.submit(move || {
            let tasks: Vec<LoadTask> = (0..16)
                .map(|_| {
                    let c = c.clone();
                    Box::new(move || {
                        c.fetch_add(1, Ordering::SeqCst);
                    }) as LoadTask
                })
                .collect();
            PoolLoads(p).run_all(tasks);
            let _ = tx.send(c.load(Ordering::SeqCst));
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(30));
        assert_eq!(got, Ok(16));
        assert_eq!(count.load(Ordering::SeqCst), 16);
    }
}
