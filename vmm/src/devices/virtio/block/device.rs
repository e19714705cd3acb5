//! The block device: queue processing and the image file.

use std::fs::{File, OpenOptions};
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

use super::request::{MAX_DATA_LEN, Op, Request};
use crate::devices::counters::counters;
use crate::devices::virtio::chain;
use crate::devices::virtio::{ActivateError, Interrupt, VirtioDevice, read_config_bytes};
use crate::memory::GuestMemoryMmap;

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

    /// Parses `PATH[,readonly]` (the `--disk` syntax).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("A disk needs a path")?;
        let mut read_only = false;
        for opt in parts {
            match opt {
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

/// Errors of opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("Cannot open disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The image is smaller than one sector.
    #[error("Disk image {0} is smaller than one 512-byte sector")]
    TooSmall(PathBuf),
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
        /// Requests answered with IOERR (bad request or I/O failure).
        errors,
        /// Requests answered with UNSUPP.
        unsupported,
        /// Chains dropped without a status (no place to put one).
        invalid_chains,
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
}

impl Block {
    /// Opens the image of `config`.
    pub fn new(
        config: BlockConfig,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|source| BlockError::Open {
                path: config.path.clone(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| BlockError::Open {
                path: config.path.clone(),
                source,
            })?
            .len();
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
        Ok(Self {
            file,
            config,
            sectors,
            id,
            mem,
            interrupt,
            queue: None,
            counters: Arc::new(BlockCounters::default()),
        })
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
        let (status, written) = match request {
            Ok(req) => self.execute(&req),
            Err(e) => {
                tracing::debug!("virtio-blk: {e}");
                (BLK_S_IOERR, 0)
            }
        };
        match status {
            BLK_S_OK => {}
            BLK_S_UNSUPP => add(&self.counters.unsupported, 1),
            _ => add(&self.counters.errors, 1),
        }
        if self.mem.write_obj(status, status_addr).is_err() {
            add(&self.counters.invalid_chains, 1);
            return 0;
        }
        written + 1
    }

    /// Runs a well-formed request; returns the status and the data bytes written to the guest.
    fn execute(&mut self, req: &Request) -> (u8, u32) {
        let len = req.data_len();
        match req.op {
            Op::Read => match self.read(req) {
                Ok(()) => {
                    add(&self.counters.read_requests, 1);
                    add(&self.counters.read_bytes, len);
                    (BLK_S_OK, len as u32)
                }
                Err(()) => (BLK_S_IOERR, 0),
            },
            Op::Write if self.config.read_only => (BLK_S_IOERR, 0),
            Op::Write => match self.write(req) {
                Ok(()) => {
                    add(&self.counters.write_requests, 1);
                    add(&self.counters.write_bytes, len);
                    (BLK_S_OK, 0)
                }
                Err(()) => (BLK_S_IOERR, 0),
            },
            Op::Flush => match self.file.sync_data() {
                Ok(()) => {
                    add(&self.counters.flush_requests, 1);
                    (BLK_S_OK, 0)
                }
                Err(_) => (BLK_S_IOERR, 0),
            },
            Op::GetId => {
                let mut left = &self.id[..];
                let mut written = 0;
                for b in &req.data {
                    let n = left.len().min(b.len as usize);
                    if self.mem.write_slice(&left[..n], b.addr).is_err() {
                        return (BLK_S_IOERR, 0);
                    }
                    left = &left[n..];
                    written += n as u32;
                }
                add(&self.counters.get_id_requests, 1);
                (BLK_S_OK, written)
            }
            Op::Unsupported(_) => (BLK_S_UNSUPP, 0),
        }
    }

    fn read(&self, req: &Request) -> Result<(), ()> {
        let mut offset = req.offset_within(self.sectors).map_err(|_| ())?;
        for b in &req.data {
            let mut buf = vec![0u8; b.len as usize];
            self.file.read_exact_at(&mut buf, offset).map_err(|_| ())?;
            // Through vm-memory, so the page is marked in the dirty bitmap.
            self.mem.write_slice(&buf, b.addr).map_err(|_| ())?;
            offset += u64::from(b.len);
        }
        Ok(())
    }

    fn write(&self, req: &Request) -> Result<(), ()> {
        let mut offset = req.offset_within(self.sectors).map_err(|_| ())?;
        for b in &req.data {
            let mut buf = vec![0u8; b.len as usize];
            self.mem.read_slice(&mut buf, b.addr).map_err(|_| ())?;
            self.file.write_all_at(&buf, offset).map_err(|_| ())?;
            offset += u64::from(b.len);
        }
        Ok(())
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
}
