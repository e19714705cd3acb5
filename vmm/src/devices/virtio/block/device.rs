//! The block device: queue processing and the image file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ftvm_guest_abi::virtio::{
    BLK_F_FLUSH, BLK_F_RO, BLK_HEADER_LEN, BLK_ID_LEN, BLK_S_IOERR, BLK_S_OK, BLK_S_UNSUPP,
    ID_BLOCK, SECTOR_SIZE,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use super::request::{MAX_DATA_LEN, Op, Request, RequestError};
use crate::devices::counters::counters;
use crate::devices::virtio::chain;
use crate::devices::virtio::{ActivateError, Interrupt, VirtioDevice, read_config_bytes};
use crate::disk_track::DiskTracker;
use crate::hostfile::{self, HostFileError, InputKind};
use crate::memory::GuestMemoryMmap;
use crate::state::{StateError, VirtioDeviceState};

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;

/// How a disk is configured (`--disk path[,readonly]`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
}

impl std::str::FromStr for BlockConfig {
    type Err = String;

    /// Parses `PATH[,readonly]` (the `--disk` syntax); `ro` is short for `readonly`, and an
    /// option may be given once.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("A disk needs a path")?;
        let mut read_only = false;
        for opt in parts {
            match opt {
                "readonly" | "ro" if read_only => {
                    return Err(format!("Disk option '{opt}' is given twice"));
                }
                "readonly" | "ro" => read_only = true,
                other => return Err(format!("Unknown disk option '{other}' (known: readonly)")),
            }
        }
        Ok(Self {
            path: path.into(),
            read_only,
        })
    }
}

/// What the operator's files are called in messages.
const WHAT: &str = "disk image";

/// Errors of opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened, is not a file or block device, or is in use.
    #[error(transparent)]
    Host(#[from] HostFileError),
    /// The image is smaller than one sector.
    #[error("Disk image {0} is smaller than one 512-byte sector")]
    TooSmall(PathBuf),
}

/// The host failed a request the guest made correctly: the image's read, write or flush.
#[derive(Debug, thiserror::Error)]
#[error("Cannot {op} disk image {path} at byte {offset}")]
pub struct HostIoError {
    op: &'static str,
    path: PathBuf,
    offset: u64,
    #[source]
    source: std::io::Error,
}

/// How a request ended, for its status byte and counters.
enum Outcome {
    /// Done; the data bytes written into guest buffers.
    Done(u32),
    /// An operation the device does not know.
    Unsupported,
    /// The guest asked for something it may not (the request is refused, nothing changes).
    Refused(RequestError),
    /// The host failed a valid request.
    Host(HostIoError),
}

counters!(
    /// Block counters: monotonic, never reset on read.
    pub struct BlockCounters {
        /// Completed reads.
        read_requests,
        /// Bytes read.
        read_bytes,
        /// Completed writes.
        write_requests,
        /// Bytes written.
        write_bytes,
        /// Completed flushes.
        flush_requests,
        /// Completed GET_ID requests.
        get_id_requests,
        /// Requests refused with IOERR because the guest asked wrongly (bad header, range,
        /// direction or length, a write to a read-only disk).
        errors,
        /// Requests answered with UNSUPP.
        unsupported,
        /// Chains dropped without a status (no place to put one).
        invalid_chains,
        /// Valid requests answered with IOERR because the host's read, write or flush of the
        /// image failed.
        host_errors,
    }
);

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A virtio-blk device.
pub struct Block {
    file: File,
    config: BlockConfig,
    sectors: u64,
    id: [u8; BLK_ID_LEN],
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue: Option<Queue>,
    counters: Arc<BlockCounters>,
    /// The blocks the guest wrote (marked after each write reaches the image).
    tracker: Arc<DiskTracker>,
}

impl Block {
    /// Opens the image of `config` (a regular file or a block device) and locks it: shared
    /// when read-only, else exclusive, so that no other VMM writes it while this one uses it.
    pub fn new(
        config: BlockConfig,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, BlockError> {
        let writable = !config.read_only;
        let file = hostfile::open_input(&config.path, WHAT, InputKind::Disk { writable })?;
        hostfile::lock(&file, writable, &config.path, WHAT)?;
        Self::with_file(config, file, mem, interrupt)
    }

    /// A device over `file`, already opened (and locked) for `config`.
    pub(super) fn with_file(
        config: BlockConfig,
        file: File,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, BlockError> {
        let len = hostfile::input_size(&file, &config.path, WHAT)?;
        let sectors = len / SECTOR_SIZE;
        if sectors == 0 {
            return Err(BlockError::TooSmall(config.path));
        }
        let mut id = [0u8; BLK_ID_LEN];
        let name = config
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(BLK_ID_LEN);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        let reader = file.try_clone().map_err(|source| {
            BlockError::Host(HostFileError::Open {
                what: WHAT,
                path: config.path.clone(),
                source,
            })
        })?;
        let tracker = Arc::new(DiskTracker::new(reader, sectors * SECTOR_SIZE));
        Ok(Self {
            file,
            config,
            sectors,
            id,
            mem,
            interrupt,
            queue: None,
            counters: Arc::new(BlockCounters::default()),
            tracker,
        })
    }

    /// Which blocks the guest wrote, for whoever copies the disk.
    pub fn tracker(&self) -> Arc<DiskTracker> {
        self.tracker.clone()
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Processes every available request; returns how many were completed.
    pub fn process_queue(&mut self) -> usize {
        let Some(mut queue) = self.queue.take() else {
            return 0;
        };
        let mem = self.mem.clone();
        let mut done = 0;
        while let Some(head) = queue.pop_descriptor_chain(&mem) {
            let index = head.head_index();
            let used = self.handle(head);
            if let Err(e) = queue.add_used(&mem, index, used) {
                tracing::warn!("virtio-blk: cannot complete a request: {e}");
            }
            done += 1;
        }
        if done > 0 && queue.needs_notification(&mem).unwrap_or(true) {
            self.interrupt.signal_used();
        }
        self.queue = Some(queue);
        done
    }

    /// Executes one chain; returns the bytes written into guest buffers.
    fn handle(&mut self, head: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32 {
        // Chains up to twice the largest transfer are parsed (and refused with IOERR if too
        // large); longer ones are not even walked to the end.
        let max = 2 * MAX_DATA_LEN + u64::from(BLK_HEADER_LEN) + 1;
        let parsed = chain::collect(head, max)
            .ok()
            .and_then(|c| Request::parse(&c, &self.mem));
        let Some((status_addr, request)) = parsed else {
            add(&self.counters.invalid_chains, 1);
            return 0;
        };
        let outcome = match request {
            Ok(req) => self.execute(&req),
            Err(e) => Outcome::Refused(e),
        };
        let (status, written) = match outcome {
            Outcome::Done(written) => (BLK_S_OK, written),
            Outcome::Unsupported => {
                add(&self.counters.unsupported, 1);
                (BLK_S_UNSUPP, 0)
            }
            Outcome::Refused(e) => {
                tracing::debug!("virtio-blk: {e}");
                add(&self.counters.errors, 1);
                (BLK_S_IOERR, 0)
            }
            Outcome::Host(e) => {
                let n = self.counters.host_errors.fetch_add(1, Ordering::Relaxed) + 1;
                // A failing disk fails every request: log the 1st, 2nd, 4th, 8th... only.
                if n.is_power_of_two() {
                    tracing::warn!(
                        host_errors = n,
                        "virtio-blk: {}",
                        crate::event::error_chain(&e)
                    );
                }
                (BLK_S_IOERR, 0)
            }
        };
        if self.mem.write_obj(status, status_addr).is_err() {
            add(&self.counters.invalid_chains, 1);
            return 0;
        }
        written + 1
    }

    /// Runs a well-formed request.
    fn execute(&mut self, req: &Request) -> Outcome {
        let len = req.data_len();
        match req.op {
            Op::Read => {
                let result = self.read(req);
                if matches!(result, Outcome::Done(_)) {
                    add(&self.counters.read_requests, 1);
                    add(&self.counters.read_bytes, len);
                }
                result
            }
            Op::Write if self.config.read_only => Outcome::Refused(RequestError::ReadOnly),
            Op::Write => {
                let result = self.write(req);
                if matches!(result, Outcome::Done(_)) {
                    add(&self.counters.write_requests, 1);
                    add(&self.counters.write_bytes, len);
                }
                result
            }
            Op::Flush => match self.file.sync_data() {
                Ok(()) => {
                    add(&self.counters.flush_requests, 1);
                    Outcome::Done(0)
                }
                Err(source) => Outcome::Host(self.host_error("flush", 0, source)),
            },
            Op::GetId => {
                let mut left = &self.id[..];
                let mut written = 0;
                for b in &req.data {
                    let n = left.len().min(b.len as usize);
                    if self.mem.write_slice(&left[..n], b.addr).is_err() {
                        return Outcome::Refused(RequestError::Memory);
                    }
                    left = &left[n..];
                    written += n as u32;
                }
                add(&self.counters.get_id_requests, 1);
                Outcome::Done(written)
            }
            Op::Unsupported(_) => Outcome::Unsupported,
        }
    }

    fn host_error(&self, op: &'static str, offset: u64, source: std::io::Error) -> HostIoError {
        HostIoError {
            op,
            path: self.config.path.clone(),
            offset,
            source,
        }
    }

    fn read(&self, req: &Request) -> Outcome {
        let mut offset = match req.offset_within(self.sectors) {
            Ok(o) => o,
            Err(e) => return Outcome::Refused(e),
        };
        for b in &req.data {
            let mut buf = vec![0u8; b.len as usize];
            if let Err(source) = self.file.read_exact_at(&mut buf, offset) {
                return Outcome::Host(self.host_error("read", offset, source));
            }
            // Through vm-memory, so the page is marked in the dirty bitmap.
            if self.mem.write_slice(&buf, b.addr).is_err() {
                return Outcome::Refused(RequestError::Memory);
            }
            offset += u64::from(b.len);
        }
        Outcome::Done(req.data_len() as u32)
    }

    fn write(&self, req: &Request) -> Outcome {
        let mut offset = match req.offset_within(self.sectors) {
            Ok(o) => o,
            Err(e) => return Outcome::Refused(e),
        };
        let start = offset;
        // Marked once the data is in the image, also when only part of it got there.
        let mark = |end: u64| self.tracker.mark(start, end - start);
        for b in &req.data {
            let mut buf = vec![0u8; b.len as usize];
            if self.mem.read_slice(&mut buf, b.addr).is_err() {
                // The buffers before this one are in the image already.
                mark(offset);
                return Outcome::Refused(RequestError::Memory);
            }
            if let Err(source) = self.file.write_all_at(&buf, offset) {
                // A failed write may have changed part of the range: it counts as written.
                mark(offset + u64::from(b.len));
                return Outcome::Host(self.host_error("write", offset, source));
            }
            offset += u64::from(b.len);
        }
        mark(offset);
        Outcome::Done(0)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        BLK_F_FLUSH | if self.config.read_only { BLK_F_RO } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Capacity in sectors is the only field of the configuration we fill.
        read_config_bytes(&self.sectors.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, _features: u64, mut queues: Vec<Queue>) -> Result<(), ActivateError> {
        let queue = queues.pop().ok_or(ActivateError::BadQueue(0))?;
        self.queue = Some(queue);
        Ok(())
    }

    fn reset(&mut self) {
        self.queue = None;
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.queue.iter().map(|q| q.state()).collect()
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block {
            sectors: self.sectors,
            read_only: self.config.read_only,
        }
    }

    fn check_state(&self, state: &VirtioDeviceState) -> Result<(), StateError> {
        match *state {
            VirtioDeviceState::Block { sectors, .. } if sectors != self.sectors => Err(
                StateError::Invalid("a disk image's size differs from its size in the snapshot"),
            ),
            VirtioDeviceState::Block { read_only, .. } if read_only != self.config.read_only => {
                Err(StateError::Invalid(
                    "a disk is read-only in the snapshot and writable here, or the reverse",
                ))
            }
            VirtioDeviceState::Block { .. } => Ok(()),
            _ => Err(StateError::Invalid(
                "a disk was given another device's state",
            )),
        }
    }
}

#[cfg(test)]
mod partial_write_tests {
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::chain::Buffer;

    /// A write whose second buffer lies outside guest memory is refused, but its first buffer
    /// reached the image: those blocks are marked, so replication copies them.
    #[test]
    fn a_write_refused_halfway_marks_what_reached_the_image() {
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(1 << 20).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = Arc::new(Interrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            Arc::new(|| {}),
        ));
        let config = BlockConfig {
            path: image.path().to_path_buf(),
            read_only: false,
        };
        let block = Block::new(config, mem, irq).unwrap();
        let tracker = block.tracker();
        tracker.start();
        let buffer = |addr: u64| Buffer {
            addr: GuestAddress(addr),
            len: 4096,
            writable: false,
        };
        let req = Request {
            op: Op::Write,
            sector: 16, // byte 8192: block 2
            data: vec![buffer(0x1000), buffer(1 << 20)],
            status: GuestAddress(0),
        };
        assert!(matches!(
            block.write(&req),
            Outcome::Refused(RequestError::Memory)
        ));
        assert_eq!(tracker.take(), vec![2]);
    }
}
