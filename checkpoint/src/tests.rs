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
    assert!(matches!(damaged(|b| b.push(0)), SnapshotError::Checksum(_)));
    assert!(matches!(
        damaged(|b| b[0] = b'X'),
        SnapshotError::BadMagic(_)
    ));
    let v2 = damaged(|b| b[8..10].copy_from_slice(&(FORMAT_MAJOR + 1).to_le_bytes()));
    assert!(
        matches!(v2, SnapshotError::Version { found, .. } if found == FORMAT_MAJOR + 1),
        "{v2}"
    );
    assert!(v2.to_string().contains("format 2.x"), "{v2}");
    let missing = snapshot::read::<State>(Path::new("/nonexistent/vm.snap"))
        .err()
        .unwrap();
    assert!(matches!(missing, SnapshotError::Io { .. }), "{missing}");
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
