//! The operator's inputs through the `ftvm` binary: disk images are locked against a second
//! writer, things that are not disks are refused at once by name, block devices are disks of
//! their real size, and network options are strict.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Console, Guarded, ftvm, last_count, require_kvm, spawn_ftvm};

const LIMIT: Duration = Duration::from_secs(60);
/// The embedded guest counting forever, slowly.
const FOREVER: &str = "count=0 interval-ms=100";

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failed run with exactly one line on stderr that contains every `needle`.
fn assert_clear_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected failure; stderr: {err}");
    assert!(!err.contains("panicked"), "ftvm panicked: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got: {err}");
    assert!(lines[0].starts_with("ftvm: error: "), "{err}");
    for n in needles {
        assert!(
            lines[0].contains(n),
            "{:?} does not mention {n:?}",
            lines[0]
        );
    }
}

fn disk_image(mib: u64) -> tempfile::NamedTempFile {
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(mib << 20).unwrap();
    img
}

/// Starts a VM counting forever with `disk` and waits until its guest counts.
fn start_counting(disk: &str) -> (Guarded, Console) {
    let (vm, console, _) =
        spawn_ftvm(&["run", "--vcpus", "1", "--disk", disk, "--cmdline", FOREVER]);
    console.wait_for("vcpu0 count 1\n", LIMIT);
    (vm, console)
}

/// Asserts that the VM is alive and its guest still counts.
fn assert_still_counting(vm: &mut Guarded, console: &Console) {
    let child = vm.0.as_mut().unwrap();
    assert!(child.try_wait().unwrap().is_none(), "the first VM exited");
    let seen = last_count(&console.text(), 0).unwrap_or(0);
    console.wait_until("the guest to count on", LIMIT, |t| {
        last_count(t, 0).is_some_and(|n| n > seen + 1)
    });
}

fn run_with_disk(disk: &str, cmdline: &str) -> Output {
    ftvm(
        &["run", "--vcpus", "1", "--disk", disk, "--cmdline", cmdline],
        LIMIT,
    )
}

#[test]
fn a_second_vm_on_the_same_disk_is_refused_while_the_first_runs() {
    require_kvm();
    let img = disk_image(4);
    let path = img.path().to_str().unwrap();
    let (mut first, console) = start_counting(path);
    for second in [path.to_string(), format!("{path},readonly")] {
        let o = run_with_disk(&second, "count=1");
        assert_clear_error(
            &o,
            &[&format!("Disk image {path} is in use by another process")],
        );
        assert!(!stdout(&o).contains("ftvm-guest: boot"), "{}", stdout(&o));
    }
    assert_still_counting(&mut first, &console);
    drop(first);
    // Once the first is gone (its lock goes with it), the image can be used again.
    let o = run_with_disk(path, "count=1 interval-ms=1");
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn read_only_users_share_a_disk_and_keep_writers_out() {
    require_kvm();
    let img = disk_image(4);
    let path = img.path().to_str().unwrap();
    let ro = format!("{path},readonly");
    let (mut first, console) = start_counting(&ro);
    let o = run_with_disk(&ro, "count=2 interval-ms=1");
    assert!(o.status.success(), "a second reader runs: {}", stderr(&o));
    assert!(stdout(&o).contains("vcpu0 done"), "{}", stdout(&o));
    let o = run_with_disk(path, "count=1");
    assert_clear_error(&o, &[path, "in use by another process"]);
    assert_still_counting(&mut first, &console);
}

#[test]
fn a_fifo_as_a_disk_is_refused_at_once() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("disk.fifo");
    let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path that lives for the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let fifo = fifo.to_str().unwrap();
    for disk in [format!("{fifo},readonly"), fifo.to_string()] {
        let start = Instant::now();
        // Opening a FIFO for reading used to wait for a writer forever.
        let o = run_with_disk(&disk, "count=1");
        let took = start.elapsed();
        assert_clear_error(&o, &[&format!("Disk image {fifo} is a FIFO")]);
        assert!(
            took < Duration::from_secs(1),
            "{disk}: refused after {took:?}"
        );
    }
}

#[test]
fn a_directory_as_a_disk_is_refused() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // Read-only, a directory used to become an 8-sector disk.
    for disk in [format!("{d},readonly"), d.to_string()] {
        let o = run_with_disk(&disk, "count=1");
        assert_clear_error(
            &o,
            &[&format!(
                "Disk image {d} is a directory, not a regular file or a block device"
            )],
        );
    }
}

/// A loop device over a file, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Self {
        let o = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap_or_else(|e| panic!("this test needs losetup(8) to attach a loop device: {e}"));
        assert!(
            o.status.success(),
            "this test needs root and loop devices (losetup --find failed): {}",
            stderr(&o)
        );
        Self(stdout(&o).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_block_device_is_a_disk_of_its_real_size() {
    require_kvm();
    let img = disk_image(4);
    let dev = Loop::attach(img.path());
    assert_eq!(
        vmm::hostfile::input_size(
            &vmm::hostfile::open_input(
                Path::new(&dev.0),
                "disk image",
                vmm::hostfile::InputKind::Disk { writable: false },
            )
            .unwrap(),
            Path::new(&dev.0),
            "disk image",
        )
        .unwrap(),
        4 << 20
    );
    // It used to be refused as smaller than one sector (its inode length is 0).
    let o = run_with_disk(&dev.0, "disk-write=3,21");
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains(" sectors=8192\n"), "{}", stdout(&o));
    let o = run_with_disk(&format!("{},readonly", dev.0), "disk-verify=3,21");
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("disk-verify ok bytes=3145728"),
        "{}",
        stdout(&o)
    );
    // Beyond its capacity the guest's writes fail.
    let o = run_with_disk(&dev.0, "disk-write=5,21");
    assert!(!o.status.success(), "{}", stdout(&o));
}

#[test]
fn bad_network_options_are_refused() {
    for (net, needles) in [
        ("tap=t0,mac=01:00:5e:00:00:01", &["multicast"][..]),
        ("tap=t0,mac=ff:ff:ff:ff:ff:ff", &["broadcast"]),
        ("tap=t0,mac=00:00:00:00:00:00", &["all zeros"]),
        (
            "tap=t0,mac=+6:+0:+0:+0:+0:+1",
            &["Invalid MAC address '+6:+0:+0:+0:+0:+1'"],
        ),
        ("tap=a,tap=b", &["Network option 'tap' is given twice"]),
        ("tap=a,speed=fast", &["Unknown network option 'speed=fast'"]),
    ] {
        let o = ftvm(&["run", "--vcpus", "1", "--net", net], LIMIT);
        assert_clear_error(&o, needles);
    }
}
