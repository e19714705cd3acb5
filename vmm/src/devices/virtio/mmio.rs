//! The virtio-mmio transport (version 2): registers, feature negotiation, queue set-up.

use std::sync::{Arc, Mutex};

use ftvm_guest_abi::virtio::{self, F_VERSION_1, reg, status};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VirtioDevice};
use crate::bus::{BusDevice, VcpuAction};
use crate::memory::GuestMemoryMmap;
use crate::state::{DeviceState, StateError, VirtioState};

/// A virtio device as the guest sees it on the MMIO bus.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<Interrupt>,
    mem: GuestMemoryMmap,
    device_type: u32,
    features: u64,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    /// Queue notification eventfds (the same ones KVM signals through ioeventfd).
    notify: Vec<EventFd>,
    activated: bool,
}

fn u32_le(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl MmioTransport {
    /// Wraps `device`, whose interrupt is `interrupt`, whose queues live in `mem` and are
    /// notified through `notify` (one eventfd per queue).
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<Interrupt>,
        mem: GuestMemoryMmap,
        notify: Vec<EventFd>,
    ) -> Self {
        let (device_type, features, queues) = {
            let d = device.lock().unwrap_or_else(|p| p.into_inner());
            let queues = d
                .queue_max_sizes()
                .iter()
                .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
                .collect();
            (d.device_type(), d.features() | F_VERSION_1, queues)
        };
        Self {
            device,
            interrupt,
            mem,
            device_type,
            features,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            notify,
            activated: false,
        }
    }

    fn device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device().reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        // FEATURES_OK only sticks if the driver accepted virtio 1.x and nothing unoffered.
        if value & status::FEATURES_OK != 0
            && self.status & status::FEATURES_OK == 0
            && (self.driver_features & !self.features != 0
                || self.driver_features & F_VERSION_1 == 0)
        {
            value &= !status::FEATURES_OK;
        }
        self.status = value;
        let ready = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        if !self.activated && value & ready == ready {
            self.activate();
        }
    }

    fn activate(&mut self) {
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() || !q.is_valid(&self.mem) {
                tracing::warn!(
                    device = self.device_type,
                    queue = i,
                    "driver set up an invalid queue"
                );
                self.status |= status::NEEDS_RESET;
                return;
            }
        }
        // The device gets its own copies; the transport keeps reporting what the driver set.
        let queues = match self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(q) => q,
            Err(e) => {
                tracing::warn!(device = self.device_type, "invalid queue state: {e}");
                self.status |= status::NEEDS_RESET;
                return;
            }
        };
        let features = self.driver_features;
        let result = self.device().activate(features, queues);
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::warn!(device = self.device_type, "cannot activate: {e}");
                self.status |= status::NEEDS_RESET;
            }
        }
    }

    /// Whether queue set-up registers may still change.
    fn configurable(&self) -> bool {
        self.status & status::DRIVER_OK == 0
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device().read_config(offset - reg::CONFIG, data);
            return;
        }
        let value = match offset {
            reg::MAGIC => virtio::MAGIC,
            reg::VERSION => virtio::VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => virtio::VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.features as u32,
                1 => (self.features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        data.fill(0);
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        let v = u32_le(data);
        let configurable = self.configurable();
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM if configurable => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY if configurable => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH
                if configurable =>
            {
                let high = offset & 4 != 0;
                let (lo, hi) = if high {
                    (None, Some(v))
                } else {
                    (Some(v), None)
                };
                if let Some(q) = self.queue() {
                    match offset & !4 {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        reg::QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            // Notifications normally arrive through an ioeventfd and never exit to the VMM;
            // one that does (no ioeventfd for it) is passed on the same way.
            reg::QUEUE_NOTIFY => {
                if let Some(evt) = self.notify.get(v as usize)
                    && let Err(e) = evt.write(1)
                {
                    tracing::warn!(
                        device = self.device_type,
                        "cannot pass on a notification: {e}"
                    );
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            _ => {
                tracing::debug!(
                    device = self.device_type,
                    offset,
                    "ignored virtio-mmio write"
                );
            }
        }
        VcpuAction::Continue
    }

    fn save(&self) -> Result<DeviceState, StateError> {
        let queues = if self.activated {
            self.device().queue_states()
        } else {
            self.queues.iter().map(|q| q.state()).collect()
        };
        Ok(DeviceState::Virtio(VirtioState {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues: queues.into_iter().map(Into::into).collect(),
            device: self.device().save_state(),
        }))
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        let DeviceState::Virtio(s) = state else {
            return Err(StateError::Invalid(
                "a virtio device's saved state is not a virtio transport's",
            ));
        };
        if s.device_type != self.device_type || s.queues.len() != self.queues.len() {
            return Err(StateError::Invalid(
                "saved virtio device differs from the configured one",
            ));
        }
        self.device().load_state(&s.device)?;
        let build = || -> Result<Vec<Queue>, StateError> {
            s.queues
                .iter()
                .map(|&q| {
                    Queue::try_from(virtio_queue::QueueState::from(q))
                        .map_err(|_| StateError::Invalid("a saved virtqueue is invalid"))
                })
                .collect()
        };
        let queues = build()?;
        if s.activated && queues.iter().any(|q| !q.is_valid(&self.mem)) {
            return Err(StateError::Invalid(
                "a saved virtqueue lies outside guest memory",
            ));
        }
        self.queues = queues;
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.interrupt.set_status(s.interrupt_status);
        self.activated = false;
        if s.activated {
            let features = self.driver_features;
            let result = self.device().activate(features, build()?);
            result.map_err(|_| StateError::Invalid("the device refused its saved queues"))?;
            self.activated = true;
            // Requests the guest queued before the snapshot are processed now.
            for evt in &self.notify {
                let _ = evt.write(1);
            }
        }
        Ok(())
    }
}
