//! The Linux early-boot test: Debian's kernel, started by `ftvm run` with 2 vCPUs, prints on
//! ftvm's console its view of what ftvm built — the command line, the e820 map, the ACPI
//! tables, 2 CPUs — and each line is checked against the configuration.
//!
//! On this project's machines (/dev/kvm is PVM) Linux's ring-0 code runs in an instruction
//! emulator, so this takes a minute or more; the test stops the VM as soon as every line has
//! been seen. The kernel and initramfs come from `scripts/linux-guest.sh` (run by
//! `scripts/setup.sh`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use common::{Guarded, require_kvm};

const DEADLINE: Duration = Duration::from_secs(900);
const CMDLINE: &str =
    "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 ftvm.test=early-boot";

fn asset(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/linux-guest")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/linux-guest.sh (scripts/setup.sh does)",
        path.display()
    );
    path
}

/// The lines the kernel must print, derived from the configuration.
fn expected(mem: u64) -> Vec<String> {
    let mut want = vec![format!("Command line: {CMDLINE}")];
    for (start, len, kind) in vmm::linux::e820_map(&vmm::memory::ram_ranges(mem).unwrap()) {
        let kind = if kind == 1 { "usable" } else { "reserved" };
        want.push(format!(
            "BIOS-e820: [mem {start:#018x}-{:#018x}] {kind}",
            start + len - 1
        ));
    }
    want.push(format!("ACPI: RSDP {:#018X}", vmm::acpi::RSDP_ADDR).replace("0X", "0x"));
    for table in ["XSDT", "FACP", "DSDT", "APIC"] {
        want.push(format!("ACPI: {table} 0x"));
    }
    want.push("IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23".into());
    want.push("smpboot: Allowing 2 CPUs, 0 hotplug CPUs".into());
    want
}

#[test]
fn linux_early_boot_shows_what_ftvm_built() {
    require_kvm();
    let (vmlinux, initrd) = (asset("vmlinux"), asset("initramfs.cpio.gz"));
    let mem = 512u64 << 20;
    let want = expected(mem);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(["run", "--vcpus", "2", "--mem", "512M", "--cmdline", CMDLINE])
        .arg("--kernel")
        .arg(&vmlinux)
        .arg("--initrd")
        .arg(&initrd)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("ftvm starts");
    let stdout = child.stdout.take().unwrap();
    let _guard = Guarded(Some(child));
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let start = Instant::now();
    let mut console = Vec::new();
    let mut missing: Vec<&String> = want.iter().collect();
    while !missing.is_empty() {
        let left = DEADLINE.saturating_sub(start.elapsed());
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        missing.retain(|w| !line.contains(w.as_str()));
        console.push(line);
    }
    eprintln!(
        "early boot: {} lines in {:.1?}",
        console.len(),
        start.elapsed()
    );
    assert!(
        missing.is_empty(),
        "not seen within {DEADLINE:?}: {missing:#?}\nconsole:\n{}",
        console.join("\n")
    );
}
