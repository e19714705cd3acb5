//! A TAP device: Ethernet frames in and out of the host's network stack.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `TUNSETIFF`: attach the fd to a TUN/TAP interface.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Errors of opening a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("TAP name '{0}' is empty or longer than 15 bytes")]
    Name(String),
    /// /dev/net/tun cannot be opened.
    #[error("Cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    /// The kernel refused to attach to (or create) the interface.
    #[error("Cannot attach to TAP device '{name}'")]
    Attach {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An open TAP interface, non-blocking, without packet information headers.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the TAP interface `name` (creating it if it does not exist and the process
    /// may create interfaces).
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq matches in layout and
        // size (40 bytes); the fd is a freshly opened /dev/net/tun.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if ret < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame; `WouldBlock` when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame.
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }

    /// Another descriptor of the same interface, to write frames from elsewhere (one write,
    /// one frame).
    pub fn writer(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused() {
        assert!(matches!(Tap::open(""), Err(TapError::Name(_))));
        assert!(matches!(
            Tap::open("a-name-far-too-long"),
            Err(TapError::Name(_))
        ));
    }

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
