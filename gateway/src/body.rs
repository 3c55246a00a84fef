//! Reading a body, a client's request or a datanode's answer, into memory within a size
//! limit, holding its bytes against the memory budgets as they arrive.
//!
//! A body is kept in blocks ([`Chunks`]), never in one buffer grown by doubling (which
//! holds up to twice what it counts): large frames as they arrived (no copy), small ones
//! copied into blocks of 64 KiB, so that a body sent in one-byte chunks, or trickled a byte
//! per read, holds neither a list entry per byte nor the read buffers each frame would pin.
//! Budget is taken a block at a time, before the block is allocated: what is held is what
//! is counted. Nothing is held for bytes not yet received: a client declaring a 16 MiB body
//! and sending none holds nothing.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use nimbus_api::ApiError;

use crate::budget::{Budget, Reservation};

/// Budget is taken, and small frames gathered, in blocks of this much.
const BLOCK: usize = 64 * 1024;
/// Frames at least this large are kept as they arrived; smaller ones are copied.
const KEEP_FRAME: usize = 16 * 1024;
/// The first block of a body of unknown length.
const MIN_BLOCK: usize = 4 * 1024;

#[derive(Debug)]
pub enum BodyError {
    /// Longer than the limit (declared or as sent).
    TooLarge,
    /// A memory budget is exhausted.
    Budget(ApiError),
    /// The peer broke off or sent something malformed.
    Read(String),
    /// The check on each arriving piece refused it.
    Refused,
}

/// A body as the frames it arrived in. Cloning it clones references, not bytes.
#[derive(Debug, Clone, Default)]
pub struct Chunks {
    parts: Vec<Bytes>,
    len: usize,
}

impl Chunks {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// The bytes as one buffer (a copy, unless there is a single frame): for tests and
    /// for the rare reader that needs them contiguous.
    pub fn to_bytes(&self) -> Bytes {
        match self.parts.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => Bytes::from(many.concat()),
        }
    }

    /// The body to send (or answer) with these bytes.
    pub fn body(&self) -> ChunksBody {
        ChunksBody { parts: self.parts.iter().cloned().collect(), left: self.len as u64 }
    }
}

impl From<Bytes> for Chunks {
    fn from(b: Bytes) -> Chunks {
        let len = b.len();
        Chunks { parts: if len == 0 { Vec::new() } else { vec![b] }, len }
    }
}

/// [`Chunks`] as an HTTP body of exactly their length.
pub struct ChunksBody {
    parts: VecDeque<Bytes>,
    left: u64,
}

impl Body for ChunksBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let next = self.parts.pop_front();
        if let Some(b) = &next {
            self.left -= b.len() as u64;
        }
        Poll::Ready(next.map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.parts.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// Reads `body` whole: at most `limit` bytes, held in `res` against `tenant` and `global`
/// before they are kept. `declared` is the Content-Length, if any: a body declaring more
/// than the limit is refused before a byte of it is read. `each` sees every piece as it
/// arrives and may refuse the body (the depth scan stops a body nested too deep at once).
pub async fn read<B>(
    mut body: B,
    declared: Option<u64>,
    limit: usize,
    res: &mut Reservation,
    tenant: &Budget,
    global: &Budget,
    mut each: impl FnMut(&[u8]) -> bool,
) -> Result<Chunks, BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut out = Chunks::default();
    // The block small frames are copied into; its capacity is held in `res` already.
    let mut block = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        let Ok(data) = frame.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        if out.len + data.len() > limit {
            return Err(BodyError::TooLarge);
        }
        if !each(&data) {
            return Err(BodyError::Refused);
        }
        out.len += data.len();
        if data.len() >= KEEP_FRAME {
            // Large: kept as it arrived, held at its own size.
            res.grow(tenant, global, data.len()).map_err(BodyError::Budget)?;
            if !block.is_empty() {
                out.parts.push(block.split().freeze());
            }
            out.parts.push(data);
            continue;
        }
        let mut rest = &data[..];
        while !rest.is_empty() {
            if block.capacity() == block.len() {
                if !block.is_empty() {
                    out.parts.push(block.split().freeze());
                }
                // A new block, held before it is allocated: what the body says is left (a
                // small body costs its size, not a block), else growing with the body.
                let size = match declared {
                    Some(d) => (d as usize).saturating_sub(out.len - data.len() + (data.len() - rest.len())),
                    None => out.len.max(MIN_BLOCK),
                }
                .clamp(rest.len().min(BLOCK), BLOCK);
                res.grow(tenant, global, size).map_err(BodyError::Budget)?;
                block = bytes::BytesMut::with_capacity(size);
            }
            let n = rest.len().min(block.capacity() - block.len());
            block.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
    }
    if !block.is_empty() {
        out.parts.push(block.freeze());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    type Frames = futures::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::io::Error>>>;

    fn stream(chunks: Vec<&'static [u8]>) -> StreamBody<Frames> {
        let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> =
            chunks.into_iter().map(|c| Ok(http_body::Frame::data(Bytes::from_static(c)))).collect();
        StreamBody::new(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_body_is_read_whole_and_held_against_the_budgets() {
        let (tenant, global) = (Budget::new(1 << 20), Budget::new(1 << 20));
        let mut res = Reservation::default();
        let mut seen = 0;
        let b = read(stream(vec![b"ab", b"cd"]), None, 10, &mut res, &tenant, &global, |f| {
            seen += f.len();
            true
        })
        .await
        .unwrap();
        assert_eq!((&b.to_bytes()[..], b.len(), seen), (&b"abcd"[..], 4, 4));
        assert_eq!(b.parts().len(), 1, "small frames gathered in one block");
        assert!(res.bytes() >= 4);
        assert_eq!(tenant.used(), res.bytes());
        drop(res);
        assert_eq!(tenant.used(), 0);
    }

    #[tokio::test]
    async fn nothing_is_held_for_bytes_not_yet_sent() {
        let (tenant, global) = (Budget::new(1 << 30), Budget::new(1 << 30));
        let mut res = Reservation::default();
        // Declares 16 MiB, sends 3 bytes: one 64 KiB block held, not 16 MiB (it may come).
        let b =
            read(Full::new(Bytes::from_static(b"abc")), Some(16 << 20), 17 << 20, &mut res, &tenant, &global, |_| true)
                .await
                .unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(res.bytes(), 64 * 1024);
    }

    #[tokio::test]
    async fn over_the_limit_is_refused_declared_or_sent() {
        let (tenant, global) = (Budget::new(1 << 20), Budget::new(1 << 20));
        let mut res = Reservation::default();
        let declared =
            read(Full::new(Bytes::from_static(b"x")), Some(11), 10, &mut res, &tenant, &global, |_| true).await;
        assert!(matches!(declared, Err(BodyError::TooLarge)));
        assert_eq!(tenant.used(), 0, "nothing is held for a body refused by its declared length");
        let sent = read(stream(vec![b"123456", b"78901"]), None, 10, &mut res, &tenant, &global, |_| true).await;
        assert!(matches!(sent, Err(BodyError::TooLarge)));
    }

    #[tokio::test]
    async fn a_body_over_the_budget_is_refused() {
        let (tenant, global) = (Budget::new(4), Budget::new(1 << 20));
        let mut res = Reservation::default();
        let r = read(Full::new(Bytes::from_static(b"12345")), Some(5), 10, &mut res, &tenant, &global, |_| true).await;
        assert!(matches!(r, Err(BodyError::Budget(_))));
    }

    #[tokio::test]
    async fn one_byte_frames_cost_blocks_not_entries_and_large_frames_are_kept() {
        let (tenant, global) = (Budget::new(1 << 30), Budget::new(1 << 30));
        let mut res = Reservation::default();
        let ones: Vec<&'static [u8]> = std::iter::repeat_n(&b"x"[..], 200_000).collect();
        let b = read(stream(ones), None, 1 << 20, &mut res, &tenant, &global, |_| true).await.unwrap();
        assert_eq!(b.len(), 200_000);
        // 200,000 one-byte frames: a few blocks (growing to 64 KiB), each held before it was
        // allocated, and no more held than allocated.
        assert!(b.parts().len() <= 8, "{} blocks", b.parts().len());
        let held = res.bytes();
        assert!((200_000..200_000 + BLOCK).contains(&held), "{held} bytes held");
        // A small body of known length costs its size.
        let mut small = Reservation::default();
        let b = read(Full::new(Bytes::from_static(b"{}")), Some(2), 1 << 20, &mut small, &tenant, &global, |_| true)
            .await
            .unwrap();
        assert_eq!((b.len(), small.bytes()), (2, 2));
        // A large frame is kept as it came, between blocks of small ones.
        let big: &'static [u8] = Box::leak(vec![b'y'; KEEP_FRAME * 2].into_boxed_slice());
        let mut res = Reservation::default();
        let b =
            read(stream(vec![b"ab", big, b"cd"]), None, 1 << 20, &mut res, &tenant, &global, |_| true).await.unwrap();
        assert_eq!(b.parts().iter().map(|p| p.len()).collect::<Vec<_>>(), vec![2, KEEP_FRAME * 2, 2]);
        assert_eq!(b.to_bytes().len(), KEEP_FRAME * 2 + 4);
    }

    #[tokio::test]
    async fn a_refused_piece_stops_the_body_at_once() {
        let (tenant, global) = (Budget::new(1 << 20), Budget::new(1 << 20));
        let mut res = Reservation::default();
        let mut pieces = 0;
        let r = read(stream(vec![b"[[", b"[[", b"]]"]), None, 10, &mut res, &tenant, &global, |_| {
            pieces += 1;
            pieces < 2
        })
        .await;
        assert!(matches!(r, Err(BodyError::Refused)));
        assert_eq!(pieces, 2);
    }

    #[tokio::test]
    async fn chunks_make_a_body_of_exactly_their_length() {
        let c = Chunks { parts: vec![Bytes::from_static(b"ab"), Bytes::from_static(b"c")], len: 3 };
        let body = c.body();
        assert_eq!(body.size_hint().exact(), Some(3));
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"abc");
    }
}
