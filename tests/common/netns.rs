//! A network namespace with a TAP device in it, made for one test and removed afterwards, even
//! when the test fails. Test traffic never leaves it.

use std::os::fd::AsRawFd;
use std::process::Command;

/// The namespace; dropping it deletes the TAP and the namespace.
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
    /// The TAP device inside it.
    pub tap: String,
    /// The host side's address (x.y.z.1); the guest gets x.y.z.2.
    pub subnet: [u8; 3],
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2's ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// Creates namespace `ftvm-<pid>-<tag>` with TAP `ftvm-tap<n>` at 10.77.<n>.1/24, IPv6 off
    /// (so that the kernel sends nothing of its own on the TAP).
    pub fn create(tag: &str, n: u8) -> Self {
        let ns = Self {
            name: format!("ftvm-{}-{tag}", std::process::id()),
            tap: format!("ftvm-tap{n}"),
            subnet: [10, 77, n],
        };
        ip(&["netns", "add", &ns.name]);
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        exec(&["link", "set", "lo", "up"]);
        exec(&["tuntap", "add", "dev", &ns.tap, "mode", "tap"]);
        let sysctl = format!("net.ipv6.conf.{}.disable_ipv6=1", ns.tap);
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sysctl", "-qw", &sysctl])
            .output()
            .expect("sysctl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        exec(&[
            "addr",
            "add",
            &format!("{}/24", ns.host_ip()),
            "dev",
            &ns.tap,
        ]);
        exec(&["link", "set", &ns.tap, "up"]);
        ns
    }

    /// The host side's address.
    pub fn host_ip(&self) -> String {
        let [a, b, c] = self.subnet;
        format!("{a}.{b}.{c}.1")
    }

    /// The guest's address.
    pub fn guest_ip(&self) -> String {
        let [a, b, c] = self.subnet;
        format!("{a}.{b}.{c}.2")
    }

    /// Moves the calling thread into the namespace (and so every thread or process it starts).
    pub fn enter(&self) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.name)).expect("netns file");
        // SAFETY: setns with a namespace fd we opened; it affects only this thread.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// A statistic of the TAP (e.g. `tx_packets`), as the host kernel counts it.
    pub fn tap_stat(&self, name: &str) -> u64 {
        let path = format!("/sys/class/net/{}/statistics/{name}", self.tap);
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat", &path])
            .output()
            .expect("cat runs");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a number")
    }

    /// Whether the namespace still exists.
    pub fn exists(name: &str) -> bool {
        std::path::Path::new(&format!("/run/netns/{name}")).exists()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.name, "ip", "link", "del", &self.tap])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
