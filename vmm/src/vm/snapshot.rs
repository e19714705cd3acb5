//! Saving a paused machine's whole state, and building a machine from a saved state.
//!
//! Order follows the usual quiescing rules: the VM is paused (vCPUs, then the device event
//! loop) before anything is read; devices are saved before KVM's state (a device may still
//! raise an interrupt while saving); vCPUs are saved MP state first, events last. Restore builds
//! the same machine from the saved configuration, fills memory, then loads devices, the
//! in-kernel devices, and the vCPUs.

use std::io::Write;

use serde::{Deserialize, Serialize};

use super::build;
use super::{MAX_VCPUS, RunningVm, SavedConfig, Vm, VmError, kvm_err};
use crate::bus::{self, Bus, BusAddress};
use crate::devices::virtio::net::NetConfig;
use crate::memory::{self, GuestMemoryMmap};
use crate::state::{CountersState, DeviceState, KvmVmState, StateError, VcpuState};
use crate::vcpu::VcpuRunState;

/// Everything about a machine except its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// What the machine was built from.
    pub config: SavedConfig,
    /// PIC, IOAPIC, PIT, clock.
    pub kvm: KvmVmState,
    /// Each vCPU.
    pub vcpus: Vec<VcpuState>,
    /// Port-I/O devices by port.
    pub pio: Vec<(u16, DeviceState)>,
    /// MMIO devices by address.
    pub mmio: Vec<(u64, DeviceState)>,
    /// Accounting counters.
    pub counters: CountersState,
}

/// `IA32_TIME_STAMP_COUNTER`.
const MSR_IA32_TSC: u32 = 0x10;

impl MachineState {
    /// Moves the guest's clocks — each vCPU's TSC (at its saved frequency) and kvmclock —
    /// forward by `by`, as if the guest had run on for that long: a takeover restores a state
    /// captured before the outage, and without this the guest's time would fall behind real
    /// time by the outage (and timers due during it, such as TCP retransmissions, would wait
    /// it out again). Every vCPU moves by the same amount, so their TSCs stay in step. Returns
    /// how many TSCs moved.
    pub fn advance_clocks(&mut self, by: std::time::Duration) -> usize {
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let mut moved = 0;
        for vcpu in &mut self.vcpus {
            let Some(khz) = vcpu.tsc_khz else { continue };
            let ticks =
                u64::try_from(u128::from(ns) * u128::from(khz) / 1_000_000).unwrap_or(u64::MAX);
            for msr in vcpu.msrs.iter_mut().filter(|m| m.index == MSR_IA32_TSC) {
                msr.data = msr.data.saturating_add(ticks);
                moved += 1;
            }
        }
        self.kvm.clock.clock = self.kvm.clock.clock.saturating_add(ns);
        moved
    }
}

/// How a restored machine differs from the saved one.
pub struct RestoreOptions {
    /// Where the console goes.
    pub console: Box<dyn Write + Send>,
    /// Network cards to use instead of the saved ones (same number, e.g. another TAP name on
    /// another host); None keeps the saved ones.
    pub nets: Option<Vec<NetConfig>>,
    /// Disk images to use instead of the saved paths (same number and order, e.g. a replica's
    /// copies); each keeps its saved read-only flag. None keeps the saved ones.
    pub disks: Option<Vec<std::path::PathBuf>>,
}

/// Fills guest memory from wherever the snapshot keeps it.
pub type MemoryFiller<'a> =
    &'a mut dyn FnMut(&GuestMemoryMmap) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Where a restored machine's memory comes from.
pub enum RestoreMemory<'a> {
    /// Fresh memory, filled by the closure.
    Fill(MemoryFiller<'a>),
    /// Memory already mapped (e.g. copy-on-write from a snapshot file), used as it is.
    Mapped(GuestMemoryMmap),
}

fn save_bus<A: BusAddress>(bus: &Bus<A>) -> Result<Vec<(u64, DeviceState)>, StateError> {
    bus.devices()
        .map(|(a, d)| Ok((a.raw(), bus::lock(d).save()?)))
        .collect()
}

fn restore_bus<A: BusAddress>(
    bus: &Bus<A>,
    saved: &[(u64, DeviceState)],
) -> Result<(), StateError> {
    let devices: Vec<_> = bus.devices().collect();
    if devices.len() != saved.len() {
        return Err(StateError::Invalid(
            "the saved devices differ from the machine's",
        ));
    }
    for ((addr, dev), (saved_addr, state)) in devices.into_iter().zip(saved) {
        if addr.raw() != *saved_addr {
            return Err(StateError::Invalid("a saved device is at another address"));
        }
        bus::lock(dev).restore(state)?;
    }
    Ok(())
}

impl RunningVm {
    /// Saves the state of a paused machine (memory is read separately, through
    /// [`Vm::memory`]).
    pub fn save_state(&self) -> Result<MachineState, VmError> {
        if self.vcpu_states().contains(&VcpuRunState::Running) {
            return Err(VmError::NotPaused);
        }
        let pio = save_bus(&self.pio)?
            .into_iter()
            .map(|(a, s)| (a as u16, s))
            .collect();
        let mmio = save_bus(&self.mmio)?;
        let kvm = KvmVmState::save(&self.fd, self.saved.linux)?;
        let msrs: Vec<u32> = self
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("list saveable MSRs"))?
            .as_slice()
            .to_vec();
        let mut vcpus = Vec::new();
        for v in &self.vcpus {
            let msrs = msrs.clone();
            vcpus.push(v.with_fd(move |fd| VcpuState::save(fd, &msrs))??);
        }
        let counters = CountersState {
            vcpus: self.vcpus.iter().map(|v| v.counters().values()).collect(),
            blocks: self
                .devices
                .block_counters
                .iter()
                .map(|c| c.values())
                .collect(),
            nets: self
                .devices
                .net_counters
                .iter()
                .map(|c| c.values())
                .collect(),
            serial: self.serial.values(),
        };
        Ok(MachineState {
            config: self.machine.saved.clone(),
            kvm,
            vcpus,
            pio,
            mmio,
            counters,
        })
    }
}

impl Vm {
    /// Builds a machine from `state` (untrusted: checked as it is applied, all of it before any
    /// vCPU exists to run guest code) with memory from `fill`. The machine is ready to
    /// [`Vm::start`] and continues where the saved one was.
    pub fn restore(
        state: MachineState,
        opts: RestoreOptions,
        memory: RestoreMemory,
    ) -> Result<Vm, VmError> {
        let (mapped, fill) = match memory {
            RestoreMemory::Fill(f) => (None, Some(f)),
            RestoreMemory::Mapped(m) => (Some(m), None),
        };
        let standby = Standby::prepare(&state.config, state.vcpus.len(), opts, mapped)?;
        if let Some(fill) = fill {
            fill(&standby.parts.memory).map_err(VmError::LoadMemory)?;
        }
        standby.activate(state)
    }
}

/// A machine built ahead of its state (a hot standby): the KVM VM, its memory slots over an
/// image that someone else keeps current (a replica's committed image, shared, not copied),
/// the vCPUs, the buses and the devices with their host ends (TAPs, disk files) open, but no
/// guest state and no thread. [`Standby::activate`] loads a state into it — device, in-kernel
/// and vCPU state, counters, which takes well under a millisecond — and gives the VM, ready to
/// [`Vm::start`]; building is what takes milliseconds, and it is done before it is needed.
pub struct Standby {
    parts: build::Parts,
    /// The configuration as a state of this machine carries it.
    saved: SavedConfig,
    /// The configuration built: `saved` with the cards and disks of [`RestoreOptions`].
    config: SavedConfig,
    vcpus: usize,
}

impl Standby {
    /// Builds, on `memory` as it is, the machine whose states carry `config` and have `vcpus`
    /// vCPUs, with the cards and disks of `opts`.
    pub fn build(
        config: &SavedConfig,
        vcpus: usize,
        opts: RestoreOptions,
        memory: GuestMemoryMmap,
    ) -> Result<Standby, VmError> {
        Self::prepare(config, vcpus, opts, Some(memory))
    }

    fn prepare(
        saved: &SavedConfig,
        count: usize,
        opts: RestoreOptions,
        mapped: Option<GuestMemoryMmap>,
    ) -> Result<Standby, VmError> {
        let vcpus = match u8::try_from(count) {
            Ok(n) if (1..=MAX_VCPUS).contains(&n) => n,
            _ => {
                return Err(VmError::VcpuCount {
                    count: count as u64,
                    max: u64::from(MAX_VCPUS),
                });
            }
        };
        let ram = memory::ram_ranges(saved.mem_size)?;
        let mut config = saved.clone();
        if let Some(nets) = opts.nets {
            if nets.len() != config.nets.len() {
                return Err(StateError::Invalid(
                    "the snapshot has a different number of network cards",
                )
                .into());
            }
            // A card given without a MAC keeps the one the guest knows.
            config.nets = nets
                .into_iter()
                .zip(&config.nets)
                .map(|(mut new, saved)| {
                    new.mac = new.mac.or(saved.mac);
                    new
                })
                .collect();
        }
        if let Some(disks) = opts.disks {
            if disks.len() != config.disks.len() {
                return Err(
                    StateError::Invalid("the snapshot has a different number of disks").into(),
                );
            }
            for (saved, path) in config.disks.iter_mut().zip(disks) {
                saved.path = path;
            }
        }
        let parts = build::build(vcpus, &ram, &config, opts.console, mapped)?;
        Ok(Standby {
            parts,
            saved: saved.clone(),
            config,
            vcpus: count,
        })
    }

    /// Guest memory (the image it was built on).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.parts.memory
    }

    /// Loads `state` (untrusted: checked as it is applied, before any vCPU runs guest code),
    /// which must be of the machine this was built for; the VM continues where the saved one
    /// was, on the memory as it is now.
    pub fn activate(self, state: MachineState) -> Result<Vm, VmError> {
        let Standby {
            parts,
            saved,
            config,
            vcpus,
        } = self;
        if state.config != saved || state.vcpus.len() != vcpus {
            return Err(
                StateError::Invalid("the state is of another machine than the standby").into(),
            );
        }
        if state.counters.vcpus.len() != state.vcpus.len()
            || state.counters.blocks.len() != config.disks.len()
            || state.counters.nets.len() != config.nets.len()
        {
            return Err(StateError::Invalid("the saved counters do not match the machine").into());
        }
        // What restoring wrote is not a change the guest made.
        memory::take_dirty(&parts.fd, &parts.memory)?;

        restore_bus(
            &parts.pio,
            &state
                .pio
                .iter()
                .map(|(a, s)| (u64::from(*a), s.clone()))
                .collect::<Vec<_>>(),
        )?;
        restore_bus(&parts.mmio, &state.mmio)?;
        state.kvm.restore(&parts.fd)?;
        for (vcpu, saved) in parts.vcpu_fds.iter().zip(&state.vcpus) {
            saved.restore(vcpu)?;
        }
        for (c, v) in parts
            .devices
            .block_counters
            .iter()
            .zip(&state.counters.blocks)
        {
            c.load_values(v)?;
        }
        for (c, v) in parts.devices.net_counters.iter().zip(&state.counters.nets) {
            c.load_values(v)?;
        }
        parts.serial.load_values(&state.counters.serial)?;
        let vm = parts.into_vm(None, config);
        for (c, v) in vm.vcpu_counters.iter().zip(&state.counters.vcpus) {
            c.load_values(v)?;
        }
        Ok(vm)
    }
}
