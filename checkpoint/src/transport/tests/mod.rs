//! Unit tests of the transport: fingerprints, addresses, identity files, the frame cap, and
//! who the handshake lets in.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use quinn::rustls;

use super::endpoint::connect_as;
use super::*;

mod link;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_fingerprint_prints_with_colons_and_parses_in_every_accepted_form() {
    let id = Identity::generate().unwrap();
    let fp = id.fingerprint();
    assert_eq!(fp, fingerprint(id.cert_der()));
    let shown = fp.to_string();
    assert_eq!(shown.len(), 32 * 3 - 1, "{shown}");
    assert_eq!(shown, shown.to_lowercase());
    let plain = shown.replace(':', "");
    for text in [
        shown.clone(),
        shown.to_uppercase(),
        plain.clone(),
        plain.to_uppercase(),
        format!("SHA256:{shown}"),
        format!("sha256:{plain}"),
        format!("  {shown}\n"),
    ] {
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp, "{text:?}");
    }
    for bad in [
        String::new(),
        plain[..62].to_string(),
        format!("{plain}00"),
        format!("{}zz", &plain[..62]),
        format!("{}é", &plain[..62]),
    ] {
        let e = bad.parse::<Fingerprint>().unwrap_err();
        assert!(matches!(e, Error::BadFingerprint(_)), "{bad:?}: {e}");
    }
}

#[test]
fn a_peer_address_takes_the_default_port_when_none_is_given() {
    let ok = |s: &str, host: &str, port: u16| {
        let a: PeerAddr = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(
            a,
            PeerAddr {
                host: host.into(),
                port
            },
            "{s}"
        );
    };
    ok("10.0.0.2", "10.0.0.2", DEFAULT_PORT);
    ok("10.0.0.2:9000", "10.0.0.2", 9000);
    ok("replica.example", "replica.example", DEFAULT_PORT);
    ok("replica-1:7000", "replica-1", 7000);
    ok("::1", "::1", DEFAULT_PORT);
    ok("[::1]", "::1", DEFAULT_PORT);
    ok("[fe80::2]:7481", "fe80::2", 7481);
    for bad in [
        "",
        ":7480",
        "host:",
        "host:0",
        "host:65536",
        "host:x",
        "[::1",
        "[::1]x",
        "[host]:1",
        "a b",
        "a:b:c",
    ] {
        assert!(
            matches!(bad.parse::<PeerAddr>(), Err(Error::BadAddress(_))),
            "{bad:?} accepted"
        );
    }
    assert_eq!(
        "[::1]".parse::<PeerAddr>().unwrap().to_string(),
        format!("[::1]:{DEFAULT_PORT}")
    );
}

#[test]
fn a_frame_length_is_checked_at_its_edges() {
    let header = |n: u32| n.to_be_bytes();
    assert_eq!(frame_len(header(1023), 1024).unwrap(), 1023);
    assert_eq!(frame_len(header(1024), 1024).unwrap(), 1024);
    assert!(matches!(
        frame_len(header(1025), 1024),
        Err(Error::FrameTooLong {
            len: 1025,
            max: 1024
        })
    ));
    assert!(frame_len(header(u32::MAX), 64 << 20).is_err());
    assert_eq!(frame_len(header(0), 0).unwrap(), 0);
}

#[test]
fn an_identity_is_written_with_private_modes_and_never_replaced_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b");
    let id = Identity::generate().unwrap();
    id.write(&dir, false).unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
    assert_eq!(mode(&dir.join(CERT_FILE)) & 0o600, 0o600);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "no temporaries left: {names:?}");
    let loaded = Identity::load(&dir).unwrap();
    assert_eq!(loaded.fingerprint(), id.fingerprint());

    let key_before = std::fs::read(dir.join(KEY_FILE)).unwrap();
    let other = Identity::generate().unwrap();
    let e = other.write(&dir, false).unwrap_err();
    assert!(matches!(e, Error::Exists { .. }), "{e}");
    assert!(e.to_string().contains("--force"), "{e}");
    assert_eq!(std::fs::read(dir.join(KEY_FILE)).unwrap(), key_before);
    assert_eq!(
        Identity::load(&dir).unwrap().fingerprint(),
        id.fingerprint()
    );

    other.write(&dir, true).unwrap();
    assert_eq!(
        Identity::load(&dir).unwrap().fingerprint(),
        other.fingerprint()
    );
    assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);

    // Only the key refused: a lone cert.pem is refused as well.
    let lone = tmp.path().join("lone");
    std::fs::create_dir(&lone).unwrap();
    std::fs::write(lone.join(CERT_FILE), b"mine").unwrap();
    assert!(matches!(id.write(&lone, false), Err(Error::Exists { .. })));
    assert_eq!(std::fs::read(lone.join(CERT_FILE)).unwrap(), b"mine");
    assert!(!lone.join(KEY_FILE).exists());
}

#[test]
fn an_identity_is_not_loaded_from_a_key_others_can_read_or_from_garbage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    generate_into(dir, false).unwrap();
    let key = dir.join(KEY_FILE);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Identity::load(dir).unwrap_err();
    assert!(matches!(e, Error::KeyExposed { mode: 0o644, .. }), "{e}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(dir.join(CERT_FILE), b"not a certificate").unwrap();
    let e = Identity::load(dir).unwrap_err();
    assert!(matches!(e, Error::Pem { .. }), "{e}");
    let e = Identity::load(&dir.join("missing")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

#[test]
fn options_with_a_keep_alive_near_the_idle_timeout_are_refused() {
    let rt = runtime();
    let id = Identity::generate().unwrap();
    for keep_alive in [
        std::time::Duration::ZERO,
        std::time::Duration::from_millis(751),
        std::time::Duration::MAX,
    ] {
        let options = Options {
            keep_alive,
            ..Options::default()
        };
        let e = rt
            .block_on(listen_with(loopback(), &id, id.fingerprint(), &options))
            .err()
            .unwrap();
        assert!(matches!(e, Error::BadOptions(_)), "{keep_alive:?}: {e}");
        let e = rt
            .block_on(connect_with(loopback(), &id, id.fingerprint(), &options))
            .err()
            .unwrap();
        assert!(matches!(e, Error::BadOptions(_)), "{keep_alive:?}: {e}");
    }
}

/// The messages an operator reads, printed for review (`--nocapture`).
#[test]
fn refusals_read_clearly() {
    let rt = runtime();
    let replica = Identity::generate().unwrap();
    let primary = Identity::generate().unwrap();
    let stranger = Identity::generate().unwrap();
    rt.block_on(async {
        let server = listen(loopback(), &replica, primary.fingerprint())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let (on_replica, on_primary) = tokio::join!(server.accept(), async {
            match connect(addr, &stranger, replica.fingerprint()).await {
                Ok(conn) => conn.closed().await,
                Err(e) => e,
            }
        });
        let on_replica = on_replica.err().unwrap();
        println!("replica: {}", vmm::event::error_chain(&on_replica));
        println!("primary: {}", vmm::event::error_chain(&on_primary));
        for e in [&on_replica, &on_primary] {
            let text = e.to_string();
            assert!(text.starts_with(char::is_uppercase), "{text}");
            assert!(!text.ends_with('.'), "{text}");
        }
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One frame each way on a fresh stream.
async fn echo_once(server: &Server, primary: &Identity, replica_pin: Fingerprint) {
    let addr = server.local_addr().unwrap();
    let serve = async {
        let conn = server.accept().await.unwrap();
        assert_eq!(conn.peer(), Role::Primary);
        let (mut send, mut recv) = conn.accept_stream().await.unwrap();
        let got = recv_frame(&mut recv, 1 << 20).await.unwrap();
        send_frame(&mut send, &got).await.unwrap();
        send.finish().unwrap();
        // Until the primary has read the answer and closed.
        conn.closed().await;
    };
    let client = async {
        let conn = connect(addr, primary, replica_pin).await.unwrap();
        assert_eq!(conn.peer(), Role::Replica);
        let (mut send, mut recv) = conn.open_stream().await.unwrap();
        send_frame(&mut send, b"epoch 1").await.unwrap();
        assert_eq!(recv_frame(&mut recv, 1 << 20).await.unwrap(), b"epoch 1");
        assert!(matches!(
            recv_frame(&mut recv, 1 << 20).await,
            Err(Error::StreamEnded)
        ));
        conn.close("done");
    };
    tokio::join!(serve, client);
}

#[test]
fn a_primary_with_another_certificate_is_refused_and_the_replica_serves_the_next() {
    let rt = runtime();
    let replica = Identity::generate().unwrap();
    let primary = Identity::generate().unwrap();
    let stranger = Identity::generate().unwrap();
    rt.block_on(async {
        let server = listen(loopback(), &replica, primary.fingerprint())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let (accepted, refused) = tokio::join!(server.accept(), async {
            // TLS 1.3: the client's side of the handshake may finish before the server has
            // checked its certificate; the refusal then arrives as the connection's end.
            match connect(addr, &stranger, replica.fingerprint()).await {
                Ok(conn) => conn.closed().await,
                Err(e) => e,
            }
        });
        let e = accepted.err().expect("stranger accepted");
        match &e {
            Error::PinMismatch {
                peer: Role::Primary,
                presented,
                pinned,
            } => {
                assert_eq!(*presented, stranger.fingerprint());
                assert_eq!(*pinned, primary.fingerprint());
            }
            other => panic!("{other}"),
        }
        assert!(
            e.to_string().starts_with(&format!(
                "Primary presented certificate SHA256 {} but --peer pins {}",
                stranger.fingerprint(),
                primary.fingerprint()
            )),
            "{e}"
        );
        assert!(
            matches!(
                refused,
                Error::Refused {
                    peer: Role::Replica,
                    ..
                }
            ),
            "{refused}"
        );
        echo_once(&server, &primary, replica.fingerprint()).await;
    });
}

#[test]
fn a_primary_without_a_certificate_is_refused() {
    let rt = runtime();
    let replica = Identity::generate().unwrap();
    let primary = Identity::generate().unwrap();
    rt.block_on(async {
        let server = listen(loopback(), &replica, primary.fingerprint())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let options = Options::default();
        let (accepted, refused) = tokio::join!(server.accept(), async {
            match connect_as(addr, None, replica.fingerprint(), &options).await {
                Ok(conn) => conn.closed().await,
                Err(e) => e,
            }
        });
        let e = accepted.err().expect("anonymous primary accepted");
        assert!(matches!(e, Error::Handshake { .. }), "{e}");
        let chain = format!("{:?}", e);
        assert!(
            chain.contains("NoCertificatesPresented") || chain.contains("no certificates"),
            "{chain}"
        );
        assert!(matches!(refused, Error::Refused { .. }), "{refused}");
        echo_once(&server, &primary, replica.fingerprint()).await;
    });
}

#[test]
fn a_replica_with_another_certificate_is_refused_by_the_primary() {
    let rt = runtime();
    let replica = Identity::generate().unwrap();
    let impostor = Identity::generate().unwrap();
    let primary = Identity::generate().unwrap();
    rt.block_on(async {
        let server = listen(loopback(), &impostor, primary.fingerprint())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let (accepted, connected) = tokio::join!(
            server.accept(),
            connect(addr, &primary, replica.fingerprint())
        );
        let e = connected.err().expect("impostor replica accepted");
        assert!(
            e.to_string().starts_with(&format!(
                "Replica presented certificate SHA256 {} but --peer pins {}",
                impostor.fingerprint(),
                replica.fingerprint()
            )),
            "{e}"
        );
        let e = accepted.err().expect("the primary went on");
        assert!(
            matches!(
                e,
                Error::Refused {
                    peer: Role::Primary,
                    ..
                }
            ),
            "{e}"
        );
    });
}

/// Hands out the victim's certificate with another key.
#[derive(Debug)]
struct Stolen(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Stolen {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[test]
fn a_replica_with_the_pinned_certificate_but_not_its_key_is_refused() {
    let rt = runtime();
    let replica = Identity::generate().unwrap();
    let thief = Identity::generate().unwrap();
    let primary = Identity::generate().unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let signer = provider
        .key_provider
        .load_private_key(thief.key.clone_key())
        .unwrap();
    let stolen = rustls::sign::CertifiedKey::new(vec![replica.cert.clone()], signer);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Stolen(Arc::new(stolen))));
    tls.alpn_protocols = vec![super::endpoint::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    rt.block_on(async {
        let endpoint =
            quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(quic)), loopback())
                .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let serve = async {
            let incoming = endpoint.accept().await.unwrap();
            incoming.await.expect_err("the thief's handshake completed")
        };
        let (_, connected) = tokio::join!(serve, connect(addr, &primary, replica.fingerprint()));
        let e = connected
            .err()
            .expect("a replica without the key was accepted");
        assert!(matches!(e, Error::Handshake { .. }), "{e}");
        let chain = format!("{:?}", e);
        assert!(
            chain.contains("BadSignature") || chain.contains("signature"),
            "{chain}"
        );
    });
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused_at_listen() {
    let rt = runtime();
    let a = Identity::generate().unwrap();
    let b = Identity::generate().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    a.write(tmp.path(), false).unwrap();
    // b's key with a's certificate.
    let b_dir = tempfile::tempdir().unwrap();
    b.write(b_dir.path(), false).unwrap();
    std::fs::copy(b_dir.path().join(KEY_FILE), tmp.path().join(KEY_FILE)).unwrap();
    let mixed = Identity::load(tmp.path()).unwrap();
    let e = rt
        .block_on(listen(loopback(), &mixed, a.fingerprint()))
        .err()
        .unwrap();
    assert!(matches!(e, Error::Tls(_)), "{e}");
}

/// A frame that keeps arriving is received however long it takes in all, in pieces each
/// within the silence allowed; nothing for longer than that gives `None` (a silent peer), and
/// a stream that ends is told apart from silence.
#[test]
fn silence_not_a_frame_s_length_ends_a_wait() {
    let rt = runtime();
    let (replica, primary) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    rt.block_on(async {
        let server = listen(loopback(), &replica, primary.fingerprint())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let silence = Duration::from_millis(500);
        let serve = async {
            let conn = server.accept().await.unwrap();
            let (_send, mut recv) = conn.accept_stream().await.unwrap();
            // Eight pieces 100 ms apart: 800 ms in all, never 500 ms of silence.
            let got = recv_frame_unless_silent(&mut recv, 1 << 20, silence)
                .await
                .unwrap();
            assert_eq!(got.as_deref(), Some(&[7u8; 8000][..]));
            // Then nothing (the client waits for this side's close), inside the next frame's
            // header.
            let started = std::time::Instant::now();
            let got = recv_frame_unless_silent(&mut recv, 1 << 20, silence)
                .await
                .unwrap();
            assert_eq!(got, None);
            assert!(started.elapsed() >= silence);
            conn.close("done");
        };
        let client = async {
            let conn = connect(addr, &primary, replica.fingerprint())
                .await
                .unwrap();
            let (mut send, _recv) = conn.open_stream().await.unwrap();
            let mut frame = 8000u32.to_be_bytes().to_vec();
            frame.extend_from_slice(&[7u8; 8000]);
            for piece in frame.chunks(frame.len().div_ceil(8)) {
                send.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            send.write_all(&[0, 0]).await.unwrap();
            conn.closed().await;
        };
        tokio::join!(serve, client);
    });
}

/// A stream that ends before a frame, or inside one, is an error, not silence.
#[test]
fn an_ended_stream_is_not_silence() {
    let rt = runtime();
    let (replica, primary) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    rt.block_on(async {
        let server = listen(loopback(), &replica, primary.fingerprint())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let silence = Duration::from_secs(5);
        let serve = async {
            let conn = server.accept().await.unwrap();
            let (_send, mut recv) = conn.accept_stream().await.unwrap();
            let got = recv_frame_unless_silent(&mut recv, 1 << 20, silence).await;
            assert!(matches!(got, Ok(Some(ref b)) if b == b"one"), "{got:?}");
            let got = recv_frame_unless_silent(&mut recv, 1 << 20, silence).await;
            assert!(
                matches!(got, Err(Error::Truncated { got: 2, want: 5 })),
                "{got:?}"
            );
            conn.close("done");
        };
        let client = async {
            let conn = connect(addr, &primary, replica.fingerprint())
                .await
                .unwrap();
            let (mut send, _recv) = conn.open_stream().await.unwrap();
            send_frame(&mut send, b"one").await.unwrap();
            send.write_all(&5u32.to_be_bytes()).await.unwrap();
            send.write_all(b"tw").await.unwrap();
            send.finish().unwrap();
            conn.closed().await;
        };
        tokio::join!(serve, client);
    });
}
