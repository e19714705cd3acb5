//! Checkpoint frames and greetings as a replica receives them from the network
//! (`checkpoint::wire`), against a 16 MiB test-guest shape.
//!
//! Input: a control byte, then the bytes. Control bit 0: fix up the header and body CRC-32s
//! first (so mutations get past the checksums into the runs, bitmap, state and pages); bit 1:
//! treat the bytes as a greeting (`Hello`) instead of a frame.
//!
//! Invariants: no panic; a refused frame or greeting is an error; an accepted frame applies to
//! memory of the shape, after which every page it carries reads back as decoded, and
//! re-encoding what was decoded decodes to the same pages, epoch, kind and state.
#![no_main]

use checkpoint::codec;
use checkpoint::wire::{self, Decoder, DeviceKind, Encoder, EncoderOptions, MachineShape};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm::memory::GuestMemoryMmap;

const MEM: u64 = 16 << 20;

fn shape() -> MachineShape {
    MachineShape {
        ram: vec![(0, MEM)],
        vcpus: 1,
        devices: vec![DeviceKind::Block],
        linux: false,
    }
}

fn fix_crcs(frame: &mut [u8]) {
    if frame.len() < wire::HEADER_LEN {
        return;
    }
    let body_len = u64::from_le_bytes(frame[40..48].try_into().unwrap());
    let end = (wire::HEADER_LEN as u64)
        .saturating_add(body_len)
        .min(frame.len() as u64) as usize;
    let body = crc32fast::hash(&frame[wire::HEADER_LEN..end]);
    frame[48..52].copy_from_slice(&body.to_le_bytes());
    let head = crc32fast::hash(&frame[..52]);
    frame[52..56].copy_from_slice(&head.to_le_bytes());
}

thread_local! {
    static MEMORY: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if ctl & 2 != 0 {
        if let Ok(hello) = wire::decode_hello(&bytes) {
            let again = wire::encode_hello(&hello).expect("an accepted greeting encodes");
            let back = wire::decode_hello(&again).expect("a re-encoded greeting decodes");
            assert_eq!(back.shape, hello.shape);
            assert_eq!(back.protocol, hello.protocol);
        }
        return;
    }
    if ctl & 1 != 0 {
        fix_crcs(&mut bytes);
    }
    let mut decoder = Decoder::new(shape()).unwrap();
    MEMORY.with(|memory| {
        let Ok(decoded) = decoder.decode(&bytes, Some(memory)) else {
            return;
        };
        wire::apply(&decoded, memory).expect("a verified frame applies to memory of its shape");
        let mut page = vec![0u8; wire::PAGE_SIZE];
        for (i, gfn) in decoded.pages.gfns.iter().enumerate() {
            memory
                .read_slice(&mut page, GuestAddress(gfn * wire::PAGE_SIZE as u64))
                .unwrap();
            assert!(
                page == decoded.pages.data[i * wire::PAGE_SIZE..(i + 1) * wire::PAGE_SIZE],
                "page {gfn:#x} reads back otherwise"
            );
        }
        let mut encoder = Encoder::new(shape(), EncoderOptions::default()).unwrap();
        let (gfns, data) = (&decoded.pages.gfns, &decoded.pages.data);
        let mut frame = Vec::new();
        match &decoded.state {
            Some(state) => encoder
                .encode_into(decoded.epoch, decoded.kind, gfns, data, state, &mut frame),
            None => encoder.encode_precopy_into(decoded.epoch, gfns, data, &mut frame),
        }
        .expect("what was decoded encodes");
        let again = Decoder::new(shape())
            .unwrap()
            .decode(&frame, Some(memory))
            .expect("a re-encoded frame decodes");
        assert_eq!(again.epoch, decoded.epoch);
        assert_eq!(again.kind, decoded.kind);
        assert!(again.pages.gfns == decoded.pages.gfns && again.pages.data == decoded.pages.data);
        let state = |s: &Option<_>| s.as_ref().map(|s| codec::encode(s).unwrap());
        assert!(
            state(&again.state) == state(&decoded.state),
            "the state changed in a round trip"
        );
    });
});
