//! The thread that owns a running VM: waits for it to end while executing API commands.

use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmm::vcpu::VcpuState;
use vmm::{Vm, VmEvent};

use crate::api::{Command, Request};
use crate::snapshot;

/// How often the VM's thread looks for API commands while the guest runs.
const POLL: Duration = Duration::from_millis(10);

/// Runs until the VM ends; returns why.
pub fn run(vm: &mut Vm, api: Option<&Receiver<Request>>) -> Option<VmEvent> {
    let Some(api) = api else {
        return vm.wait_event(None);
    };
    loop {
        if let Some(event) = vm.wait_event(Some(POLL)) {
            return Some(event);
        }
        while let Ok((command, reply)) = api.try_recv() {
            let _ = reply.send(execute(vm, command));
        }
    }
}

fn paused(vm: &Vm) -> bool {
    vm.vcpu_states().iter().all(|s| *s != VcpuState::Running)
}

/// Executes one API command on the VM.
pub fn execute(vm: &mut Vm, command: Command) -> Result<Value, String> {
    match command {
        Command::Status => Ok(json!({
            "state": if paused(vm) { "paused" } else { "running" },
            "vcpus": vm.vcpu_states().len(),
        })),
        Command::Pause => {
            vm.pause().map_err(|e| format!("{e:#}"))?;
            tracing::info!("VM paused");
            Ok(json!({ "state": "paused" }))
        }
        Command::Resume => {
            vm.resume();
            tracing::info!("VM resumed");
            Ok(json!({ "state": "running" }))
        }
        Command::Snapshot { path, raw } => {
            let encoding = if raw {
                snapshot::MemoryEncoding::Raw
            } else {
                snapshot::MemoryEncoding::Compressed
            };
            let was_running = !paused(vm);
            let start = Instant::now();
            vm.pause().map_err(|e| e.to_string())?;
            let paused_at = start.elapsed();
            let result = vm
                .save_state()
                .map_err(|e| e.to_string())
                .and_then(|state| {
                    snapshot::write_with(&path, &state, vm.memory(), encoding)
                        .map_err(|e| error_chain(&e))
                });
            if was_running {
                vm.resume();
            }
            let stats = result?;
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(path = %path.display(), ms, "snapshot written");
            Ok(json!({
                "path": path,
                "state_bytes": stats.state_bytes,
                "memory_bytes": stats.memory_bytes,
                "pages": stats.pages,
                "zero_pages": stats.zero_pages,
                "pause_ms": paused_at.as_secs_f64() * 1000.0,
                "total_ms": ms,
            }))
        }
    }
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s += &format!(": {c}");
        cause = c.source();
    }
    s
}
