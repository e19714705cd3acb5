//! Snapshot create time and restore-to-running time, for a 512 MiB and a 2 GiB test guest
//! whose second vCPU has dirtied 128 MiB.
//!
//! `cargo bench --bench snapshot`. Snapshot files go to the system temp directory.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use vmm::vm::RestoreOptions;

fn run(mem_mib: u64, encoding: checkpoint::snapshot::MemoryEncoding) {
    let cmdline = "@0:count=0 @0:interval-ms=50 @1:dirty=400,128";
    let (vm, console) = common::test_vm(2, mem_mib, cmdline);
    let vm = vm.start().unwrap();
    console.wait_for_line("vcpu1 workload dirty", Duration::from_secs(30));
    // Let the dirtying vCPU cover its working set once (128 MiB at 400 MiB/s).
    std::thread::sleep(Duration::from_millis(500));
    let path = std::env::temp_dir().join(format!("ftvm-bench-{mem_mib}.snap"));

    let t0 = Instant::now();
    vm.pause().unwrap();
    let paused = t0.elapsed();
    let state = vm.save_state().unwrap();
    let saved = t0.elapsed();
    let stats = checkpoint::snapshot::write_with(&path, &state, vm.memory(), encoding).unwrap();
    let on_disk = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&path).unwrap().blocks() * 512
    };
    let written = t0.elapsed();
    vm.stop().unwrap();

    let sink = common::Console::default();
    let t1 = Instant::now();
    let opts = RestoreOptions {
        console: Box::new(sink.clone()),
        nets: None,
        disks: None,
    };
    let restored = checkpoint::snapshot::restore(&path, opts).unwrap();
    let built = t1.elapsed();
    let restored = restored.start().unwrap();
    let running = t1.elapsed();
    sink.wait_until("the restored guest prints", Duration::from_secs(30), |t| {
        t.contains("count")
    });
    let printing = t1.elapsed();
    restored.stop().unwrap();
    let _ = std::fs::remove_file(&path);
    println!(
        "{encoding:?} {mem_mib:>5} MiB: snapshot {written:>8.1?} (pause {paused:.1?}, state {:.1?}, file {:.1?}; {} KiB on disk, {} of {} pages non-zero) | restore to running {running:>8.1?} (build+load {built:.1?}), first output {printing:.1?}",
        saved - paused,
        written - saved,
        on_disk >> 10,
        stats.pages - stats.zero_pages,
        stats.pages,
    );
}

fn main() {
    use checkpoint::snapshot::MemoryEncoding::{Compressed, Raw};
    for encoding in [Compressed, Raw] {
        for mem in [512, 2048] {
            run(mem, encoding);
        }
    }
}
