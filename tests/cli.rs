//! The `ftvm` binary end to end: booting the embedded guest, workloads, exit status, and clear
//! one-line errors for bad input.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Output};
use std::time::Duration;

use common::{ftvm, ftvm_with, require_kvm};

const LIMIT: Duration = Duration::from_secs(60);

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failed run with exactly one line on stderr that contains every `needle`.
fn assert_clear_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure; stderr: {err}");
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "ftvm panicked: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got: {err}");
    assert!(lines[0].starts_with("ftvm: error: "), "{err}");
    for n in needles {
        assert!(
            lines[0].contains(n),
            "error {:?} does not mention {n:?}",
            lines[0]
        );
    }
}

#[test]
fn the_embedded_guest_runs_on_one_and_two_vcpus_and_exits_zero() {
    require_kvm();
    for vcpus in [1u8, 2] {
        let n = vcpus.to_string();
        let o = ftvm(
            &["run", "--vcpus", &n, "--cmdline", "count=3 interval-ms=10"],
            LIMIT,
        );
        let out = stdout(&o);
        assert!(o.status.success(), "vcpus={vcpus}: {}\n{out}", stderr(&o));
        assert!(
            out.contains(&format!(
                "ftvm-guest: boot abi={} vcpus={vcpus} ",
                ftvm_guest_abi::ABI_VERSION
            )),
            "{out}"
        );
        for v in 0..vcpus {
            for k in 1..=3 {
                assert!(
                    out.contains(&format!("vcpu{v} count {k}\n")),
                    "vcpu{v} count {k}: {out}"
                );
            }
            assert!(out.contains(&format!("vcpu{v} done\n")), "{out}");
        }
        assert!(
            !out.contains(&format!("vcpu{vcpus} ")),
            "no extra vCPU: {out}"
        );
        assert!(
            out.contains(&format!("ftvm-guest: all {vcpus} vcpus done")),
            "{out}"
        );
    }
}

#[test]
fn the_workload_comes_from_the_command_line() {
    require_kvm();
    let o = ftvm(
        &["run", "--vcpus", "2", "--cmdline", "compute=12345"],
        LIMIT,
    );
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    for v in 0..2u64 {
        let expected = ftvm_guest_abi::compute(12345, v + 1);
        let line = format!("vcpu{v} compute iterations=12345 ");
        let found = out
            .lines()
            .find(|l| l.starts_with(&line))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(found.ends_with(&format!("result={expected}")), "{found}");
    }
}

#[test]
fn the_guest_exit_status_becomes_ftvm_s() {
    require_kvm();
    // An unknown workload makes the guest power off with status 2.
    let o = ftvm(
        &["run", "--vcpus", "1", "--cmdline", "no-such-workload"],
        LIMIT,
    );
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("ftvm-guest: error: unknown word"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn help_explains_every_flag() {
    let o = ftvm(&["run", "--help"], LIMIT);
    let out = stdout(&o);
    assert!(o.status.success());
    for flag in ["--kernel", "--cmdline", "--mem", "--vcpus"] {
        assert!(out.contains(flag), "{flag} missing from --help:\n{out}");
    }
    assert!(out.contains("embedded"), "{out}");
}

#[test]
fn a_missing_kernel_is_a_clear_error() {
    let o = ftvm(&["run", "--kernel", "/nonexistent/vmlinux"], LIMIT);
    assert_clear_error(&o, &["/nonexistent/vmlinux", "No such file"]);
}

#[test]
fn an_unreadable_kernel_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // A directory cannot be read as a file, even by root.
    let o = ftvm(&["run", "--kernel", dir.path().to_str().unwrap()], LIMIT);
    assert_clear_error(&o, &[dir.path().to_str().unwrap(), "directory"]);
}

#[test]
fn a_non_elf_kernel_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kernel.txt");
    std::fs::write(&path, b"this is not a kernel").unwrap();
    let o = ftvm(&["run", "--kernel", path.to_str().unwrap()], LIMIT);
    assert_clear_error(
        &o,
        &["kernel.txt", "neither an ELF file nor a Linux bzImage"],
    );
}

#[test]
fn bad_memory_sizes_are_clear_errors() {
    let o = ftvm(&["run", "--mem", "0"], LIMIT);
    assert_clear_error(&o, &["Guest memory size 0 MiB is out of range"]);
    let o = ftvm(&["run", "--mem", "lots"], LIMIT);
    assert_clear_error(&o, &["Invalid memory size 'lots'"]);
    let o = ftvm(&["run", "--mem", "99999999999G"], LIMIT);
    assert_clear_error(&o, &["too large"]);
}

#[test]
fn absurd_vcpu_counts_are_clear_errors() {
    for n in ["0", "100000", "255"] {
        let o = ftvm(&["run", "--vcpus", n], LIMIT);
        assert_clear_error(&o, &[&format!("Cannot run {n} vCPUs")]);
    }
    let o = ftvm(&["run", "--vcpus=-3"], LIMIT);
    assert_clear_error(&o, &["Invalid vCPU count '-3'"]);
}

#[test]
fn no_access_to_dev_kvm_is_a_clear_error() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test drops to an unprivileged user and so must start as root"
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ftvm"));
    cmd.args(["run", "--vcpus", "1"]).uid(65534).gid(65534);
    let o = ftvm_with(&mut cmd, LIMIT);
    assert_clear_error(&o, &["Cannot open /dev/kvm", "Permission denied"]);
}

#[test]
fn bad_disks_are_clear_errors() {
    let o = ftvm(&["run", "--disk", "/nonexistent/disk.img"], LIMIT);
    assert_clear_error(
        &o,
        &[
            "Cannot open disk image /nonexistent/disk.img",
            "No such file",
        ],
    );
    let o = ftvm(&["run", "--disk", "/tmp/x.img,fast"], LIMIT);
    assert_clear_error(&o, &["Unknown disk option 'fast'"]);
}

#[test]
fn a_disk_given_on_the_command_line_reaches_the_guest() {
    require_kvm();
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(4 << 20).unwrap();
    let path = img.path().to_str().unwrap();
    let o = ftvm(
        &[
            "run",
            "--vcpus",
            "1",
            "--disk",
            path,
            "--cmdline",
            "disk-write=1,9",
        ],
        LIMIT,
    );
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let o = ftvm(
        &[
            "run",
            "--vcpus",
            "1",
            "--disk",
            &format!("{path},readonly"),
            "--cmdline",
            "disk-verify=1,9",
        ],
        LIMIT,
    );
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("disk-verify ok bytes=1048576"),
        "{}",
        stdout(&o)
    );
}

/// A minimal 64-bit ELF header for `machine`, with one PT_LOAD of 16 bytes at 16 MiB.
fn elf_kernel(machine: u16) -> Vec<u8> {
    let mut f = vec![0u8; 0x1010];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16] = 2;
    f[18..20].copy_from_slice(&machine.to_le_bytes());
    f[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    f[64..68].copy_from_slice(&1u32.to_le_bytes());
    f[72..80].copy_from_slice(&0x1000u64.to_le_bytes());
    for off in [80, 88] {
        f[off..off + 8].copy_from_slice(&0x100_0000u64.to_le_bytes());
    }
    for off in [96, 104] {
        f[off..off + 8].copy_from_slice(&16u64.to_le_bytes());
    }
    f
}

#[test]
fn bad_linux_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();

    // A bzImage whose header announces more than the file holds.
    let mut bz = vec![0u8; 4096];
    bz[0x1f1] = 1;
    bz[0x1f4..0x1f8].copy_from_slice(&0x1000u32.to_le_bytes());
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    std::fs::write(path("bzImage"), &bz).unwrap();
    let o = ftvm(&["run", "--kernel", &path("bzImage")], LIMIT);
    assert_clear_error(
        &o,
        &["bzImage is truncated", "announces 66560 bytes", "has 4096"],
    );

    // A kernel for another architecture.
    std::fs::write(path("Image"), elf_kernel(183)).unwrap();
    let o = ftvm(&["run", "--kernel", &path("Image")], LIMIT);
    assert_clear_error(&o, &["Image is not a 64-bit x86-64"]);

    // An initrd larger than guest memory.
    std::fs::write(path("vmlinux"), elf_kernel(62)).unwrap();
    let big = std::fs::File::create(path("initrd")).unwrap();
    big.set_len(40 << 20).unwrap();
    let o = ftvm(
        &[
            "run",
            "--kernel",
            &path("vmlinux"),
            "--initrd",
            &path("initrd"),
            "--mem",
            "32M",
            "--vcpus",
            "1",
        ],
        LIMIT,
    );
    assert_clear_error(
        &o,
        &[
            "Initrd",
            "is 41943040 bytes, more than the 33554432 allowed",
        ],
    );

    // A missing initrd, and an initrd for the test guest.
    let o = ftvm(
        &[
            "run",
            "--kernel",
            &path("vmlinux"),
            "--initrd",
            "/nonexistent/initrd",
        ],
        LIMIT,
    );
    assert_clear_error(&o, &["initrd /nonexistent/initrd", "No such file"]);
    let o = ftvm(&["run", "--initrd", &path("initrd"), "--vcpus", "1"], LIMIT);
    assert_clear_error(&o, &["--initrd applies to Linux kernels only"]);
}
