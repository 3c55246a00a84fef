//! Reading a body, a client's request or a datanode's answer, into memory within a size
//! limit, holding each byte against the memory budgets before it is read.

use bytes::{Bytes, BytesMut};
use http_body::Body;
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

/// Reads `body` whole: at most `limit` bytes, every byte held in `res` against `tenant` and
/// `global` first. `declared` is the Content-Length, if any: a body declaring more than the
/// limit is refused before a byte of it is read.
pub async fn read<B>(
    mut body: B,
    declared: Option<u64>,
    limit: usize,
    res: &mut Reservation,
    tenant: &Budget,
    global: &Budget,
) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut reserved = 0usize;
    if let Some(n) = declared {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n > limit {
            return Err(BodyError::TooLarge);
        }
        res.grow(tenant, global, n).map_err(BodyError::Budget)?;
        reserved = n;
    }
    // One buffer of the declared size (a body copied once, never twice); a small body in
    // one frame is not copied at all.
    let mut buf = BytesMut::with_capacity(reserved);
    let mut first: Option<Bytes> = None;
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        let Ok(data) = frame.into_data() else { continue };
        len += data.len();
        if len > limit {
            return Err(BodyError::TooLarge);
        }
        if len > reserved {
            let step = (len - reserved).max(RESERVE_STEP).min(limit - reserved);
            res.grow(tenant, global, step).map_err(BodyError::Budget)?;
            reserved += step;
        }
        if data.is_empty() {
            continue;
        }
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            Some(f) => {
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&data);
            }
            None => buf.extend_from_slice(&data),
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
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
        let b = read(stream(vec![b"ab", b"cd"]), None, 10, &mut res, &tenant, &global).await.unwrap();
        assert_eq!(&b[..], b"abcd");
        assert!(res.bytes() >= 4);
        assert_eq!(tenant.used(), res.bytes());
        drop(res);
        assert_eq!(tenant.used(), 0);
    }

    #[tokio::test]
    async fn over_the_limit_is_refused_declared_or_sent() {
        let (tenant, global) = (Budget::new(1 << 20), Budget::new(1 << 20));
        let mut res = Reservation::default();
        let declared = read(Full::new(Bytes::from_static(b"x")), Some(11), 10, &mut res, &tenant, &global).await;
        assert!(matches!(declared, Err(BodyError::TooLarge)));
        assert_eq!(tenant.used(), 0, "nothing is held for a body refused by its declared length");
        let sent = read(stream(vec![b"123456", b"78901"]), None, 10, &mut res, &tenant, &global).await;
        assert!(matches!(sent, Err(BodyError::TooLarge)));
    }

    #[tokio::test]
    async fn a_body_over_the_budget_is_refused() {
        let (tenant, global) = (Budget::new(4), Budget::new(1 << 20));
        let mut res = Reservation::default();
        let r = read(Full::new(Bytes::from_static(b"12345")), Some(5), 10, &mut res, &tenant, &global).await;
        assert!(matches!(r, Err(BodyError::Budget(_))));
    }
}
