use std::collections::BTreeMap;
use std::path::Path;

use super::*;
use crate::codec::encode_step;
use crate::export::{Query, Start, export};

fn sample(vm: &str, time_ms: u64, epoch: u64, cpu: u64, bytes: u64) -> Sample {
    let mut counters = BTreeMap::new();
    counters.insert(names::vcpu_run_ns(0), cpu);
    counters.insert(names::block_bytes("vda", "write"), bytes);
    Sample {
        vm: vm.into(),
        time_ms,
        epoch,
        counters,
    }
}

/// Every file under `dir` with its contents, to show that nothing was written.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.insert(format!("{}/", p.display()), Vec::new());
                out.extend(snapshot(&p));
            } else {
                out.insert(p.display().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn samples_round_trip_and_persist_with_the_resolution() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h");
    {
        let h = History::create(
            &path,
            Options {
                resolution_ms: 500,
                sync: true,
                ..Options::default()
            },
        )
        .unwrap();
        assert_eq!(
            h.record(&sample("vm1", 1_200, 3, 10, 512)).unwrap(),
            Recorded::Written
        );
        assert_eq!(
            h.record(&sample("vm1", 1_700, 5, 20, 1024)).unwrap(),
            Recorded::Written
        );
    }
    let h = History::open(&path).unwrap();
    assert_eq!(h.resolution_ms(), 500);
    let r = h.range("vm1", 0, u64::MAX).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].step_ms, 1_000);
    assert_eq!(r[1].step_ms, 1_500);
    assert_eq!(
        r[1].last.counters,
        sample("vm1", 1_700, 5, 20, 1024).counters
    );
    // Creating again with another resolution is refused; with the same one it opens.
    drop(h);
    let e = History::create(&path, Options::default()).unwrap_err();
    assert!(e.to_string().contains("resolution of 500 ms"), "{e}");
    History::create(
        &path,
        Options {
            resolution_ms: 500,
            sync: false,
            ..Options::default()
        },
    )
    .unwrap();
}

#[test]
fn the_same_epoch_twice_changes_nothing_and_a_changed_epoch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::create(dir.path(), Options::default()).unwrap();
    let s = sample("vm1", 10_100, 7, 100, 4096);
    assert_eq!(h.record(&s).unwrap(), Recorded::Written);
    let before = h.range("vm1", 0, u64::MAX).unwrap();
    assert_eq!(h.record(&s).unwrap(), Recorded::Unchanged);
    assert_eq!(h.range("vm1", 0, u64::MAX).unwrap(), before);
    // The same epoch with other counters: a conflict, nothing changes.
    let e = h.record(&sample("vm1", 10_100, 7, 101, 4096)).unwrap_err();
    assert!(matches!(e, HistoryError::Conflict { epoch: 7, .. }), "{e}");
    assert_eq!(h.range("vm1", 0, u64::MAX).unwrap(), before);
}

#[test]
fn a_step_keeps_its_last_commit_and_ignores_late_older_ones() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::create(dir.path(), Options::default()).unwrap();
    for (i, t) in [5_000u64, 5_025, 5_050, 5_975].iter().enumerate() {
        let e = 10 + i as u64;
        assert_eq!(
            h.record(&sample("vm1", *t, e, e * 10, 0)).unwrap(),
            Recorded::Written
        );
    }
    // A replay of an earlier epoch of the step: kept out (and still idempotent).
    assert_eq!(
        h.record(&sample("vm1", 5_025, 11, 110, 0)).unwrap(),
        Recorded::Unchanged
    );
    assert_eq!(
        h.record(&sample("vm1", 5_030, 12, 999, 0)).unwrap(),
        Recorded::Unchanged
    );
    let r = h.range("vm1", 0, u64::MAX).unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].last.epoch, r[0].last.time_ms), (13, 5_975));
    assert!(r[0].peaks.is_empty());
}

#[test]
fn a_rollback_inside_a_step_keeps_the_rolled_back_peak_and_is_not_billed() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::create(dir.path(), Options::default()).unwrap();
    h.record(&sample("vm1", 1_000, 40, 400, 40)).unwrap();
    h.record(&sample("vm1", 2_100, 50, 500, 50)).unwrap();
    // Failover: the VM continues from epoch 45 (its counters as at 45).
    h.record(&sample("vm1", 2_600, 45, 450, 45)).unwrap();
    h.record(&sample("vm1", 3_000, 60, 600, 60)).unwrap();
    let r = h.range("vm1", 2_000, 3_000).unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].peaks.len(), 1);
    assert_eq!(r[0].peaks[0].epoch, 50);
    assert_eq!(r[0].last.epoch, 45);

    let u = export(&h, &Query::default()).unwrap();
    assert_eq!(u.len(), 1);
    let u = &u[0];
    assert_eq!(u.start, Start::VmStart);
    assert_eq!((u.start_epoch, u.end_epoch, u.samples), (0, 60, 3));
    // Billed: exactly the counters at the last epoch, minus the start (zero).
    assert_eq!(u.billed, u.end_counters);
    assert_eq!(u.billed[&names::vcpu_run_ns(0)], 600);
    assert_eq!(u.rollbacks.len(), 1);
    let rb = &u.rollbacks[0];
    assert_eq!((rb.from_epoch, rb.to_epoch, rb.at_ms), (50, 45, 2_600));
    assert_eq!(rb.counters[&names::vcpu_run_ns(0)], 50);
}

#[test]
fn export_bills_the_difference_from_the_last_point_before_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::create(dir.path(), Options::default()).unwrap();
    for i in 0..10u64 {
        h.record(&sample(
            "vm1",
            i * 1000 + 10,
            i * 40,
            i * 1_000_000_007,
            i * 4096,
        ))
        .unwrap();
    }
    let q = Query {
        vm: Some("vm1".into()),
        from_ms: Some(3_000),
        to_ms: Some(7_000),
    };
    let u = &export(&h, &q).unwrap()[0];
    assert_eq!(u.start, Start::Before);
    assert_eq!((u.start_ms, u.start_epoch), (Some(2_010), 80));
    assert_eq!((u.end_ms, u.end_epoch, u.samples), (6_010, 240, 4));
    assert_eq!(u.billed[&names::vcpu_run_ns(0)], 4 * 1_000_000_007);
    assert_eq!(u.billed[&names::block_bytes("vda", "write")], 4 * 4096);
    assert_eq!(u.columns()[0], 4 * 1_000_000_007);
    // Adjacent intervals add up to the whole, exactly.
    let whole = &export(&h, &Query::default()).unwrap()[0];
    let a = &export(
        &h,
        &Query {
            from_ms: None,
            to_ms: Some(5_000),
            ..q.clone()
        },
    )
    .unwrap()[0];
    let b = &export(
        &h,
        &Query {
            from_ms: Some(5_000),
            to_ms: None,
            ..q.clone()
        },
    )
    .unwrap()[0];
    for (name, v) in &whole.billed {
        assert_eq!(a.billed[name] + b.billed[name], *v, "{name}");
    }
    let csv = export::render(&h, std::slice::from_ref(u), export::Format::Csv);
    let mut lines = csv.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("kind,vm,start_ms,end_ms,from_epoch,to_epoch,samples,cpu_seconds,cpu_ns")
    );
    assert_eq!(
        lines.next().unwrap(),
        "billed,vm1,2010,6010,80,240,4,4.000000028,4000000028,0,0,0,16384,0,0,0,0,0"
    );
}

#[test]
fn export_refuses_bad_queries_and_inconsistent_counters() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::create(dir.path(), Options::default()).unwrap();
    h.record(&sample("vm1", 1_000, 1, 10, 0)).unwrap();
    h.record(&sample("vm1", 2_000, 2, 20, 0)).unwrap();
    let err = |q: Query| export(&h, &q).unwrap_err().to_string();
    assert!(
        err(Query {
            vm: Some("nope".into()),
            ..Default::default()
        })
        .contains("unknown VM nope")
    );
    assert!(
        err(Query {
            from_ms: Some(5),
            to_ms: Some(4),
            vm: None
        })
        .contains("reversed")
    );
    assert!(
        err(Query {
            from_ms: Some(5),
            to_ms: Some(5),
            vm: None
        })
        .contains("empty")
    );
    assert!(
        err(Query {
            from_ms: Some(9_000),
            to_ms: None,
            vm: None
        })
        .contains("no samples")
    );
    // A counter that goes backwards while the epoch goes forwards is not billed.
    h.record(&sample("vm1", 3_000, 3, 15, 0)).unwrap();
    let e = err(Query::default());
    assert!(e.contains("went backwards"), "{e}");
    // A repeated epoch with the same counters is billed once.
    let dir2 = tempfile::tempdir().unwrap();
    let h2 = History::create(dir2.path(), Options::default()).unwrap();
    h2.record(&sample("vm1", 1_000, 1, 10, 0)).unwrap();
    h2.record(&sample("vm1", 2_000, 1, 10, 0)).unwrap();
    h2.record(&sample("vm1", 3_000, 2, 30, 0)).unwrap();
    let u = &export(&h2, &Query::default()).unwrap()[0];
    assert_eq!(u.repeats, 1);
    assert_eq!(u.billed[&names::vcpu_run_ns(0)], 30);
}

#[test]
fn limits_on_ids_names_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::create(dir.path(), Options::default()).unwrap();
    let long = "v".repeat(MAX_VM_ID);
    assert_eq!(
        h.record(&sample(&long, 1, 1, 1, 1)).unwrap(),
        Recorded::Written
    );
    for bad in ["", "a/b", "a\0b", "é", &"v".repeat(MAX_VM_ID + 1)] {
        assert!(
            matches!(
                h.record(&sample(bad, 1, 1, 1, 1)),
                Err(HistoryError::Invalid(_))
            ),
            "{bad:?}"
        );
    }
    let mut s = sample("vm1", 1, 1, 1, 1);
    s.counters.insert("x".repeat(MAX_COUNTER_NAME), u64::MAX);
    assert_eq!(h.record(&s).unwrap(), Recorded::Written);
    assert_eq!(
        h.range("vm1", 0, u64::MAX).unwrap()[0].last.counters[&"x".repeat(MAX_COUNTER_NAME)],
        u64::MAX
    );
    for bad in ["", "a,b", "a\"b", "a b", &"x".repeat(MAX_COUNTER_NAME + 1)] {
        let mut s = sample("vm2", 1, 1, 1, 1);
        s.counters.insert(bad.to_string(), 1);
        assert!(
            matches!(h.record(&s), Err(HistoryError::Invalid(_))),
            "{bad:?}"
        );
    }
    let mut s = sample("vm2", 1, 1, 1, 1);
    s.counters = (0..=MAX_COUNTERS).map(|i| (format!("c{i}"), 1)).collect();
    assert!(matches!(h.record(&s), Err(HistoryError::Invalid(_))));
    s.counters = (0..MAX_COUNTERS).map(|i| (format!("c{i}"), 1)).collect();
    assert_eq!(h.record(&s).unwrap(), Recorded::Written);
    // Time 0 and the last millisecond are valid.
    assert_eq!(
        h.record(&sample("vm3", 0, 1, 1, 1)).unwrap(),
        Recorded::Written
    );
    assert_eq!(
        h.record(&sample("vm3", u64::MAX, 2, 2, 2)).unwrap(),
        Recorded::Written
    );
    assert_eq!(
        h.range("vm3", 0, u64::MAX).unwrap().len(),
        1,
        "[0, MAX) excludes MAX"
    );
    let mut n = 0;
    h.scan("vm3", 0, None, |_| {
        n += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(n, 2);
    assert_eq!(
        h.vms()
            .unwrap()
            .iter()
            .find(|r| r.vm == "vm3")
            .unwrap()
            .last_ms,
        u64::MAX
    );
}

#[test]
fn vms_with_ids_that_prefix_each_other_stay_apart() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::create(dir.path(), Options::default()).unwrap();
    h.record(&sample("vm1", 1_000, 1, 1, 0)).unwrap();
    h.record(&sample("vm10", 2_000, 5, 2, 0)).unwrap();
    h.record(&sample("vm10", 3_000, 6, 3, 0)).unwrap();
    h.record(&sample("vm1", 4_000, 2, 4, 0)).unwrap();
    let vms = h.vms().unwrap();
    assert_eq!(vms.len(), 2);
    assert_eq!(
        (
            vms[0].vm.as_str(),
            vms[0].samples,
            vms[0].first_ms,
            vms[0].last_ms
        ),
        ("vm1", 2, 1_000, 4_000)
    );
    assert_eq!(
        (
            vms[1].vm.as_str(),
            vms[1].samples,
            vms[1].first_epoch,
            vms[1].last_epoch
        ),
        ("vm10", 2, 5, 6)
    );
    assert_eq!(h.range("vm1", 0, u64::MAX).unwrap().len(), 2);
    assert!(h.range("vm", 0, u64::MAX).unwrap().is_empty());
}

#[test]
fn retention_deletes_old_steps_and_keeps_them_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::create(dir.path(), Options::default()).unwrap();
    for i in 0..10u64 {
        h.record(&sample("vm1", i * 15_000, i + 1, (i + 1) * 10, 0))
            .unwrap();
        h.record(&sample("vm2", i * 15_000, i + 1, (i + 1) * 10, 0))
            .unwrap();
    }
    // Whole minutes: 70 s prunes the first minute (4 steps of each VM).
    assert_eq!(h.prune(70_000).unwrap(), 8);
    assert_eq!(h.prune(60_000).unwrap(), 0);
    let r = h.range("vm1", 0, u64::MAX).unwrap();
    assert_eq!(r.len(), 6);
    assert_eq!(r[0].step_ms, 60_000);
    assert_eq!(h.vms().unwrap()[0].pruned_before_ms, Some(60_000));
    // A late sample before the cut is not recorded again.
    assert_eq!(
        h.record(&sample("vm1", 15_000, 2, 20, 0)).unwrap(),
        Recorded::Expired
    );
    // The export starts at the first retained point and says so.
    let u = &export(
        &h,
        &Query {
            vm: Some("vm1".into()),
            ..Default::default()
        },
    )
    .unwrap()[0];
    assert_eq!(u.start, Start::Retained);
    assert_eq!(
        (u.start_ms, u.start_epoch, u.end_epoch),
        (Some(60_000), 5, 10)
    );
    assert_eq!(u.billed[&names::vcpu_run_ns(0)], 50);
}

#[test]
fn opening_what_is_not_a_history_is_an_error_and_writes_nothing() {
    let root = tempfile::tempdir().unwrap();
    // Missing: not created.
    let missing = root.path().join("missing");
    let e = History::open(&missing).unwrap_err();
    assert!(matches!(e, HistoryError::Missing(_)), "{e}");
    assert!(!missing.exists());
    assert!(History::open_read_only(&missing).is_err());
    assert!(!missing.exists());
    // A file.
    let file = root.path().join("file");
    std::fs::write(&file, b"data").unwrap();
    assert!(matches!(
        History::open(&file),
        Err(HistoryError::NotAHistory(..))
    ));
    assert!(matches!(
        History::create(&file, Options::default()),
        Err(HistoryError::NotAHistory(..))
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    // An empty directory (open does not make one) and a directory of other things.
    let empty = root.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(matches!(
        History::open(&empty),
        Err(HistoryError::NotAHistory(..))
    ));
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    let other = root.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), b"mine").unwrap();
    let before = snapshot(&other);
    assert!(matches!(
        History::open(&other),
        Err(HistoryError::NotAHistory(..))
    ));
    let e = History::create(&other, Options::default()).unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");
    assert_eq!(snapshot(&other), before);
    // Corrupted: a damaged marker, then damaged RocksDB files.
    let good = root.path().join("good");
    History::create(&good, Options::default())
        .unwrap()
        .record(&sample("vm1", 1, 1, 1, 1))
        .unwrap();
    std::fs::write(good.join(MARKER), b"ftvm-history 1\nresolution_ms 0\n").unwrap();
    let before = snapshot(&good);
    let e = History::open(&good).unwrap_err();
    assert!(matches!(e, HistoryError::Corrupted(..)), "{e}");
    assert!(History::open_read_only(&good).is_err());
    assert_eq!(snapshot(&good), before);
    std::fs::write(good.join(MARKER), marker_text(1000)).unwrap();
    std::fs::write(good.join("CURRENT"), b"MANIFEST-999999\n").unwrap();
    let before = snapshot(&good);
    let e = History::open(&good).unwrap_err();
    assert!(
        e.to_string().contains("cannot open") || e.to_string().contains("corrupted"),
        "{e}"
    );
    assert!(History::open_read_only(&good).is_err());
    let after = snapshot(&good);
    let changed: Vec<_> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(v))
        .map(|(k, _)| k)
        .collect();
    let gone: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    assert!(
        changed.is_empty() && gone.is_empty(),
        "changed {changed:?} gone {gone:?}"
    );
}

#[test]
fn a_read_only_store_refuses_writes_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    History::create(dir.path(), Options::default())
        .unwrap()
        .record(&sample("vm1", 1, 1, 1, 1))
        .unwrap();
    let h = History::open_read_only(dir.path()).unwrap();
    assert_eq!(h.range("vm1", 0, u64::MAX).unwrap().len(), 1);
    let e = h.record(&sample("vm1", 2_000, 2, 2, 2)).unwrap_err();
    assert!(matches!(e, HistoryError::Db(..)), "{e}");
    assert!(h.prune(u64::MAX).is_err());
}

#[test]
fn a_damaged_value_is_reported_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::create(dir.path(), Options::default()).unwrap();
    h.record(&sample("vm1", 1_000, 1, 1, 1)).unwrap();
    let good = h.db.get(sample_key("vm1", 1_000)).unwrap().unwrap();
    for cut in [0, 1, 2, good.len() / 2, good.len() - 1] {
        h.db.put(sample_key("vm1", 1_000), &good[..cut]).unwrap();
        let e = h.range("vm1", 0, u64::MAX).unwrap_err();
        assert!(matches!(e, HistoryError::Corrupted(..)), "{e}");
        assert!(h.record(&sample("vm1", 1_500, 2, 2, 2)).is_err());
    }
    let mut long = good.clone();
    long.push(0);
    h.db.put(sample_key("vm1", 1_000), &long).unwrap();
    assert!(h.range("vm1", 0, u64::MAX).is_err());
    // A counter name id the store does not know; a number that does not end.
    h.db.put(sample_key("vm1", 1_000), [2, 0, 1, 1, 1, 99, 1])
        .unwrap();
    let e = h.range("vm1", 0, u64::MAX).unwrap_err();
    assert!(e.to_string().contains("unknown counter name id 99"), "{e}");
    h.db.put(
        sample_key("vm1", 1_000),
        [
            2, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ],
    )
    .unwrap();
    assert!(matches!(
        h.range("vm1", 0, u64::MAX),
        Err(HistoryError::Corrupted(..))
    ));
    // A damaged name table is found at open.
    drop(h);
    let h = History::open(dir.path()).unwrap();
    h.db.put(name_key(5), b"orphan").unwrap();
    drop(h);
    let e = History::open(dir.path()).unwrap_err();
    assert!(e.to_string().contains("out of sequence"), "{e}");
}

#[test]
fn counter_names_are_kept_once_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let h = History::create(dir.path(), Options::default()).unwrap();
        h.record(&sample("vm1", 1_000, 1, 1, 1)).unwrap();
        let mut s = sample("vm2", 2_000, 1, 1, 1);
        s.counters.insert(names::net_bytes("eth0", "rx"), 7);
        h.record(&s).unwrap();
        assert_eq!(h.names.read().unwrap().by_id.len(), 3);
    }
    let h = History::open_read_only(dir.path()).unwrap();
    assert_eq!(h.names.read().unwrap().by_id.len(), 3);
    let r = h.range("vm2", 0, u64::MAX).unwrap();
    assert_eq!(r[0].last.counters[&names::net_bytes("eth0", "rx")], 7);
}

#[test]
fn times_parse_as_milliseconds_or_utc() {
    use crate::export::parse_time;
    assert_eq!(parse_time("0").unwrap(), 0);
    assert_eq!(parse_time("1764234000123").unwrap(), 1_764_234_000_123);
    assert_eq!(parse_time("1970-01-01T00:00:00Z").unwrap(), 0);
    assert_eq!(parse_time("2000-03-01T00:00:00Z").unwrap(), 951_868_800_000);
    assert_eq!(
        parse_time("2026-11-27T09:00:00.123Z").unwrap(),
        1_795_770_000_123
    );
    assert_eq!(
        parse_time("2024-02-29T23:59:59Z").unwrap(),
        1_709_251_199_000
    );
    for bad in [
        "",
        "-1",
        "1.5",
        "2023-02-29T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-11-27 09:00:00Z",
        "2026-11-27T09:00:00",
        "2026-11-27T09:00:00.1Z",
        "99999999999999999999999",
    ] {
        assert!(parse_time(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn a_history_can_be_shared_with_a_commit_callback() {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<History>();
    let dir = tempfile::tempdir().unwrap();
    let h = std::sync::Arc::new(History::create(dir.path(), Options::default()).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let h = h.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    h.record(&sample(&format!("vm{t}"), i * 1000, i, i, i))
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(h.vms().unwrap().iter().map(|r| r.samples).sum::<u64>(), 200);
}

#[test]
fn packed_minutes_read_and_bill_exactly_like_the_steps_they_hold() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::create(dir.path(), Options::default()).unwrap();
    // 5 minutes at 1 s, with a rollback inside minute 2 (at 130.5 s).
    for t in 0..300u64 {
        h.record(&sample("vm1", t * 1000 + 7, t * 40 + 1, t * 1000, t * 512))
            .unwrap();
        if t == 130 {
            h.record(&sample(
                "vm1",
                t * 1000 + 500,
                t * 40 - 20,
                t * 1000 - 500,
                t * 512 - 256,
            ))
            .unwrap();
        }
    }
    h.record(&sample("vm2", 5_000, 1, 1, 1)).unwrap();
    let queries = [
        (0, None),
        (61_000, Some(200_000)),
        (130_200, Some(130_900)),
        (59_999, Some(60_010)),
    ];
    let before: Vec<_> = queries
        .iter()
        .map(|(f, t)| {
            let q = Query {
                vm: Some("vm1".into()),
                from_ms: Some(*f),
                to_ms: *t,
            };
            (export(&h, &q).unwrap(), h.before("vm1", *f).unwrap())
        })
        .collect();
    let all = h.range("vm1", 0, u64::MAX).unwrap();
    // Pack the first 3 minutes (180.5 s rounds down to 180 s).
    assert_eq!(h.pack(180_500).unwrap(), 180);
    assert_eq!(h.pack(180_500).unwrap(), 0, "packing again changes nothing");
    assert_eq!(h.range("vm1", 0, u64::MAX).unwrap(), all);
    for ((f, t), was) in queries.iter().zip(&before) {
        let q = Query {
            vm: Some("vm1".into()),
            from_ms: Some(*f),
            to_ms: *t,
        };
        assert_eq!(
            &(export(&h, &q).unwrap(), h.before("vm1", *f).unwrap()),
            was,
            "{f} {t:?}"
        );
    }
    assert_eq!(before[0].0[0].rollbacks.len(), 1);
    // Packed minutes are closed: the same epoch again, or a late one, changes nothing.
    let s = sample("vm1", 10_007, 401, 10_000, 10 * 512);
    assert_eq!(h.record(&s).unwrap(), Recorded::Expired);
    assert_eq!(h.range("vm1", 0, u64::MAX).unwrap(), all);
    assert_eq!(h.packed_before("vm1").unwrap(), Some(180_000));
    // Retention deletes packed minutes whole; vm2 (one step in its minute) is left as it was.
    assert_eq!(h.range("vm2", 0, u64::MAX).unwrap().len(), 1);
    assert_eq!(h.prune(120_000).unwrap(), 2 + 1);
    assert_eq!(
        h.range("vm1", 0, u64::MAX).unwrap(),
        all[all.iter().position(|s| s.step_ms == 120_000).unwrap()..]
    );
    // Reopened, the same.
    drop(h);
    let h = History::open_read_only(dir.path()).unwrap();
    assert_eq!(h.range("vm1", 120_000, u64::MAX).unwrap().len(), 180);
    // A damaged pack is an error.
    drop(h);
    let h = History::open(dir.path()).unwrap();
    let key = sample_key("vm1", 120_000);
    let good = h.db.get(&key).unwrap().unwrap();
    for bad in [
        &good[..good.len() - 1],
        &[PACK_VERSION, 0][..],
        &[PACK_VERSION, 2, 5, 1, 2, 4, 1, 2][..],
    ] {
        h.db.put(&key, bad).unwrap();
        assert!(
            matches!(
                h.range("vm1", 0, u64::MAX),
                Err(HistoryError::Corrupted(..))
            ),
            "{bad:?}"
        );
    }
}

fn counters(k: u64) -> BTreeMap<String, u64> {
    sample("vm1", 0, 0, k * 1_000_000_007, k * 4096).counters
}

#[test]
fn a_recorder_that_cannot_write_is_behind_keeps_the_latest_commit_and_catches_up_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let r = Recorder::new(
        History::create(dir.path(), Options::default()).unwrap(),
        "vm1",
    )
    .unwrap();
    assert!(r.record_at(1_000, 1, counters(1)));
    let s = r.status();
    assert!(!s.behind);
    assert_eq!(
        (s.recorded_epoch, s.recorded_ms, s.failures),
        (Some(1), Some(1_000), 0)
    );
    // The store refuses to write (as on a full disk): the VM's commits go on.
    r.history().set_min_free_bytes(u64::MAX);
    assert!(!r.record_at(2_000, 2, counters(2)));
    assert!(!r.record_at(3_000, 3, counters(3)));
    assert!(!r.retry());
    let s = r.status();
    assert!(s.behind && s.behind_since_ms.is_some(), "{s:?}");
    assert_eq!(
        (s.failures, s.recorded_epoch, s.pending_epoch),
        (3, Some(1), Some(3))
    );
    assert!(
        s.last_error.as_deref().unwrap().contains("not written"),
        "{s:?}"
    );
    let j = r.status_json();
    assert_eq!(
        (j["behind"].as_bool(), j["write_failures"].as_u64()),
        (Some(true), Some(3))
    );
    assert_eq!(r.history().range("vm1", 0, u64::MAX).unwrap().len(), 1);
    // Room again: the latest commit is written, the totals catch up exactly.
    r.history().set_min_free_bytes(0);
    assert!(r.retry());
    let s = r.status();
    assert!(!s.behind && s.behind_since_ms.is_none(), "{s:?}");
    assert_eq!(
        (s.failures, s.recorded_epoch, s.pending_epoch),
        (3, Some(3), None)
    );
    assert!(r.retry(), "nothing left to write");
    let steps: Vec<u64> = r
        .history()
        .range("vm1", 0, u64::MAX)
        .unwrap()
        .iter()
        .map(|s| s.last.epoch)
        .collect();
    assert_eq!(
        steps,
        [1, 3],
        "the commit in between is superseded, not written"
    );
    let u = export(r.history(), &Query::default()).unwrap();
    assert_eq!(u[0].end_epoch, 3);
    assert_eq!(u[0].billed, counters(3));
    // A commit after catching up is written at once.
    assert!(r.record_at(4_000, 4, counters(4)));
    assert_eq!(r.status().failures, 3);
}

#[test]
fn a_recorder_catches_up_from_its_timer_when_commits_stop() {
    let dir = tempfile::tempdir().unwrap();
    let r = std::sync::Arc::new(
        Recorder::new(
            History::create(dir.path(), Options::default()).unwrap(),
            "vm1",
        )
        .unwrap(),
    );
    let timer = r.tick_every(std::time::Duration::from_millis(10)).unwrap();
    r.history().set_min_free_bytes(u64::MAX);
    assert!(!r.record_at(1_000, 7, counters(7)));
    // The timer retries while the store is still full: more failures, still behind.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while r.status().failures < 3 {
        assert!(std::time::Instant::now() < deadline, "no retries");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(r.status().behind);
    // No further commit: the timer writes the one kept back once there is room.
    r.history().set_min_free_bytes(0);
    while r.status().behind {
        assert!(std::time::Instant::now() < deadline, "never caught up");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(r.status().recorded_epoch, Some(7));
    timer.stop().unwrap();
    let u = export(r.history(), &Query::default()).unwrap();
    assert_eq!(u[0].billed, counters(7));
}

#[test]
fn a_recorder_on_a_read_only_store_reports_why_and_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    History::create(dir.path(), Options::default())
        .unwrap()
        .record(&sample("vm1", 1_000, 1, 1, 1))
        .unwrap();
    let r = Recorder::new(History::open_read_only(dir.path()).unwrap(), "vm1").unwrap();
    for e in 2..5 {
        assert!(!r.record_at(e * 1_000, e, counters(e)));
    }
    let s = r.status();
    assert!(s.behind);
    assert_eq!(
        (s.failures, s.recorded_epoch, s.pending_epoch),
        (3, None, Some(4))
    );
    assert!(s.last_error.unwrap().contains("cannot write"));
    // Bad VM ids are refused up front.
    let h = History::open_read_only(dir.path()).unwrap();
    let e = Recorder::new(h, "a/b").unwrap_err();
    assert!(e.to_string().contains("VM id"), "{e}");
}

#[test]
fn delta_packed_minutes_bill_like_their_steps_and_format_3_packs_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::create(dir.path(), Options::default()).unwrap();
    for t in 0..120u64 {
        let mut s = sample("vm1", t * 1000 + 3, t * 40, t * 999, t * 4096);
        match t {
            // The same epoch again a step later (a repeat, counted once).
            10 => s = sample("vm1", t * 1000 + 3, 9 * 40, 9 * 999, 9 * 4096),
            // A counter appears.
            20.. => {
                s.counters.insert(names::net_bytes("eth0", "rx"), t * 60);
            }
            _ => {}
        }
        // A rollback from one step to the next: lower epoch and counters.
        if t == 30 {
            s.epoch = 28 * 40;
            s.counters.insert(names::vcpu_run_ns(0), 28 * 999);
            s.counters
                .insert(names::block_bytes("vda", "write"), 28 * 4096);
            s.counters.insert(names::net_bytes("eth0", "rx"), 28 * 60);
        }
        h.record(&s).unwrap();
    }
    // Epoch 400's counters differ in two steps: an error before packing and after.
    h.record(&sample("vm-bad", 1_000, 400, 5, 5)).unwrap();
    h.record(&sample("vm-bad", 2_000, 400, 6, 5)).unwrap();
    let queries = [(0, None), (10_500, Some(70_000)), (29_000, Some(31_000))];
    let billed = |h: &History| -> Vec<_> {
        queries
            .iter()
            .map(|(f, t)| {
                let q = Query {
                    vm: Some("vm1".into()),
                    from_ms: Some(*f),
                    to_ms: *t,
                };
                export(h, &q).unwrap()
            })
            .collect()
    };
    let bad = Query {
        vm: Some("vm-bad".into()),
        ..Default::default()
    };
    let was = billed(&h);
    assert_eq!(was[0][0].repeats, 1);
    assert_eq!(was[0][0].rollbacks.len(), 1);
    let e = export(&h, &bad).unwrap_err().to_string();
    assert!(e.contains("appears twice with different counters"), "{e}");
    let all = h.range("vm1", 0, u64::MAX).unwrap();
    // The single-step values, to pack by hand in format 3 below.
    let raw: Vec<(u64, Vec<u8>)> = (0..60u64)
        .map(|t| {
            let v = h.db.get(sample_key("vm1", t * 1000)).unwrap().unwrap();
            (t * 1000, v)
        })
        .collect();
    assert_eq!(h.pack(120_000).unwrap(), 122);
    let packed = h.db.get(sample_key("vm1", 0)).unwrap().unwrap();
    assert_eq!(packed[0], PACK_DELTA_VERSION);
    let v2_bytes: usize = raw.iter().map(|(_, v)| v.len()).sum();
    assert!(packed.len() < v2_bytes, "{} vs {v2_bytes}", packed.len());
    assert_eq!(h.range("vm1", 0, u64::MAX).unwrap(), all);
    assert_eq!(billed(&h), was);
    let e = export(&h, &bad).unwrap_err().to_string();
    assert!(e.contains("appears twice with different counters"), "{e}");

    // Minute 0 in format 3 (as an older ftvm packed it): the same steps, the same bills.
    let mut v3 = vec![PACK_VERSION];
    put_varint(&mut v3, raw.len() as u64);
    for (step, v) in &raw {
        put_varint(&mut v3, *step);
        put_varint(&mut v3, v.len() as u64);
        v3.extend_from_slice(v);
    }
    h.db.put(sample_key("vm1", 0), &v3).unwrap();
    assert_eq!(h.range("vm1", 0, u64::MAX).unwrap(), all);
    assert_eq!(billed(&h), was);
    assert_eq!(
        h.pack(120_000).unwrap(),
        0,
        "packed minutes are not packed again"
    );

    // Damaged delta packs are errors: a delta first, an unknown kind, a delta past 2^64.
    h.db.put(sample_key("vm1", 0), &packed).unwrap();
    let full = encode_step(&[codec_point(5, 1, &[(0, 7)])]);
    let mut first_delta = vec![PACK_DELTA_VERSION, 1, 0, 1, 0, 0, 0];
    first_delta.truncate(7);
    let mut unknown_kind = vec![PACK_DELTA_VERSION, 1, 0, 7];
    unknown_kind.extend_from_slice(&full);
    let mut overflow = vec![PACK_DELTA_VERSION, 2, 0, 0, full.len() as u8];
    overflow.extend_from_slice(&full);
    overflow.extend_from_slice(&[1, 1, 0, 0]);
    overflow.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    for damaged in [first_delta, unknown_kind, overflow] {
        h.db.put(sample_key("vm1", 0), &damaged).unwrap();
        let e = h.range("vm1", 0, u64::MAX).unwrap_err();
        assert!(matches!(e, HistoryError::Corrupted(..)), "{damaged:?}: {e}");
        assert!(export(&h, &Query::default()).is_err());
    }
}

fn codec_point(time_ms: u64, epoch: u64, counters: &[(u32, u64)]) -> codec::IdPoint {
    codec::IdPoint {
        time_ms,
        epoch,
        ids: counters.iter().map(|c| c.0).collect(),
        values: counters.iter().map(|c| c.1).collect(),
    }
}

#[test]
fn a_recorder_packs_the_minutes_older_than_its_lag_once_a_minute_and_not_while_behind() {
    let dir = tempfile::tempdir().unwrap();
    let r = Recorder::new(
        History::create(dir.path(), Options::default()).unwrap(),
        "vm1",
    )
    .unwrap();
    for t in 0..300u64 {
        assert!(r.record_at(t * 1000 + 5, t * 40, counters(t)));
    }
    let all = r.history().range("vm1", 0, u64::MAX).unwrap();
    let bill = export(r.history(), &Query::default()).unwrap();
    // Behind: no packing.
    r.history().set_min_free_bytes(u64::MAX);
    assert!(!r.record_at(300_005, 300 * 40, counters(300)));
    r.tick(400_000);
    assert_eq!(r.history().packed_before("vm1").unwrap(), None);
    // Caught up by the tick itself, which then packs the minutes older than 2 minutes
    // (before 280 s, in whole minutes).
    r.history().set_min_free_bytes(0);
    r.tick(400_000);
    assert!(!r.status().behind);
    assert_eq!(r.history().packed_before("vm1").unwrap(), Some(240_000));
    // Not again within the minute; again after it.
    r.tick(459_999);
    assert_eq!(r.history().packed_before("vm1").unwrap(), Some(240_000));
    r.tick(460_000);
    assert_eq!(r.history().packed_before("vm1").unwrap(), Some(300_000));
    let mut now_all = all.clone();
    now_all.push(r.history().range("vm1", 300_000, u64::MAX).unwrap()[0].clone());
    assert_eq!(r.history().range("vm1", 0, u64::MAX).unwrap(), now_all);
    let q = Query {
        to_ms: Some(300_000),
        ..Default::default()
    };
    assert_eq!(export(r.history(), &q).unwrap(), bill);
    // A commit stamped inside a packed minute (a clock set back) is not recorded, nor
    // reported as recorded, nor left behind.
    let recorded = r.status().recorded_epoch;
    assert!(r.record_at(100_000, 50_000, counters(400)));
    let s = r.status();
    assert_eq!(
        (s.recorded_epoch, s.behind, s.pending_epoch),
        (recorded, false, None)
    );
}

#[test]
fn an_export_while_the_store_is_written_packed_and_compacted_never_reports_damage() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::create(dir.path(), Options::default()).unwrap();
    h.record(&sample("vm1", 0, 0, 0, 0)).unwrap();
    let path = dir.path().to_owned();
    let writer = std::thread::spawn(move || -> Result<()> {
        for t in 1..6_000u64 {
            h.record(&sample("vm1", t * 1000, t, t * 7, t * 512))?;
            if t % 300 == 0 {
                h.pack((t - 120) * 1000)?;
                h.compact()?;
            }
        }
        Ok(())
    });
    let mut exports = 0;
    while !writer.is_finished() {
        let r = History::open_read_only(&path);
        let u = r.and_then(|r| export(&r, &Query::default()));
        let u = u.unwrap_or_else(|e| panic!("export {exports} while writing: {e}"));
        assert_eq!(u[0].billed, u[0].end_counters);
        exports += 1;
    }
    writer.join().unwrap().unwrap();
    assert!(exports > 0);
    let u = export(&History::open_read_only(&path).unwrap(), &Query::default()).unwrap();
    assert_eq!(u[0].end_epoch, 5_999);
}
