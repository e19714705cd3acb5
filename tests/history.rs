//! The accounting history and `ftvm accounting export|ls`: exact billing totals, rollbacks
//! reported apart, bad input refused with one line and nothing written, and a store on a full
//! or read-only file system that returns errors (and catches up once there is room) instead of
//! panicking.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::protection::{Replica, cert, field, protected_primary, s};
use history::{History, HistoryError, Options, Recorded, Sample, names};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

fn ftvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(args)
        .output()
        .expect("run ftvm")
}

/// A sample with one vCPU, a disk and a network card whose counters are `k` times a base.
fn sample(vm: &str, time_ms: u64, epoch: u64, k: u64) -> Sample {
    let mut c = BTreeMap::new();
    c.insert(names::vcpu_run_ns(0), k * 1_000_000_001);
    c.insert(names::vcpu_run_ns(1), k * 500_000_000);
    c.insert(names::block_requests("vda", "read"), k * 3);
    c.insert(names::block_bytes("vda", "read"), k * 3 * 4096);
    c.insert(names::block_requests("vda", "write"), k * 2);
    c.insert(names::block_bytes("vda", "write"), k * 2 * 512);
    c.insert(names::block_requests("vda", "flush"), k);
    c.insert(names::net_packets("eth0", "rx"), k * 7);
    c.insert(names::net_bytes("eth0", "rx"), k * 7 * 60);
    c.insert(names::net_packets("eth0", "tx"), k * 5);
    c.insert(names::net_bytes("eth0", "tx"), k * 5 * 1514);
    c.insert("serial/tx_bytes".into(), k * 11);
    Sample {
        vm: vm.into(),
        time_ms,
        epoch,
        counters: c,
    }
}

/// Every file under `dir` with its contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(snapshot(&p));
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A history of two VMs; vm-a is failed over at 5.5 s: it continues from epoch 180 after
/// having committed 200 (the primary's last 20 epochs are lost and redone).
fn populated(dir: &Path) {
    let h = History::create(dir, Options::default()).unwrap();
    for s in 0..10u64 {
        let t = 1_000_000 + s * 1000;
        let k = s + 1;
        if s == 5 {
            h.record(&sample("vm-a", t + 100, 200, 7)).unwrap();
            h.record(&sample("vm-a", t + 500, 180, 6)).unwrap();
        } else {
            h.record(&sample("vm-a", t + 100, s * 40, k + 1)).unwrap();
        }
        h.record(&sample("vm-b", t + 200, s * 40, k)).unwrap();
    }
}

#[test]
fn export_totals_equal_the_counters_at_the_last_epoch_and_rollbacks_stand_apart() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path());
    let d = dir.path().to_str().unwrap();

    let out = ftvm(&["accounting", "export", "--history", d, "--format", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vms = doc["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2);
    for vm in vms {
        // Billed counters are the counters at the last epoch (the interval starts at the VM's
        // start), each one, exactly.
        assert_eq!(vm["start"]["kind"], "vm_start");
        assert_eq!(vm["billed_counters"], vm["end_counters"]);
        assert_eq!(vm["end"]["epoch"], 360);
    }
    let a = &vms[0];
    assert_eq!(a["vm"], "vm-a");
    // At the last epoch vm-a's counters are 11 × the base.
    assert_eq!(a["billed"]["cpu_ns"], 11 * 1_500_000_001u64);
    assert_eq!(a["billed"]["cpu_seconds"], "16.500000011");
    assert_eq!(a["billed"]["block_write_bytes"], 11 * 1024);
    assert_eq!(a["billed"]["block_flush_requests"], 11);
    assert_eq!(a["billed"]["net_tx_bytes"], 11 * 5 * 1514);
    assert_eq!(a["billed_counters"]["serial/tx_bytes"], 11 * 11);
    assert_eq!(a["epochs"]["rollbacks"], 1);
    let rb = &a["rolled_back"][0];
    assert_eq!(
        (rb["from_epoch"].as_u64(), rb["to_epoch"].as_u64()),
        (Some(200), Some(180))
    );
    assert_eq!(rb["amounts"]["cpu_ns"], 1_500_000_001u64);
    assert_eq!(vms[1]["epochs"]["rollbacks"], 0);

    // CSV: the same totals; a rolled_back line apart.
    let out = ftvm(&["accounting", "export", "--history", d, "--vm", "vm-a"]);
    assert!(out.status.success());
    let csv = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(
        lines[0]
            .starts_with("kind,vm,start_ms,end_ms,from_epoch,to_epoch,samples,cpu_seconds,cpu_ns,")
    );
    assert_eq!(
        lines[1],
        "billed,vm-a,,1009100,0,360,10,16.500000011,16500000011,33,135168,22,11264,11,77,4620,55,83270"
    );
    assert!(
        lines[2].starts_with("rolled_back,vm-a,1005500,1005500,200,180,,1.500000001,1500000001,3,")
    );

    // An interval: from the last sample before it to the last one in it; adjacent intervals
    // add up to the whole.
    let part = |from: &str, to: &str| {
        let out = ftvm(&[
            "accounting",
            "export",
            "--history",
            d,
            "--vm",
            "vm-b",
            "--from",
            from,
            "--to",
            to,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let csv = String::from_utf8(out.stdout).unwrap();
        let cols: Vec<u64> = csv
            .lines()
            .nth(1)
            .unwrap()
            .split(',')
            .skip(8)
            .map(|v| v.parse().unwrap())
            .collect();
        cols
    };
    let first = part("0", "1004000");
    let second = part("1004000", "1970-01-01T00:16:50Z");
    let whole = part("0", "99999999");
    assert_eq!(first[0], 4 * 1_500_000_001);
    for i in 0..whole.len() {
        assert_eq!(first[i] + second[i], whole[i], "column {i}");
    }

    let out = ftvm(&["accounting", "ls", "--history", d]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "vm,samples,first_ms,last_ms,first_epoch,last_epoch,pruned_before_ms\n\
         vm-a,10,1000100,1009100,0,360,\n\
         vm-b,10,1000200,1009200,0,360,\n"
    );
}

/// A populated history whose RocksDB files (a table, the manifest or the write-ahead log) are
/// then damaged in place by `damage`, given the file's path and bytes.
fn damaged(dir: &Path, file: &str, damage: impl FnOnce(&mut Vec<u8>)) {
    populated(dir);
    {
        // A table on disk, and more samples only in the write-ahead log.
        let h = History::open(dir).unwrap();
        h.compact().unwrap();
        for s in 10..40u64 {
            h.record(&sample("vm-b", 1_000_200 + s * 1000, s * 40, s + 1))
                .unwrap();
        }
    }
    let path = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().contains(file))
        .unwrap_or_else(|| panic!("no {file} file in {}", dir.display()));
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(
        bytes.len() > 64,
        "{} is too small to damage",
        path.display()
    );
    damage(&mut bytes);
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn bad_input_is_one_error_line_exit_1_and_nothing_written() {
    let root = tempfile::tempdir().unwrap();
    let good = root.path().join("good");
    populated(&good);
    let corrupted = root.path().join("corrupted");
    populated(&corrupted);
    std::fs::write(corrupted.join("CURRENT"), b"MANIFEST-424242\n").unwrap();
    let not_history = root.path().join("not-history");
    std::fs::create_dir(&not_history).unwrap();
    std::fs::write(not_history.join("data"), b"x").unwrap();
    // Garbage in the middle of a table, a manifest of garbage, a flipped log record.
    let bad_table = root.path().join("bad-table");
    damaged(&bad_table, ".sst", |b| {
        let n = b.len();
        b[n / 3..n / 2].fill(0x5a);
    });
    let bad_manifest = root.path().join("bad-manifest");
    damaged(&bad_manifest, "MANIFEST-", |b| b.fill(0x5a));
    let bad_log = root.path().join("bad-log");
    damaged(&bad_log, ".log", |b| {
        let n = b.len();
        for x in &mut b[n / 2..n / 2 + 3] {
            *x ^= 0xff;
        }
    });
    let missing = root.path().join("missing");
    let before = snapshot(root.path());
    let g = good.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["export", "--history", g, "--vm", "vm-z"],
            "unknown VM vm-z",
        ),
        (
            vec!["export", "--history", g, "--from", "5", "--to", "5"],
            "empty",
        ),
        (
            vec!["export", "--history", g, "--from", "6", "--to", "5"],
            "reversed",
        ),
        (
            vec!["export", "--history", g, "--from", "2000000"],
            "no samples",
        ),
        (
            vec!["export", "--history", g, "--from", "yesterday"],
            "bad time",
        ),
        (
            vec!["export", "--history", g, "--format", "xml"],
            "unknown --format",
        ),
        (vec!["export", "--history", g, "--vm", "a/b"], "VM id"),
        (
            vec!["export", "--history", missing.to_str().unwrap()],
            "does not exist",
        ),
        (
            vec!["ls", "--history", missing.to_str().unwrap()],
            "does not exist",
        ),
        (
            vec!["export", "--history", not_history.to_str().unwrap()],
            "not an ftvm history",
        ),
        (
            vec!["export", "--history", corrupted.to_str().unwrap()],
            "corrupted",
        ),
        (
            vec!["ls", "--history", corrupted.to_str().unwrap()],
            "corrupted",
        ),
    ];
    let mut cases = cases;
    for d in [&bad_table, &bad_manifest, &bad_log] {
        let d = d.to_str().unwrap();
        cases.push((vec!["export", "--history", d], "corrupted"));
        cases.push((vec!["ls", "--history", d], "corrupted"));
        cases.push((vec!["export", "--history", d, "--vm", "vm-b"], "corrupted"));
    }
    for (args, expect) in cases {
        let out = ftvm(&[&["accounting"], args.as_slice()].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("ftvm: error: ") && err.contains(expect),
            "{args:?}: {err}"
        );
    }
    assert!(!missing.exists());
    assert_eq!(
        snapshot(root.path()),
        before,
        "a failed export changed files"
    );
    // A successful export writes nothing either.
    assert!(
        ftvm(&["accounting", "export", "--history", g])
            .status
            .success()
    );
    assert_eq!(snapshot(root.path()), before, "an export changed files");
}

/// A tmpfs of `size` mounted on a new directory, unmounted on drop.
struct Mount(tempfile::TempDir);

impl Mount {
    fn new(size: &str) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        Self::mount(dir.path(), &format!("size={size}"));
        Mount(dir)
    }
    fn mount(path: &Path, opts: &str) {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success(), "this test mounts a tmpfs (needs root)");
    }
    fn remount(&self, opts: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(self.0.path())
            .status()
            .unwrap();
        assert!(st.success(), "remount {opts}");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn a_full_file_system_gives_errors_not_panics_and_the_store_catches_up_with_room() {
    let m = Mount::new("96m");
    let dir = m.0.path().join("h");
    let h = History::create(&dir, Options::default()).unwrap();
    for i in 0..5u64 {
        assert_eq!(
            h.record(&sample("vm-a", i * 1000, i, i)).unwrap(),
            Recorded::Written
        );
    }
    // Something else fills the file system to below the store's reserve (64 MiB).
    let filler = m.0.path().join("filler");
    std::fs::write(&filler, vec![1u8; 48 << 20]).unwrap();
    let before = h.range("vm-a", 0, u64::MAX).unwrap();
    for i in 5..10u64 {
        let e = h.record(&sample("vm-a", i * 1000, i, i)).unwrap_err();
        assert!(matches!(e, HistoryError::Full { .. }), "{e}");
        assert!(e.to_string().contains("not written"), "{e}");
    }
    assert!(h.prune(60_000).is_err());
    assert_eq!(h.range("vm-a", 0, u64::MAX).unwrap(), before);
    // Room again: the caller records what it kept back, and nothing is lost or doubled.
    std::fs::remove_file(&filler).unwrap();
    for i in 5..10u64 {
        assert_eq!(
            h.record(&sample("vm-a", i * 1000, i, i)).unwrap(),
            Recorded::Written
        );
    }
    assert_eq!(h.range("vm-a", 0, u64::MAX).unwrap().len(), 10);
    drop(h);
    assert_eq!(
        History::open(&dir)
            .unwrap()
            .range("vm-a", 0, u64::MAX)
            .unwrap()
            .len(),
        10
    );
}

#[test]
fn a_read_only_file_system_refuses_writes_and_still_exports() {
    let m = Mount::new("96m");
    let dir = m.0.path().join("h");
    populated(&dir);
    m.remount("ro");
    let e = History::open(&dir).unwrap_err();
    assert!(matches!(e, HistoryError::Db(..)), "{e}");
    let e = History::create(&dir, Options::default()).unwrap_err();
    assert!(matches!(e, HistoryError::Db(..)), "{e}");
    let out = ftvm(&[
        "accounting",
        "export",
        "--history",
        dir.to_str().unwrap(),
        "--vm",
        "vm-b",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("billed,vm-b,,1009200,0,360,10,")
    );
    m.remount("rw");
}

/// `GET /metrics` from 127.0.0.1:`port`: each sample line's series and value.
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let body = text.split_once("\r\n\r\n").expect("an HTTP answer").1;
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The replica's status until `done` holds for it, within [`LIMIT`].
fn replica_status_until(sock: &Path, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        let st = common::protection::status(sock);
        if done(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The replica's history on a small file system that fills up: the protected guest keeps
/// running and committing, the replica's status and `/metrics` say the history is behind;
/// once there is room again it catches up, and the billing export equals the replica's
/// committed counters exactly.
#[test]
fn a_replica_whose_history_cannot_write_keeps_committing_says_so_and_catches_up_exactly() {
    common::require_kvm();
    let m = Mount::new("96m");
    let hist = m.0.path().join("h");
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    let copies = dir.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let (rsock, psock) = (dir.path().join("r.sock"), dir.path().join("p.sock"));
    let replica = Replica::start_with(
        "127.0.0.1:0",
        &rc,
        &pfp,
        &[
            "--disk-dir",
            &s(&copies),
            "--history",
            &s(&hist),
            "--vm-name",
            "acct",
            "--metrics",
            "127.0.0.1:0",
            "--api",
            &s(&rsock),
        ],
        &[],
    );
    replica.wait_log("serving metrics");
    let log = replica.log();
    let line = log.lines().find(|l| l.contains("serving metrics")).unwrap();
    let port: u16 = field(line, "addr")
        .and_then(|a| {
            a.trim_start_matches("Some(")
                .trim_end_matches(')')
                .rsplit(':')
                .next()
        })
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {line}"));
    let (mut primary, _plog, console) = protected_primary(&[
        "run",
        "--mem",
        "32M",
        "--disk",
        &s(&img),
        "--api",
        &s(&psock),
        "--replica",
        &replica.addr,
        "--cert",
        &s(&pc),
        "--peer",
        &rfp,
        "--cmdline",
        "@0:disk-write=4,5 @0:chunk-kib=4 @1:count=0 @1:interval-ms=50",
    ]);
    let counts = console.wait_for_line("blk0 counts", LIMIT);
    assert!(counts.contains("writes=1024"), "{counts}");
    let st = replica_status_until(&rsock, "a first recorded epoch", |st| {
        st["history"]["recorded_epoch"].is_u64()
    });
    assert_eq!(st["history"]["behind"], false, "{st}");
    assert_eq!(st["history"]["vm"], "acct", "{st}");

    // Someone else fills the file system below the store's reserve (64 MiB).
    let filler = m.0.path().join("filler");
    std::fs::write(&filler, vec![1u8; 48 << 20]).unwrap();
    let st = replica_status_until(&rsock, "the history to fall behind", |st| {
        st["history"]["behind"] == true
    });
    let behind_at = st["committed_epoch"].as_u64().unwrap();
    let recorded = st["history"]["recorded_epoch"].as_u64().unwrap();
    assert!(
        st["history"]["last_error"]
            .as_str()
            .unwrap()
            .contains("not written"),
        "{st}"
    );
    // The guest runs on, protected, and the replica keeps committing.
    let st = replica_status_until(&rsock, "commits while behind", |st| {
        st["committed_epoch"].as_u64().unwrap() >= behind_at + 5
    });
    assert_eq!(st["history"]["behind"], true, "{st}");
    assert_eq!(
        st["history"]["recorded_epoch"].as_u64(),
        Some(recorded),
        "{st}"
    );
    common::protection::wait_protection(&psock, "protection while behind", |p| {
        p["state"] == "protected"
    });
    let scraped = scrape(port);
    assert_eq!(scraped["ftvm_history_behind{vm=\"acct\"}"], 1.0);
    let failures = scraped["ftvm_history_write_failures_total{vm=\"acct\"}"];
    assert!(failures >= 1.0, "{scraped:?}");
    assert_eq!(
        scraped["ftvm_history_recorded_epoch{vm=\"acct\"}"],
        recorded as f64
    );

    // Room again: the next commit (or the retry timer) writes the latest one.
    std::fs::remove_file(&filler).unwrap();
    let st = replica_status_until(&rsock, "the history to catch up", |st| {
        st["history"]["behind"] == false
    });
    assert!(
        st["history"]["recorded_epoch"].as_u64().unwrap() > behind_at,
        "{st}"
    );
    assert!(st["history"]["write_failures"].as_u64().unwrap() >= failures as u64);
    let scraped = scrape(port);
    assert_eq!(scraped["ftvm_history_behind{vm=\"acct\"}"], 0.0);

    // The primary stops in order; once the replica's last commit is recorded, its committed
    // counters are what the export must equal.
    let pid = primary.0.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = primary.0.as_mut().unwrap().wait().unwrap();
    assert_eq!(status.code(), Some(143), "the primary stopped in order");
    let st = replica_status_until(&rsock, "the last commit recorded", |st| {
        st["history"]["behind"] == false && st["history"]["recorded_epoch"] == st["committed_epoch"]
    });
    let last = st["committed_epoch"].as_u64().unwrap();
    let committed = scrape(port);
    let rpid = replica.child.0.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(rpid, libc::SIGTERM) }, 0);
    replica.wait_log("replica stopped in order");
    let log = replica.log();
    assert_eq!(
        log.matches("the accounting history is behind").count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("the accounting history caught up").count(),
        1,
        "{log}"
    );

    let out = ftvm(&[
        "accounting",
        "export",
        "--history",
        &s(&hist),
        "--vm",
        "acct",
        "--format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let vm = &doc["vms"][0];
    assert_eq!(vm["end"]["epoch"].as_u64(), Some(last), "{doc}");
    assert_eq!(vm["billed_counters"], vm["end_counters"], "{doc}");
    assert_eq!(vm["billed"]["block_write_requests"], 1024, "{doc}");
    assert_eq!(vm["billed"]["block_write_bytes"], 4 << 20, "{doc}");
    let end = vm["end_counters"].as_object().unwrap();
    let metric = |series: &str| {
        *committed
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in {committed:?}"))
    };
    let mut checked = 0;
    for (name, v) in end {
        let v = v.as_u64().unwrap();
        let parts: Vec<&str> = name.split('/').collect();
        match parts.as_slice() {
            ["vcpu", n, "run_ns"] => {
                let series = format!("ftvm_vcpu_run_seconds_total{{vm=\"acct\",vcpu=\"{n}\"}}");
                assert_eq!(metric(&series), v as f64 / 1e9, "{name}");
            }
            ["block", d, op, "requests"] => {
                let series =
                    format!("ftvm_block_requests_total{{vm=\"acct\",drive=\"{d}\",op=\"{op}\"}}");
                assert_eq!(metric(&series), v as f64, "{name}");
            }
            ["block", d, op, "bytes"] => {
                let series =
                    format!("ftvm_block_bytes_total{{vm=\"acct\",drive=\"{d}\",op=\"{op}\"}}");
                assert_eq!(metric(&series), v as f64, "{name}");
            }
            _ => panic!("an unexpected counter {name}"),
        }
        checked += 1;
    }
    // 2 vCPUs, and read/write/flush requests and read/write bytes of the one disk.
    assert_eq!(checked, 7, "{end:?}");
    assert!(end.values().any(|v| v.as_u64() > Some(0)));
}

#[test]
fn a_replica_s_metrics_on_a_port_in_use_or_a_bad_vm_name_is_one_error_line_and_no_history_is_made()
{
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let pfp = cert(&pc);
    cert(&rc);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let hist = dir.path().join("history");
    let out = common::ftvm(
        &[
            "replica",
            "--listen",
            "127.0.0.1:0",
            "--cert",
            &s(&rc),
            "--peer",
            &pfp,
            "--history",
            &s(&hist),
            "--metrics",
            &addr,
        ],
        LIMIT,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "ftvm: error: Cannot listen for metrics on {addr}: "
        )) && err.contains("in use"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    assert!(!hist.exists(), "the history was made");

    // A --vm-name the history cannot take: one line, nothing made.
    let out = common::ftvm(
        &[
            "replica",
            "--listen",
            "127.0.0.1:0",
            "--cert",
            &s(&rc),
            "--peer",
            &pfp,
            "--history",
            &s(&hist),
            "--vm-name",
            "my vm",
        ],
        LIMIT,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("ftvm: error: Invalid --vm-name for --history: VM id \"my vm\" has ' '"),
        "{err}"
    );
    assert!(!hist.exists(), "the history was made");
}
