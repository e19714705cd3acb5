//! The control API's request parser, `checkpoint::api::parse_command(method, path, body)`.
//!
//! NOT BUILT YET: the function arrives with the API rewrite; enable this target's [[bin]] entry
//! in fuzz/Cargo.toml once it exists.
//!
//! Input: a method selector byte, then the path up to the first newline, then the body.
//!
//! Invariants: no panic; parsing is deterministic (same input, same answer); an accepted
//! request is one the API documents (`GET /status`, `PUT /pause`, `PUT /resume`,
//! `PUT /snapshot` with a JSON body naming a non-empty path); a refused one has a message.
#![no_main]

use checkpoint::api::{Command, parse_command};
use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 7] = ["GET", "PUT", "POST", "DELETE", "PATCH", "get", ""];

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = METHODS[usize::from(m) % METHODS.len()];
    let (path, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let path = String::from_utf8_lossy(path);

    let first = parse_command(method, &path, body);
    let second = parse_command(method, &path, body);
    assert_eq!(
        format!("{first:?}"),
        format!("{second:?}"),
        "the same request parsed two ways"
    );
    match first {
        Ok(Command::Status) => assert_eq!(method, "GET", "status through {method}"),
        Ok(Command::Pause | Command::Resume) => {
            assert_eq!(method, "PUT", "pause/resume through {method}")
        }
        Ok(Command::Snapshot { path: file, .. }) => {
            assert_eq!(method, "PUT", "snapshot through {method}");
            assert!(!file.as_os_str().is_empty(), "snapshot to an empty path");
            assert!(
                std::str::from_utf8(body).is_ok(),
                "snapshot from a body that is not UTF-8"
            );
        }
        #[allow(unreachable_patterns)]
        Ok(_) => {}
        Err(e) => assert!(!e.to_string().is_empty(), "refusal without a message"),
    }
});
