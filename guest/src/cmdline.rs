//! The guest command line: space-separated `key=value` words. The first workload word wins.

/// Most addresses a `touch=` list may name.
pub const MAX_TOUCH: usize = 64;

/// A workload and its parameters.
pub struct Work {
    pub kind: Kind,
    /// Pause between steps of `count` and `touch`, in milliseconds.
    pub interval_ms: u64,
    /// Number of rounds of `touch` (0 = forever).
    pub rounds: u64,
    /// Seconds `dirty` and `randpages` run for (0 = forever).
    pub secs: u64,
    /// Percentage of each page `randpages` rewrites (1 to 100; the rest keeps its content).
    pub fill_pct: u64,
    /// Which disk the disk workloads use (0 = the first).
    pub disk: u64,
    /// Bytes per disk request.
    pub chunk: u64,
    /// Network services for the `net` workload.
    pub services: Services,
    /// The workload was given to this vCPU by an `@N:` word (so it runs here even if it is
    /// one that otherwise only vCPU 0 runs).
    pub explicit: bool,
}

/// What the network workload serves.
#[derive(Clone, Copy)]
pub struct Services {
    /// The guest's IPv4 address.
    pub ip: [u8; 4],
    /// Its prefix length.
    pub prefix: u8,
    /// TCP echo port.
    pub echo: Option<u16>,
    /// TCP pattern-stream port.
    pub stream: Option<u16>,
    /// TCP discard port (reads and drops everything: upload throughput).
    pub sink: Option<u16>,
    /// HTTP file on port 80: size in MiB and pattern seed.
    pub http: Option<(u64, u64)>,
}

fn parse_ip(s: &str) -> Result<([u8; 4], u8), &'static str> {
    let bad = "ip= wants A.B.C.D/PREFIX";
    let (addr, prefix) = s.split_once('/').ok_or(bad)?;
    let mut ip = [0u8; 4];
    let mut parts = addr.split('.');
    for b in &mut ip {
        *b = parts.next().ok_or(bad)?.parse().map_err(|_| bad)?;
    }
    let prefix: u8 = prefix.parse().map_err(|_| bad)?;
    if parts.next().is_some() || prefix > 32 {
        return Err(bad);
    }
    Ok((ip, prefix))
}

fn port(value: &str, default: u16) -> Result<u16, &'static str> {
    if value.is_empty() {
        return Ok(default);
    }
    u16::try_from(number(value)?).map_err(|_| "a port is out of range")
}

// No allocator in the guest: the touch list lives inline.
#[allow(clippy::large_enum_variant)]
pub enum Kind {
    /// Print a counter `n` times (0 = forever).
    Count(u64),
    /// Print a counter and the guest's clock (ms since its TSC started) `n` times (0 = forever).
    Clock(u64),
    /// Run `n` iterations of the compute kernel and report the time taken.
    Compute(u64),
    /// Write `mib_per_s` MiB/s over a working set of `mib` MiB (split between the vCPUs).
    Dirty { mib_per_s: u64, mib: u64 },
    /// Rewrite `Work::fill_pct` % of a page with pseudo-random bytes, `mib_per_s` MiB of pages
    /// per second (0 = as fast as it can), over a working set of `mib` MiB (split between the
    /// vCPUs) that is first filled with pseudo-random bytes.
    RandPages { mib_per_s: u64, mib: u64 },
    /// Write one word into each listed page, once per round (vCPU 0 only).
    Touch { addrs: [u64; MAX_TOUCH], len: usize },
    /// Write `mib` MiB of pattern `seed` to the disk from sector 0, then flush (vCPU 0 only).
    DiskWrite { mib: u64, seed: u64 },
    /// Read `mib` MiB from sector 0 and check it is pattern `seed` (vCPU 0 only).
    DiskVerify { mib: u64, seed: u64 },
    /// Append `n` numbered, checksummed 4 KiB records from block 0, each written and flushed
    /// before the guest says so on the console (vCPU 0 only).
    DiskLog(u64),
    /// Check the records `disk-log` wrote: the length of the clean prefix, and any valid record
    /// after it (a gap) or a damaged one inside the first `mib` MiB (vCPU 0 only).
    DiskLogVerify(u64),
    /// `count` reads of one chunk each at pseudo-random chunk-aligned offsets in the first
    /// `mib` MiB (vCPU 0 only).
    DiskRandRead { mib: u64, count: u64 },
    /// Serve the network services in `Work::services` (vCPU 0 only), forever.
    Net,
}

fn mib_seed(value: &str) -> Result<(u64, u64), &'static str> {
    match value.split_once(',') {
        Some((m, s)) => Ok((number(m)?, number(s)?)),
        None => Ok((number(value)?, 1)),
    }
}

fn number(s: &str) -> Result<u64, &'static str> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| "a number is malformed")
}

/// Parses the words that apply to `vcpu`: unprefixed ones, and `@N:word` where N is `vcpu`.
pub fn parse(cmdline: &str, vcpu: u64) -> Result<Work, &'static str> {
    let mut work = Work {
        kind: Kind::Count(5),
        interval_ms: 100,
        rounds: 0,
        secs: 0,
        fill_pct: 100,
        disk: 0,
        chunk: 64 << 10,
        services: Services {
            ip: [10, 0, 2, 15],
            prefix: 24,
            echo: None,
            stream: None,
            sink: None,
            http: None,
        },
        explicit: false,
    };
    let mut have_kind = false;
    for word in cmdline.split_ascii_whitespace() {
        let word = match word.strip_prefix('@') {
            Some(rest) => {
                let (n, w) = rest.split_once(':').ok_or("@N: needs a colon")?;
                if number(n)? != vcpu {
                    continue;
                }
                (w, true)
            }
            None => (word, false),
        };
        let (word, prefixed) = word;
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        let kind = match key {
            "count" => Kind::Count(if value.is_empty() { 5 } else { number(value)? }),
            "clock" => Kind::Clock(if value.is_empty() { 5 } else { number(value)? }),
            "compute" => Kind::Compute(number(value)?),
            "dirty" => {
                let (rate, mib) = value.split_once(',').ok_or("dirty= wants RATE,MIB")?;
                Kind::Dirty {
                    mib_per_s: number(rate)?,
                    mib: number(mib)?.max(1),
                }
            }
            "randpages" => {
                let (rate, mib) = value.split_once(',').ok_or("randpages= wants RATE,MIB")?;
                Kind::RandPages {
                    mib_per_s: number(rate)?,
                    mib: number(mib)?.max(1),
                }
            }
            "touch" => {
                let mut addrs = [0u64; MAX_TOUCH];
                let mut len = 0;
                for a in value.split(',').filter(|a| !a.is_empty()) {
                    *addrs.get_mut(len).ok_or("touch= lists too many pages")? = number(a)?;
                    len += 1;
                }
                Kind::Touch { addrs, len }
            }
            "disk-write" => {
                let (mib, seed) = mib_seed(value)?;
                Kind::DiskWrite { mib, seed }
            }
            "disk-randread" => {
                let (mib, count) = value
                    .split_once(',')
                    .ok_or("disk-randread= wants MIB,COUNT")?;
                Kind::DiskRandRead {
                    mib: number(mib)?,
                    count: number(count)?,
                }
            }
            "disk-verify" => {
                let (mib, seed) = mib_seed(value)?;
                Kind::DiskVerify { mib, seed }
            }
            "disk-log" => Kind::DiskLog(number(value)?),
            "disk-log-verify" => Kind::DiskLogVerify(number(value)?),
            "net" => Kind::Net,
            "tcp-echo" => {
                work.services.echo = Some(port(value, 7)?);
                Kind::Net
            }
            "tcp-stream" => {
                work.services.stream = Some(port(value, 19)?);
                Kind::Net
            }
            "tcp-sink" => {
                work.services.sink = Some(port(value, 9)?);
                Kind::Net
            }
            "http-file" => {
                work.services.http = Some(mib_seed(value)?);
                Kind::Net
            }
            "ip" => {
                (work.services.ip, work.services.prefix) = parse_ip(value)?;
                continue;
            }
            "disk" => {
                work.disk = number(value)?;
                continue;
            }
            "chunk-kib" => {
                work.chunk = number(value)?.clamp(1, 1024) << 10;
                continue;
            }
            "interval-ms" => {
                work.interval_ms = number(value)?;
                continue;
            }
            "rounds" => {
                work.rounds = number(value)?;
                continue;
            }
            "randpages-fill" => {
                work.fill_pct = number(value)?;
                if !(1..=100).contains(&work.fill_pct) {
                    return Err("randpages-fill= wants a percentage from 1 to 100");
                }
                continue;
            }
            "secs" => {
                work.secs = number(value)?;
                continue;
            }
            _ => return Err("unknown word on the command line"),
        };
        // The first workload word wins, but one addressed to this vCPU (@N:) beats any other.
        if !have_kind || (prefixed && !work.explicit) {
            work.kind = kind;
            work.explicit = prefixed;
            have_kind = true;
        }
    }
    Ok(work)
}
