//! Snapshot files through the real binary: two VMs snapshotting into one directory at once
//! both restore; what is not a regular file, or is in use, is refused and left as it was; a
//! destination named `x.partial` works and a failed write keeps it; a FIFO input is refused at
//! once.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Console, Guarded, ftvm, ftvm_ok, last_count, require_kvm, spawn_ftvm};

const LIMIT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// The names in `dir` that are not API sockets, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".sock"))
        .collect();
    v.sort();
    v
}

/// Starts a guest that counts forever, serving the API on `sock`; returns once it counts.
/// With `fsize`, the VMM may write no file beyond that many bytes (RLIMIT_FSIZE, SIGXFSZ
/// ignored, so a write fails with EFBIG as on a full disk).
fn counting_vm(sock: &Path, fsize: Option<u64>) -> (Guarded, Console) {
    require_kvm();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ftvm"));
    cmd.args(["run", "--mem", "64M", "--api", &s(sock)])
        .args(["--cmdline", "count=0 interval-ms=100"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(limit) = fsize {
        let rlim = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: between fork and exec the closure makes only async-signal-safe calls
        // (setrlimit, signal) on values it owns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_FSIZE, &rlim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().expect("ftvm starts");
    let mut out = child.stdout.take().unwrap();
    let console = Console::default();
    let mut sink = console.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut out, &mut sink);
    });
    let guard = Guarded(Some(child));
    console.wait_until("the guest counting", LIMIT, |t| last_count(t, 0) >= Some(1));
    (guard, console)
}

/// Waits until a counting guest prints its next count.
fn counts_on(console: &Console) {
    let now = last_count(&console.text(), 0).unwrap_or(0);
    console.wait_until("the guest counting on", LIMIT, |t| {
        last_count(t, 0) > Some(now)
    });
}

/// Restores `snap` in a new process and waits for the guest to count on where it was saved
/// (not from a new boot); returns the process, still running.
fn restores(snap: &Path, sock: &Path) -> (Guarded, Console) {
    let (guard, console, _) = spawn_ftvm(&["restore", "--from", &s(snap), "--api", &s(sock)]);
    let text = console.wait_until("the restored guest counting", LIMIT, |t| {
        last_count(t, 0).is_some()
    });
    assert!(
        last_count(&text, 0) > Some(1) && !text.contains("ftvm-guest: boot"),
        "{} did not continue the saved guest:\n{text}",
        snap.display()
    );
    (guard, console)
}

/// `ftvm snapshot` that must fail; returns its error output.
fn snapshot_refused(sock: &Path, to: &Path, raw: bool) -> String {
    let mut args = vec!["snapshot", "--api", sock.to_str().unwrap()];
    let to = s(to);
    args.extend(["--to", &to]);
    if raw {
        args.push("--raw");
    }
    let o = ftvm(&args, LIMIT);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "a snapshot to {to} is refused: {err}");
    err
}

#[test]
fn two_vms_snapshotting_into_one_directory_at_once_both_restore() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let socks: Vec<PathBuf> = ["a.sock", "b.sock"].iter().map(|n| d.join(n)).collect();
    let (vm_a, _) = counting_vm(&socks[0], None);
    let (vm_b, _) = counting_vm(&socks[1], None);
    // Once to vm.snap and vm.raw (which shared vm.partial), once both to one name.
    for targets in [["vm.snap", "vm.raw"], ["same.snap", "same.snap"]] {
        let barrier = std::sync::Barrier::new(2);
        std::thread::scope(|scope| {
            for (i, name) in targets.iter().enumerate() {
                let (sock, to, barrier) = (s(&socks[i]), s(&d.join(name)), &barrier);
                scope.spawn(move || {
                    let mut args = vec!["snapshot", "--api", &sock, "--to", &to];
                    if i == 1 {
                        args.push("--raw");
                    }
                    barrier.wait();
                    ftvm_ok(&args);
                });
            }
        });
    }
    drop((vm_a, vm_b));
    assert_eq!(files(d), ["same.snap", "vm.raw", "vm.snap"]);
    for name in ["vm.snap", "vm.raw", "same.snap"] {
        drop(restores(&d.join(name), &d.join("r.sock")));
    }
}

#[test]
fn what_is_not_a_regular_file_or_is_in_use_is_refused_and_left_as_it_was() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("api.sock");
    let (_vm, console) = counting_vm(&sock, None);

    std::fs::create_dir(d.join("adir")).unwrap();
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    let r = unsafe { libc::mkfifo(c(&d.join("fifo")).as_ptr(), 0o600) };
    assert_eq!(r, 0, "mkfifo: {}", std::io::Error::last_os_error());
    // A device node like /dev/null, made here (the tests run as root).
    // SAFETY: mknod with a valid NUL-terminated path.
    let r = unsafe {
        libc::mknod(
            c(&d.join("null")).as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(1, 3),
        )
    };
    assert_eq!(r, 0, "mknod: {}", std::io::Error::last_os_error());
    std::fs::write(d.join("target"), b"pointed at").unwrap();
    std::os::unix::fs::symlink("target", d.join("link")).unwrap();
    let before = files(d);
    for (name, says) in [
        ("adir", "is a directory"),
        ("fifo", "is a FIFO"),
        ("null", "is a character device"),
        ("link", "is a symbolic link"),
    ] {
        for raw in [false, true] {
            let err = snapshot_refused(&sock, &d.join(name), raw);
            assert!(err.contains(says), "{name}: {err}");
            assert_eq!(files(d), before, "{name}: nothing created or removed");
        }
    }
    assert!(d.join("adir").is_dir());
    assert!(d.join("fifo").metadata().unwrap().file_type().is_fifo());
    assert!(
        d.join("null")
            .metadata()
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(std::fs::read(d.join("link")).unwrap(), b"pointed at");

    // A raw snapshot that a running VM is restored from (its memory mapped from the file) is
    // not replaced, by either kind of snapshot; once that VM is gone, it is.
    let raw = d.join("vm.raw");
    ftvm_ok(&["snapshot", "--api", &s(&sock), "--to", &s(&raw), "--raw"]);
    let (restored, _) = restores(&raw, &d.join("r.sock"));
    let bytes = std::fs::read(&raw).unwrap();
    for kind in [false, true] {
        let err = snapshot_refused(&sock, &raw, kind);
        assert!(err.contains("is in use"), "{err}");
    }
    assert!(
        std::fs::read(&raw).unwrap() == bytes,
        "the file is unchanged"
    );
    drop(restored);
    ftvm_ok(&["snapshot", "--api", &s(&sock), "--to", &s(&raw), "--raw"]);

    // Restoring from a FIFO nobody writes is refused at once (it hung forever).
    let o = ftvm(&["restore", "--from", &s(&d.join("fifo"))], LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is a FIFO"), "{err}");
    assert!(o.stdout.is_empty(), "no guest output");

    // The VM that was refused so often runs on.
    counts_on(&console);
}

#[test]
fn a_destination_named_partial_works_and_a_failed_write_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x = d.join("x.partial");
    {
        let sock = d.join("a.sock");
        let _vm = counting_vm(&sock, None);
        ftvm_ok(&["snapshot", "--api", &s(&sock), "--to", &s(&x)]);
    }
    assert_eq!(files(d), ["x.partial"]);
    let good = std::fs::read(&x).unwrap();

    // A VMM that may not write a file beyond 4 KiB fails halfway, in either encoding.
    let sock = d.join("b.sock");
    let (_vm, console) = counting_vm(&sock, Some(4096));
    for raw in [false, true] {
        let err = snapshot_refused(&sock, &x, raw);
        assert!(err.contains("File too large"), "{err}");
        assert!(std::fs::read(&x).unwrap() == good, "x.partial is unchanged");
        assert_eq!(files(d), ["x.partial"], "no temporary is left");
    }
    counts_on(&console);
    drop(restores(&x, &d.join("r.sock")));
}
