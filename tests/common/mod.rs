//! Helpers shared by the integration tests: the embedded test guest, a console that tests can
//! wait on, a KVM check with a clear message, and a child-process guard.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm::{Kernel, Vm, VmConfig};

/// The test guest, as embedded in the ftvm binary.
pub static TEST_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ftvm-guest.elf"));

/// Fails the test with a clear message when KVM cannot be used: these tests need it, and
/// they are never skipped.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs /dev/kvm, which cannot be opened: {e}");
    }
}

/// A console sink that tests can read and wait on.
#[derive(Clone, Default)]
pub struct Console(Arc<(Mutex<Vec<u8>>, Condvar)>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.0.lock().unwrap().extend_from_slice(buf);
        self.0.1.notify_all();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    /// Everything printed so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.0.lock().unwrap()).into_owned()
    }

    /// Waits until `done(text)` holds; panics with the console's contents after `timeout`.
    pub fn wait_until(&self, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        let mut buf = self.0.0.lock().unwrap();
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if done(&text) {
                return text;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; console:\n{text}"
            );
            buf = self.0.1.wait_timeout(buf, left).unwrap().0;
        }
    }

    /// Waits for a complete line (ended by a newline) that starts with `prefix`; returns it.
    pub fn wait_for_line(&self, prefix: &str, timeout: Duration) -> String {
        let find = |t: &str| {
            t.split_inclusive('\n')
                .find(|l| l.starts_with(prefix) && l.ends_with('\n'))
                .map(|l| l.trim_end().to_string())
        };
        let text = self.wait_until(prefix, timeout, |t| find(t).is_some());
        find(&text).expect("present")
    }

    /// Waits for a line containing `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        self.wait_until(needle, timeout, |t| t.contains(needle))
    }
}

/// Builds (not starts) a VM running the embedded test guest.
pub fn test_vm(vcpus: u64, mem_mib: u64, cmdline: &str) -> (Vm, Console) {
    test_vm_with(vcpus, mem_mib, cmdline, Vec::new())
}

/// Builds (not starts) a VM running the embedded test guest with `disks`.
pub fn test_vm_with(
    vcpus: u64,
    mem_mib: u64,
    cmdline: &str,
    disks: Vec<vmm::devices::virtio::block::BlockConfig>,
) -> (Vm, Console) {
    test_vm_full(vcpus, mem_mib, cmdline, disks, Vec::new())
}

/// Builds (not starts) a VM running the embedded test guest with `disks` and `nets`.
pub fn test_vm_full(
    vcpus: u64,
    mem_mib: u64,
    cmdline: &str,
    disks: Vec<vmm::devices::virtio::block::BlockConfig>,
    nets: Vec<vmm::devices::virtio::net::NetConfig>,
) -> (Vm, Console) {
    require_kvm();
    let console = Console::default();
    let vm = Vm::new(VmConfig {
        mem_size: mem_mib << 20,
        vcpus,
        kernel: Kernel::Bytes {
            name: "test guest".into(),
            image: Arc::from(TEST_GUEST),
        },
        cmdline: Some(cmdline.into()),
        initrd: None,
        console: Box::new(console.clone()),
        disks,
        nets,
    })
    .expect("VM builds");
    (vm, console)
}

/// The last `vcpuN count K` value printed by vCPU `vcpu`, if any.
pub fn last_count(text: &str, vcpu: u8) -> Option<u64> {
    let prefix = format!("vcpu{vcpu} count ");
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

/// Every `vcpuN count K` value vCPU `vcpu` printed, in order.
pub fn counts(text: &str, vcpu: u8) -> Vec<u64> {
    let prefix = format!("vcpu{vcpu} count ");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .collect()
}

/// Asserts that the console of a guest before a snapshot, followed by the console of the
/// restored guest, shows vCPU `vcpu` counting 1, 2, 3... with nothing lost or repeated (a line
/// cut by the snapshot is completed by the restored guest), and that it counted on after the
/// restore.
pub fn assert_counts_continue(before: &str, after: &str, vcpu: u8) {
    let saved = counts(before, vcpu).len() as u64;
    let all = counts(&format!("{before}{after}"), vcpu);
    let want: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(
        all, want,
        "vCPU {vcpu} counts across the restore:\n{before}\n--- restored ---\n{after}"
    );
    assert!(
        all.len() as u64 > saved + 2,
        "vCPU {vcpu} did not count on after the restore"
    );
    assert!(
        !after.contains("ftvm-guest: boot"),
        "the guest booted again:\n{after}"
    );
}

/// A child process that is killed if the test ends before it does.
pub struct Guarded(pub Option<Child>);

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `ftvm` with `args`, waiting at most `timeout` for it to finish.
pub fn ftvm(args: &[&str], timeout: Duration) -> Output {
    ftvm_with(Command::new(env!("CARGO_BIN_EXE_ftvm")).args(args), timeout)
}

/// Runs a prepared `ftvm` command, waiting at most `timeout` for it to finish.
pub fn ftvm_with(cmd: &mut Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ftvm starts");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    // Collect output on another thread so that a full pipe can never stall the child.
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.expect("ftvm's output can be read"),
        Err(_) => {
            // SAFETY: plain kill(2) of the child we started and have not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("ftvm did not finish within {timeout:?}");
        }
    }
}
pub mod capture;
pub mod lan;
pub mod netns;
pub mod protection;

/// Starts `ftvm` with `args`, its stdout collected into a [`Console`] the test can wait on;
/// the handle ends when ftvm's stdout closes (join it to know the console is complete).
pub fn spawn_ftvm(args: &[&str]) -> (Guarded, Console, std::thread::JoinHandle<()>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("ftvm starts");
    let mut out = child.stdout.take().unwrap();
    let console = Console::default();
    let mut sink = console.clone();
    let reader = std::thread::spawn(move || {
        let _ = std::io::copy(&mut out, &mut sink);
    });
    (Guarded(Some(child)), console, reader)
}

/// Runs an `ftvm` client command (pause, snapshot, ...) and returns its stdout; panics if it fails.
pub fn ftvm_ok(args: &[&str]) -> String {
    let o = ftvm(args, Duration::from_secs(60));
    assert!(
        o.status.success(),
        "ftvm {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Pages the test guest writes besides its workload's: vCPU 0's stack and the page of the
/// console lock (named on its boot line in `console_text`).
pub fn named_pages(vm: &vmm::vm::Machine, console_text: &str) -> std::collections::BTreeSet<u64> {
    let info = vm.boot_info().expect("a test guest");
    let (lo, hi) = info.stack(0);
    let lock = console_text
        .split_whitespace()
        .find_map(|w| u64::from_str_radix(w.strip_prefix("console-lock=0x")?, 16).ok())
        .expect("boot line names the console lock");
    (lo..hi).step_by(4096).chain([lock & !0xfff]).collect()
}

/// Asserts that the dirty pages `dirty` are every page of `written`, and besides them only
/// pages of `named`.
pub fn assert_dirty_exactly(
    dirty: &std::collections::BTreeSet<u64>,
    written: &std::collections::BTreeSet<u64>,
    named: &std::collections::BTreeSet<u64>,
) {
    let missing: Vec<_> = written.difference(dirty).collect();
    assert!(missing.is_empty(), "written pages not dirty: {missing:x?}");
    let unexplained: Vec<_> = dirty
        .iter()
        .filter(|p| !written.contains(p) && !named.contains(p))
        .collect();
    assert!(
        unexplained.is_empty(),
        "dirty pages nobody wrote: {unexplained:x?}"
    );
}

/// On a paused `vm`: the guest logs nothing, and the VMM's own writes — a word at `at` and
/// two bytes across the page boundary 16 MiB further — are reported, exactly those pages.
pub fn assert_vmm_writes_tracked(vm: &vmm::RunningVm, at: u64) {
    use vm_memory::{Bytes, GuestAddress};
    assert_eq!(vm.take_dirty_pages().unwrap().count(), 0);
    vm.memory()
        .write_obj(0xfeed_u64, GuestAddress(at + 8))
        .unwrap();
    vm.memory()
        .write_slice(&[1; 2], GuestAddress(at + 0x100_0fff))
        .unwrap();
    let dirty: Vec<u64> = vm.take_dirty_pages().unwrap().addresses().collect();
    assert_eq!(dirty, vec![at, at + 0x100_0000, at + 0x100_1000]);
}
