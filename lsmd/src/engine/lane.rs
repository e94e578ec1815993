//! A lane: one client's share of the shared [`WorkerPool`] (an NBD connection, a ublk queue, a
//! FUSE mount).
//!
//! Invariants: at most `share` (all but one of the pool's workers) of a lane's tasks run at
//! once, the rest wait in the lane's own queue, so a client whose tasks block (a client that
//! stops reading its replies, a source that hangs) leaves a worker for every other lane; and a
//! lane holds at most `max_pending` tasks, after which [`Lane::submit`] waits (back-pressure on
//! a client that floods cold work). A task that panics still releases its place.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::pool::{panic_message, WorkerPool};

type Task = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct State {
    /// Not yet given to the pool (the lane has its share of workers busy).
    queued: VecDeque<Task>,
    /// Given to the pool: queued there or running.
    running: usize,
    /// `queued.len() + running`.
    total: usize,
}

struct Shared {
    state: Mutex<State>,
    done: Condvar,
    share: usize,
    max_pending: usize,
}

/// One client's lane; cloning shares it.
#[derive(Clone)]
pub struct Lane {
    pool: WorkerPool,
    shared: Arc<Shared>,
}

impl Lane {
    pub(super) fn new(pool: WorkerPool, max_pending: usize) -> Lane {
        let share = pool.threads().saturating_sub(1).max(1);
        Lane {
            pool,
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                done: Condvar::new(),
                share,
                max_pending: max_pending.max(1),
            }),
        }
    }

    /// Runs `task` on the pool, after this lane's earlier tasks have a worker; waits first
    /// while the lane already holds `max_pending` tasks.
    pub fn submit(&self, task: impl FnOnce() + Send + 'static) {
        let mut s = self.shared.state.lock();
        while s.total >= self.shared.max_pending {
            self.shared.done.wait(&mut s);
        }
        s.total += 1;
        if s.running < self.shared.share {
            s.running += 1;
            drop(s);
            start(&self.pool, self.shared.clone(), Box::new(task));
        } else {
            s.queued.push_back(Box::new(task));
        }
    }

    /// Tasks submitted and not yet finished.
    pub fn pending(&self) -> usize {
        self.shared.state.lock().total
    }

    /// Waits until every submitted task has finished.
    pub fn drain(&self) {
        let mut s = self.shared.state.lock();
        while s.total > 0 {
            self.shared.done.wait(&mut s);
        }
    }
}

/// Gives `task` to the pool; when it is done, the lane's next queued task follows.
fn start(pool: &WorkerPool, shared: Arc<Shared>, task: Task) {
    let next_pool = pool.clone();
    pool.submit(move || {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(task)) {
            tracing::error!(
                panic = panic_message(&*panic),
                "a request task panicked; the worker goes on"
            );
        }
        let next = {
            let mut s = shared.state.lock();
            s.total -= 1;
            let next = s.queued.pop_front();
            if next.is_none() {
                s.running -= 1;
            }
            next
        };
        shared.done.notify_all();
        if let Some(task) = next {
            start(&next_pool, shared, task);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    /// A lane whose tasks all block keeps its hands off the last worker: another lane's task
    /// still runs.
    #[test]
    fn a_blocked_lane_leaves_a_worker_for_the_others() {
        let pool = WorkerPool::new(3);
        let stuck = Lane::new(pool.clone(), 64);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        let started = Arc::new(AtomicUsize::new(0));
        for _ in 0..10 {
            let (rx, started) = (release_rx.clone(), started.clone());
            stuck.submit(move || {
                started.fetch_add(1, Ordering::SeqCst);
                let _ = rx.lock().map(|r| r.recv());
            });
        }
        let other = Lane::new(pool.clone(), 64);
        let (tx, rx) = mpsc::channel();
        other.submit(move || tx.send(1).unwrap_or(()));
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(1));
        assert!(started.load(Ordering::SeqCst) <= 2, "share is all but one");
        drop(release_tx);
        stuck.drain();
        assert_eq!(stuck.pending(), 0);
    }

    /// A panicking task frees its place in the lane.
    #[test]
    fn a_panicking_task_releases_its_place() {
        let lane = Lane::new(WorkerPool::new(1), 1);
        lane.submit(|| panic!("a bug in a task"));
        let (tx, rx) = mpsc::channel();
        lane.submit(move || tx.send(2).unwrap_or(()));
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(2));
        lane.drain();
    }
}
