//! The device-type-independent half of a virtio device: feature bits, queue eventfds, the
//! activation hand-off from the vCPU thread to the event loop, and queue draining.
//!
//! Activation happens on a vCPU thread (the transport calls `VirtioDevice::activate` when the
//! driver writes DRIVER_OK), but the queue eventfds must be added to the event loop's epoll set,
//! which only the event-loop thread can do through its `EventOps`. [`DeviceState`] therefore
//! stores the queues and writes `activate_evt`; when the event loop sees it, it (un)registers
//! the queue eventfds so that the watch list always matches the activation state. A reset goes
//! through the same eventfd, so queue events left over from a previous activation are removed
//! instead of being processed against queues that no longer exist.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use log::{debug, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, ActivateError, IrqTrigger, INT_VRING, VIRTIO_RING_F_EVENT_IDX};
use crate::vstate::memory::GuestMemoryMmap;

/// Descriptor chains processed per wake-up before the queue yields the event loop to other
/// devices. A driver that keeps refilling its queue cannot starve everything else: the device
/// re-signals its own queue eventfd and resumes on the next event-loop iteration.
pub const MAX_CHAINS_PER_WAKEUP: usize = 1024;

/// A guest descriptor chain over the VMM's guest memory.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// What an activated device owns: its guest memory, its queues and its interrupt line.
pub struct Activated {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<IrqTrigger>,
}

/// Shared by every virtio device of a VM: while closed, queue notifications are consumed but
/// not served, so no device touches guest memory while the VM is paused (a paused restore
/// stays byte-identical to its snapshot). Opening it again kicks every queue (the runtime
/// writes each queue eventfd), which serves whatever was deferred. It starts closed: boot and
/// restore open it with their first resume.
#[derive(Clone, Debug)]
pub struct PauseGate(Arc<AtomicBool>);

impl Default for PauseGate {
    fn default() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }
}

impl PauseGate {
    pub fn is_closed(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub fn set_closed(&self, closed: bool) {
        self.0.store(closed, Ordering::Release);
    }
}

/// What the event loop should do after [`DeviceState::handle_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeup {
    /// Nothing to process (stale or spurious event).
    Nothing,
    /// The device was just activated: process every queue, requests may already be pending.
    AllQueues,
    /// The driver notified this queue.
    Queue(usize),
}

/// Features, queue eventfds and activation state shared by every virtio device type.
pub struct DeviceState {
    avail_features: u64,
    acked_features: u64,
    queue_max_sizes: Vec<u16>,
    queue_evts: Vec<EventFd>,
    activate_evt: EventFd,
    active: Option<Activated>,
    /// Whether the queue eventfds are currently in the event loop's watch list.
    queues_registered: bool,
    gate: PauseGate,
}

impl DeviceState {
    /// A device offering `avail_features`, with one queue per entry of `queue_max_sizes`.
    pub fn new(avail_features: u64, queue_max_sizes: &[u16]) -> io::Result<Self> {
        let queue_evts = queue_max_sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            avail_features,
            acked_features: 0,
            queue_max_sizes: queue_max_sizes.to_vec(),
            queue_evts,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            active: None,
            queues_registered: false,
            // Open until the device manager hands the VM's gate over, so a device used on
            // its own (tests) serves requests.
            gate: PauseGate(Arc::new(AtomicBool::new(false))),
        })
    }

    /// Joins the VM's pause gate.
    pub fn set_pause_gate(&mut self, gate: PauseGate) {
        self.gate = gate;
    }

    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Records the driver's features, dropping any bit that was never offered.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The eventfd the event loop watches for activation and reset.
    pub fn activate_event(&self) -> &EventFd {
        &self.activate_evt
    }

    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// The queues handed over at activation, as the device has advanced them; empty when
    /// not activated.
    pub fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| a.queues.as_slice())
    }

    /// The activated device's memory, queues and interrupt, for a device that takes a chain
    /// only when it has something to put in it (vsock's receive and event queues) instead of
    /// serving every available chain as [`process_queue`](Self::process_queue) does.
    pub fn active_mut(&mut self) -> Option<&mut Activated> {
        self.active.as_mut()
    }

    /// Stores the queues and wakes the event loop. Runs on a vCPU thread: never blocks.
    pub fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if ctx.queues.len() != self.queue_max_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_max_sizes.len(),
                got: ctx.queues.len(),
            });
        }
        let ActivateContext {
            mem,
            mut queues,
            interrupt,
        } = ctx;
        // Notification suppression is a ring feature: every queue follows the negotiation.
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for queue in &mut queues {
            queue.set_event_idx(event_idx);
        }
        self.activate_evt.write(1).map_err(ActivateError::Signal)?;
        self.active = Some(Activated {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    /// Drops the queues and the negotiated features; the event loop unregisters the queue
    /// eventfds when it sees `activate_evt`.
    pub fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        if let Err(e) = self.activate_evt.write(1) {
            // The stale queue events are still harmless: handle_event ignores them.
            warn!("virtio device reset: cannot signal the event loop: {e}");
        }
    }

    /// Processes the available chains of queue `index`, if the device is active: `handle`
    /// serves one chain and returns the number of bytes it wrote into guest memory (the used
    /// length). Raises INT_VRING when the driver asked to be notified.
    ///
    /// At most [`MAX_CHAINS_PER_WAKEUP`] chains are served per call; the queue then re-signals
    /// its own eventfd. A ring the device cannot trust (available index more than a queue size
    /// ahead) disables the queue until the driver resets the device, instead of being retried
    /// on every notification.
    pub fn process_queue<F>(&mut self, index: usize, handle: F)
    where
        F: FnMut(&GuestMemoryMmap, Chain<'_>) -> u32,
    {
        let Self {
            active, queue_evts, ..
        } = self;
        if let (Some(active), Some(kick)) = (active.as_mut(), queue_evts.get(index)) {
            drain_queue(active, index, kick, handle);
        }
    }

    /// Runs `f` on queue `index` of an activated device, with guest memory and the interrupt
    /// line; `None` when the device is not activated or has no such queue. For queues whose
    /// work is not one chain per notification (a receive queue is filled when data arrives,
    /// and a chain may have to wait for it), where [`Self::process_queue`] does not fit.
    pub fn with_queue<R>(
        &mut self,
        index: usize,
        f: impl FnOnce(&GuestMemoryMmap, &mut Queue, &IrqTrigger) -> R,
    ) -> Option<R> {
        let active = self.active.as_mut()?;
        let queue = active.queues.get_mut(index)?;
        Some(f(&active.mem, queue, &active.interrupt))
    }

    /// `MutEventSubscriber::init`: watch the activation eventfd.
    pub fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            warn!("virtio device: cannot register the activation eventfd: {e}");
        }
    }

    /// `MutEventSubscriber::process`: consumes the eventfd that fired, keeps the watch list in
    /// step with the activation state and says which queues need processing.
    pub fn handle_event(&mut self, events: &Events, ops: &mut EventOps) -> Wakeup {
        let wakeup = self.consume_event(events, ops);
        if wakeup != Wakeup::Nothing && self.gate.is_closed() {
            // The VM is paused: resume kicks every queue, which serves this then.
            return Wakeup::Nothing;
        }
        wakeup
    }

    fn consume_event(&mut self, events: &Events, ops: &mut EventOps) -> Wakeup {
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            // EAGAIN only means another wake-up already consumed the count.
            let _ = self.activate_evt.read();
            self.sync_registration(ops);
            return if self.active.is_some() {
                Wakeup::AllQueues
            } else {
                Wakeup::Nothing
            };
        }
        let Some(index) = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) else {
            debug!("virtio device: event on unknown fd {fd}");
            return Wakeup::Nothing;
        };
        // Read even when inactive: the eventfd is level-triggered in epoll.
        let _ = self.queue_evts[index].read();
        if self.active.is_some() {
            Wakeup::Queue(index)
        } else {
            // A notification that raced with a reset: drop the stale registration.
            self.sync_registration(ops);
            Wakeup::Nothing
        }
    }

    fn sync_registration(&mut self, ops: &mut EventOps) {
        let want = self.active.is_some();
        if want == self.queues_registered {
            return;
        }
        for evt in &self.queue_evts {
            let result = if want {
                ops.add(Events::new(evt, EventSet::IN))
            } else {
                ops.remove(Events::new(evt, EventSet::IN))
            };
            if let Err(e) = result {
                warn!("virtio device: cannot update the queue eventfd registration: {e}");
            }
        }
        self.queues_registered = want;
    }
}

/// Drains queue `index` of an activated device; see [`DeviceState::process_queue`].
fn drain_queue<F>(active: &mut Activated, index: usize, kick: &EventFd, mut handle: F)
where
    F: FnMut(&GuestMemoryMmap, Chain<'_>) -> u32,
{
    let Activated {
        mem,
        queues,
        interrupt,
    } = active;
    let Some(queue) = queues.get_mut(index) else {
        return;
    };
    if !queue.ready() {
        return;
    }
    let mem: &GuestMemoryMmap = mem;
    let mut budget = MAX_CHAINS_PER_WAKEUP;
    let mut used_any = false;
    // Whether the last check said more chains were available.
    let mut more_expected = false;
    'ring: loop {
        if let Err(e) = queue.disable_notification(mem) {
            debug!("virtio queue {index}: cannot disable notifications: {e}");
        }
        let mut taken = 0usize;
        loop {
            if budget == 0 {
                // Notifications stay disabled: our own kick brings us back.
                if let Err(e) = kick.write(1) {
                    warn!("virtio queue {index}: cannot re-signal the queue: {e}");
                }
                break 'ring;
            }
            let chain = match queue.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    stop_queue(
                        queue,
                        interrupt,
                        format_args!("virtio queue {index}: unusable ring ({e})"),
                    );
                    break 'ring;
                }
            };
            let Some(chain) = chain else { break };
            if let Some(fault) = chain_fault(&chain) {
                stop_queue(
                    queue,
                    interrupt,
                    format_args!("virtio queue {index}: {fault}"),
                );
                break 'ring;
            }
            budget -= 1;
            taken += 1;
            let head = chain.head_index();
            let len = handle(mem, chain);
            match queue.add_used(mem, head, len) {
                Ok(()) => used_any = true,
                Err(e) => debug!("virtio queue {index}: cannot return chain {head}: {e}"),
            }
        }
        if more_expected && taken == 0 {
            // The available index said there was more, yet no chain could be taken: it moved
            // back or its ring cannot be read. A driver only ever advances it, so the rings
            // overlap or lie; re-checking would spin forever (our own flag writes can flip it).
            stop_queue(
                queue,
                interrupt,
                format_args!("virtio queue {index}: available index inconsistent"),
            );
            break;
        }
        match queue.enable_notification(mem) {
            Ok(true) => {
                more_expected = true;
                continue;
            }
            Ok(false) => break,
            Err(e) => {
                debug!("virtio queue {index}: cannot enable notifications: {e}");
                break;
            }
        }
    }
    if used_any {
        // If the driver's used_event cannot be read, notifying is the safe default.
        let notify = queue.needs_notification(mem).unwrap_or(true);
        if notify {
            if let Err(e) = interrupt.trigger(INT_VRING) {
                warn!("virtio queue {index}: cannot inject the interrupt: {e}");
            }
        }
    }
}

/// Ring-level corruption: the device stops serving `queue` and sets DEVICE_NEEDS_RESET until
/// the driver resets it (docs/hostile-guests.md). Retrying a ring the device cannot trust
/// would only spin or serve garbage. `what` names the queue and the fault for the
/// (rate-limited) log line.
pub(crate) fn stop_queue(queue: &mut Queue, interrupt: &IrqTrigger, what: std::fmt::Arguments) {
    interrupt.guest_warn(format_args!(
        "{what}; queue stopped, DEVICE_NEEDS_RESET until the driver resets the device"
    ));
    queue.set_ready(false);
    interrupt.set_needs_reset();
}

/// Why a descriptor chain cannot be a request, if it is broken at the ring level: virtio-queue
/// ends the iteration early, without an error, at a `next` index outside the queue, after
/// as many descriptors as the queue has (a loop, or a chain longer than the queue), at a
/// descriptor it cannot read, and past 4 GiB of buffers. The last descriptor then still has
/// NEXT set, or there is no descriptor at all.
fn chain_fault(chain: &Chain<'_>) -> Option<&'static str> {
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in chain.clone() {
        count += 1;
        last_has_next = desc.has_next();
    }
    if count == 0 {
        Some("descriptor chain head out of range or unreadable")
    } else if last_has_next {
        Some("descriptor chain loops, outgrows the queue, leaves it or exceeds 4 GiB")
    } else {
        None
    }
}

/// Saved acked features that include bits the device never offered: the driver cannot have
/// accepted them, so the state is corrupt or belongs to another device version.
#[derive(Debug, thiserror::Error)]
#[error("saved acked features {acked:#x} include bits {unoffered:#x} the device does not offer")]
pub struct FeaturesError {
    pub acked: u64,
    pub unoffered: u64,
}

/// Checks saved acked features against the features a device offers.
pub fn check_acked_features(offered: u64, acked: u64) -> Result<(), FeaturesError> {
    match acked & !offered {
        0 => Ok(()),
        unoffered => Err(FeaturesError { acked, unoffered }),
    }
}

/// Copies the bytes of `config` at `offset` into `data`; bytes past the end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn corrupt_ring_disables_the_queue_without_panicking() {
        use crate::devices::virtio::test_utils::{activate_ctx, desc, guest_mem, Driver};
        use vm_memory::{Bytes, GuestAddress};

        let mem = guest_mem();
        let mut drv = Driver::new(&mem, 16);
        drv.add_chain(&[desc(0x1_0000, 16, true)]);
        let mut s = DeviceState::new(0, &[16]).unwrap();
        let (ctx, irq) = activate_ctx(&mem, drv.queue());
        s.activate(ctx).unwrap();
        // avail.idx 100 entries ahead of a 16-entry ring.
        mem.write_obj(100u16, GuestAddress(drv.vq.avail_addr().0 + 2))
            .unwrap();
        let mut served = 0;
        s.process_queue(0, |_, _| {
            served += 1;
            0
        });
        assert_eq!(served, 0);
        // The driver hears about it: DEVICE_NEEDS_RESET and a config interrupt only.
        assert!(irq.needs_reset());
        assert_eq!(irq.status(), crate::devices::virtio::INT_CONFIG);
        // Disabled until reset: a fixed ring is not looked at again.
        mem.write_obj(1u16, GuestAddress(drv.vq.avail_addr().0 + 2))
            .unwrap();
        s.process_queue(0, |_, _| {
            served += 1;
            0
        });
        assert_eq!(served, 0);
        s.process_queue(7, |_, _| unreachable!("no such queue"));
    }

    #[test]
    fn rings_whose_flags_move_the_available_index_do_not_spin() {
        // Found by the virtio_queue fuzz target: the used ring's flags field is the available
        // ring's index, so every enable/disable of notifications rewrote the index and the
        // drain loop re-checked forever without taking a chain.
        use crate::devices::virtio::test_utils::{activate_ctx, desc, guest_mem};
        use virtio_queue::QueueT;
        use vm_memory::{Bytes, GuestAddress};

        let mem = guest_mem();
        let (avail, used) = (0x1002u64, 0x1004u64);
        let mut queue = Queue::new(16).unwrap();
        queue.try_set_size(1).unwrap();
        queue.try_set_desc_table_address(GuestAddress(0)).unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(avail))
            .unwrap();
        queue.try_set_used_ring_address(GuestAddress(used)).unwrap();
        queue.set_ready(true);
        assert!(queue.is_valid(&mem));
        mem.write_obj(desc(0x2000, 16, true), GuestAddress(0))
            .unwrap();
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap(); // avail.idx
        mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap(); // avail.ring[0]

        let mut s = DeviceState::new(0, &[16]).unwrap();
        let (ctx, _irq) = activate_ctx(&mem, queue);
        s.activate(ctx).unwrap();
        let mut served = 0;
        s.process_queue(0, |_, _| {
            served += 1;
            0
        });
        assert_eq!(served, 1, "the one real chain is served");
        assert!(!s.queues()[0].ready(), "the inconsistent queue is disabled");
    }

    #[test]
    fn broken_chains_stop_the_queue_with_needs_reset() {
        use crate::devices::virtio::test_utils::{activate_ctx, desc, guest_mem, Driver};
        use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};

        let next = |addr: u64, to: u16| {
            RawDescriptor::from(SplitDescriptor::new(addr, 16, VRING_DESC_F_NEXT as u16, to))
        };
        // (what, descriptors 0.. of the table; the chain starts at 0)
        let cases: [(&str, Vec<RawDescriptor>); 3] = [
            // 0 -> 1 -> 0 -> ...
            ("loop", vec![next(0x1_0000, 1), next(0x1_1000, 0)]),
            // 0 -> 1 -> ... -> 15 -> 0: more descriptors than the queue has.
            (
                "longer than the queue",
                (0..16u16).map(|i| next(0x1_0000, (i + 1) % 16)).collect(),
            ),
            ("next out of range", vec![next(0x1_0000, 200)]),
        ];
        for (what, descs) in cases {
            let mem = guest_mem();
            let mut drv = Driver::new(&mem, 16);
            drv.add_raw_chain(&descs);
            if descs.len() < 16 {
                // A good chain behind the broken one is not served either.
                drv.add_chain(&[desc(0x2_0000, 16, true)]);
            }
            let mut s = DeviceState::new(0, &[16]).unwrap();
            let (ctx, irq) = activate_ctx(&mem, drv.queue());
            s.activate(ctx).unwrap();
            let mut served = 0;
            s.process_queue(0, |_, _| {
                served += 1;
                0
            });
            assert_eq!(served, 0, "{what}");
            assert!(irq.needs_reset(), "{what}");
            assert!(!s.queues()[0].ready(), "{what}");
            assert_eq!(drv.used_idx(), 0, "{what}");
            // Reset (as the transport does it) clears the request.
            s.reset();
            irq.reset();
            assert!(!irq.needs_reset(), "{what}");
        }
    }

    #[test]
    fn a_well_formed_chain_is_served() {
        use crate::devices::virtio::test_utils::{activate_ctx, desc, guest_mem, Driver};
        let mem = guest_mem();
        let mut drv = Driver::new(&mem, 8);
        drv.add_chain(&[desc(0x1_0000, 16, false), desc(0x1_1000, 1, true)]);
        let mut s = DeviceState::new(0, &[8]).unwrap();
        let (ctx, irq) = activate_ctx(&mem, drv.queue());
        s.activate(ctx).unwrap();
        let mut served = 0;
        s.process_queue(0, |_, _| {
            served += 1;
            1
        });
        assert_eq!(served, 1);
        assert!(!irq.needs_reset());
        assert_eq!(drv.used(0), (0, 1));
    }

    #[test]
    fn acked_features_are_masked() {
        let mut s = DeviceState::new(0b1010, &[16]).unwrap();
        s.set_acked_features(0b1111);
        assert_eq!(s.acked_features(), 0b1010);
        assert_eq!(s.queue_events().len(), 1);
    }
}
