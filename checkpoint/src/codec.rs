//! The one place that knows how state is encoded (bincode 2, standard configuration: varint
//! integers, little endian). bincode is marked unmaintained (RUSTSEC-2025-0141); swapping it
//! means changing this module and bumping the snapshot format's major version.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest encoded state accepted when decoding (untrusted input).
pub const MAX_STATE_LEN: usize = 64 << 20;

/// Errors of encoding and decoding.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Encoding failed.
    #[error("Cannot encode state")]
    Encode(#[source] bincode::error::EncodeError),
    /// The bytes are not a valid encoding.
    #[error("Cannot decode state")]
    Decode(#[source] bincode::error::DecodeError),
    /// Bytes were left over after the state.
    #[error("{0} bytes follow the encoded state")]
    Trailing(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_STATE_LEN>()
}

/// Encodes `value`.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(CodecError::Encode)
}

/// Decodes a whole `T` from `bytes`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(CodecError::Decode)?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct S {
        a: u64,
        b: Vec<u8>,
        c: Option<String>,
    }

    #[test]
    fn round_trips_and_refuses_garbage() {
        let s = S {
            a: 1 << 40,
            b: vec![1, 2, 3],
            c: Some("x".into()),
        };
        let bytes = encode(&s).unwrap();
        assert_eq!(decode::<S>(&bytes).unwrap(), s);
        assert!(matches!(
            decode::<S>(&bytes[..bytes.len() - 1]),
            Err(CodecError::Decode(_))
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode::<S>(&longer), Err(CodecError::Trailing(1))));
        // A length prefix claiming more than the limit is refused, not allocated.
        let huge = [0, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(decode::<S>(&huge).is_err());
    }
}
