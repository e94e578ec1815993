//! A fixed set of threads shared by every connection of every frontend, for the work that may
//! block (decoding a cold chunk, a fetch from a slow source, fsync). Hot work never comes here:
//! frontends do it on their own thread, which saves a thread hand-off per request.
//!
//! A task that panics is contained: the worker logs it and takes the next task. Whoever
//! submitted the task answers its request itself (the NBD frontend replies EIO, see
//! `nbd::transmission`); the pool only guarantees that no panic costs a thread.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

type Task = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct Queue {
    tasks: VecDeque<Task>,
    closed: bool,
}

type Shared = (Mutex<Queue>, Condvar);

/// Closes the queue when the last [`WorkerPool`] handle goes; workers finish what is queued
/// and exit.
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        let (q, cv) = &*self.0;
        q.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        cv.notify_all();
    }
}

/// The pool; cloning shares it. Threads live as long as the last clone.
#[derive(Clone)]
pub struct WorkerPool {
    handle: Arc<Handle>,
    threads: usize,
}

impl WorkerPool {
    /// Starts `threads` workers (at least one).
    pub fn new(threads: usize) -> WorkerPool {
        let shared: Arc<Shared> = Arc::new((Mutex::new(Queue::default()), Condvar::new()));
        for i in 0..threads.max(1) {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("lsmd-worker-{i}"))
                .spawn(move || worker(&s));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a worker thread");
            }
        }
        WorkerPool {
            handle: Arc::new(Handle(shared)),
            threads: threads.max(1),
        }
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Queues `task`; some worker runs it soon.
    pub fn submit(&self, task: impl FnOnce() + Send + 'static) {
        let (q, cv) = &*self.handle.0;
        let mut q = q.lock().unwrap_or_else(|p| p.into_inner());
        q.tasks.push_back(Box::new(task));
        drop(q);
        cv.notify_one();
    }
}

fn worker(shared: &Shared) {
    let (q, cv) = shared;
    loop {
        let task = {
            let mut g = q.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(t) = g.tasks.pop_front() {
                    break t;
                }
                if g.closed {
                    return;
                }
                g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        };
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(task)) {
            tracing::error!(
                panic = panic_message(&*panic),
                "a worker task panicked; the worker goes on"
            );
        }
    }
}

/// The message of a panic payload (`panic!` with a literal or a formatted string).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn runs_every_task_and_stops_with_the_last_handle() {
        let pool = WorkerPool::new(3);
        let (tx, rx) = mpsc::channel();
        for i in 0..100 {
            let tx = tx.clone();
            pool.clone().submit(move || tx.send(i).unwrap_or(()));
        }
        drop(tx);
        let mut got: Vec<i32> = (0..100).map(|_| rx.recv().unwrap_or(-1)).collect();
        got.sort();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        drop(pool);
    }

    #[test]
    fn a_panicking_task_leaves_the_worker_alive() {
        let pool = WorkerPool::new(1);
        let (tx, rx) = mpsc::channel();
        pool.submit(|| panic!("a bug in a task"));
        pool.submit(move || tx.send(7).unwrap_or(()));
        let got = rx.recv_timeout(std::time::Duration::from_secs(30));
        assert_eq!(got, Ok(7), "the only worker must survive the panic");
    }
}
