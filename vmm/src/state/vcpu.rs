//! vCPU state: everything KVM keeps for a vCPU, saved and restored in the order the KVM
//! documentation requires (MP state first, vCPU events last).

use kvm_bindings::{
    CpuId, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::StateError;

/// One vCPU, as plain data.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as set for this vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state (runnable, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers (None where KVM has none to give).
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists as saveable and could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// TSC frequency in kHz.
    pub tsc_khz: Option<u32>,
}

fn call<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, StateError> {
    r.map_err(|source| StateError::Kvm { what, source })
}

/// Reads the MSRs in `indices` that KVM lets this vCPU read, in chunks.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::new();
    for chunk in indices.chunks(64) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::Msrs)?;
        let n = call("read MSRs", fd.get_msrs(&mut msrs))?;
        if n == chunk.len() {
            out.extend_from_slice(&msrs.as_slice()[..n]);
            continue;
        }
        // One of them cannot be read: take them one by one, keeping those that can.
        for &index in chunk {
            let mut one = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .map_err(|_| StateError::Msrs)?;
            if fd.get_msrs(&mut one).is_ok_and(|n| n == 1) {
                out.push(one.as_slice()[0]);
            }
        }
    }
    Ok(out)
}

impl VcpuState {
    /// Saves a paused vCPU; `msr_indices` is KVM's list of saveable MSRs.
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, StateError> {
        let cpuid = call(
            "read CPUID",
            fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES),
        )?;
        let mp_state = call("read the MP state", fd.get_mp_state())?;
        let regs = call("read registers", fd.get_regs())?;
        let sregs = call("read special registers", fd.get_sregs())?;
        let xsave = call("read XSAVE state", fd.get_xsave())?;
        let xcrs = fd.get_xcrs().ok();
        let debugregs = call("read debug registers", fd.get_debug_regs())?;
        let lapic = call("read the local APIC", fd.get_lapic())?;
        let msrs = read_msrs(fd, msr_indices)?;
        let events = call("read vCPU events", fd.get_vcpu_events())?;
        Ok(Self {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Loads this state into a fresh vCPU.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), StateError> {
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|_| StateError::Invalid("CPUID has too many entries"))?;
        call("set CPUID", fd.set_cpuid2(&cpuid))?;
        if let Some(khz) = self.tsc_khz
            && fd.get_tsc_khz().ok() != Some(khz)
        {
            // Not every KVM can scale the TSC; the guest then sees the host's frequency.
            if let Err(e) = fd.set_tsc_khz(khz) {
                tracing::warn!("cannot set the TSC frequency to {khz} kHz: {e}");
            }
        }
        call("set the MP state", fd.set_mp_state(self.mp_state))?;
        call("set registers", fd.set_regs(&self.regs))?;
        call("set special registers", fd.set_sregs(&self.sregs))?;
        // SAFETY: the buffer is a whole kvm_xsave as KVM_GET_XSAVE produced it (the legacy
        // 4 KiB layout, which is all that set_xsave reads).
        call("set XSAVE state", unsafe { fd.set_xsave(&self.xsave) })?;
        if let Some(xcrs) = &self.xcrs {
            call("set XCRs", fd.set_xcrs(xcrs))?;
        }
        call("set debug registers", fd.set_debug_regs(&self.debugregs))?;
        call("set the local APIC", fd.set_lapic(&self.lapic))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| StateError::Msrs)?;
        let n = call("set MSRs", fd.set_msrs(&msrs))?;
        if n != self.msrs.len() {
            return Err(StateError::MsrRejected(self.msrs[n].index));
        }
        call("set vCPU events", fd.set_vcpu_events(&self.events))?;
        Ok(())
    }
}
