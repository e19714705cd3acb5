//! Length-prefixed frames on a QUIC stream: a 4-byte big-endian length, then that many bytes.

use quinn::{ReadExactError, RecvStream, SendStream};

use super::{Error, Result};

/// Bytes in a frame's length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// The body length a frame header announces, refused if it exceeds `max_len`. The receiver
/// calls this before it allocates anything for the body.
pub fn frame_len(header: [u8; FRAME_HEADER_LEN], max_len: usize) -> Result<usize> {
    let len = u32::from_be_bytes(header);
    match usize::try_from(len) {
        Ok(n) if n <= max_len => Ok(n),
        _ => Err(Error::FrameTooLong {
            len: len.into(),
            max: max_len as u64,
        }),
    }
}

/// Sends one frame. Frames longer than `u32::MAX` bytes cannot be expressed and are refused.
pub async fn send_frame(send: &mut SendStream, body: &[u8]) -> Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| Error::FrameTooLong {
        len: body.len() as u64,
        max: u32::MAX.into(),
    })?;
    send.write_all(&len.to_be_bytes())
        .await
        .map_err(Error::Send)?;
    send.write_all(body).await.map_err(Error::Send)
}

/// Receives one frame of at most `max_len` bytes. A longer announced length is refused before
/// the body is allocated or read ([`Error::FrameTooLong`]); a stream that ends exactly where a
/// frame would start gives [`Error::StreamEnded`], one that ends inside a frame
/// [`Error::Truncated`].
pub async fn recv_frame(recv: &mut RecvStream, max_len: usize) -> Result<Vec<u8>> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Err(Error::StreamEnded),
        Err(e) => return Err(read_error(e, FRAME_HEADER_LEN)),
    }
    let len = frame_len(header, max_len)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| read_error(e, len))?;
    Ok(body)
}

fn read_error(e: ReadExactError, want: usize) -> Error {
    match e {
        ReadExactError::FinishedEarly(got) => Error::Truncated { got, want },
        ReadExactError::ReadError(e) => Error::Recv(e),
    }
}

/// Like [`recv_frame`], but gives up (`Ok(None)`) when nothing at all arrives for `silence`:
/// a frame that keeps arriving, however long it takes in all, is never cut short, so a large
/// checkpoint on a slow link is not mistaken for a silent primary. What has been read of a
/// frame given up on is lost with it (the caller ends the session).
pub async fn recv_frame_unless_silent(
    recv: &mut RecvStream,
    max_len: usize,
    silence: std::time::Duration,
) -> Result<Option<Vec<u8>>> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match fill(recv, &mut header, silence).await {
        Ok(true) => {}
        Ok(false) => return Ok(None),
        Err(Error::Truncated { got: 0, .. }) => return Err(Error::StreamEnded),
        Err(e) => return Err(e),
    }
    let len = frame_len(header, max_len)?;
    let mut body = vec![0u8; len];
    Ok(fill(recv, &mut body, silence).await?.then_some(body))
}

/// Fills `buf` from `recv`; false if `silence` passes with nothing read.
async fn fill(recv: &mut RecvStream, buf: &mut [u8], silence: std::time::Duration) -> Result<bool> {
    let mut at = 0;
    while at < buf.len() {
        match tokio::time::timeout(silence, recv.read(&mut buf[at..])).await {
            Err(_) => return Ok(false),
            Ok(Ok(Some(n))) => at += n,
            Ok(Ok(None)) => {
                return Err(Error::Truncated {
                    got: at,
                    want: buf.len(),
                });
            }
            Ok(Err(e)) => return Err(Error::Recv(e)),
        }
    }
    Ok(true)
}
