//! `ftvm run --metrics`: after known guest workloads (a 4 MiB disk write in 64 KiB requests,
//! pings through a TAP in a network namespace) the scraped counters equal the guest's own
//! counts and the TAP's statistics exactly; `promtool check metrics` accepts the exposition;
//! a real Prometheus server on loopback scrapes ftvm and its query API returns the same
//! values; a port in use is a one-line error before anything runs. A replica's `/metrics`
//! serves the committed counters and its health, and after a failover (SIGKILL of the primary
//! mid-write) the counters continue: the scrape equals the guest's own counts of the whole
//! write, done partly on each host. A vCPU's CPU seconds follow its thread's CPU time and
//! continue exactly from a snapshot; a protected primary exports checkpoint figures that agree
//! with each other; and while protected it serves only acknowledged counters, so that after a
//! SIGKILL and a takeover no counter is below anything either host served.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::protection::{Replica, cert};
use common::{Guarded, ftvm, require_kvm, spawn_ftvm};

const LIMIT: Duration = Duration::from_secs(60);

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` from 127.0.0.1:`port`: (status line, body), or None if nobody answers.
fn http_get(port: u16, path: &str) -> Option<(String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

/// The samples of an exposition: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The value of `series` as an exact count.
fn count(s: &BTreeMap<String, f64>, series: &str) -> u64 {
    let v = *s
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {s:#?}"));
    assert!(v.fract() == 0.0 && v >= 0.0, "{series} = {v}");
    v as u64
}

/// The guest's own `blk0 counts ...` line: reads, read bytes, writes, write bytes, flushes.
fn guest_block_counts(text: &str) -> [u64; 5] {
    let line = text
        .lines()
        .find(|l| l.starts_with("blk0 counts "))
        .unwrap_or_else(|| panic!("no counts line in:\n{text}"));
    [
        "reads=",
        "read-bytes=",
        "writes=",
        "write-bytes=",
        "flushes=",
    ]
    .map(|key| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line}"))
    })
}

const BLOCK: [&str; 5] = [
    r#"ftvm_block_requests_total{vm="t1",drive="0",op="read"}"#,
    r#"ftvm_block_bytes_total{vm="t1",drive="0",op="read"}"#,
    r#"ftvm_block_requests_total{vm="t1",drive="0",op="write"}"#,
    r#"ftvm_block_bytes_total{vm="t1",drive="0",op="write"}"#,
    r#"ftvm_block_requests_total{vm="t1",drive="0",op="flush"}"#,
];

/// rx = delivered to the guest = sent by the host into the TAP, and the other way round.
const NET: [(&str, &str); 4] = [
    (
        r#"ftvm_net_packets_total{vm="t1",iface="0",direction="rx"}"#,
        "tx_packets",
    ),
    (
        r#"ftvm_net_bytes_total{vm="t1",iface="0",direction="rx"}"#,
        "tx_bytes",
    ),
    (
        r#"ftvm_net_packets_total{vm="t1",iface="0",direction="tx"}"#,
        "rx_packets",
    ),
    (
        r#"ftvm_net_bytes_total{vm="t1",iface="0",direction="tx"}"#,
        "rx_bytes",
    ),
];

#[test]
fn scraped_counters_equal_the_guests_and_the_taps_and_prometheus_agrees() {
    require_kvm();
    let ns = Netns::create("metrics", 41);
    ns.enter();
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(8 << 20).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let cmdline = format!(
        "ip={}/24 tcp-echo http-file=1,5 @1:disk-write=4,77 @1:chunk-kib=64",
        ns.guest_ip()
    );
    let net = format!("tap={}", ns.tap);
    let disk = img.path().to_str().unwrap();
    let (_vm, console, _reader) = spawn_ftvm(&[
        "run",
        "--vcpus",
        "2",
        "--mem",
        "128M",
        "--disk",
        disk,
        "--net",
        &net,
        "--metrics",
        &addr,
        "--vm-name",
        "t1",
        "--cmdline",
        &cmdline,
    ]);
    console.wait_for_line("vcpu0 workload net ", LIMIT);
    let text = console.wait_for_line("blk0 counts ", LIMIT);
    let guest_block = guest_block_counts(&text);
    assert_eq!(guest_block[2..4], [64, 4 << 20], "{text}");

    let ping = Command::new("ping")
        .args(["-c", "20", "-i", "0.01", "-W", "5", &ns.guest_ip()])
        .output()
        .expect("ping runs");
    let out = String::from_utf8_lossy(&ping.stdout);
    assert!(out.contains("20 received, 0% packet loss"), "{out}");
    // A file of known size over TCP: 1 MiB of pattern 5 from the guest's HTTP service.
    let mut http = std::net::TcpStream::connect((ns.guest_ip().as_str(), 80)).unwrap();
    http.set_read_timeout(Some(LIMIT)).unwrap();
    std::io::Write::write_all(&mut http, b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    std::io::Read::read_to_end(&mut http, &mut answer).unwrap();
    let body_at = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP header")
        + 4;
    let mut want = vec![0u8; 1 << 20];
    ftvm_guest_abi::fill_pattern(5, 0, &mut want);
    assert!(answer[body_at..] == want[..], "the file, exactly");
    // The guest closed first; our close ends the connection once the guest acknowledges it:
    // wait until the kernel has forgotten it, so that no packet of it is still to come.
    let local = format!(":{:04X}", http.local_addr().unwrap().port());
    drop(http);
    let deadline = Instant::now() + LIMIT;
    while std::fs::read_to_string("/proc/thread-self/net/tcp")
        .unwrap()
        .lines()
        .any(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with(&local))
        })
    {
        assert!(
            Instant::now() < deadline,
            "the HTTP connection never closed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // Traffic has stopped: the scrape settles on the TAP's figures (ARP replies may still be
    // on their way for a moment).
    let tap = || NET.map(|(_, stat)| ns.tap_stat(stat));
    let deadline = Instant::now() + Duration::from_secs(20);
    let (text, scraped) = loop {
        let (status, body) = http_get(port, "/metrics").expect("ftvm serves /metrics");
        assert_eq!(status, "HTTP/1.0 200 OK", "{body}");
        let s = samples(&body);
        let net = NET.map(|(series, _)| count(&s, series));
        if net == tap() || Instant::now() > deadline {
            break (body, s);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let net = NET.map(|(series, _)| count(&scraped, series));
    assert_eq!(
        net,
        tap(),
        "ftvm vs TAP [rx pkts, rx bytes, tx pkts, tx bytes]"
    );
    assert!(net[0] >= 20 && net[2] >= 20, "at least the pings: {net:?}");
    assert!(net[3] > 1 << 20, "at least the file: {net:?}");
    assert_eq!(
        BLOCK.map(|series| count(&scraped, series)),
        guest_block,
        "ftvm vs the guest [reads, read bytes, writes, write bytes, flushes]"
    );
    for (series, want) in [
        (
            r#"ftvm_block_errors_total{vm="t1",drive="0",cause="guest"}"#,
            0,
        ),
        (
            r#"ftvm_block_errors_total{vm="t1",drive="0",cause="host"}"#,
            0,
        ),
        (
            r#"ftvm_net_dropped_total{vm="t1",iface="0",direction="rx"}"#,
            0,
        ),
        (
            r#"ftvm_net_dropped_total{vm="t1",iface="0",direction="tx"}"#,
            0,
        ),
    ] {
        assert_eq!(count(&scraped, series), want, "{series}");
    }
    assert!(
        scraped.contains_key(r#"ftvm_vcpu_run_seconds_total{vm="t1",vcpu="1"}"#),
        "{text}"
    );

    // promtool accepts the exposition.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian's prometheus package; scripts/setup.sh installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // A real Prometheus scrapes ftvm; its query API returns the same numbers.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ftvm\n    \
             static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    let prom_port = free_port();
    let _prometheus = Guarded(Some(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus runs"),
    ));
    let query = |metric: &str| -> BTreeMap<String, u64> {
        let Some((status, body)) = http_get(prom_port, &format!("/api/v1/query?query={metric}"))
        else {
            return BTreeMap::new();
        };
        if !status.contains("200") {
            return BTreeMap::new();
        }
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let m = &r["metric"];
                let key = ["drive", "iface", "op", "direction"]
                    .iter()
                    .filter_map(|k| Some(format!("{k}={}", m[*k].as_str()?)))
                    .collect::<Vec<_>>()
                    .join(",");
                (key, r["value"][1].as_str().unwrap().parse().unwrap())
            })
            .collect()
    };
    let want_block: BTreeMap<String, u64> = [
        ("drive=0,op=read", guest_block[1]),
        ("drive=0,op=write", guest_block[3]),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .into();
    let want_net: BTreeMap<String, u64> = [
        ("iface=0,direction=rx", net[1]),
        ("iface=0,direction=tx", net[3]),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .into();
    let deadline = Instant::now() + LIMIT;
    let (block, net_bytes) = loop {
        let got = (
            query("ftvm_block_bytes_total"),
            query("ftvm_net_bytes_total"),
        );
        if (got.0 == want_block && got.1 == want_net) || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(block, want_block, "Prometheus's block bytes vs the guest's");
    assert_eq!(net_bytes, want_net, "Prometheus's net bytes vs the TAP's");
}

#[test]
fn metrics_on_a_port_in_use_is_one_error_line_and_nothing_runs() {
    require_kvm();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let o = ftvm(&["run", "--metrics", &addr], LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with(&format!(
            "ftvm: error: Cannot listen for metrics on {addr}: "
        )),
        "{err}"
    );
    assert!(lines[0].contains("in use"), "{err}");
    assert!(o.stdout.is_empty(), "the guest ran: {:?}", o.stdout);

    let o = ftvm(&["run", "--metrics", "nowhere"], LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(
        err.trim_end(),
        "ftvm: error: Invalid --metrics address 'nowhere': expected HOST:PORT, e.g. \
         127.0.0.1:9464"
    );
}

/// Scrapes 127.0.0.1:`port` until `done` holds for its samples (or the deadline passes).
fn scrape_until(
    port: u16,
    what: &str,
    done: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some((status, body)) = http_get(port, "/metrics") {
            assert!(status.contains(" 200 "), "{status}: {body}");
            let s = samples(&body);
            if done(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{body}"
            );
        } else {
            assert!(Instant::now() < deadline, "nobody serves :{port} ({what})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const WRITES: &str = r#"ftvm_block_requests_total{vm="t3",drive="0",op="write"}"#;
const WRITE_BYTES: &str = r#"ftvm_block_bytes_total{vm="t3",drive="0",op="write"}"#;
const PROTECTED: &str = r#"ftvm_replication_protected{vm="t3"}"#;
const EPOCHS: &str = r#"ftvm_checkpoint_epochs_total{vm="t3"}"#;
const COMMITTED: &str = r#"ftvm_checkpoint_committed_epoch{vm="t3"}"#;

#[test]
fn the_replica_serves_committed_counters_and_they_continue_exactly_after_a_failover() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    let copies = dir.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 16 << 20]).unwrap();
    let (rport, pport) = (free_port(), free_port());
    let (raddr, paddr) = (format!("127.0.0.1:{rport}"), format!("127.0.0.1:{pport}"));
    let replica = Replica::start_with(
        "127.0.0.1:0",
        &rc,
        &pfp,
        &[
            "--failover",
            "--failover-timeout",
            "300",
            "--disk-dir",
            copies.to_str().unwrap(),
            "--metrics",
            &raddr,
            "--vm-name",
            "t3",
        ],
        &[],
    );
    // Nothing committed yet: health only, and it says unprotected.
    let s = scrape_until(rport, "the replica's health", |s| s.contains_key(PROTECTED));
    assert_eq!(count(&s, PROTECTED), 0, "{s:#?}");
    assert_eq!(count(&s, EPOCHS), 0, "{s:#?}");
    assert!(
        !s.contains_key(WRITES),
        "no counters before a commit: {s:#?}"
    );

    let sock = dir.path().join("api.sock");
    let (mut primary, _log, console) = common::protection::protected_primary(&[
        "run",
        "--vcpus",
        "2",
        "--mem",
        "64M",
        "--disk",
        img.to_str().unwrap(),
        "--api",
        sock.to_str().unwrap(),
        "--paused",
        "--replica",
        &replica.addr,
        "--cert",
        pc.to_str().unwrap(),
        "--peer",
        &rfp,
        "--metrics",
        &paddr,
        "--vm-name",
        "t3",
        "--cmdline",
        "@0:disk-write=16,5 @0:chunk-kib=1 @1:count=0 @1:interval-ms=20",
    ]);
    common::ftvm_ok(&["resume", "--api", sock.to_str().unwrap()]);
    console.wait_for("workload disk-write", LIMIT);

    // The primary: protected, epochs acknowledged, writes going on.
    let p = scrape_until(pport, "the primary's epochs", |s| {
        s.get(PROTECTED) == Some(&1.0) && s.get(EPOCHS).is_some_and(|&e| e >= 8.0)
    });
    // The replica: protected, a committed epoch, committed writes; the primary, protected,
    // serves only what its replica has committed (scraped before, so never more).
    let r = scrape_until(rport, "the replica's committed writes", |s| {
        s.get(PROTECTED) == Some(&1.0) && s.get(WRITES).is_some_and(|&w| w > 0.0)
    });
    assert!(count(&r, COMMITTED) >= 1, "{r:#?}");
    assert!(count(&r, EPOCHS) >= 1, "{r:#?}");
    assert!(
        count(&p, WRITES) <= count(&r, WRITES),
        "primary {p:#?} vs committed {r:#?}"
    );
    assert_eq!(
        count(&r, WRITE_BYTES),
        count(&r, WRITES) * 1024,
        "1 KiB per write"
    );
    assert!(count(&p, WRITES) < 16384, "the write ended too soon");

    // The primary dies mid-write; the guest finishes the write on the replica.
    let child = primary.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    replica.wait_log("took over");
    let counts = replica.console.wait_for_line("blk0 counts", LIMIT);
    let guest = guest_block_counts(&counts);
    assert_eq!(
        guest[2..4],
        [16384, 16 << 20],
        "the guest's own count: {counts}"
    );
    // The same server now serves the guest's live counters, continued from the committed
    // ones: exactly the guest's count of the whole write, done partly on each host.
    let after = scrape_until(rport, "the writes after the takeover", |s| {
        s.get(WRITES) == Some(&16384.0)
    });
    assert_eq!(count(&after, WRITE_BYTES), 16 << 20);
    assert_eq!(
        [
            r#"ftvm_block_requests_total{vm="t3",drive="0",op="read"}"#,
            r#"ftvm_block_bytes_total{vm="t3",drive="0",op="read"}"#,
            WRITES,
            WRITE_BYTES,
            r#"ftvm_block_requests_total{vm="t3",drive="0",op="flush"}"#,
        ]
        .map(|series| count(&after, series)),
        guest,
        "ftvm vs the guest [reads, read bytes, writes, write bytes, flushes]"
    );
    assert_eq!(
        count(&after, PROTECTED),
        0,
        "no --then-replica: unprotected"
    );
}

#[test]
fn counters_continue_exactly_across_a_snapshot_and_restore() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
    let sock = dir.path().join("api.sock");
    let snap = dir.path().join("vm.snap");
    let (port, port2) = (free_port(), free_port());
    let (vm, console, _reader) = spawn_ftvm(&[
        "run",
        "--vcpus",
        "2",
        "--mem",
        "64M",
        "--disk",
        img.to_str().unwrap(),
        "--api",
        sock.to_str().unwrap(),
        "--metrics",
        &format!("127.0.0.1:{port}"),
        "--vm-name",
        "t4",
        "--cmdline",
        "@0:disk-write=4,77 @0:chunk-kib=64 @1:count=0 @1:interval-ms=20",
    ]);
    let text = console.wait_for_line("blk0 counts ", LIMIT);
    let guest = guest_block_counts(&text);
    let block = [
        r#"ftvm_block_requests_total{vm="t4",drive="0",op="read"}"#,
        r#"ftvm_block_bytes_total{vm="t4",drive="0",op="read"}"#,
        r#"ftvm_block_requests_total{vm="t4",drive="0",op="write"}"#,
        r#"ftvm_block_bytes_total{vm="t4",drive="0",op="write"}"#,
        r#"ftvm_block_requests_total{vm="t4",drive="0",op="flush"}"#,
    ];
    let before = scrape_until(port, "the write's counts", |s| {
        block.map(|series| s.get(series).copied().unwrap_or(-1.0) as u64) == guest
    });
    common::ftvm_ok(&[
        "snapshot",
        "--api",
        sock.to_str().unwrap(),
        "--to",
        snap.to_str().unwrap(),
    ]);
    drop(vm); // SIGKILL: the snapshot is all that is left
    let console_series = r#"ftvm_console_bytes_total{vm="t4"}"#;
    let run_series = r#"ftvm_vcpu_run_seconds_total{vm="t4",vcpu="1"}"#;

    let (_restored, console2, _reader2) = spawn_ftvm(&[
        "restore",
        "--from",
        snap.to_str().unwrap(),
        "--metrics",
        &format!("127.0.0.1:{port2}"),
        "--vm-name",
        "t4",
    ]);
    // The guest continues (vCPU 1 counts on) ...
    console2.wait_for("vcpu1 count ", LIMIT);
    let after = scrape_until(port2, "the restored counters", |s| {
        s.contains_key(console_series)
    });
    // ... and its counters continue from the snapshot's: the disk is idle, so its counters are
    // exactly what they were; the others only grew.
    assert_eq!(
        block.map(|series| count(&after, series)),
        guest,
        "block counters after the restore vs the guest's own"
    );
    assert!(count(&after, console_series) > count(&before, console_series));
    assert!(after[run_series] >= before[run_series], "{after:#?}");
}

/// The CPU time (ns) of the thread named `name` of process `pid`, from
/// /proc/PID/task/TID/schedstat (the clock CLOCK_THREAD_CPUTIME_ID reads).
fn thread_cpu_ns(pid: u32, name: &str) -> u64 {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        if std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == name) {
            let stat = std::fs::read_to_string(t.join("schedstat")).unwrap();
            return stat.split(' ').next().unwrap().parse().unwrap();
        }
    }
    panic!("process {pid} has no thread {name}");
}

/// Seconds as scraped, back in nanoseconds (exact: the exposition prints ns / 1e9 in full).
fn ns(s: &BTreeMap<String, f64>, series: &str) -> u64 {
    let v = *s
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {s:#?}"));
    (v * 1e9).round() as u64
}

/// Slack between a vCPU's counted CPU time and its thread's: what the thread ran before it
/// started counting (its start-up), far less than this.
const STARTUP_NS: u64 = 20_000_000;

#[test]
fn vcpu_cpu_time_follows_the_vcpu_thread_and_continues_exactly_across_a_snapshot() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (sock, sock2) = (dir.path().join("api.sock"), dir.path().join("api2.sock"));
    let snap = dir.path().join("vm.snap");
    let (port, port2) = (free_port(), free_port());
    let cpu0 = r#"ftvm_vcpu_run_seconds_total{vm="t5",vcpu="0"}"#;
    // vCPU 0 computes without exits (a KVM_RUN that lasts), vCPU 1 mostly waits.
    let (vm, console, _reader) = spawn_ftvm(&[
        "run",
        "--vcpus",
        "2",
        "--mem",
        "64M",
        "--api",
        sock.to_str().unwrap(),
        "--metrics",
        &format!("127.0.0.1:{port}"),
        "--vm-name",
        "t5",
        "--cmdline",
        "@0:compute=1000000000000 @1:count=0 @1:interval-ms=20",
    ]);
    console.wait_for("vcpu1 count ", LIMIT);
    let pid = vm.0.as_ref().unwrap().id();
    // Counted live, while vCPU 0 is still inside one long KVM_RUN.
    scrape_until(port, "vCPU 0's CPU time", |s| {
        s.get(cpu0).is_some_and(|&v| v >= 0.3)
    });
    common::ftvm_ok(&["pause", "--api", sock.to_str().unwrap()]);
    let t1 = thread_cpu_ns(pid, "vcpu0");
    let paused = scrape_until(port, "the paused VM", |_| true);
    let t2 = thread_cpu_ns(pid, "vcpu0");
    let x = ns(&paused, cpu0);
    assert!(
        x <= t2 && x + STARTUP_NS >= t1,
        "counted {x} ns vs the thread's {t1}..{t2} ns"
    );
    for v in ["0", "1"] {
        let s = format!(r#"ftvm_vcpu_run_seconds_total{{vm="t5",vcpu="{v}"}}"#);
        let t = thread_cpu_ns(pid, &format!("vcpu{v}"));
        assert!(ns(&paused, &s) <= t, "vCPU {v}: {} > {t}", ns(&paused, &s));
    }

    // The snapshot carries the count as it was at the save, exactly.
    common::ftvm_ok(&[
        "snapshot",
        "--api",
        sock.to_str().unwrap(),
        "--to",
        snap.to_str().unwrap(),
    ]);
    let t3 = thread_cpu_ns(pid, "vcpu0");
    drop(vm);
    let saved = checkpoint::snapshot::read::<vmm::vm::MachineState>(&snap)
        .unwrap()
        .state
        .counters
        .vcpus[0]
        .last()
        .copied()
        .unwrap();
    assert!(
        x <= saved && saved <= t3,
        "saved {saved} ns: not between the scrape {x} and the thread's {t3}"
    );

    // The restored vCPU counts on from the saved value: saved + its new thread's CPU time.
    let (restored, _console2, _reader2) = spawn_ftvm(&[
        "restore",
        "--from",
        snap.to_str().unwrap(),
        "--api",
        sock2.to_str().unwrap(),
        "--metrics",
        &format!("127.0.0.1:{port2}"),
        "--vm-name",
        "t5",
    ]);
    let first = scrape_until(port2, "the restored count", |s| s.contains_key(cpu0));
    assert!(ns(&first, cpu0) >= saved, "{} < {saved}", ns(&first, cpu0));
    scrape_until(port2, "vCPU 0 computing again", |s| {
        s.get(cpu0).is_some_and(|&v| v * 1e9 >= saved as f64 + 2e8)
    });
    common::ftvm_ok(&["pause", "--api", sock2.to_str().unwrap()]);
    let pid2 = restored.0.as_ref().unwrap().id();
    let t4 = thread_cpu_ns(pid2, "vcpu0");
    let y = ns(
        &scrape_until(port2, "the paused restored VM", |_| true),
        cpu0,
    );
    let t5 = thread_cpu_ns(pid2, "vcpu0");
    eprintln!(
        "vCPU 0: counted {x} ns, thread {t1}..{t2} ns; saved {saved} ns; restored {y} ns, \
         new thread {t4}..{t5} ns"
    );
    assert!(
        y <= saved + t5 && y + STARTUP_NS >= saved + t4,
        "restored count {y} ns vs saved {saved} + the new thread's {t4}..{t5}"
    );
}

/// The value of a histogram's series, checking that its buckets are cumulative and end with
/// +Inf = count; returns (count, sum).
fn histogram(s: &BTreeMap<String, f64>, name: &str, labels: &str) -> (u64, f64) {
    let prefix = format!("{name}_bucket{{{labels},le=\"");
    let buckets: Vec<(String, u64)> = s
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(k, _)| (k[prefix.len()..k.len() - 2].to_string(), count(s, k)))
        .collect();
    let mut by_bound: Vec<(f64, u64)> = buckets
        .iter()
        .map(|(le, n)| (le.parse().unwrap(), *n))
        .collect();
    by_bound.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(by_bound.len() >= 2, "{name}: {buckets:?}");
    assert!(
        by_bound.windows(2).all(|w| w[0].1 <= w[1].1),
        "{name} buckets are not cumulative: {by_bound:?}"
    );
    let n = count(s, &format!("{name}_count{{{labels}}}"));
    let last = by_bound.last().unwrap();
    assert!(last.0.is_infinite() && last.1 == n, "{name}: {by_bound:?}");
    (n, s[&format!("{name}_sum{{{labels}}}")])
}

/// Runs promtool check metrics on `text`.
fn promtool(text: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian's prometheus package; scripts/setup.sh installs it)");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let checked = p.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

#[test]
fn a_protected_primary_exports_consistent_checkpoint_figures() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    let copies = dir.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
    let replica = Replica::start_with(
        "127.0.0.1:0",
        &rc,
        &pfp,
        &["--disk-dir", copies.to_str().unwrap()],
        &[],
    );
    let port = free_port();
    let (_primary, log, console) = common::protection::protected_primary(&[
        "run",
        "--vcpus",
        "2",
        "--mem",
        "64M",
        "--disk",
        img.to_str().unwrap(),
        "--replica",
        &replica.addr,
        "--cert",
        pc.to_str().unwrap(),
        "--peer",
        &rfp,
        "--metrics",
        &format!("127.0.0.1:{port}"),
        "--vm-name",
        "t7",
        "--cmdline",
        "@0:disk-write=4,9 @0:chunk-kib=64 @1:count=0 @1:interval-ms=20",
    ]);
    console.wait_for_line("blk0 counts ", LIMIT);
    let l = r#"vm="t7""#;
    let epochs = format!("ftvm_checkpoint_epochs_total{{{l}}}");
    let s = scrape_until(port, "20 acknowledged epochs and released output", |s| {
        s.get(&epochs).is_some_and(|&e| e >= 20.0)
            && s.get(&format!("ftvm_output_delay_seconds_count{{{l}}}"))
                .is_some_and(|&n| n > 0.0)
    });
    let text = http_get(port, "/metrics").unwrap().1;
    promtool(&text);
    for line in text.lines().filter(|l| {
        l.starts_with("ftvm_checkpoint_") || l.starts_with("ftvm_output_delay_seconds_")
    }) {
        eprintln!("{line}");
    }
    let e = count(&s, &epochs);
    assert_eq!(count(&s, &format!("ftvm_replication_protected{{{l}}}")), 1);
    assert_eq!(count(&s, &format!("ftvm_failovers_total{{{l}}}")), 0);
    // One observation per acknowledged checkpoint in each checkpoint histogram.
    let (pauses, pause_sum) = histogram(&s, "ftvm_checkpoint_pause_seconds", l);
    let (checkpoints, pages) = histogram(&s, "ftvm_checkpoint_dirty_pages", l);
    let (acks, ack_sum) = histogram(&s, "ftvm_checkpoint_ack_seconds", l);
    assert_eq!([pauses, checkpoints, acks], [e; 3], "{s:#?}");
    assert!(pause_sum > 0.0 && ack_sum > 0.0 && pages >= 1.0, "{s:#?}");
    // Guest memory is mostly zero pages and the disk data a pattern: the wire carries less.
    let raw = count(
        &s,
        &format!("ftvm_checkpoint_bytes_total{{{l},stage=\"raw\"}}"),
    );
    let wire = count(
        &s,
        &format!("ftvm_checkpoint_bytes_total{{{l},stage=\"wire\"}}"),
    );
    assert!(raw >= pages as u64 * 4096, "raw {raw} for {pages} pages");
    assert!(0 < wire && wire <= raw, "wire {wire} vs raw {raw}");
    // Every released output item was held, and its hold time counted.
    let (held, held_sum) = histogram(&s, "ftvm_output_delay_seconds", l);
    assert_eq!(
        held,
        count(&s, &format!("ftvm_output_released_items_total{{{l}}}")),
        "{s:#?}"
    );
    assert!(held_sum > 0.0, "{s:#?}");
    let log = log.lock().unwrap();
    assert!(!log.contains("runs unprotected"), "{log}");
}

/// The guest's accounting counters in a scrape (vCPU, block, net, console: the ones the
/// checkpoints carry and a takeover continues), not the process's own figures (checkpoints,
/// output gate, failovers).
fn guest_counters(s: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    s.iter()
        .filter(|(k, _)| {
            ["ftvm_vcpu_", "ftvm_block_", "ftvm_net_", "ftvm_console_"]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// Each series of `high` becomes the larger of its value and `s`'s.
fn raise(high: &mut BTreeMap<String, f64>, s: &BTreeMap<String, f64>) {
    for (k, v) in guest_counters(s) {
        let h = high.entry(k).or_insert(v);
        *h = h.max(v);
    }
}

/// Every series of `low` is in `s` and at most its value there.
fn assert_at_most(low: &BTreeMap<String, f64>, s: &BTreeMap<String, f64>, what: &str) {
    for (k, v) in low {
        let now = s.get(k).unwrap_or_else(|| panic!("{what}: no {k}"));
        assert!(v <= now, "{what}: {k} was {v}, is {now}");
    }
}

#[test]
fn counters_never_go_below_what_a_scraper_saw_across_a_failover() {
    require_kvm();
    let lan = common::lan::Lan::create();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    let copies = dir.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 16 << 20]).unwrap();
    let (rport, pport) = (free_port(), free_port());
    let (raddr, paddr) = (format!("127.0.0.1:{rport}"), format!("127.0.0.1:{pport}"));
    // Each host's /metrics is on its own loopback: the test scrapes from inside its namespace.
    lan.enter("R");
    let replica = Replica::start_with(
        &common::lan::Lan::rep_addr("R"),
        &rc,
        &pfp,
        &[
            "--failover",
            "--failover-timeout",
            "300",
            "--disk-dir",
            copies.to_str().unwrap(),
            "--net",
            "tap=tapR",
            "--metrics",
            &raddr,
            "--vm-name",
            "t6",
        ],
        &[],
    );
    let sock = dir.path().join("api.sock");
    let guest_ip = format!("{}.2", common::lan::SUBNET);
    let cmdline = format!("ip={guest_ip}/24 tcp-echo @1:disk-write=16,5 @1:chunk-kib=1");
    lan.enter("P");
    let (mut primary, _log, console) = common::protection::protected_primary(&[
        "run",
        "--vcpus",
        "2",
        "--mem",
        "64M",
        "--disk",
        img.to_str().unwrap(),
        "--net",
        "tap=tapP",
        "--api",
        sock.to_str().unwrap(),
        "--paused",
        "--replica",
        &replica.addr,
        "--cert",
        pc.to_str().unwrap(),
        "--peer",
        &rfp,
        "--metrics",
        &paddr,
        "--vm-name",
        "t6",
        "--cmdline",
        &cmdline,
    ]);
    common::ftvm_ok(&["resume", "--api", sock.to_str().unwrap()]);
    console.wait_for("workload disk-write", LIMIT);
    // Pings all along, answered by whichever host runs the guest.
    lan.enter_lan();
    let _ping = Guarded(Some(
        Command::new("ping")
            .args(["-i", "0.02", "-W", "1", &guest_ip])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ping runs"),
    ));

    // Scrape the primary then the replica, again and again: the replica has committed
    // whatever the primary serves (it serves acknowledged checkpoints only), and the
    // primary's values never go back.
    let rx = r#"ftvm_net_packets_total{vm="t6",iface="0",direction="rx"}"#;
    let writes = r#"ftvm_block_requests_total{vm="t6",drive="0",op="write"}"#;
    let (mut seen, mut committed) = (BTreeMap::new(), BTreeMap::new());
    let deadline = Instant::now() + LIMIT;
    let mut scrapes = 0;
    loop {
        lan.enter("P");
        let p = samples(&http_get(pport, "/metrics").expect("the primary serves").1);
        assert_eq!(count(&p, r#"ftvm_replication_protected{vm="t6"}"#), 1);
        assert_at_most(&seen, &guest_counters(&p), "the primary again");
        raise(&mut seen, &p);
        lan.enter("R");
        let r = samples(&http_get(rport, "/metrics").expect("the replica serves").1);
        assert_at_most(&guest_counters(&p), &r, "the replica after the primary");
        raise(&mut committed, &r);
        scrapes += 1;
        if scrapes >= 20 && p.get(rx).is_some_and(|&n| n >= 20.0) {
            break;
        }
        assert!(Instant::now() < deadline, "no pings arrived: {p:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(seen[writes] < 16384.0, "the write ended too soon");

    let child = primary.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    replica.wait_log("took over");
    // The new primary (the replica's server, now serving the guest it runs) starts from the
    // committed counters: never below anything either side served before.
    for _ in 0..10 {
        let after = scrape_until(rport, "the new primary", |s| {
            s.get(r#"ftvm_failovers_total{vm="t6"}"#) == Some(&1.0)
        });
        assert_at_most(&seen, &after, "the new primary vs the old one's scrapes");
        assert_at_most(
            &committed,
            &after,
            "the new primary vs the replica's scrapes",
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(lan);
}

#[test]
fn run_history_records_the_acknowledged_counters() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history");
    // Only acknowledged checkpoints are recorded: without a replica there are none.
    let o = ftvm(&["run", "--history", history.to_str().unwrap()], LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--replica"), "{err}");
    assert!(!history.exists(), "nothing written");

    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    // A bad argument ends ftvm before the history is made.
    let o = ftvm(
        &[
            "run",
            "--replica",
            "127.0.0.1:1",
            "--cert",
            pc.to_str().unwrap(),
            "--peer",
            &rfp,
            "--history",
            history.to_str().unwrap(),
            "--mem",
            "lots",
        ],
        LIMIT,
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!history.exists(), "nothing written");
    let copies = dir.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
    let replica = Replica::start_with(
        "127.0.0.1:0",
        &rc,
        &pfp,
        &["--disk-dir", copies.to_str().unwrap()],
        &[],
    );
    let port = free_port();
    let sock = dir.path().join("api.sock");
    let (primary, log, console) = common::protection::protected_primary(&[
        "run",
        "--vcpus",
        "2",
        "--mem",
        "64M",
        "--disk",
        img.to_str().unwrap(),
        "--api",
        sock.to_str().unwrap(),
        "--paused",
        "--replica",
        &replica.addr,
        "--cert",
        pc.to_str().unwrap(),
        "--peer",
        &rfp,
        "--metrics",
        &format!("127.0.0.1:{port}"),
        "--vm-name",
        "t8",
        "--history",
        history.to_str().unwrap(),
        "--cmdline",
        "@0:disk-write=4,9 @0:chunk-kib=64 @1:count=0 @1:interval-ms=20",
    ]);
    common::ftvm_ok(&["resume", "--api", sock.to_str().unwrap()]);
    console.wait_for_line("blk0 counts ", LIMIT);
    let bytes = r#"ftvm_block_bytes_total{vm="t8",drive="0",op="write"}"#;
    let cpu = r#"ftvm_vcpu_run_seconds_total{vm="t8",vcpu="0"}"#;
    let s = scrape_until(port, "the whole write acknowledged", |s| {
        s.get(bytes) == Some(&((4 << 20) as f64))
    });
    let epoch = count(&s, r#"ftvm_checkpoint_committed_epoch{vm="t8"}"#);
    // The history's own figures are served beside the VM's.
    assert_eq!(count(&s, r#"ftvm_history_behind{vm="t8"}"#), 0, "{s:#?}");
    assert!(
        s.contains_key(r#"ftvm_history_recorded_epoch{vm="t8"}"#),
        "{s:#?}"
    );
    // An orderly stop closes the history.
    let pid = primary.0.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) of our own child, not yet reaped (Guarded reaps it on drop).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut primary = primary;
    let status = primary.0.as_mut().unwrap().wait().unwrap();
    assert_eq!(status.code(), Some(143), "{}", log.lock().unwrap());

    let out = common::ftvm_ok(&[
        "accounting",
        "export",
        "--history",
        history.to_str().unwrap(),
        "--vm",
        "t8",
        "--format",
        "json",
    ]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let vm = &doc["vms"][0];
    assert_eq!(vm["vm"], "t8", "{out}");
    assert!(vm["end"]["epoch"].as_u64().unwrap() >= epoch, "{out}");
    let end = &vm["end_counters"];
    assert_eq!(end["block/0/write/bytes"], 4 << 20, "{out}");
    assert_eq!(end["block/0/write/requests"], 64, "{out}");
    assert!(
        end["vcpu/0/run_ns"].as_u64().unwrap() >= ns(&s, cpu),
        "recorded CPU time below the one served at epoch {epoch}: {out}"
    );
}
