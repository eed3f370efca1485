//! The embedded ledger store: quota decisions in process ([`Quotas`] under a mutex), made
//! durable in the SQLite file through its writer, or kept in memory only.
//!
//! Order of every operation: decide and update memory under the lock (never held across an
//! `.await`), then queue the durable write. A reservation is returned only after its row
//! committed; if the write fails or the caller goes away first, the hold is undone. This
//! module must not open files or connections itself: [`Database`] does.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use futures_util::future::{BoxFuture, FutureExt, ready};
use rusqlite::Transaction;

use super::calendar::{UtcDay, unix_secs};
use super::quota::{ClientQuota, Quotas};
use super::report::{self, Tally, UsageReport, UsageRow};
use super::sql;
use super::store::{LedgerStore, Reservation, UsageKey};
use super::{LedgerError, ReserveError, ReserveRequest, to_micros};
use crate::config::ClientLimits;
use crate::storage::{Database, Reader, StorageError, Writer};

/// Where settled usage goes.
enum Durability {
    /// Nothing persists: rows are kept in this map for reports.
    Memory(Mutex<HashMap<(UsageKey, UtcDay), Tally>>),
    Sqlite {
        db: Database,
        /// Cache hits not yet written: one lazy write drains them all, so a hit costs a map
        /// update rather than a write of its own.
        cached: Arc<Mutex<CachedCounts>>,
    },
}

/// Cache hits counted in memory, waiting for the one lazy write that moves them to disk.
#[derive(Default)]
struct CachedCounts {
    counts: HashMap<(UsageKey, UtcDay), u64>,
    /// That write is queued (or running): a new count just joins the map.
    queued: bool,
}

impl CachedCounts {
    fn lock(this: &Mutex<CachedCounts>) -> MutexGuard<'_, CachedCounts> {
        // Map updates are single calls that cannot leave it half-changed.
        this.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues the write that drains the counts unless one is queued or nothing is waiting.
    ///
    /// The write takes the counts when it runs; if its transaction does not commit, they go
    /// back into the map, and whatever is waiting when it ends is queued again. Without that,
    /// one failed batch would leave `queued` set forever and the counts would never be written.
    fn drain(this: &Arc<Mutex<CachedCounts>>, writer: &Writer) {
        {
            let mut state = CachedCounts::lock(this);
            if state.queued || state.counts.is_empty() {
                return;
            }
            state.queued = true;
        }
        // What the write took, held until its transaction's fate is known.
        let taken: Arc<Mutex<HashMap<(UsageKey, UtcDay), u64>>> = Arc::default();
        let (state, slot) = (Arc::clone(this), Arc::clone(&taken));
        let work = move |tx: &Transaction<'_>| {
            let counts = std::mem::take(&mut CachedCounts::lock(&state).counts);
            let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
            *slot = counts;
            for ((key, day), images) in slot.iter() {
                let tally = Tally {
                    cached: *images,
                    ..Tally::default()
                };
                sql::add_usage(tx, key, *day, &tally)?;
            }
            Ok(())
        };
        // The writer handle in a queued job only keeps the thread up until the job has run.
        let (state, again) = (Arc::clone(this), writer.clone());
        let then = move |result: Result<(), StorageError>| {
            {
                let mut state = CachedCounts::lock(&state);
                state.queued = false;
                if result.is_err() {
                    let taken =
                        std::mem::take(&mut *taken.lock().unwrap_or_else(PoisonError::into_inner));
                    for (key, images) in taken {
                        *state.counts.entry(key).or_default() += images;
                    }
                }
            }
            // A stopped writer takes nothing more: what is left is lost with the process
            // (the failure was logged).
            if !matches!(result, Err(StorageError::WriterStopped)) {
                CachedCounts::drain(&state, &again);
            }
        };
        writer.submit_lazy_then("cached usage", work, then);
    }
}

pub struct LocalStore {
    quotas: Mutex<Quotas>,
    durability: Durability,
    next_id: AtomicU64,
    /// Reservations with a holder that an earlier run left pending, until taken over.
    held: Mutex<HashMap<String, Reservation>>,
}

impl LocalStore {
    pub fn in_memory() -> LocalStore {
        LocalStore {
            quotas: Mutex::new(Quotas::default()),
            durability: Durability::Memory(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
            held: Mutex::default(),
        }
    }

    /// Settles what an unclean stop left pending in `db` (except reservations with a holder,
    /// which stay pending and counted until taken over), and loads the current month's usage
    /// into the quota counters.
    pub async fn from_database(db: Database, today: UtcDay) -> Result<LocalStore, LedgerError> {
        let settled = db.writer().execute(sql::settle_pending).await?;
        if settled.reservations > 0 {
            // Expected after kill -9 or a crash with requests in flight; charged in full
            // because those clients may have received their images.
            tracing::warn!(
                reservations = settled.reservations,
                images = settled.images,
                "settled reservations left pending by an unclean stop as charged"
            );
        }
        let month = today.month();
        let rows = db
            .reader()
            .read(move |conn| sql::usage_rows(conn, month.first_day(), month.last_day()))
            .await?;
        let quotas = quotas_from(&rows, &settled.held, today);
        let held = settled
            .held
            .into_iter()
            .filter_map(|row| {
                let reservation = row.into_reservation();
                Some((reservation.holder.clone()?, reservation))
            })
            .collect();
        Ok(LocalStore {
            quotas: Mutex::new(quotas),
            durability: Durability::Sqlite {
                db,
                cached: Arc::default(),
            },
            next_id: AtomicU64::new(settled.next_id),
            held: Mutex::new(held),
        })
    }

    fn quotas(&self) -> MutexGuard<'_, Quotas> {
        // The counters are updated in single statements that cannot panic half-way, so a
        // poisoned lock still guards consistent numbers.
        self.quotas.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a settled reservation's usage and deletes its pending row, in one job. The
    /// write is queued before this returns, so it happens even if the returned future is
    /// dropped.
    fn record(
        &self,
        reservation: &Reservation,
        tally: Tally,
    ) -> BoxFuture<'static, Result<(), LedgerError>> {
        match &self.durability {
            Durability::Memory(rows) => {
                add_row(rows, &reservation.key, reservation.day, &tally);
                ready(Ok(())).boxed()
            }
            Durability::Sqlite { db, .. } => {
                let (id, key, day) = (reservation.id, reservation.key.clone(), reservation.day);
                let submitted = db
                    .writer()
                    .submit(move |tx| record_row(tx, id, &key, day, &tally));
                async move { Ok(submitted?.await?) }.boxed()
            }
        }
    }

    /// [`record`](LocalStore::record) as a lazy write: nobody waits, no thread is woken.
    fn record_lazily(&self, reservation: &Reservation, tally: Tally) {
        match &self.durability {
            Durability::Memory(rows) => add_row(rows, &reservation.key, reservation.day, &tally),
            Durability::Sqlite { db, .. } => {
                let (id, key, day) = (reservation.id, reservation.key.clone(), reservation.day);
                db.writer().submit_lazy(
                    "usage commit (the reservation is charged in full on restart)",
                    move |tx| record_row(tx, id, &key, day, &tally),
                );
            }
        }
    }

    /// Settles `reservation` in memory, then durably.
    fn settle(
        &self,
        reservation: &Reservation,
        charged_images: u32,
        tally: Tally,
    ) -> BoxFuture<'static, Result<(), LedgerError>> {
        self.settle_in_memory(reservation, charged_images, &tally);
        self.record(reservation, tally)
    }

    fn settle_in_memory(&self, reservation: &Reservation, charged_images: u32, tally: &Tally) {
        self.quotas().settle(
            &reservation.key.client,
            reservation.day,
            (reservation.images, reservation.cost_micros()),
            (u64::from(charged_images), tally.spend_micros),
        );
    }
}

fn add_row(
    rows: &Mutex<HashMap<(UsageKey, UtcDay), Tally>>,
    key: &UsageKey,
    day: UtcDay,
    tally: &Tally,
) {
    rows.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry((key.clone(), day))
        .or_default()
        .add(tally);
}

/// Adds a settled reservation's `tally` to its usage row and deletes its pending row: one job,
/// so both happen or neither.
fn record_row(
    tx: &rusqlite::Transaction<'_>,
    reservation_id: u64,
    key: &UsageKey,
    day: UtcDay,
    tally: &Tally,
) -> Result<(), StorageError> {
    sql::delete_reservation(tx, reservation_id)?;
    sql::add_usage(tx, key, day, tally)
}

fn commit_tally(reservation: &Reservation, images_produced: u32) -> Tally {
    Tally {
        requests: 1,
        images: u64::from(images_produced),
        spend_micros: i64::from(images_produced).saturating_mul(reservation.unit_price_micros),
        ..Tally::default()
    }
}

/// Quota windows as of `today` from stored rows and pending holds.
fn quotas_from(rows: &[UsageRow], pending: &[sql::PendingRow], today: UtcDay) -> Quotas {
    let mut quotas = Quotas::default();
    for row in rows {
        quotas.load(
            &row.key.client,
            today,
            row.day,
            row.tally.images,
            row.tally.spend_micros,
        );
    }
    for hold in pending {
        quotas.load_pending(
            &hold.key.client,
            today,
            hold.day,
            hold.images,
            hold.cost_micros,
        );
    }
    quotas
}

/// A report read straight from a database file through a read-only connection: nothing is
/// written or settled, so it is safe while a gateway serves from the file. Pending
/// reservations show as `reserved`.
pub async fn report_from_file(
    path: &Path,
    clients: &[(String, ClientLimits)],
    days: u32,
    now: SystemTime,
) -> Result<UsageReport, LedgerError> {
    let reader = Reader::open_existing(path).await?;
    let today = UtcDay::containing(now);
    let from = report::first_day_needed(today, days);
    let (rows, pending) = reader
        .read(move |conn| {
            Ok((
                sql::usage_rows(conn, from, today)?,
                sql::pending_reservations(conn)?,
            ))
        })
        .await?;
    let quotas = quotas_from(&rows, &pending, today);
    let views: Vec<ClientQuota> = clients
        .iter()
        .map(|(id, _)| quotas.view(id, today))
        .collect();
    Ok(report::build(clients, &views, &rows, days, now))
}

/// A hold granted in memory whose row is not yet known to be committed. If the reserving
/// future is dropped before that (the client went away), the hold is undone and the row, if
/// it committed after all, is deleted by a queued write.
struct UnconfirmedHold<'a> {
    store: &'a LocalStore,
    reservation: Option<Reservation>,
}

impl UnconfirmedHold<'_> {
    fn release_memory(&self, reservation: &Reservation) {
        self.store.quotas().settle(
            &reservation.key.client,
            reservation.day,
            (reservation.images, reservation.cost_micros()),
            (0, 0),
        );
    }

    fn confirm(mut self) -> Option<Reservation> {
        self.reservation.take()
    }

    /// The row did not commit: only the memory hold needs undoing.
    fn abandon(mut self) {
        if let Some(reservation) = self.reservation.take() {
            self.release_memory(&reservation);
        }
    }
}

impl Drop for UnconfirmedHold<'_> {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        self.release_memory(&reservation);
        if let Durability::Sqlite { db, .. } = &self.store.durability {
            let id = reservation.id;
            // Queued behind the insert, so it runs after it. If it cannot be queued the
            // writer is gone and the row is charged on the next start: usage over-counted,
            // never under.
            let _ = db
                .writer()
                .submit_detached("delete the row of a cancelled reservation", move |tx| {
                    sql::delete_reservation(tx, id)
                });
        }
    }
}

impl LedgerStore for LocalStore {
    fn reserve<'a>(
        &'a self,
        request: &'a ReserveRequest<'a>,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Reservation, ReserveError>> {
        let unit_price_micros = to_micros(request.unit_price);
        let cost_micros = i64::from(request.images).saturating_mul(unit_price_micros);
        let held = self.quotas().try_reserve(
            request.client,
            request.limits,
            request.images,
            cost_micros,
            UtcDay::containing(now),
        );
        let day = match held {
            Ok(day) => day,
            Err(refused) => return ready(Err(refused)).boxed(),
        };
        let reservation = Reservation {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            key: UsageKey::new(request.client, request.model, request.size, request.quality),
            day,
            images: request.images,
            unit_price_micros,
            holder: request.holder.map(str::to_owned),
        };
        let db = match &self.durability {
            Durability::Memory(_) => return ready(Ok(reservation)).boxed(),
            Durability::Sqlite { db, .. } => db,
        };
        let row = reservation.clone();
        let created_at = unix_secs(now);
        let submitted = db
            .writer()
            .submit(move |tx| sql::insert_reservation(tx, &row, created_at));
        let hold = UnconfirmedHold {
            store: self,
            reservation: Some(reservation),
        };
        async move {
            let written = match submitted {
                Ok(pending) => pending.await,
                Err(e) => Err(e),
            };
            match written {
                Ok(()) => hold.confirm().ok_or_else(|| {
                    ReserveError::Unavailable("reservation vanished before confirmation".into())
                }),
                Err(e) => {
                    hold.abandon();
                    tracing::error!(error = %e, client = request.client, "could not record a quota reservation");
                    Err(ReserveError::Unavailable(e.to_string()))
                }
            }
        }
        .boxed()
    }

    fn commit(
        &self,
        reservation: &Reservation,
        images_produced: u32,
    ) -> BoxFuture<'static, Result<(), LedgerError>> {
        self.settle(
            reservation,
            images_produced,
            commit_tally(reservation, images_produced),
        )
    }

    fn commit_unwaited(&self, reservation: &Reservation, images_produced: u32) {
        let tally = commit_tally(reservation, images_produced);
        self.settle_in_memory(reservation, images_produced, &tally);
        self.record_lazily(reservation, tally);
    }

    fn refund(&self, reservation: &Reservation) -> BoxFuture<'static, Result<(), LedgerError>> {
        let tally = Tally {
            failures: 1,
            ..Tally::default()
        };
        self.settle(reservation, 0, tally)
    }

    fn release(&self, reservation: &Reservation) -> BoxFuture<'static, Result<(), LedgerError>> {
        self.quotas().settle(
            &reservation.key.client,
            reservation.day,
            (reservation.images, reservation.cost_micros()),
            (0, 0),
        );
        match &self.durability {
            Durability::Memory(_) => ready(Ok(())).boxed(),
            Durability::Sqlite { db, .. } => {
                let id = reservation.id;
                let submitted = db
                    .writer()
                    .submit(move |tx| sql::delete_reservation(tx, id));
                async move { Ok(submitted?.await?) }.boxed()
            }
        }
    }

    fn held(&self) -> Vec<String> {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    fn take_held(&self, holder: &str) -> Option<Reservation> {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(holder)
    }

    fn record_cached(&self, key: UsageKey, day: UtcDay, images: u32) {
        let tally = Tally {
            cached: u64::from(images),
            ..Tally::default()
        };
        match &self.durability {
            Durability::Memory(rows) => add_row(rows, &key, day, &tally),
            Durability::Sqlite { db, cached } => {
                *CachedCounts::lock(cached)
                    .counts
                    .entry((key, day))
                    .or_default() += u64::from(images);
                // Outside the lock: a refused write calls back at once and takes it.
                CachedCounts::drain(cached, db.writer());
            }
        }
    }

    fn report<'a>(
        &'a self,
        clients: &'a [(String, ClientLimits)],
        days: u32,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<UsageReport, LedgerError>> {
        let today = UtcDay::containing(now);
        let quotas: Vec<ClientQuota> = {
            let quotas = self.quotas();
            clients
                .iter()
                .map(|(id, _)| quotas.view(id, today))
                .collect()
        };
        let from = report::first_day_needed(today, days);
        async move {
            let rows: Vec<UsageRow> = match &self.durability {
                Durability::Memory(rows) => rows
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .filter(|((_, day), _)| (from..=today).contains(day))
                    .map(|((key, day), tally)| UsageRow {
                        key: key.clone(),
                        day: *day,
                        tally: *tally,
                    })
                    .collect(),
                Durability::Sqlite { db, .. } => {
                    // Lazy writes (settled commits, cached counts) first, so the report
                    // agrees with the quota counters it was built with. If that fails, the
                    // report still shows what is on disk (a stopped writer wrote everything
                    // it had when it closed).
                    match db.writer().flush().await {
                        Ok(()) | Err(StorageError::WriterStopped) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "usage report without the latest writes");
                        }
                    }
                    db.reader()
                        .read(move |conn| sql::usage_rows(conn, from, today))
                        .await?
                }
            };
            Ok(report::build(clients, &quotas, &rows, days, now))
        }
        .boxed()
    }

    fn check_writable(&self) -> BoxFuture<'_, Result<(), LedgerError>> {
        match &self.durability {
            Durability::Memory(_) => ready(Ok(())).boxed(),
            // A flush is an empty durable job: it proves the writer thread is alive and can
            // take the write lock.
            Durability::Sqlite { db, .. } => {
                let writer = db.writer().clone();
                async move { Ok(writer.flush().await?) }.boxed()
            }
        }
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        match &self.durability {
            Durability::Memory(_) => ready(()).boxed(),
            Durability::Sqlite { db, .. } => db.writer().close().boxed(),
        }
    }
}
