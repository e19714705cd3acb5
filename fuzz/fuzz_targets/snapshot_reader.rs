//! The snapshot file reader (`checkpoint::snapshot::read`) and memory fill on untrusted files.
//!
//! Input: a control byte, then the file. Control bits ask the target to repair the header's
//! memory length and CRC after mutation (see `ftvm_fuzz::layout::snapshot`), so that mutations
//! reach the state decoder and the memory section instead of stopping at the checksum.
//!
//! Invariants: `read` returns Ok or Err, never panics; an accepted file's state re-encodes to
//! bytes that decode to the same encoding (decode → encode → decode is stable; see
//! state_decode.rs for why the file's own bytes may differ); filling memory of a fixed small
//! shape (64 KiB at 0, 16 KiB at 4 GiB) returns Ok or Err without panicking, and a fill that
//! succeeds is deterministic (a second fill into fresh memory gives the same bytes).
#![no_main]

use std::sync::Mutex;

use checkpoint::codec;
use checkpoint::snapshot;
use ftvm_fuzz::layout::snapshot::RAM;
use ftvm_fuzz::seeds::fix_snapshot;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::memory::GuestMemoryMmap;
use vmm::vm::MachineState;

struct Rig {
    dir: tempfile::TempDir,
}

static RIG: Mutex<Option<Rig>> = Mutex::new(None);

fn memory() -> GuestMemoryMmap {
    let ranges: Vec<_> = RAM.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("small guest memory")
}

fn contents(m: &GuestMemoryMmap) -> Vec<u8> {
    let mut all = Vec::new();
    for r in m.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        m.read_slice(&mut buf, r.start_addr())
            .expect("read own memory");
        all.extend(buf);
    }
    all
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctrl, file)) = data.split_first() else {
        return;
    };
    let mut file = file.to_vec();
    fix_snapshot(&mut file, ctrl);
    let mut guard = RIG.lock().unwrap_or_else(|e| e.into_inner());
    let rig = guard.get_or_insert_with(|| Rig {
        dir: ftvm_fuzz::scratch_dir(),
    });
    let path = rig.dir.path().join("input.snap");
    std::fs::write(&path, &file).expect("write input file");

    let Ok(snap) = snapshot::read::<MachineState>(&path) else {
        return;
    };
    let again = codec::encode(&snap.state).expect("an accepted state encodes");
    let decoded: MachineState = codec::decode(&again).expect("a re-encoded state decodes");
    assert!(
        codec::encode(&decoded).expect("encodes") == again,
        "state round trip differs"
    );

    let first = memory();
    if snap.fill(&first).is_ok() {
        let second = memory();
        snap.fill(&second)
            .expect("a fill that worked once works twice");
        assert!(contents(&first) == contents(&second), "two fills differ");
    }
});
