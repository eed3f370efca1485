//! The usage ledger: image quotas per UTC day and month, a monthly budget, and the usage
//! record behind `/admin/usage` and `imagegate usage`.
//!
//! Spending is reserve → settle. [`Ledger::reserve`] checks every window and holds `n` images
//! (and their cost) atomically, before the upstream is called; the returned
//! [`QuotaReservation`] is then committed with what the upstream actually produced, or
//! refunded when nothing was. A reservation is durable before `reserve` returns, so after a
//! crash usage is never below what clients received (pending reservations are settled as
//! charged on the next start).
//!
//! Money is counted in integer micro-units (price × 1 000 000) so sums never drift; reports
//! show it as `f64`. Time comes from an injected [`Clock`].
//!
//! This module owns quota decisions and usage accounting. It must not speak HTTP (the
//! pipeline maps [`ReserveError`] to a response) nor know SQL beyond its own tables: the
//! connection, the writer and the schema belong to [`crate::storage`].

mod calendar;
mod local;
mod quota;
mod report;
mod sql;
mod store;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use crate::config::{ClientLimits, StorageBackend, StorageConfig};
use crate::storage::{Database, StorageError};

pub use calendar::{UtcDay, UtcMonth};
pub use report::{
    BudgetUsage, ClientUsage, Counters, DailyUsage, MAX_REPORT_DAYS, ModelUsage, UsageReport,
    WindowUsage, render_table,
};
pub use store::{LedgerStore, Reservation, UsageKey};

/// Where the ledger reads the time. Injected so tests can stand exactly on a UTC boundary.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The real wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that stays where it is put; for tests (unit and HTTP) of window boundaries.
#[derive(Debug)]
pub struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    pub fn new(at: SystemTime) -> ManualClock {
        ManualClock(Mutex::new(at))
    }

    /// A clock at `secs` after the Unix epoch.
    pub fn at_unix_secs(secs: i64) -> ManualClock {
        ManualClock::new(calendar::from_unix_secs(secs))
    }

    pub fn set(&self, at: SystemTime) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = at;
    }

    pub fn advance(&self, by: std::time::Duration) {
        let mut now = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A quota window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    /// Images per UTC day.
    Day,
    /// Images per UTC calendar month.
    Month,
    /// Spend per UTC calendar month, in price units.
    Budget,
}

impl Window {
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Day => "day",
            Window::Month => "month",
            Window::Budget => "budget",
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One request's claim on quota, made before the upstream call.
#[derive(Debug, Clone, Copy)]
pub struct ReserveRequest<'a> {
    pub client: &'a str,
    pub limits: &'a ClientLimits,
    pub model: &'a str,
    pub size: &'a str,
    pub quality: &'a str,
    /// Images the request may produce (`n`).
    pub images: u32,
    /// Price of one image of this model and quality, in budget units.
    pub unit_price: f64,
    /// Who holds the reservation across restarts, when that is not the request itself: an
    /// async task's id. A held reservation survives a restart pending (see
    /// [`Ledger::take_held`]) instead of being charged at the next start.
    pub holder: Option<&'a str>,
}

/// Why a reservation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// A window has no room for the request. `used` counts settled and pending usage, in
    /// images (day, month) or price units (budget). Not retryable before `resets_at`.
    #[error(
        "{} quota exhausted: {used} of {limit} used, resets at {}",
        window,
        calendar::rfc3339(calendar::unix_secs(*resets_at))
    )]
    Exhausted {
        window: Window,
        limit: f64,
        used: f64,
        resets_at: SystemTime,
    },
    /// The reservation could not be made durable; the request must be refused (503), never
    /// served unmetered. The text is for logs, not for clients.
    #[error("usage ledger unavailable: {0}")]
    Unavailable(String),
}

impl ReserveError {
    /// A message for the client: which window, its limit, and when it resets. Internal
    /// detail of `Unavailable` is left out.
    pub fn client_message(&self) -> String {
        match self {
            ReserveError::Exhausted {
                window,
                limit,
                resets_at,
                ..
            } => {
                let resets = calendar::rfc3339(calendar::unix_secs(*resets_at));
                match window {
                    Window::Day => format!(
                        "You exceeded your daily quota of {limit} images; it resets at {resets}."
                    ),
                    Window::Month => format!(
                        "You exceeded your monthly quota of {limit} images; it resets at {resets}."
                    ),
                    Window::Budget => format!(
                        "You exceeded your monthly budget of {limit}; it resets at {resets}."
                    ),
                }
            }
            ReserveError::Unavailable(_) => {
                "Usage accounting is temporarily unavailable; retry shortly.".to_owned()
            }
        }
    }
}

/// Why a ledger operation other than `reserve` failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(
        "storage.backend = \"{0}\" is not available in this build yet; use \"sqlite\" or \"memory\""
    )]
    BackendNotBuilt(&'static str),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The usage ledger. Cheap to clone: every clone is the same ledger.
#[derive(Clone)]
pub struct Ledger {
    store: Arc<dyn LedgerStore>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger").finish_non_exhaustive()
    }
}

impl Ledger {
    /// Opens the configured backend: `sqlite` opens (creating) the file and settles what a
    /// crash left pending; `memory` keeps nothing across restarts; `redis` is refused until
    /// it exists, rather than silently running unmetered.
    pub async fn open(
        config: &StorageConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Ledger, LedgerError> {
        match config.backend {
            StorageBackend::Memory => Ok(Ledger::in_memory(clock)),
            StorageBackend::Redis => Err(LedgerError::BackendNotBuilt("redis")),
            StorageBackend::Sqlite => {
                let db = Database::open_async(&config.path).await?;
                Ledger::with_database(db, clock).await
            }
        }
    }

    /// A ledger on an already open database, for sharing the file (and its one writer)
    /// with the task store. Settles what a crash left pending. Note that
    /// [`close`](Ledger::close) stops that shared writer: call it last at shutdown.
    pub async fn with_database(db: Database, clock: Arc<dyn Clock>) -> Result<Ledger, LedgerError> {
        let today = UtcDay::containing(clock.now());
        let store = local::LocalStore::from_database(db, today).await?;
        Ok(Ledger::with_store(Arc::new(store), clock))
    }

    /// A ledger that keeps everything in memory (the demo, tests).
    pub fn in_memory(clock: Arc<dyn Clock>) -> Ledger {
        Ledger::with_store(Arc::new(local::LocalStore::in_memory()), clock)
    }

    /// A ledger over any store (the shared Redis backend plugs in here).
    pub fn with_store(store: Arc<dyn LedgerStore>, clock: Arc<dyn Clock>) -> Ledger {
        Ledger { store, clock }
    }

    /// Checks every window and holds `request.images` images and their cost. Durable before
    /// it returns `Ok`.
    pub async fn reserve(
        &self,
        request: ReserveRequest<'_>,
    ) -> Result<QuotaReservation, ReserveError> {
        let now = self.clock.now();
        let reservation = self.store.reserve(&request, now).await?;
        Ok(QuotaReservation {
            ledger: self.clone(),
            reservation: Some(reservation),
        })
    }

    /// The holders of reservations that an earlier run left pending with a holder (async
    /// tasks), in no particular order. Each stays pending until taken with
    /// [`take_held`](Ledger::take_held).
    pub fn held(&self) -> Vec<String> {
        self.store.held()
    }

    /// Takes over the reservation an earlier run left pending for `holder`, to settle it now
    /// or later. `None` if there is none (or it was taken already).
    pub fn take_held(&self, holder: &str) -> Option<QuotaReservation> {
        self.store
            .take_held(holder)
            .map(|reservation| QuotaReservation {
                ledger: self.clone(),
                reservation: Some(reservation),
            })
    }

    /// Records a cache hit: counted as `cached` images, spends no quota. Nobody waits for the
    /// write: the client already has its answer. The store may batch such counts for a moment
    /// (see [`LedgerStore::record_cached`]); reports include them.
    pub fn record_cached(&self, client: &str, model: &str, size: &str, quality: &str, images: u32) {
        let key = UsageKey::new(client, model, size, quality);
        let day = UtcDay::containing(self.clock.now());
        self.store.record_cached(key, day, images);
    }

    /// Usage of `clients` (only `only`, when given; an unknown name gives an empty list),
    /// with `days` days of daily history.
    pub async fn report(
        &self,
        clients: &[(String, ClientLimits)],
        only: Option<&str>,
        days: u32,
    ) -> Result<UsageReport, LedgerError> {
        self.store
            .report(&selected(clients, only), days, self.clock.now())
            .await
    }

    /// `Ok` when the ledger can record usage now (the writer is alive and can lock the
    /// file); `/readyz` should fail otherwise, since every reserve would be refused.
    pub async fn check_writable(&self) -> Result<(), LedgerError> {
        self.store.check_writable().await
    }

    /// Finishes pending writes and stops the writer (graceful shutdown). Reservations still
    /// open are left pending and settled as charged on the next start.
    pub async fn close(&self) {
        self.store.close().await;
    }
}

/// Usage of `clients` (only `only`, when given) read from a SQLite ledger file without
/// opening the ledger: nothing is written or settled, so `imagegate usage` can run while a
/// gateway serves from the same file. Reservations in flight show as `reserved`.
pub async fn report_from_file(
    path: &std::path::Path,
    clients: &[(String, ClientLimits)],
    only: Option<&str>,
    days: u32,
    now: SystemTime,
) -> Result<UsageReport, LedgerError> {
    local::report_from_file(path, &selected(clients, only), days, now).await
}

/// The clients a report covers: all, or only the one named (none if it is unknown).
fn selected(clients: &[(String, ClientLimits)], only: Option<&str>) -> Vec<(String, ClientLimits)> {
    clients
        .iter()
        .filter(|(id, _)| only.is_none_or(|o| o == id))
        .cloned()
        .collect()
}

/// Images (and their cost) held for one request until it is settled with
/// [`commit`](QuotaReservation::commit) or [`refund`](QuotaReservation::refund).
///
/// Dropping it unsettled is a bug in the caller: it is logged, and the hold stays counted
/// (and is charged on the next start), because images may have been delivered.
#[must_use = "a reservation must be committed or refunded"]
pub struct QuotaReservation {
    ledger: Ledger,
    // `None` once settled, so `Drop` knows.
    reservation: Option<Reservation>,
}

impl fmt::Debug for QuotaReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaReservation")
            .field("reservation", &self.reservation)
            .finish()
    }
}

impl QuotaReservation {
    /// Images held.
    pub fn images(&self) -> u32 {
        self.reservation.as_ref().map_or(0, |r| r.images)
    }

    /// Charges `images_produced` images (and their cost) and counts one request; whatever was
    /// held beyond that is released. More than held is charged too: usage follows what the
    /// client received. On `Err` the in-memory quota is settled all the same, and the durable
    /// row stays pending, to be charged in full on the next start.
    pub async fn commit(mut self, images_produced: u32) -> Result<(), LedgerError> {
        let Some(reservation) = self.reservation.take() else {
            return Ok(());
        };
        self.ledger
            .store
            .commit(&reservation, images_produced)
            .await
    }

    /// [`commit`](QuotaReservation::commit) without waiting for the write to be durable: the
    /// quota counters are settled and the write is queued before this returns, so the
    /// request's answer need not wait for an fsync, and the write itself is batched with the
    /// next ones (no thread is woken for it). Safe because the reservation itself is already
    /// durable: if the write is lost (the process dies first, or a power cut takes the last
    /// unsynced commits), the next start charges the whole reservation, so usage is never
    /// below what the client received.
    pub fn commit_unwaited(mut self, images_produced: u32) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        self.ledger
            .store
            .commit_unwaited(&reservation, images_produced);
    }

    /// Nothing was produced: releases everything held and counts a failure.
    pub async fn refund(mut self) -> Result<(), LedgerError> {
        let Some(reservation) = self.reservation.take() else {
            return Ok(());
        };
        self.ledger.store.refund(&reservation).await
    }

    /// Releases everything held without counting anything: the request was answered without
    /// an upstream call of its own (a cache hit, recorded separately as cached) or was a
    /// duplicate of another.
    pub async fn release(mut self) -> Result<(), LedgerError> {
        let Some(reservation) = self.reservation.take() else {
            return Ok(());
        };
        self.ledger.store.release(&reservation).await
    }

    /// Leaves a held reservation pending on purpose (shutdown with async tasks still queued):
    /// the next start finds it again with [`Ledger::take_held`]. Without a holder it is
    /// charged at the next start, as after a crash.
    pub fn leave_pending(mut self) {
        self.reservation = None;
    }
}

impl Drop for QuotaReservation {
    fn drop(&mut self) {
        if let Some(r) = &self.reservation {
            if let Some(holder) = &r.holder {
                // An async task's hold outlives this handle on purpose (shutdown with tasks
                // still queued): its row stays pending for the task at the next start.
                tracing::debug!(holder = %holder, reservation = r.id, "held reservation left pending for its task");
                return;
            }
            tracing::error!(
                client = %r.key.client,
                model = %r.key.model,
                images = r.images,
                reservation = r.id,
                "quota reservation dropped without commit or refund; it stays charged"
            );
        }
    }
}

/// Price units to integer micro-units, rounded; negative and non-finite prices count as 0
/// (config validation already refuses them).
pub fn to_micros(units: f64) -> i64 {
    if units.is_finite() && units > 0.0 {
        // `as` saturates, which is the right answer for absurd prices.
        (units * 1_000_000.0).round() as i64
    } else {
        0
    }
}

/// Integer micro-units back to price units, for reports and messages.
pub fn from_micros(micros: i64) -> f64 {
    micros as f64 / 1_000_000.0
}
