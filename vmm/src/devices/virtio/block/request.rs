//! Parsing a block request out of a checked descriptor chain.
//!
//! A request is a 16-byte readable header (type, reserved, sector), data buffers, and a
//! one-byte status the device writes: the last byte of the chain, in a writable buffer.

use ftvm_guest_abi::virtio::{
    BLK_HEADER_LEN, BLK_T_FLUSH, BLK_T_GET_ID, BLK_T_IN, BLK_T_OUT, SECTOR_SIZE,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::devices::virtio::chain::{Buffer, Chain};

/// Largest data transfer of one request.
pub const MAX_DATA_LEN: u64 = 16 << 20;

/// What a request asks for; the label of `ftvm_block_requests_total{op}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read sectors.
    Read,
    /// Write sectors.
    Write,
    /// Flush to stable storage.
    Flush,
    /// Return the device id string.
    GetId,
    /// Anything else.
    Unsupported(u32),
}

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub op: Op,
    /// First sector.
    pub sector: u64,
    /// Data buffers (header and status excluded).
    pub data: Vec<Buffer>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a request is refused; each maps to an IOERR status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The header is missing or is not a readable 16-byte buffer.
    #[error("Request header is missing or malformed")]
    Header,
    /// A data buffer goes the wrong way for the operation.
    #[error("Request data buffer has the wrong direction")]
    Direction,
    /// The data length is not a whole number of sectors, or is zero.
    #[error("Request data length is not a whole number of sectors")]
    Length,
    /// More data than the device accepts in one request.
    #[error("Request is too large")]
    TooLarge,
    /// The sector range lies beyond the disk.
    #[error("Request is beyond the end of the disk")]
    Range,
    /// A write to a read-only disk.
    #[error("Request writes to a read-only disk")]
    ReadOnly,
    /// A data buffer cannot be accessed (the chain was checked, so this should not happen).
    #[error("Request buffer cannot be accessed")]
    Memory,
}

impl Request {
    /// Parses `chain`. Returns `None` when there is no writable status byte to report an error
    /// in (the chain is then dropped and counted), `Err` for a request that gets IOERR.
    pub fn parse(
        chain: &Chain,
        mem: &impl GuestMemory,
    ) -> Option<(GuestAddress, Result<Request, RequestError>)> {
        let last = chain.buffers.last().filter(|b| b.writable)?;
        let status = last.addr.unchecked_add(u64::from(last.len) - 1);
        Some((status, Self::parse_body(chain, mem, status)))
    }

    fn parse_body(
        chain: &Chain,
        mem: &impl GuestMemory,
        status: GuestAddress,
    ) -> Result<Request, RequestError> {
        let header = chain.buffers.first().ok_or(RequestError::Header)?;
        if header.writable || header.len != BLK_HEADER_LEN {
            return Err(RequestError::Header);
        }
        let mut raw = [0u8; BLK_HEADER_LEN as usize];
        mem.read_slice(&mut raw, header.addr)
            .map_err(|_| RequestError::Header)?;
        let kind = u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
        let op = match kind {
            BLK_T_IN => Op::Read,
            BLK_T_OUT => Op::Write,
            BLK_T_FLUSH => Op::Flush,
            BLK_T_GET_ID => Op::GetId,
            other => Op::Unsupported(other),
        };
        // Data: everything between the header and the status byte.
        let mut data: Vec<Buffer> = chain.buffers[1..].to_vec();
        if let Some(tail) = data.last_mut() {
            tail.len -= 1;
            if tail.len == 0 {
                data.pop();
            }
        }
        let len: u64 = data.iter().map(|b| u64::from(b.len)).sum();
        if len > MAX_DATA_LEN {
            return Err(RequestError::TooLarge);
        }
        let want_writable = match op {
            Op::Read | Op::GetId => Some(true),
            Op::Write => Some(false),
            Op::Flush | Op::Unsupported(_) => None,
        };
        if let Some(w) = want_writable
            && data.iter().any(|b| b.writable != w)
        {
            return Err(RequestError::Direction);
        }
        if matches!(op, Op::Read | Op::Write) && (len == 0 || !len.is_multiple_of(SECTOR_SIZE)) {
            return Err(RequestError::Length);
        }
        Ok(Request {
            op,
            sector,
            data,
            status,
        })
    }

    /// Total data bytes.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|b| u64::from(b.len)).sum()
    }

    /// Byte offset in the image, if the whole transfer fits in `sectors`.
    pub fn offset_within(&self, sectors: u64) -> Result<u64, RequestError> {
        let count = self.data_len() / SECTOR_SIZE;
        match self.sector.checked_add(count) {
            Some(end) if end <= sectors => Ok(self.sector * SECTOR_SIZE),
            _ => Err(RequestError::Range),
        }
    }
}
