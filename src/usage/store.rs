//! The seam between the [`Ledger`](super::Ledger) and where its state lives.
//!
//! [`LedgerStore`] is what a backend implements: the embedded one (SQLite or memory, with
//! quota decisions in process) is in `local.rs`; a shared Redis store would make the same
//! decisions atomically in Lua so several replicas enforce one limit. Stores receive the time
//! from the ledger and must not read a clock themselves; they must never grant a
//! reservation they could not make durable.

use std::time::SystemTime;

use futures_util::future::BoxFuture;

use super::calendar::UtcDay;
use super::report::UsageReport;
use super::{LedgerError, ReserveError, ReserveRequest};
use crate::config::ClientLimits;

/// What usage is broken down by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UsageKey {
    pub client: String,
    pub model: String,
    pub size: String,
    pub quality: String,
}

impl UsageKey {
    pub fn new(client: &str, model: &str, size: &str, quality: &str) -> UsageKey {
        UsageKey {
            client: client.to_owned(),
            model: model.to_owned(),
            size: size.to_owned(),
            quality: quality.to_owned(),
        }
    }
}

/// A granted hold, as its store needs it to settle it later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Unique among this store's pending reservations.
    pub id: u64,
    pub key: UsageKey,
    /// The UTC day (and so month) the hold and its settlement count in, even if settled
    /// after midnight.
    pub day: UtcDay,
    pub images: u32,
    /// Price of one image in micro-units, fixed at reservation time so a config reload
    /// mid-request cannot change what this request costs.
    pub unit_price_micros: i64,
    /// Who holds it across restarts (an async task's id), if anyone.
    pub holder: Option<String>,
}

impl Reservation {
    /// The cost held: images × unit price, in micro-units.
    pub fn cost_micros(&self) -> i64 {
        i64::from(self.images).saturating_mul(self.unit_price_micros)
    }
}

/// A ledger backend. Object-safe: the ledger holds an `Arc<dyn LedgerStore>`.
///
/// Settling methods (`commit`, `commit_unwaited`, `refund`, `release`, `record_cached`) apply
/// their effect on the quota counters and queue their durable write before they return; the
/// returned future (if any) only reports when that write is durable, so a caller may answer
/// its client first.
pub trait LedgerStore: Send + Sync + 'static {
    /// Checks the client's windows and holds `request.images` images and their cost,
    /// atomically with the check; `Ok` only once the hold is durable.
    fn reserve<'a>(
        &'a self,
        request: &'a ReserveRequest<'a>,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Reservation, ReserveError>>;

    /// Settles a hold as `images_produced` images, one request.
    fn commit(
        &self,
        reservation: &Reservation,
        images_produced: u32,
    ) -> BoxFuture<'static, Result<(), LedgerError>>;

    /// Releases a hold entirely and counts one failure.
    fn refund(&self, reservation: &Reservation) -> BoxFuture<'static, Result<(), LedgerError>>;

    /// Releases a hold entirely and counts nothing.
    fn release(&self, reservation: &Reservation) -> BoxFuture<'static, Result<(), LedgerError>>;

    /// Holders of the reservations a previous run left pending with a holder.
    fn held(&self) -> Vec<String>;

    /// Hands over the pending reservation of `holder` (at most once).
    fn take_held(&self, holder: &str) -> Option<Reservation>;

    /// [`commit`](LedgerStore::commit) for a caller that will not wait: the quota counters
    /// are settled before this returns; the durable write may be deferred and batched with
    /// others (the reservation's own row covers it until then), and a failure is logged.
    fn commit_unwaited(&self, reservation: &Reservation, images_produced: u32);

    /// Counts images served from the cache on `day`; no quota is involved. Nobody waits: the
    /// store may aggregate counts in memory for a moment and write them in one go (a failure
    /// is logged), but a [`report`](LedgerStore::report) includes them.
    fn record_cached(&self, key: UsageKey, day: UtcDay, images: u32);

    /// Usage of exactly `clients`, with `days` days of daily history up to `now`'s day.
    fn report<'a>(
        &'a self,
        clients: &'a [(String, ClientLimits)],
        days: u32,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<UsageReport, LedgerError>>;

    /// `Ok` when a write would be accepted now; for readiness probes.
    fn check_writable(&self) -> BoxFuture<'_, Result<(), LedgerError>>;

    /// Flushes and stops background writers.
    fn close(&self) -> BoxFuture<'_, ()>;
}
