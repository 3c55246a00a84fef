//! Reading a body, a client's request or a datanode's answer, into memory within a size
//! limit, holding its bytes against the memory budgets as they arrive.
//!
//! A body is kept as the frames it arrived in ([`Chunks`]), never copied into one buffer:
//! what is held is what was received (a buffer grown by doubling would hold up to twice as
//! much as it counts), and the frames go on to the datanode, or to the client, as they are.
//! Nothing is held for bytes not yet received: a client declaring a 16 MiB body and sending
//! none holds nothing.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use nimbus_api::ApiError;

use crate::budget::{Budget, Reservation};

/// Budget is taken in steps of at least this much, not per frame.
const RESERVE_STEP: usize = 64 * 1024;

#[derive(Debug)]
pub enum BodyError {
    /// Longer than the limit (declared or as sent).
    TooLarge,
    /// A memory budget is exhausted.
    Budget(ApiError),
    /// The peer broke off or sent something malformed.
    Read(String),
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

/// Reads `body` whole: at most `limit` bytes, each step of them held in `res` against
/// `tenant` and `global` before it is kept. `declared` is the Content-Length, if any: a body
/// declaring more than the limit is refused before a byte of it is read. `each` sees every
/// frame as it arrives (the depth scan).
pub async fn read<B>(
    mut body: B,
    declared: Option<u64>,
    limit: usize,
    res: &mut Reservation,
    tenant: &Budget,
    global: &Budget,
    mut each: impl FnMut(&[u8]),
) -> Result<Chunks, BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut out = Chunks::default();
    let mut reserved = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        let Ok(data) = frame.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        let len = out.len + data.len();
        if len > limit {
            return Err(BodyError::TooLarge);
        }
        if len > reserved {
            // Steps of 64 KiB, never past what the body declared or the limit.
            let cap = declared.map_or(limit, |d| (d as usize).max(len)).min(limit);
            let step = (len - reserved).max(RESERVE_STEP).min(cap - reserved);
            res.grow(tenant, global, step).map_err(BodyError::Budget)?;
            reserved += step;
        }
        each(&data);
        out.len = len;
        out.parts.push(data);
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
        let b =
            read(stream(vec![b"ab", b"cd"]), None, 10, &mut res, &tenant, &global, |f| seen += f.len()).await.unwrap();
        assert_eq!((&b.to_bytes()[..], b.len(), seen), (&b"abcd"[..], 4, 4));
        assert_eq!(b.parts().len(), 2, "kept as it arrived, not copied");
        assert!(res.bytes() >= 4);
        assert_eq!(tenant.used(), res.bytes());
        drop(res);
        assert_eq!(tenant.used(), 0);
    }

    #[tokio::test]
    async fn nothing_is_held_for_bytes_not_yet_sent() {
        let (tenant, global) = (Budget::new(1 << 30), Budget::new(1 << 30));
        let mut res = Reservation::default();
        // Declares 16 MiB, sends 3 bytes: 64 KiB held, not 16 MiB.
        let b =
            read(Full::new(Bytes::from_static(b"abc")), Some(16 << 20), 17 << 20, &mut res, &tenant, &global, |_| {})
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
            read(Full::new(Bytes::from_static(b"x")), Some(11), 10, &mut res, &tenant, &global, |_| {}).await;
        assert!(matches!(declared, Err(BodyError::TooLarge)));
        assert_eq!(tenant.used(), 0, "nothing is held for a body refused by its declared length");
        let sent = read(stream(vec![b"123456", b"78901"]), None, 10, &mut res, &tenant, &global, |_| {}).await;
        assert!(matches!(sent, Err(BodyError::TooLarge)));
    }

    #[tokio::test]
    async fn a_body_over_the_budget_is_refused() {
        let (tenant, global) = (Budget::new(4), Budget::new(1 << 20));
        let mut res = Reservation::default();
        let r = read(Full::new(Bytes::from_static(b"12345")), Some(5), 10, &mut res, &tenant, &global, |_| {}).await;
        assert!(matches!(r, Err(BodyError::Budget(_))));
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
