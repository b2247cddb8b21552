//! Event-loop threads: one epoll each through `event-manager`. The VMM runs two: `event-loop`
//! for all device I/O (device queues, console input, host sockets of vsock and net) and
//! `control` for the control socket. One thread for all device I/O keeps pausing simple:
//! close the pause gate, wait for the device being served, and no device touches guest
//! memory. The control socket has its own thread so that a long request (a live snapshot
//! copies all of guest memory while the guest runs) never holds up device I/O.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::Subscriber;
use crate::seccomp::{self, ThreadKind};

/// Errors starting the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create the event loop")]
    Create(#[source] event_manager::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the event-loop thread")]
    Spawn(#[source] std::io::Error),
    #[error("the event-loop thread ended during start-up")]
    Died,
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// Ends the loop when its eventfd is written.
struct Stopper {
    evt: Arc<EventFd>,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stopper {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.evt.as_ref(), EventSet::IN)) {
            log::error!("cannot watch the event-loop stop eventfd: {e:?}");
        }
    }
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.evt.as_raw_fd() {
            let _ = self.evt.read();
            self.stop.store(true, Ordering::SeqCst);
        }
    }
}

/// A running event-loop thread.
pub struct EventLoop {
    thread: Option<JoinHandle<()>>,
    stop_evt: Arc<EventFd>,
}

impl EventLoop {
    /// Starts the thread `name` with `subscribers` registered (their `init` runs on that
    /// thread), then installs the seccomp filter allowing what `filter`'s thread kinds may
    /// call before the loop runs.
    pub fn start(
        name: &str,
        subscribers: Vec<Subscriber>,
        filter: &'static [ThreadKind],
    ) -> Result<Self, EventLoopError> {
        let stop_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::EventFd)?);
        let stop = Arc::new(AtomicBool::new(false));
        let stopper: Subscriber = Arc::new(Mutex::new(Stopper {
            evt: stop_evt.clone(),
            stop: stop.clone(),
        }));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut manager = match EventManager::<Subscriber>::new() {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = ready_tx.send(Err(EventLoopError::Create(e)));
                        return;
                    }
                };
                manager.add_subscriber(stopper);
                for s in subscribers {
                    manager.add_subscriber(s);
                }
                if let Err(e) = seccomp::apply_combined(filter) {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                while !stop.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        log::error!("event loop failed: {e:?}");
                        break;
                    }
                }
            })
            .map_err(EventLoopError::Spawn)?;
        ready_rx.recv().map_err(|_| EventLoopError::Died)??;
        Ok(Self {
            thread: Some(thread),
            stop_evt,
        })
    }

    /// Stops the loop and joins its thread.
    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop_evt.write(1) {
                log::error!("cannot stop the event loop: {e}");
                return;
            }
            if thread.join().is_err() {
                log::error!("event-loop thread panicked");
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}
