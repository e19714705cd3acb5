//! Decoding `vmm::vm::MachineState` with the codec's limits (untrusted snapshot and checkpoint
//! input).
//!
//! Invariants: decoding never panics; an accepted input re-encodes to bytes that decode to a
//! state with the same encoding (encode ∘ decode is idempotent on accepted input).
//!
//! The encoding is not canonical, so encode(decode(x)) == x holds only for inputs the encoder
//! wrote: bincode accepts a varint in a wider form than needed (0xFB 0x05 0x00 for 5), and
//! kvm-bindings' serde accepts a KVM structure's bytes of any length, zero-padding or truncating
//! them to the structure's size (so a re-encoding may even be longer than the input). `STRICT`
//! turns encode(decode(x)) == x into an assertion, to see such inputs.
#![no_main]

use checkpoint::codec;
use libfuzzer_sys::fuzz_target;
use vmm::vm::MachineState;

/// Also assert encode(decode(x)) == x (fails on non-minimal varints: see above).
const STRICT: bool = false;

fuzz_target!(|data: &[u8]| {
    let Ok(state) = codec::decode::<MachineState>(data) else {
        return;
    };
    let again = codec::encode(&state).expect("an accepted state encodes");
    if STRICT {
        assert!(again == data, "re-encoding differs from the accepted input");
    }
    let decoded: MachineState = codec::decode(&again).expect("a re-encoded state decodes");
    let third = codec::encode(&decoded).expect("encodes");
    assert!(third == again, "decode(encode(x)) is not x");
});
