//! `ftvm cert`: the files it writes, their modes, its refusal to replace a key, and the
//! fingerprint it prints (the one the other host pins with --peer).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use checkpoint::transport::{CERT_FILE, Fingerprint, Identity, KEY_FILE};

fn cert(dir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .arg("cert")
        .arg("--out")
        .arg(dir)
        .args(extra)
        .output()
        .expect("cannot run ftvm")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The fingerprint printed on stdout, which must be the only output line.
fn printed(o: &Output) -> Fingerprint {
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "ftvm cert failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    lines[0].parse().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn cert_writes_a_private_key_and_prints_the_fingerprint_of_the_certificate_it_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("replica/identity");
    let o = cert(&dir, &[]);
    let fp = printed(&o);
    assert_eq!(mode(&dir), 0o700, "a created directory is private");
    assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
    assert_eq!(
        mode(&dir.join(CERT_FILE)) & 0o033,
        0,
        "cert.pem: no write for others"
    );
    let identity = Identity::load(&dir).unwrap();
    assert_eq!(identity.fingerprint(), fp);
    assert_eq!(checkpoint::transport::fingerprint(identity.cert_der()), fp);
    // Printed with colons in lower case; both spellings parse to it.
    let shown = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(shown, fp.to_string());
    assert_eq!(
        shown
            .replace(':', "")
            .to_uppercase()
            .parse::<Fingerprint>()
            .unwrap(),
        fp
    );
}

#[test]
fn cert_refuses_to_replace_a_key_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let first = printed(&cert(dir, &[]));
    assert_eq!(mode(dir), 0o755, "an existing directory is left as it is");
    let key = std::fs::read(dir.join(KEY_FILE)).unwrap();
    let certificate = std::fs::read(dir.join(CERT_FILE)).unwrap();

    let o = cert(dir, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(o.stdout.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("ftvm: error: "), "{err}");
    assert!(
        err.contains("key.pem exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.join(KEY_FILE)).unwrap(), key);
    assert_eq!(std::fs::read(dir.join(CERT_FILE)).unwrap(), certificate);

    let second = printed(&cert(dir, &["--force"]));
    assert_ne!(first, second);
    assert_eq!(Identity::load(dir).unwrap().fingerprint(), second);
    assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
    let names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "temporaries left behind: {names:?}");
}
