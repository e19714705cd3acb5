//! Walking a descriptor chain from an untrusted driver into a checked list of buffers.
//!
//! virtio-queue's iterator already bounds the walk (at most queue-size descriptors, so a loop
//! ends) but simply stops on an error. [`collect`] turns that into an explicit verdict and
//! checks the rules every device relies on: readable buffers first, then writable ones, no
//! zero-length buffer, every buffer inside guest memory, a bounded total length.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it (else it reads it).
    pub writable: bool,
}

/// What is wrong with a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain ended early: a bad `next` index, a loop, or an unreadable descriptor.
    #[error("Descriptor chain is broken or loops")]
    Broken,
    /// A buffer of length zero.
    #[error("Descriptor chain has a zero-length buffer")]
    ZeroLength,
    /// A buffer outside guest memory.
    #[error("Descriptor chain points outside guest memory")]
    OutOfMemory,
    /// A readable buffer after a writable one.
    #[error("Descriptor chain has a readable buffer after a writable one")]
    Order,
    /// More bytes than the device accepts in one chain.
    #[error("Descriptor chain is too long")]
    TooLong,
}

/// The checked buffers of one chain: readable ones, then writable ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// Buffers in chain order.
    pub buffers: Vec<Buffer>,
}

impl Chain {
    /// Total bytes of readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.buffers
            .iter()
            .filter(|b| !b.writable)
            .map(|b| u64::from(b.len))
            .sum()
    }

    /// Total bytes of writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.buffers
            .iter()
            .filter(|b| b.writable)
            .map(|b| u64::from(b.len))
            .sum()
    }
}

/// Walks `chain`, checking it; refuses chains whose buffers add up to more than `max_len`.
pub fn collect<M>(chain: DescriptorChain<M>, max_len: u64) -> Result<Chain, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    // A second handle on the chain's memory, so the walk below can consume the chain.
    let holder = chain.clone();
    let mem = holder.memory();
    let mut out = Chain::default();
    let mut total = 0u64;
    let mut ended = false;
    for desc in chain {
        if desc.len() == 0 {
            return Err(ChainError::ZeroLength);
        }
        let writable = desc.is_write_only();
        if !writable && out.buffers.last().is_some_and(|b| b.writable) {
            return Err(ChainError::Order);
        }
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(desc.addr(), desc.len() as usize, access) {
            return Err(ChainError::OutOfMemory);
        }
        total += u64::from(desc.len());
        if total > max_len {
            return Err(ChainError::TooLong);
        }
        out.buffers.push(Buffer {
            addr: desc.addr(),
            len: desc.len(),
            writable,
        });
        ended = !desc.has_next();
    }
    if !ended {
        return Err(ChainError::Broken);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use ftvm_guest_abi::virtio::{DESC_F_NEXT, DESC_F_WRITE};
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::test_driver::{Desc, TestQueue};
    use crate::memory::GuestMemoryMmap;

    const MEM: usize = 1 << 20;
    const BUF: u64 = 0x1_0000;

    fn walk(descs: &[Desc], max_len: u64) -> Result<Chain, ChainError> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let (mut t, mut q) = TestQueue::new(&mem, 0, 16);
        t.publish(descs);
        let head = q.pop_descriptor_chain(&mem).expect("a chain");
        collect(head, max_len)
    }

    #[test]
    fn the_total_length_limit_is_inclusive_across_buffers() {
        let two = |a, b| [(BUF, a, DESC_F_NEXT, 1), (BUF + 0x1000, b, DESC_F_WRITE, 0)];
        for (a, b, ok) in [
            (100, 99, true),
            (100, 100, true),
            (100, 101, false),
            (201, 1, false),
        ] {
            let r = walk(&two(a, b), 200);
            assert_eq!(r.is_ok(), ok, "{a}+{b}: {r:?}");
            if let Ok(c) = r {
                assert_eq!((c.readable_len(), c.writable_len()), (100, u64::from(b)));
            } else {
                assert_eq!(r.unwrap_err(), ChainError::TooLong);
            }
        }
    }

    #[test]
    fn buffers_must_lie_in_memory_to_the_last_byte() {
        let end = MEM as u64;
        for (addr, len, ok) in [
            (end - 100, 100, true),
            (end - 100, 101, false),
            (end, 1, false),
            (u64::MAX, 2, false),
        ] {
            let r = walk(&[(addr, len, 0, 0)], u64::MAX);
            let want = if ok {
                Ok(())
            } else {
                Err(ChainError::OutOfMemory)
            };
            assert_eq!(r.map(|_| ()), want, "{addr:#x}+{len}");
        }
    }
}
