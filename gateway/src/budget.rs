//! The gateway's memory budget: every request body and every datanode answer the gateway
//! holds is counted, in bytes, against its database's budget and against the gateway's
//! global one as it arrives, before it is kept (see `body`). A request that does not fit
//! is refused at once (429 when its own database is over budget, 503 when the gateway as a
//! whole is), never queued and never an out-of-memory kill: one tenant sending many 16 MiB
//! bodies gets refusals, and the others keep their share.

use std::sync::Arc;

use nimbus_api::{ApiError, ErrorCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One pool of bytes.
#[derive(Debug, Clone)]
pub struct Budget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl Budget {
    pub fn new(total: usize) -> Budget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Budget { bytes: Arc::new(Semaphore::new(total)), total }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.total - self.bytes.available_permits()
    }

    fn try_take(&self, n: u32) -> Option<OwnedSemaphorePermit> {
        self.bytes.clone().try_acquire_many_owned(n).ok()
    }
}

/// Bytes held for one request, against its database's budget and the global one; given
/// back when dropped.
#[derive(Debug, Default)]
pub struct Reservation {
    tenant: Option<OwnedSemaphorePermit>,
    global: Option<OwnedSemaphorePermit>,
}

impl Reservation {
    /// Bytes this reservation holds.
    pub fn bytes(&self) -> usize {
        self.global.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Holds `n` more bytes, or says which budget is exhausted (nothing taken then).
    pub fn grow(&mut self, tenant: &Budget, global: &Budget, n: usize) -> Result<(), ApiError> {
        if n == 0 {
            return Ok(());
        }
        let Ok(n32) = u32::try_from(n) else { return Err(over_tenant(tenant)) };
        if n > tenant.total() {
            return Err(over_tenant(tenant));
        }
        let t = tenant.try_take(n32).ok_or_else(|| over_tenant(tenant))?;
        let g = global.try_take(n32).ok_or_else(over_global)?;
        merge(&mut self.tenant, t);
        merge(&mut self.global, g);
        Ok(())
    }
}

fn merge(slot: &mut Option<OwnedSemaphorePermit>, p: OwnedSemaphorePermit) {
    match slot {
        Some(held) => held.merge(p),
        None => *slot = Some(p),
    }
}

fn over_tenant(b: &Budget) -> ApiError {
    ApiError::new(
        ErrorCode::RateLimited,
        format!(
            "this database's requests already hold {} of its {} bytes at this gateway; retry later",
            b.used(),
            b.total()
        ),
    )
}

fn over_global() -> ApiError {
    ApiError::unavailable("this gateway is at its memory budget; retry (another gateway may have room)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_held_until_dropped_and_both_budgets_bound() {
        let global = Budget::new(100);
        let a = Budget::new(60);
        let b = Budget::new(60);
        let mut ra = Reservation::default();
        ra.grow(&a, &global, 50).unwrap();
        // Over the tenant's budget: 429, and nothing more held.
        assert_eq!(ra.grow(&a, &global, 20).unwrap_err().code, ErrorCode::RateLimited);
        assert_eq!((a.used(), global.used()), (50, 50));
        // Another tenant fits its own budget but not the global one: 503.
        let mut rb = Reservation::default();
        rb.grow(&b, &global, 40).unwrap();
        assert_eq!(rb.grow(&b, &global, 20).unwrap_err().code, ErrorCode::Unavailable);
        // A refused global take gives the tenant's bytes back.
        assert_eq!(b.used(), 40);
        drop(ra);
        assert_eq!((a.used(), global.used()), (0, 40));
        rb.grow(&b, &global, 20).unwrap();
        assert_eq!(rb.bytes(), 60);
        // More than the whole tenant budget can never fit.
        assert_eq!(Reservation::default().grow(&a, &global, 61).unwrap_err().code, ErrorCode::RateLimited);
    }
}
