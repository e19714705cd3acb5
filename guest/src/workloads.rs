//! The workloads, run by every vCPU. Each returns Err(status) to power off with that status.

use ftvm_guest_abi::virtio::{BLK_S_OK, ID_BLOCK};
use ftvm_guest_abi::{BootInfo, compute, fill_pattern};

use crate::blk::Blk;
use crate::cmdline::{Kind, Work};
use crate::{Clock, heap, println};

const PAGE: u64 = 4096;

pub fn run(work: &Work, boot: &BootInfo, vcpu: u64, clock: Clock) -> Result<(), u32> {
    let (stack_lo, stack_hi) = boot.stack(vcpu);
    // Workloads for one vCPU run on vCPU 0, or on the vCPU an `@N:` word named.
    let single = work.explicit || vcpu == 0;
    match &work.kind {
        Kind::Count(n) => {
            println!(
                "vcpu{} workload count stack=0x{:x}-0x{:x}",
                vcpu, stack_lo, stack_hi
            );
            let mut k = 1;
            while *n == 0 || k <= *n {
                println!("vcpu{} count {}", vcpu, k);
                clock.sleep_ms(work.interval_ms);
                k += 1;
            }
        }
        Kind::Clock(n) => {
            let mut k = 1;
            while *n == 0 || k <= *n {
                println!("vcpu{} clock {} ms {}", vcpu, k, clock.now_ns() / 1_000_000);
                clock.sleep_ms(work.interval_ms);
                k += 1;
            }
        }
        Kind::Compute(iterations) => {
            let start = clock.now_ns();
            let result = compute(*iterations, vcpu + 1);
            let ns = clock.now_ns() - start;
            println!(
                "vcpu{} compute iterations={} ns={} result={}",
                vcpu, iterations, ns, result
            );
        }
        Kind::Dirty { mib_per_s, mib } => dirty(work, boot, vcpu, clock, *mib_per_s, *mib)?,
        Kind::RandPages { mib_per_s, mib } => {
            rand_pages(work, boot, vcpu, clock, *mib_per_s, *mib)?
        }
        Kind::DiskWrite { mib, seed } if single => {
            disk(work, boot, clock, vcpu, true, *mib, *seed)?
        }
        Kind::DiskRandRead { mib, count } if single => {
            rand_read(work, boot, clock, vcpu, *mib, *count)?
        }
        Kind::DiskVerify { mib, seed } if single => {
            disk(work, boot, clock, vcpu, false, *mib, *seed)?
        }
        Kind::Net if single => crate::netsvc::run(boot, clock, &work.services)?,
        Kind::DiskLog(n) if single => disk_log(work, boot, clock, vcpu, *n)?,
        Kind::DiskLogVerify(mib) if single => disk_log_verify(work, boot, vcpu, *mib)?,
        Kind::DiskWrite { .. }
        | Kind::DiskLog(_)
        | Kind::DiskLogVerify(_)
        | Kind::DiskVerify { .. }
        | Kind::DiskRandRead { .. }
        | Kind::Net => {}
        Kind::Touch { addrs, len } => {
            if vcpu != 0 {
                return Ok(());
            }
            let addrs = &addrs[..*len];
            if let Some(bad) = addrs.iter().find(|&&a| a % 8 != 0 || !boot.is_free(a, 8)) {
                println!(
                    "ftvm-guest: error: touch address 0x{:x} is not free RAM",
                    bad
                );
                return Err(2);
            }
            println!(
                "vcpu0 workload touch pages={} stack=0x{:x}-0x{:x}",
                addrs.len(),
                stack_lo,
                stack_hi
            );
            let mut round = 1;
            while work.rounds == 0 || round <= work.rounds {
                for &a in addrs {
                    // SAFETY: a is 8-aligned and inside free RAM (checked above), which is
                    // identity-mapped and used by nothing else.
                    unsafe { (a as *mut u64).write_volatile(round) };
                }
                println!("vcpu0 touch round {}", round);
                clock.sleep_ms(work.interval_ms);
                round += 1;
            }
        }
    }
    Ok(())
}

/// This vCPU's share of a working set of `mib` MiB after the heap: (base, pages).
fn working_set(boot: &BootInfo, vcpu: u64, mib: u64, name: &str) -> Result<(u64, u64), u32> {
    let share = ((mib << 20) / boot.vcpus) & !(PAGE - 1);
    let base = heap::end(boot) + vcpu * share;
    if share < PAGE || !boot.is_free(base, share) {
        println!(
            "ftvm-guest: error: the {} working set does not fit in free RAM",
            name
        );
        return Err(2);
    }
    Ok((base, share / PAGE))
}

/// Calls `write(n)` for n = 0, 1, 2... at `mib_per_s` MiB of pages per second shared between
/// the vCPUs (0 = as fast as it can) until `work.secs` have passed (0 = forever). Returns the
/// number of calls and the nanoseconds they took.
fn paced(
    work: &Work,
    boot: &BootInfo,
    clock: Clock,
    mib_per_s: u64,
    mut write: impl FnMut(u64),
) -> (u64, u64) {
    // Pages per second for this vCPU: 256 pages per MiB.
    let per_s = (mib_per_s * 256 / boot.vcpus).max(1);
    let unpaced = mib_per_s == 0;
    let start = clock.now_ns();
    let end = if work.secs == 0 {
        u64::MAX
    } else {
        start + work.secs * 1_000_000_000
    };
    let mut written = 0u64;
    loop {
        let now = clock.now_ns();
        if now >= end {
            break;
        }
        let due = if unpaced {
            written + 64
        } else {
            (now - start) / 1_000_000 * per_s / 1000 + 1
        };
        // Look at the clock again after at most 1 MiB, so a vCPU that fell behind stops on time.
        let batch = due.min(written + 256);
        while written < batch {
            write(written);
            written += 1;
        }
        if written >= due && !unpaced {
            crate::wait_us(1000);
        }
    }
    (written, clock.now_ns() - start)
}

/// Writes one word into each page of this vCPU's share of the working set, at the given rate.
fn dirty(
    work: &Work,
    boot: &BootInfo,
    vcpu: u64,
    clock: Clock,
    mib_per_s: u64,
    mib: u64,
) -> Result<(), u32> {
    let (base, pages) = working_set(boot, vcpu, mib, "dirty")?;
    println!(
        "vcpu{} workload dirty base=0x{:x} pages={} rate-mib-s={}",
        vcpu, base, pages, mib_per_s
    );
    let (written, _) = paced(work, boot, clock, mib_per_s, |n| {
        let addr = base + (n % pages) * PAGE;
        // SAFETY: addr is a page inside this vCPU's share of free RAM (checked above).
        unsafe { (addr as *mut u64).write_volatile(n) };
    });
    println!("vcpu{} dirty written={}", vcpu, written);
    Ok(())
}

/// xorshift64*: a fast generator whose output zstd cannot compress.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `words` 8-byte words from `addr` with fresh output.
    fn fill(&mut self, addr: u64, words: u64) {
        for i in 0..words {
            // SAFETY: the callers pass a range inside this vCPU's share of free RAM (checked
            // by working_set), 8-aligned.
            unsafe { ((addr + i * 8) as *mut u64).write_volatile(self.next()) };
        }
    }
}

/// Fills this vCPU's share of the working set with pseudo-random bytes, then rewrites the first
/// `work.fill_pct` % of one page after another with fresh ones, at the given rate.
fn rand_pages(
    work: &Work,
    boot: &BootInfo,
    vcpu: u64,
    clock: Clock,
    mib_per_s: u64,
    mib: u64,
) -> Result<(), u32> {
    let (base, pages) = working_set(boot, vcpu, mib, "randpages")?;
    // Seeded per vCPU, so no two vCPUs write the same bytes; never zero.
    let mut rng = Rng(ftvm_guest_abi::pattern_word(0x7261_6e64, vcpu) | 1);
    rng.fill(base, pages * PAGE / 8);
    let words = (PAGE / 8 * work.fill_pct / 100).max(1);
    println!(
        "vcpu{} workload randpages base=0x{:x} pages={} rate-mib-s={} fill-pct={}",
        vcpu, base, pages, mib_per_s, work.fill_pct
    );
    let (written, ns) = paced(work, boot, clock, mib_per_s, |n| {
        rng.fill(base + (n % pages) * PAGE, words)
    });
    println!(
        "vcpu{} randpages written={} bytes={} ns={}",
        vcpu,
        written,
        written * words * 8,
        ns
    );
    Ok(())
}

fn fail<T>(name: &str, what: &str) -> Result<T, u32> {
    println!("ftvm-guest: error: {}: {}", name, what);
    Err(2)
}

/// The disk chosen by `disk=`, initialised, checked to hold `mib` MiB.
fn open_disk(work: &Work, boot: &BootInfo, name: &str, mib: u64) -> Result<Blk, u32> {
    let Some(slot) = boot
        .virtio_devices()
        .iter()
        .filter(|d| d.device_type == u64::from(ID_BLOCK))
        .nth(work.disk as usize)
    else {
        return fail(name, "no such disk");
    };
    let blk = match Blk::new(slot.base) {
        Ok(b) => b,
        Err(e) => return fail(name, e),
    };
    if mib << 20 > blk.sectors * 512 {
        return fail(name, "the disk is smaller than the transfer");
    }
    Ok(blk)
}

fn print_counts(work: &Work, blk: &Blk) {
    let c = blk.counts;
    println!(
        "blk{} counts reads={} read-bytes={} writes={} write-bytes={} flushes={}",
        work.disk, c.reads, c.read_bytes, c.writes, c.write_bytes, c.flushes
    );
}

/// Reads `count` chunks at pseudo-random chunk-aligned offsets within the first `mib` MiB.
fn rand_read(
    work: &Work,
    boot: &BootInfo,
    clock: Clock,
    vcpu: u64,
    mib: u64,
    count: u64,
) -> Result<(), u32> {
    let name = "disk-randread";
    let mut blk = open_disk(work, boot, name, mib)?;
    let chunks = ((mib << 20) / work.chunk).max(1);
    let Some(buf) = heap::alloc(work.chunk, 4096) else {
        return fail(name, "out of memory");
    };
    println!(
        "vcpu{} workload {} count={} chunk={}",
        vcpu, name, count, work.chunk
    );
    let start = clock.now_ns();
    for i in 0..count {
        let offset = (ftvm_guest_abi::pattern_word(99, i) % chunks) * work.chunk;
        let s = blk.read(offset / 512, buf, work.chunk as u32);
        if s != BLK_S_OK {
            println!(
                "vcpu{} {} refused status={} sector={}",
                vcpu,
                name,
                s,
                offset / 512
            );
            return Err(4);
        }
    }
    println!(
        "vcpu{} {} ok bytes={} ns={}",
        vcpu,
        name,
        count * work.chunk,
        clock.now_ns() - start
    );
    print_counts(work, &blk);
    Ok(())
}

/// Writes or verifies `mib` MiB of pattern `seed` on the chosen disk, from sector 0.
fn disk(
    work: &Work,
    boot: &BootInfo,
    clock: Clock,
    vcpu: u64,
    write: bool,
    mib: u64,
    seed: u64,
) -> Result<(), u32> {
    let name = if write { "disk-write" } else { "disk-verify" };
    let mut blk = open_disk(work, boot, name, mib)?;
    let total = mib << 20;
    let chunk = work.chunk;
    let (Some(buf), Some(expect)) = (heap::alloc(chunk, 4096), heap::alloc(chunk, 4096)) else {
        return fail(name, "out of memory");
    };
    let start = clock.now_ns();
    println!(
        "vcpu{} workload {} bytes={} chunk={} sectors={}",
        vcpu, name, total, chunk, blk.sectors
    );
    let mut offset = 0;
    while offset < total {
        let len = chunk.min(total - offset);
        // SAFETY: buf and expect are heap allocations of `chunk` bytes owned by this workload.
        let (data, want) = unsafe {
            (
                core::slice::from_raw_parts_mut(buf as *mut u8, len as usize),
                core::slice::from_raw_parts_mut(expect as *mut u8, len as usize),
            )
        };
        if write {
            fill_pattern(seed, offset, data);
            let s = blk.write(offset / 512, buf, len as u32);
            if s != BLK_S_OK {
                println!(
                    "vcpu{} disk-write refused status={} sector={}",
                    vcpu,
                    s,
                    offset / 512
                );
                return Err(4);
            }
        } else {
            let s = blk.read(offset / 512, buf, len as u32);
            if s != BLK_S_OK {
                println!(
                    "vcpu{} disk-verify refused status={} sector={}",
                    vcpu,
                    s,
                    offset / 512
                );
                return Err(4);
            }
            fill_pattern(seed, offset, want);
            if let Some(i) = (0..data.len()).find(|&i| data[i] != want[i]) {
                println!(
                    "vcpu{} disk-verify mismatch at byte {}",
                    vcpu,
                    offset + i as u64
                );
                return Err(5);
            }
        }
        offset += len;
    }
    if write && blk.flush() != BLK_S_OK {
        return fail(name, "flush failed");
    }
    println!(
        "vcpu{} {} ok bytes={} ns={}",
        vcpu,
        name,
        total,
        clock.now_ns() - start
    );
    print_counts(work, &blk);
    Ok(())
}

/// First bytes of a `disk-log` record.
const LOG_MAGIC: [u8; 8] = *b"FTVMLOG1";
const LOG_BLOCK: usize = 4096;

/// FNV-1a, 64 bits: the record's checksum.
fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Fills `rec` as record `seq`: magic, number, pattern, checksum of the rest in the last 8.
fn log_record(seq: u64, rec: &mut [u8]) {
    rec[..8].copy_from_slice(&LOG_MAGIC);
    rec[8..16].copy_from_slice(&seq.to_le_bytes());
    fill_pattern(seq, 0, &mut rec[16..LOG_BLOCK - 8]);
    let sum = fnv64(&rec[..LOG_BLOCK - 8]);
    rec[LOG_BLOCK - 8..].copy_from_slice(&sum.to_le_bytes());
}

/// Record `seq` if `rec` is a whole, clean one.
fn log_check(rec: &[u8]) -> Option<u64> {
    if rec[..8] != LOG_MAGIC {
        return None;
    }
    let sum = u64::from_le_bytes(rec[LOG_BLOCK - 8..].try_into().ok()?);
    (fnv64(&rec[..LOG_BLOCK - 8]) == sum)
        .then(|| u64::from_le_bytes(rec[8..16].try_into().unwrap_or_default()))
}

fn disk_log(work: &Work, boot: &BootInfo, clock: Clock, vcpu: u64, n: u64) -> Result<(), u32> {
    let name = "disk-log";
    let mib = (n * LOG_BLOCK as u64).div_ceil(1 << 20).max(1);
    let mut blk = open_disk(work, boot, name, mib)?;
    let Some(buf) = heap::alloc(LOG_BLOCK as u64, 4096) else {
        return fail(name, "out of memory");
    };
    // SAFETY: buf is a heap allocation of LOG_BLOCK bytes owned by this workload.
    let rec = unsafe { core::slice::from_raw_parts_mut(buf as *mut u8, LOG_BLOCK) };
    println!("vcpu{} workload disk-log records={}", vcpu, n);
    for seq in 1..=n {
        log_record(seq, rec);
        let sector = (seq - 1) * (LOG_BLOCK as u64 / 512);
        if blk.write(sector, buf, LOG_BLOCK as u32) != BLK_S_OK || blk.flush() != BLK_S_OK {
            return fail(name, "a record was refused");
        }
        // Told only once written and flushed.
        println!("vcpu{} disk-log record {}", vcpu, seq);
        clock.sleep_ms(work.interval_ms);
    }
    println!("vcpu{} disk-log done records={}", vcpu, n);
    Ok(())
}

fn disk_log_verify(work: &Work, boot: &BootInfo, vcpu: u64, mib: u64) -> Result<(), u32> {
    let name = "disk-log-verify";
    let mut blk = open_disk(work, boot, name, mib)?;
    let Some(buf) = heap::alloc(LOG_BLOCK as u64, 4096) else {
        return fail(name, "out of memory");
    };
    // SAFETY: buf is a heap allocation of LOG_BLOCK bytes owned by this workload.
    let rec = unsafe { core::slice::from_raw_parts_mut(buf as *mut u8, LOG_BLOCK) };
    let (mut prefix, mut ended, mut gaps, mut damaged) = (0u64, false, 0u64, 0u64);
    for block in 0..(mib << 20) / LOG_BLOCK as u64 {
        if blk.read(block * (LOG_BLOCK as u64 / 512), buf, LOG_BLOCK as u32) != BLK_S_OK {
            return fail(name, "a read was refused");
        }
        match log_check(rec) {
            Some(seq) if !ended && seq == block + 1 => prefix += 1,
            Some(_) => gaps += 1,
            None => {
                ended = true;
                // Anything but never-written zeros is a damaged record.
                if rec.iter().any(|&b| b != 0) {
                    damaged += 1;
                }
            }
        }
    }
    println!(
        "vcpu{} disk-log-verify records={} gaps={} damaged={}",
        vcpu, prefix, gaps, damaged
    );
    Ok(())
}
