//! Snapshot files round-trip, and every kind of damage is refused with a clear error.

use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::memory::GuestMemoryMmap;

use crate::snapshot::{self, FORMAT_MAJOR, SnapshotError};

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct State {
    name: String,
    regs: Vec<u64>,
}

fn state() -> State {
    State {
        name: "vm".into(),
        regs: (0..100).collect(),
    }
}

/// Empty memory of the shape the tests use: 1 MiB at 0 and 256 KiB at 4 GiB.
fn blank() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 1 << 20),
        (GuestAddress(1 << 32), 256 << 10),
    ])
    .unwrap()
}

fn memory() -> GuestMemoryMmap {
    let m = blank();
    m.write_slice(b"first page", GuestAddress(0)).unwrap();
    m.write_slice(&[0xab; 5000], GuestAddress(0x7_f000))
        .unwrap();
    m.write_slice(b"high", GuestAddress((1 << 32) + 0x3_f000))
        .unwrap();
    m
}

fn same(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> bool {
    a.iter().zip(b.iter()).all(|(x, y)| {
        let (mut p, mut q) = (vec![0u8; x.len() as usize], vec![0u8; y.len() as usize]);
        a.read_slice(&mut p, x.start_addr()).unwrap();
        b.read_slice(&mut q, y.start_addr()).unwrap();
        x.start_addr() == y.start_addr() && p == q
    })
}

fn written(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("vm.snap");
    let stats = snapshot::write(&path, &state(), &memory()).unwrap();
    assert_eq!(stats.pages, (1 << 20) / 4096 + (256 << 10) / 4096);
    assert_eq!(
        stats.pages - stats.zero_pages,
        4,
        "only written pages are stored"
    );
    path
}

#[test]
fn a_snapshot_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = written(dir.path());
    assert!(!path.with_extension("partial").exists());
    let snap = snapshot::read::<State>(&path).unwrap();
    assert_eq!(snap.state, state());
    let fresh = blank();
    snap.fill(&fresh).unwrap();
    assert!(same(&fresh, &memory()));
}

fn damaged(f: impl FnOnce(&mut Vec<u8>)) -> SnapshotError {
    let dir = tempfile::tempdir().unwrap();
    let path = written(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    f(&mut bytes);
    std::fs::write(&path, &bytes).unwrap();
    snapshot::read::<State>(&path).err().expect("refused")
}

#[test]
fn damaged_files_are_refused() {
    assert!(matches!(
        damaged(|b| b[100] ^= 1),
        SnapshotError::Checksum(_)
    ));
    let last = |b: &mut Vec<u8>| {
        let n = b.len();
        b[n - 1] ^= 0x40
    };
    assert!(matches!(damaged(last), SnapshotError::Checksum(_)));
    assert!(matches!(
        damaged(|b| b.truncate(b.len() - 10)),
        SnapshotError::Truncated { .. }
    ));
    assert!(matches!(
        damaged(|b| b.truncate(20)),
        SnapshotError::Truncated { .. }
    ));
    assert!(matches!(
        damaged(|b| b.push(0)),
        SnapshotError::Trailing { extra: 1, .. }
    ));
    assert!(matches!(
        damaged(|b| b[0] = b'X'),
        SnapshotError::BadMagic(_)
    ));
    let v2 = damaged(|b| b[8..10].copy_from_slice(&(FORMAT_MAJOR + 1).to_le_bytes()));
    assert!(
        matches!(v2, SnapshotError::Version { found, .. } if found == FORMAT_MAJOR + 1),
        "{v2}"
    );
    let want = format!("format {}.x", FORMAT_MAJOR + 1);
    assert!(v2.to_string().contains(&want), "{v2}");
    let missing = snapshot::read::<State>(Path::new("/nonexistent/vm.snap"))
        .err()
        .unwrap();
    let text = vmm::event::error_chain(&missing);
    assert!(
        text.contains("/nonexistent/vm.snap") && text.contains("No such file"),
        "{text}"
    );
}

#[test]
fn memory_of_another_shape_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot::read::<State>(&written(dir.path())).unwrap();
    let smaller = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 512 << 10)]).unwrap();
    assert!(matches!(snap.fill(&smaller), Err(SnapshotError::Memory(_))));
}

#[test]
fn raw_snapshots_map_copy_on_write_and_stay_sparse() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.snap");
    let stats =
        snapshot::write_with(&path, &state(), &memory(), snapshot::MemoryEncoding::Raw).unwrap();
    assert_eq!(stats.pages - stats.zero_pages, 4);
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.len() > (1 << 20), "the file spans all of memory");
    assert!(
        meta.blocks() * 512 < 256 << 10,
        "zero pages are holes: {} bytes allocated",
        meta.blocks() * 512
    );

    let snap = snapshot::read::<State>(&path).unwrap();
    assert!(snap.is_raw());
    assert_eq!(snap.state, state());
    let ram = [
        (GuestAddress(0), 1u64 << 20),
        (GuestAddress(1 << 32), 256 << 10),
    ];
    let mapped = snap.map(&ram).unwrap();
    assert!(same(&mapped, &memory()));
    // The guest's writes stay in its memory, not in the file.
    let before = std::fs::read(&path).unwrap();
    mapped
        .write_slice(b"guest wrote this", GuestAddress(0x1000))
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // The same file also restores by copying.
    let fresh = blank();
    snap.fill(&fresh).unwrap();
    assert!(same(&fresh, &memory()));
    // And a machine of another size is refused.
    assert!(matches!(
        snap.map(&[(GuestAddress(0), 2 << 20)]),
        Err(SnapshotError::Memory(_))
    ));
}

#[test]
fn raw_snapshot_headers_and_state_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.snap");
    snapshot::write_with(&path, &state(), &memory(), snapshot::MemoryEncoding::Raw).unwrap();
    let good = std::fs::read(&path).unwrap();
    let check = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        std::fs::write(&path, &b).unwrap();
        snapshot::read::<State>(&path).err().expect("refused")
    };
    assert!(
        matches!(check(&|b| b[50] ^= 1), SnapshotError::Checksum(_)),
        "state damage"
    );
    assert!(
        matches!(check(&|b| b[12] |= 2), SnapshotError::Checksum(_)),
        "unknown flag"
    );
    assert!(matches!(
        check(&|b| b.truncate(b.len() - 4096)),
        SnapshotError::Truncated { .. }
    ));
}

// --- Snapshot files never clobber what they did not create ---

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Takes an open-file-description lock on `file`: `F_WRLCK` as a read-write disk in use,
/// `F_RDLCK` as a read-only one.
fn ofd_lock(file: &std::fs::File, kind: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero flock is valid; the fields we need are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl on an open fd with a valid flock that outlives the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    assert_eq!(r, 0, "lock: {}", std::io::Error::last_os_error());
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn a_symlink_or_file_at_the_old_partial_name_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // root once overwrote an unrelated file through a symlink at PATH.partial.
    std::fs::write(d.join("victim"), b"the operator's file").unwrap();
    std::os::unix::fs::symlink(d.join("victim"), d.join("vm.partial")).unwrap();
    // And an unrelated notes.partial was destroyed by a snapshot to notes.snap.
    std::fs::write(d.join("notes.partial"), b"my notes").unwrap();
    snapshot::write(&d.join("vm.snap"), &state(), &memory()).unwrap();
    snapshot::write(&d.join("notes.snap"), &state(), &memory()).unwrap();
    assert_eq!(
        std::fs::read(d.join("victim")).unwrap(),
        b"the operator's file"
    );
    assert!(
        d.join("vm.partial")
            .symlink_metadata()
            .unwrap()
            .is_symlink()
    );
    assert_eq!(std::fs::read(d.join("notes.partial")).unwrap(), b"my notes");
    assert_eq!(
        names(d),
        [
            "notes.partial",
            "notes.snap",
            "victim",
            "vm.partial",
            "vm.snap"
        ],
        "no temporary file is left"
    );
    snapshot::read::<State>(&d.join("vm.snap")).unwrap();
    snapshot::read::<State>(&d.join("notes.snap")).unwrap();
}

#[test]
fn a_destination_named_partial_is_written_through_a_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.partial");
    snapshot::write(&path, &state(), &memory()).unwrap();
    let snap = snapshot::read::<State>(&path).unwrap();
    assert_eq!(snap.state, state());
    assert_eq!(names(dir.path()), ["x.partial"]);
}

/// Snapshots into one directory at once, to different and to the same names, each complete.
#[test]
fn concurrent_snapshots_never_meet() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let big = || {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        for i in 0..(8 << 20) / 4096u64 {
            m.write_slice(&i.to_le_bytes(), GuestAddress(i * 4096))
                .unwrap();
        }
        m
    };
    let targets = [
        ("vm.snap", snapshot::MemoryEncoding::Compressed),
        ("vm.raw", snapshot::MemoryEncoding::Raw),
        ("same.snap", snapshot::MemoryEncoding::Compressed),
        ("same.snap", snapshot::MemoryEncoding::Raw),
        ("same.snap", snapshot::MemoryEncoding::Compressed),
    ];
    for _round in 0..3 {
        let barrier = std::sync::Barrier::new(targets.len());
        std::thread::scope(|s| {
            for (name, encoding) in targets {
                let (path, barrier) = (d.join(name), &barrier);
                s.spawn(move || {
                    let m = big();
                    barrier.wait();
                    snapshot::write_with(&path, &state(), &m, encoding).unwrap();
                });
            }
        });
        for name in ["vm.snap", "vm.raw", "same.snap"] {
            let snap = snapshot::read::<State>(&d.join(name)).unwrap();
            let fresh = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
            snap.fill(&fresh).unwrap();
            assert!(same(&fresh, &big()), "{name} holds one whole snapshot");
        }
        assert_eq!(names(d), ["same.snap", "vm.raw", "vm.snap"]);
    }
}

/// What a refused write must leave: the destination as it was and no temporary file.
fn refused(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    let before = names(dir);
    let err = snapshot::write(&path, &state(), &memory())
        .err()
        .unwrap_or_else(|| panic!("a snapshot to {name} is refused"));
    assert_eq!(names(dir), before, "nothing created or removed");
    vmm::event::error_chain(&err)
}

#[test]
fn destinations_that_are_not_regular_files_are_refused() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("adir")).unwrap();
    std::fs::write(d.join("adir/inside"), b"kept").unwrap();
    let e = refused(d, "adir");
    assert!(e.contains("is a directory"), "{e}");
    assert_eq!(std::fs::read(d.join("adir/inside")).unwrap(), b"kept");

    mkfifo(&d.join("fifo"));
    let e = refused(d, "fifo");
    assert!(e.contains("is a FIFO"), "{e}");
    assert!(d.join("fifo").metadata().unwrap().file_type().is_fifo());

    // A device node like /dev/null (made here, as root; elsewhere /dev/null itself, which
    // only root could replace).
    let dev = d.join("null");
    let c = std::ffi::CString::new(dev.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mknod with a valid NUL-terminated path.
    let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) } == 0;
    let (dev_dir, dev_name) = if made {
        (d, "null")
    } else {
        (Path::new("/dev"), "null")
    };
    let e = refused(dev_dir, dev_name);
    assert!(e.contains("is a character device"), "{e}");
    let dev = dev_dir.join(dev_name);
    assert!(dev.metadata().unwrap().file_type().is_char_device());

    // A symlink is refused, not replaced and not written through.
    std::fs::write(d.join("target"), b"pointed at").unwrap();
    std::os::unix::fs::symlink("target", d.join("link")).unwrap();
    let e = refused(d, "link");
    assert!(e.contains("symbolic link"), "{e}");
    assert_eq!(std::fs::read(d.join("link")).unwrap(), b"pointed at");
}

#[test]
fn a_destination_locked_by_another_open_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, kind) in [("rw.img", libc::F_WRLCK), ("ro.img", libc::F_RDLCK)] {
        std::fs::write(d.join(name), b"a disk image in use").unwrap();
        let disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.join(name))
            .unwrap();
        ofd_lock(&disk, kind as libc::c_int);
        let e = refused(d, name);
        assert!(e.contains("in use"), "{e}");
        assert_eq!(std::fs::read(d.join(name)).unwrap(), b"a disk image in use");
        drop(disk);
        // Unlocked, it is an ordinary old file and is replaced.
        snapshot::write(&d.join(name), &state(), &memory()).unwrap();
        snapshot::read::<State>(&d.join(name)).unwrap();
    }
}

#[test]
fn a_raw_snapshot_that_backs_guest_memory_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.raw");
    let raw = snapshot::MemoryEncoding::Raw;
    snapshot::write_with(&path, &state(), &memory(), raw).unwrap();
    let before = std::fs::read(&path).unwrap();
    let snap = snapshot::read::<State>(&path).unwrap();
    let mapped = snap
        .map(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 256 << 10),
        ])
        .unwrap();
    drop(snap);
    // Only the mapping holds the file now; it still may not be replaced.
    let e = refused(dir.path(), "vm.raw");
    assert!(e.contains("in use"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert!(same(&mapped, &memory()));
    drop(mapped);
    snapshot::write_with(&path, &state(), &blank(), raw).unwrap();
}

#[test]
fn a_fifo_input_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("in.snap");
    mkfifo(&fifo);
    let (tx, rx) = std::sync::mpsc::channel();
    let p = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send(snapshot::read::<State>(&p).err().map(|e| e.to_string()));
    });
    let e = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("reading a FIFO with no writer returns")
        .expect("and fails");
    assert!(e.contains("is a FIFO"), "{e}");
    let e = snapshot::read::<State>(dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("is a directory"), "{e}");
}

// --- The header is covered whole, and lengths are reported as lengths ---

#[test]
fn damage_anywhere_in_the_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = written(dir.path());
    let good = std::fs::read(&path).unwrap();
    for at in 0..40 {
        let mut b = good.clone();
        b[at] ^= 0x10;
        std::fs::write(&path, &b).unwrap();
        assert!(
            snapshot::read::<State>(&path).is_err(),
            "a flipped bit at header byte {at} is noticed"
        );
    }
}

#[test]
fn an_oversized_state_length_is_reported_as_a_length() {
    let dir = tempfile::tempdir().unwrap();
    let path = written(dir.path());
    let mut b = std::fs::read(&path).unwrap();
    b[16..24].copy_from_slice(&(crate::codec::MAX_STATE_LEN as u64 + 1).to_le_bytes());
    crate::snapshot::seal_header_for_tests(&mut b);
    std::fs::write(&path, &b).unwrap();
    let e = snapshot::read::<State>(&path).err().unwrap();
    assert!(
        matches!(e, SnapshotError::StateTooLong { len, .. } if len == crate::codec::MAX_STATE_LEN as u64 + 1),
        "{e}"
    );
}

#[test]
fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in ["vm.snap", "x.partial"] {
        let path = d.join(name);
        snapshot::write(&path, &state(), &memory()).unwrap();
        let old = std::fs::read(&path).unwrap();
        let other = blank();
        other.write_slice(&[7u8; 8192], GuestAddress(0)).unwrap();
        for encoding in [
            snapshot::MemoryEncoding::Compressed,
            snapshot::MemoryEncoding::Raw,
        ] {
            // Fails in the header, in the state, and in memory (at its last byte).
            let probe = d.join("probe");
            let stats = snapshot::write_with(&probe, &state(), &other, encoding).unwrap();
            let written = stats.state_bytes + stats.memory_bytes; // Raw: its holes too.
            std::fs::remove_file(&probe).unwrap();
            let last = match encoding {
                snapshot::MemoryEncoding::Compressed => 40 + written - 1,
                snapshot::MemoryEncoding::Raw => 4096 + 8192 - 1,
            };
            for limit in [10, 40 + stats.state_bytes / 2, last] {
                let e = snapshot::write_limited(&path, &state(), &other, encoding, Some(limit))
                    .expect_err("the write fails");
                assert!(
                    matches!(&e, SnapshotError::Io { source, .. }
                        if source.raw_os_error() == Some(libc::ENOSPC)),
                    "{e:?}"
                );
                assert_eq!(std::fs::read(&path).unwrap(), old, "{name} is unchanged");
            }
        }
        snapshot::read::<State>(&path).unwrap();
    }
    assert_eq!(names(d), ["vm.snap", "x.partial"], "no temporary is left");
}

#[test]
fn unknown_flags_in_a_sound_header_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = written(dir.path());
    let mut b = std::fs::read(&path).unwrap();
    b[12] |= 4;
    crate::snapshot::seal_header_for_tests(&mut b);
    std::fs::write(&path, &b).unwrap();
    let e = snapshot::read::<State>(&path).err().unwrap();
    assert!(matches!(e, SnapshotError::Flags { flags: 4, .. }), "{e}");
}
