//! The control API's request parser, `checkpoint::api::parse_command(method, path, body)`.
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
            assert!(file.is_absolute(), "snapshot to a relative path");
            assert!(
                std::str::from_utf8(body).is_ok(),
                "snapshot from a body that is not UTF-8"
            );
        }
        #[allow(unreachable_patterns)]
        Ok(_) => {}
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty(), "refusal without a message");
            // An answer never repeats the request (a body's bytes, a path).
            // (Twelve letters or more: the fixed messages have no word that long.)
            if body.len() >= 12 && body.iter().all(u8::is_ascii_alphanumeric) {
                assert!(
                    !text.contains(std::str::from_utf8(body).unwrap()),
                    "the refusal repeats the body"
                );
            }
            assert!(matches!(e.status(), 400 | 404 | 405 | 408 | 413));
        }
    }
});
