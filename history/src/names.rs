//! The counter names the billing export knows. Others are kept and exported as they are.
//!
//! - `vcpu/<n>/run_ns`: nanoseconds vCPU `n` ran (billed as CPU time);
//! - `block/<drive>/<op>/requests` and `block/<drive>/<op>/bytes`, `op` = read, write, flush;
//! - `net/<iface>/<direction>/packets` and `net/<iface>/<direction>/bytes`, `direction` = rx, tx.

/// Nanoseconds vCPU `vcpu` ran.
pub fn vcpu_run_ns(vcpu: usize) -> String {
    format!("vcpu/{vcpu}/run_ns")
}

/// Block requests of `op` (read, write, flush) on `drive`.
pub fn block_requests(drive: &str, op: &str) -> String {
    format!("block/{drive}/{op}/requests")
}

/// Block bytes of `op` on `drive`.
pub fn block_bytes(drive: &str, op: &str) -> String {
    format!("block/{drive}/{op}/bytes")
}

/// Packets in `direction` (rx, tx) on `iface`.
pub fn net_packets(iface: &str, direction: &str) -> String {
    format!("net/{iface}/{direction}/packets")
}

/// Bytes in `direction` on `iface`.
pub fn net_bytes(iface: &str, direction: &str) -> String {
    format!("net/{iface}/{direction}/bytes")
}

/// The billing columns, in export order.
pub const COLUMNS: [&str; 10] = [
    "cpu_ns",
    "block_read_requests",
    "block_read_bytes",
    "block_write_requests",
    "block_write_bytes",
    "block_flush_requests",
    "net_rx_packets",
    "net_rx_bytes",
    "net_tx_packets",
    "net_tx_bytes",
];

/// The billing column a counter adds to, if any.
pub fn column(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('/').collect();
    let col = match parts.as_slice() {
        ["vcpu", _, "run_ns"] => "cpu_ns",
        ["block", _, "read", "requests"] => "block_read_requests",
        ["block", _, "read", "bytes"] => "block_read_bytes",
        ["block", _, "write", "requests"] => "block_write_requests",
        ["block", _, "write", "bytes"] => "block_write_bytes",
        ["block", _, "flush", "requests"] => "block_flush_requests",
        ["net", _, "rx", "packets"] => "net_rx_packets",
        ["net", _, "rx", "bytes"] => "net_rx_bytes",
        ["net", _, "tx", "packets"] => "net_tx_packets",
        ["net", _, "tx", "bytes"] => "net_tx_bytes",
        _ => return None,
    };
    COLUMNS.iter().position(|c| *c == col)
}
