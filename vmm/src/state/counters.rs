//! Counters as plain numbers, so that accounting continues from saved values after a restore.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::StateError;
use crate::devices::serial::SerialCounters;
use crate::devices::virtio::block::BlockCounters;
use crate::devices::virtio::net::NetCounters;

/// Every counter of the machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersState {
    /// Per vCPU: run nanoseconds, exits by reason, unhandled I/O.
    pub vcpus: Vec<Vec<u64>>,
    /// Per disk.
    pub blocks: Vec<Vec<u64>>,
    /// Per network card.
    pub nets: Vec<Vec<u64>>,
    /// The console.
    pub serial: Vec<u64>,
}

macro_rules! plain_counters {
    ($t:ty { $($f:ident),* $(,)? }) => {
        impl $t {
            /// The counters' values, in declaration order.
            pub fn values(&self) -> Vec<u64> {
                vec![$(self.$f.load(Ordering::Relaxed)),*]
            }

            /// Sets the counters from saved values (untrusted: the count must match).
            pub fn load_values(&self, v: &[u64]) -> Result<(), StateError> {
                let names = [$(stringify!($f)),*];
                if v.len() != names.len() {
                    return Err(StateError::Invalid(concat!("wrong number of counters for ", stringify!($t))));
                }
                let mut it = v.iter();
                $(self.$f.store(*it.next().expect("length checked"), Ordering::Relaxed);)*
                Ok(())
            }
        }
    };
}

plain_counters!(BlockCounters {
    read_requests,
    read_bytes,
    write_requests,
    write_bytes,
    flush_requests,
    get_id_requests,
    errors,
    unsupported,
    invalid_chains,
});

plain_counters!(NetCounters {
    rx_packets,
    rx_bytes,
    tx_packets,
    tx_bytes,
    rx_dropped,
    tx_dropped,
    invalid_chains,
});

plain_counters!(SerialCounters {
    tx_bytes,
    tx_errors
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_round_trip_and_refuse_wrong_lengths() {
        let a = BlockCounters::default();
        a.write_bytes.store(4096, Ordering::Relaxed);
        a.errors.store(2, Ordering::Relaxed);
        let b = BlockCounters::default();
        b.load_values(&a.values()).unwrap();
        assert_eq!(b.values(), a.values());
        assert!(b.load_values(&[1, 2]).is_err());
        let n = NetCounters::default();
        assert_eq!(n.values().len(), 7);
    }
}
