//! The test guest's memory-writing workloads, checked against a real VM: `randpages=` writes
//! pages that zstd cannot shrink (and `dirty=` pages that shrink to nothing), a partial fill
//! shrinks only with XOR-delta, the rate follows the request, and bad words are refused.

mod common;

use std::time::{Duration, Instant};

use checkpoint::wire::{Encoder, EncoderOptions, FrameKind, FrameStats, MachineShape};
use common::{Console, test_vm};
use primary::capture::{Scope, Staging, capture};
use vmm::RunningVm;
use vmm::event::VmEvent;
use vmm::vm::MachineState;

const LIMIT: Duration = Duration::from_secs(60);
const PAGE: usize = 4096;

/// The value of `key=` on a line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(|v| match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
            None => v.parse().unwrap(),
        })
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Starts a 1-vCPU guest running `cmdline` and waits for its workload line (printed once the
/// working set is initialised); returns the VM, its console, and the working set's bounds.
fn start(cmdline: &str, workload: &str) -> (RunningVm, Console, std::ops::Range<u64>) {
    let (vm, console) = test_vm(1, 64, cmdline);
    let vm = vm.start().unwrap();
    let line = console.wait_for_line(&format!("vcpu0 workload {workload} "), LIMIT);
    let base = field(&line, "base");
    let area = base..base + field(&line, "pages") * PAGE as u64;
    (vm, console, area)
}

/// Captures epochs until at least `want` pages of `area` have been captured; calls `epoch` on
/// each capture and returns the contents of the area's pages, in capture order.
fn capture_area(
    vm: &RunningVm,
    area: &std::ops::Range<u64>,
    want: usize,
    mut epoch: impl FnMut(&Staging, &MachineState),
) -> Vec<u8> {
    let mut staging = Staging::default();
    let mut pages = Vec::new();
    let deadline = Instant::now() + LIMIT;
    while pages.len() < want * PAGE {
        assert!(
            Instant::now() < deadline,
            "the guest wrote only {} pages of its working set",
            pages.len() / PAGE
        );
        // The epoch interval, not a wait for a condition: the loop ends on what was captured.
        std::thread::sleep(Duration::from_millis(10));
        let (state, _) = capture(vm, Scope::Dirty, &mut staging, None).unwrap();
        for (gfn, data) in staging.gfns.iter().zip(staging.data.chunks_exact(PAGE)) {
            if area.contains(&(gfn * PAGE as u64)) {
                pages.extend_from_slice(data);
            }
        }
        epoch(&staging, &state);
    }
    pages
}

/// Compressed size over raw size, zstd level 1 (what the wire encoder uses by default).
fn zstd_ratio(data: &[u8]) -> f64 {
    zstd::bulk::compress(data, 1).unwrap().len() as f64 / data.len() as f64
}

/// Captures the area's pages written after the workload started, at least `want` of them.
fn pages_written(cmdline: &str, workload: &str, want: usize) -> Vec<u8> {
    let (vm, _console, area) = start(cmdline, workload);
    // Forget what was written before (the initial fill).
    capture(&vm, Scope::All, &mut Staging::default(), None).unwrap();
    let pages = capture_area(&vm, &area, want, |_, _| {});
    vm.stop().unwrap();
    pages
}

#[test]
fn random_pages_do_not_compress_and_one_word_pages_do() {
    let random = pages_written("randpages=40,8", "randpages", 512);
    let ratio = zstd_ratio(&random);
    eprintln!("random pages: zstd {:.2} %", ratio * 100.0);
    assert!(
        ratio >= 0.95,
        "{} random pages compress to {:.1} %",
        random.len() / PAGE,
        ratio * 100.0
    );
    // Every page differs from every other (a generator restarted per page would repeat).
    let mut distinct: Vec<&[u8]> = random.chunks_exact(PAGE).collect();
    let n = distinct.len();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() * 10 >= n * 9,
        "{} of {n} pages distinct",
        distinct.len()
    );

    let words = pages_written("dirty=40,8", "dirty", 512);
    let ratio = zstd_ratio(&words);
    eprintln!("one-word pages: zstd {:.2} %", ratio * 100.0);
    assert!(
        ratio <= 0.05,
        "{} one-word pages compress only to {:.1} %",
        words.len() / PAGE,
        ratio * 100.0
    );
}

#[test]
fn a_partly_rewritten_random_page_shrinks_with_delta_only() {
    let (vm, _console, area) = start("randpages=40,8 randpages-fill=25", "randpages");
    let mut staging = Staging::default();
    let (state, _) = capture(&vm, Scope::All, &mut staging, None).unwrap();
    let shape = MachineShape::of(&state).unwrap();
    let delta_opts = EncoderOptions {
        delta: true,
        ..EncoderOptions::default()
    };
    let mut plain = Encoder::new(shape.clone(), EncoderOptions::default()).unwrap();
    let mut delta = Encoder::new(shape, delta_opts).unwrap();
    // The full frame gives the delta encoder every page as it was (the random initial fill).
    let mut out = Vec::new();
    delta
        .encode_into(
            0,
            FrameKind::Full,
            &staging.gfns,
            &staging.data,
            &state,
            &mut out,
        )
        .unwrap();
    let (mut sum_plain, mut sum_delta) = (FrameStats::default(), FrameStats::default());
    let mut epoch = 0;
    let add = |sum: &mut FrameStats, s: FrameStats| {
        sum.raw_bytes += s.raw_bytes;
        sum.wire_bytes += s.wire_bytes;
    };
    capture_area(&vm, &area, 512, |staging, state| {
        epoch += 1;
        let (g, d) = (&staging.gfns, &staging.data);
        let k = FrameKind::Incremental;
        let s = plain.encode_into(epoch, k, g, d, state, &mut out).unwrap();
        add(&mut sum_plain, s);
        let s = delta.encode_into(epoch, k, g, d, state, &mut out).unwrap();
        add(&mut sum_delta, s);
    });
    vm.stop().unwrap();
    let ratio = |s: FrameStats| s.wire_bytes as f64 / s.raw_bytes as f64;
    eprintln!(
        "fill 25 %: wire/raw {:.1} % without delta, {:.1} % with",
        ratio(sum_plain) * 100.0,
        ratio(sum_delta) * 100.0
    );
    // A quarter of each page is new random bytes, the rest is old random bytes.
    assert!(
        ratio(sum_plain) >= 0.95,
        "without delta: {:.1} %",
        ratio(sum_plain) * 100.0
    );
    assert!(
        (0.2..=0.4).contains(&ratio(sum_delta)),
        "with delta: {:.1} %",
        ratio(sum_delta) * 100.0
    );
}

/// Runs `cmdline` on `vcpus` vCPUs until the guest powers off; returns its console.
fn run_to_end(vcpus: u64, cmdline: &str) -> (Option<VmEvent>, String) {
    let (vm, console) = test_vm(vcpus, 64, cmdline);
    let vm = vm.start().unwrap();
    let event = vm.wait_event(Some(LIMIT));
    vm.stop().unwrap();
    (event, console.text())
}

#[test]
fn the_write_rate_follows_the_request() {
    // A rate is split between all the vCPUs, so vCPU 0 alone writes half of 16 MiB/s; vCPU 1
    // writes as fast as it can.
    let (event, text) = run_to_end(
        2,
        "@0:randpages=16,8 @1:randpages=0,8 @1:randpages-fill=50 secs=2",
    );
    assert!(
        matches!(event, Some(VmEvent::PowerOff(0))),
        "{event:?}\n{text}"
    );
    let line = |vcpu: u64| {
        let prefix = format!("vcpu{vcpu} randpages written=");
        text.lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} line:\n{text}"))
            .to_string()
    };
    // Paced: 16 MiB/s shared by 2 vCPUs is 2048 pages/s each, for the time the guest measured.
    let paced = line(0);
    let (written, ns) = (field(&paced, "written"), field(&paced, "ns"));
    let asked = 2048.0 * ns as f64 / 1e9;
    assert!(
        written as f64 <= asked + 2.0 && written as f64 >= asked * 0.8,
        "asked for {asked:.0} pages in {ns} ns, wrote {written}"
    );
    assert!(ns >= 2_000_000_000, "{paced}");
    assert_eq!(field(&paced, "bytes"), written * PAGE as u64);
    // Unpaced, half of each page: as many pages as it could, 2048 bytes each.
    eprintln!("{paced}");
    let unpaced = line(1);
    eprintln!("{unpaced}");
    let written = field(&unpaced, "written");
    assert!(written > 0, "{unpaced}");
    assert_eq!(field(&unpaced, "bytes"), written * 2048);
}

#[test]
fn bad_randpages_words_are_refused_clearly() {
    for (cmdline, error) in [
        ("randpages=5", "randpages= wants RATE,MIB"),
        ("randpages=x,4", "a number is malformed"),
        (
            "randpages=5,4 randpages-fill=0",
            "randpages-fill= wants a percentage from 1 to 100",
        ),
        (
            "randpages=5,4 randpages-fill=101",
            "randpages-fill= wants a percentage from 1 to 100",
        ),
        (
            "randpages=5,4096",
            "the randpages working set does not fit in free RAM",
        ),
    ] {
        let (event, text) = run_to_end(1, cmdline);
        assert!(
            matches!(event, Some(VmEvent::PowerOff(2))),
            "{cmdline}: {event:?}\n{text}"
        );
        assert!(
            text.contains(&format!("ftvm-guest: error: {error}\n")),
            "{cmdline}:\n{text}"
        );
    }
}
