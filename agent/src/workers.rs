//! The agent's connection workers: threads started ahead of time that each serve one
//! connection at a time, so that starting a thread is not on the path of a connection.
//!
//! Under the emulated guest kernel of Grove's CI hosts, starting a thread (its stack
//! mapping, guard page, `clone`, first touches) takes of the order of 100 ms, which is what a
//! branch waited for before its agent read the first request. Now [`Workers::new`] starts
//! `spare` workers before the agent listens, they are in every snapshot of the guest, and a
//! connection is handed to a waiting one. A worker whose connection ends waits for the next
//! one, unless `spare` others already wait (then it ends). Only when every worker is busy is
//! a new one started for the connection, up to `max` at once; beyond that the connection is
//! dropped at once, as before: a host loop gone wrong must not exhaust the guest.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// What became of a connection given to [`Workers::dispatch`].
#[derive(Debug)]
pub enum Dispatch {
    /// A waiting worker takes it.
    Handed,
    /// Every worker was busy: a new one was started for it.
    Started,
    /// `max` connections are being served: it was dropped (closed).
    Refused,
    /// A worker could not be started: it was dropped (closed).
    Failed(io::Error),
}

/// The workers and their shared state.
pub struct Workers<S> {
    shared: Arc<Shared<S>>,
}

struct Shared<S> {
    state: Mutex<State<S>>,
    /// Signalled when a connection is queued for a waiting worker.
    queued: Condvar,
    serve: Box<dyn Fn(S) + Send + Sync>,
    max: usize,
    spare: usize,
}

struct State<S> {
    /// Connections handed over and not yet taken; never more than `waiting`.
    queue: VecDeque<S>,
    /// Workers waiting for a connection (including those about to take a queued one).
    waiting: usize,
    /// Workers alive.
    alive: usize,
    /// Workers ever started (for tests and diagnostics).
    started: usize,
}

impl<S> State<S> {
    /// Waiting workers no queued connection is meant for.
    fn free(&self) -> usize {
        self.waiting - self.queue.len()
    }
}

/// Counts of the workers, for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub alive: usize,
    pub waiting: usize,
    pub started: usize,
}

impl<S: Send + 'static> Workers<S> {
    /// Starts `spare` workers (at most `max`) that call `serve` on each connection
    /// dispatched to them. A worker that cannot be started is reported on stderr; the agent
    /// starts workers on demand then.
    pub fn new(max: usize, spare: usize, serve: impl Fn(S) + Send + Sync + 'static) -> Self {
        let workers = Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    waiting: 0,
                    alive: 0,
                    started: 0,
                }),
                queued: Condvar::new(),
                serve: Box::new(serve),
                max,
                spare: spare.min(max),
            }),
        };
        for _ in 0..workers.shared.spare {
            if let Err(e) = workers.start(None) {
                eprintln!("grove-agent: cannot start a connection worker: {e}");
            }
        }
        workers
    }

    /// Has `conn` served by a waiting worker, or a new one if none waits and fewer than
    /// `max` are alive; otherwise drops it.
    pub fn dispatch(&self, conn: S) -> Dispatch {
        let mut state = self.shared.lock();
        if state.free() > 0 {
            state.queue.push_back(conn);
            drop(state);
            self.shared.queued.notify_one();
            return Dispatch::Handed;
        }
        if state.alive >= self.shared.max {
            return Dispatch::Refused;
        }
        drop(state);
        match self.start(Some(conn)) {
            Ok(()) => Dispatch::Started,
            Err(e) => Dispatch::Failed(e),
        }
    }

    /// The current counts.
    pub fn counts(&self) -> Counts {
        let state = self.shared.lock();
        Counts {
            alive: state.alive,
            waiting: state.waiting,
            started: state.started,
        }
    }

    /// Starts a worker, serving `first` first if given.
    fn start(&self, first: Option<S>) -> io::Result<()> {
        {
            let mut state = self.shared.lock();
            state.alive += 1;
            state.started += 1;
        }
        let alive = Alive(Arc::clone(&self.shared));
        std::thread::Builder::new()
            .name("connection".to_owned())
            .spawn(move || alive.run(first))
            .map(drop)
        // On failure the closure, and with it `alive`, is dropped: the count is undone.
    }
}

impl<S> Shared<S> {
    fn lock(&self) -> MutexGuard<'_, State<S>> {
        // A worker that panicked while holding the lock left counts that are still right:
        // every change under the lock is a single step.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A worker's claim on the shared state: counts it as alive until dropped, also when its
/// thread unwinds.
struct Alive<S>(Arc<Shared<S>>);

impl<S> Alive<S> {
    /// Serves `first`, then connection after connection, until enough others wait.
    fn run(self, mut next: Option<S>) {
        let shared = &self.0;
        loop {
            if let Some(conn) = next.take() {
                (shared.serve)(conn);
            }
            let mut state = shared.lock();
            if state.free() >= shared.spare {
                // Unlocked before `self` is dropped, which takes the lock again.
                drop(state);
                return;
            }
            state.waiting += 1;
            let mut state = shared
                .queued
                .wait_while(state, |s| s.queue.is_empty())
                .unwrap_or_else(PoisonError::into_inner);
            next = state.queue.pop_front();
            state.waiting -= 1;
        }
    }
}

impl<S> Drop for Alive<S> {
    fn drop(&mut self) {
        self.0.lock().alive -= 1;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use super::*;

    /// A connection stand-in: the test decides when its serving ends.
    struct Conn {
        id: usize,
        release: mpsc::Receiver<()>,
    }

    /// Workers whose `serve` reports each connection's id and the serving thread's name, then
    /// waits until the test releases it.
    fn workers(max: usize, spare: usize) -> (Workers<Conn>, mpsc::Receiver<(usize, String)>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let workers = Workers::new(max, spare, move |conn: Conn| {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            let _ = tx.lock().expect("lock").send((conn.id, name));
            let _ = conn.release.recv();
        });
        (workers, rx)
    }

    fn conn(id: usize) -> (Conn, mpsc::Sender<()>) {
        let (tx, rx) = mpsc::channel();
        (Conn { id, release: rx }, tx)
    }

    /// Waits until `f` holds for the counts (the workers change them on their own threads).
    fn until(workers: &Workers<Conn>, f: impl Fn(Counts) -> bool) -> Counts {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let counts = workers.counts();
            if f(counts) {
                return counts;
            }
            assert!(Instant::now() < deadline, "stuck at {counts:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn prestarted_workers_take_connections_without_starting_threads() {
        let (workers, served) = workers(8, 2);
        until(&workers, |c| c.waiting == 2);
        let (a, release_a) = conn(1);
        let (b, release_b) = conn(2);
        assert!(matches!(workers.dispatch(a), Dispatch::Handed));
        assert!(matches!(workers.dispatch(b), Dispatch::Handed));
        let mut ids = [served.recv().expect("a").0, served.recv().expect("b").0];
        ids.sort_unstable();
        assert_eq!(ids, [1, 2]);
        assert_eq!(workers.counts().started, 2, "no thread started for them");

        // Both busy: a third connection gets a new worker, served at once.
        let (c, release_c) = conn(3);
        assert!(matches!(workers.dispatch(c), Dispatch::Started));
        assert_eq!(served.recv().expect("c"), (3, "connection".to_owned()));

        // Done: two go back to waiting, the third ends (two spares are enough), and the next
        // connection is handed over again.
        for release in [release_a, release_b, release_c] {
            release.send(()).expect("release");
        }
        let counts = until(&workers, |c| c.alive == 2 && c.waiting == 2);
        assert_eq!(counts.started, 3);
        let (d, release_d) = conn(4);
        assert!(matches!(workers.dispatch(d), Dispatch::Handed));
        assert_eq!(served.recv().expect("d").0, 4);
        release_d.send(()).expect("release");
        assert_eq!(until(&workers, |c| c.waiting == 2).started, 3);
    }

    #[test]
    fn at_most_max_connections_are_served_and_more_are_refused() {
        let (workers, served) = workers(3, 1);
        until(&workers, |c| c.waiting == 1);
        let mut releases = Vec::new();
        for id in 0..3 {
            let (c, release) = conn(id);
            assert!(!matches!(workers.dispatch(c), Dispatch::Refused));
            served.recv().expect("served");
            releases.push(release);
        }
        let (extra, _release) = conn(99);
        assert!(matches!(workers.dispatch(extra), Dispatch::Refused));
        assert_eq!(workers.counts().alive, 3);

        // A finished connection frees its worker for the next one.
        releases.pop().expect("one").send(()).expect("release");
        until(&workers, |c| c.waiting == 1);
        let (next, _release_next) = conn(100);
        assert!(matches!(workers.dispatch(next), Dispatch::Handed));
        assert_eq!(served.recv().expect("next").0, 100);
        assert_eq!(workers.counts().started, 3);
    }

    #[test]
    fn a_worker_that_panics_frees_its_place() {
        let workers = Workers::new(1, 1, |conn: Conn| {
            if conn.id == 0 {
                panic!("serving failed");
            }
        });
        until(&workers, |c| c.waiting == 1);
        let (bad, _release) = conn(0);
        assert!(matches!(workers.dispatch(bad), Dispatch::Handed));
        until(&workers, |c| c.alive == 0);
        let (good, _release) = conn(1);
        assert!(matches!(workers.dispatch(good), Dispatch::Started));
    }
}
