//! Counters as plain numbers, so that accounting continues from saved values after a restore.
//! Each device's counter set has `values()` / `load_values()` generated with its struct
//! (`crate::devices::counters`).

use serde::{Deserialize, Serialize};

/// Every counter of the machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersState {
    /// Per vCPU ([`crate::vcpu::VcpuCounters::values`]): wall nanoseconds inside KVM_RUN,
    /// exits by reason, unhandled I/O, the vCPU thread's CPU nanoseconds (absent in state saved
    /// before snapshot format 2.1).
    pub vcpus: Vec<Vec<u64>>,
    /// Per disk.
    pub blocks: Vec<Vec<u64>>,
    /// Per network card.
    pub nets: Vec<Vec<u64>>,
    /// The console.
    pub serial: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use crate::devices::serial::SerialCounters;
    use crate::devices::virtio::block::BlockCounters;
    use crate::devices::virtio::net::NetCounters;

    #[test]
    fn counters_round_trip_and_refuse_wrong_lengths() {
        let a = BlockCounters::default();
        a.write_bytes.store(4096, Ordering::Relaxed);
        a.errors.store(2, Ordering::Relaxed);
        let b = BlockCounters::default();
        b.load_values(&a.values()).unwrap();
        assert_eq!(b.values(), a.values());
        assert!(b.load_values(&[1, 2]).is_err());
        assert_eq!(
            NetCounters::default().values().len(),
            NetCounters::NAMES.len()
        );
        assert_eq!(SerialCounters::NAMES, ["tx_bytes", "tx_errors"]);
    }
}
