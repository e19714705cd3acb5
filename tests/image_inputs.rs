//! Kernel and initrd files are checked by type, size and magic before any of them is read,
//! and mapped rather than copied: a FIFO never hangs ftvm, a huge file costs nothing.
//! (One test in its own binary: it measures the largest child's memory.)

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use common::{ftvm, require_kvm};

const LIMIT: Duration = Duration::from_secs(30);

fn refused(args: &[&str], needles: &[&str]) {
    let o = ftvm(args, LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: {err:?} does not mention {n:?}");
    }
    assert!(o.stdout.is_empty(), "{args:?}: no guest output");
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path that lives for the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

fn largest_child_rss_mib() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) }, 0);
    u.ru_maxrss / 1024
}

#[test]
fn kernel_and_initrd_inputs_are_checked_before_they_are_read() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    mkfifo(dir.path().join("k.fifo").as_path());
    mkfifo(dir.path().join("i.fifo").as_path());
    // A 4 GiB sparse file that is no kernel.
    std::fs::File::create(p("huge"))
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    // A real Linux kernel when set-up has fetched it; else the embedded guest is the kernel.
    let linux = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/linux-guest/vmlinux");
    assert!(
        linux.exists(),
        "{} is missing: run scripts/setup.sh",
        linux.display()
    );
    let linux = linux.to_str().unwrap();

    // FIFOs: refused at once instead of waiting for a writer.
    refused(&["run", "--kernel", &p("k.fifo")], &["k.fifo", "FIFO"]);
    refused(
        &["run", "--kernel", linux, "--initrd", &p("i.fifo")],
        &["i.fifo", "FIFO"],
    );
    // Character devices (endless input) and directories.
    refused(&["run", "--kernel", "/dev/zero"], &["/dev/zero"]);
    refused(
        &["run", "--kernel", linux, "--initrd", "/dev/zero"],
        &["/dev/zero"],
    );
    refused(&["run", "--kernel", &p("")], &["directory"]);
    // Larger than guest memory: refused by size, nothing read.
    refused(
        &["run", "--mem", "512M", "--kernel", &p("huge")],
        &["huge", "more than the 536870912 allowed"],
    );
    refused(
        &[
            "run",
            "--mem",
            "512M",
            "--kernel",
            linux,
            "--initrd",
            &p("huge"),
        ],
        &["huge", "more than the 536870912 allowed"],
    );
    // Small enough for an 8 GiB guest: mapped, its magic checked, refused — nothing copied.
    refused(
        &["run", "--mem", "8G", "--kernel", &p("huge")],
        &["huge", "neither an ELF file nor a Linux bzImage"],
    );
    let rss = largest_child_rss_mib();
    assert!(rss < 200, "a child used {rss} MiB of memory");
}
