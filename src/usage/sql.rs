//! The ledger's SQL over the `usage_daily` and `reservations` tables (created by the
//! migrations in [`crate::storage::sqlite`]).
//!
//! Plain functions over a transaction or a connection, run on the writer thread or the
//! blocking pool. They must not decide anything about quotas; they store what they are told.

use rusqlite::{Connection, Transaction, params};

use super::calendar::UtcDay;
use super::report::{Tally, UsageRow};
use super::store::{Reservation, UsageKey};
use crate::storage::StorageError;

fn to_sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn from_sql_int(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub fn insert_reservation(
    tx: &Transaction<'_>,
    reservation: &Reservation,
    created_at: i64,
) -> Result<(), StorageError> {
    tx.prepare_cached(
        "INSERT INTO reservations (id, client, model, size, quality, day, images, cost_micros, created_at, holder)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        to_sql_int(reservation.id),
        reservation.key.client,
        reservation.key.model,
        reservation.key.size,
        reservation.key.quality,
        reservation.day.to_string(),
        reservation.images,
        reservation.cost_micros(),
        created_at,
        reservation.holder,
    ])?;
    Ok(())
}

pub fn delete_reservation(tx: &Transaction<'_>, id: u64) -> Result<(), StorageError> {
    tx.prepare_cached("DELETE FROM reservations WHERE id = ?1")?
        .execute([to_sql_int(id)])?;
    Ok(())
}

/// Adds `tally` to the row of `key` on `day`, creating it if needed.
pub fn add_usage(
    tx: &Transaction<'_>,
    key: &UsageKey,
    day: UtcDay,
    tally: &Tally,
) -> Result<(), StorageError> {
    tx.prepare_cached(
        "INSERT INTO usage_daily (client, day, model, size, quality, requests, images, cached, failures, spend_micros)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (client, day, model, size, quality) DO UPDATE SET
             requests = requests + excluded.requests,
             images = images + excluded.images,
             cached = cached + excluded.cached,
             failures = failures + excluded.failures,
             spend_micros = spend_micros + excluded.spend_micros",
    )?
    .execute(params![
        key.client,
        day.to_string(),
        key.model,
        key.size,
        key.quality,
        to_sql_int(tally.requests),
        to_sql_int(tally.images),
        to_sql_int(tally.cached),
        to_sql_int(tally.failures),
        tally.spend_micros,
    ])?;
    Ok(())
}

/// A reservation row: a hold that was not settled (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRow {
    pub id: u64,
    pub key: UsageKey,
    pub day: UtcDay,
    pub images: u64,
    pub cost_micros: i64,
    /// Set for holds that outlive a restart (async tasks).
    pub holder: Option<String>,
}

impl PendingRow {
    /// The row as a live reservation again.
    pub fn into_reservation(self) -> Reservation {
        let images = u32::try_from(self.images).unwrap_or(u32::MAX);
        Reservation {
            id: self.id,
            key: self.key,
            day: self.day,
            images,
            // Exact: the cost was stored as images × unit price.
            unit_price_micros: self.cost_micros / i64::from(images.max(1)),
            holder: self.holder,
        }
    }
}

/// Every pending reservation.
pub fn pending_reservations(conn: &Connection) -> Result<Vec<PendingRow>, StorageError> {
    let mut statement = conn.prepare_cached(
        "SELECT id, client, model, size, quality, day, images, cost_micros, holder FROM reservations",
    )?;
    let raw = statement
        .query_map([], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                UsageKey {
                    client: row.get(1)?,
                    model: row.get(2)?,
                    size: row.get(3)?,
                    quality: row.get(4)?,
                },
                row.get::<_, String>(5)?,
                row.get::<_, i64>(6)?,
                row.get::<_, i64>(7)?,
                row.get::<_, Option<String>>(8)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    raw.into_iter()
        .map(|(id, key, day, images, cost_micros, holder)| {
            let day = UtcDay::parse(&day).ok_or_else(|| {
                StorageError::Corrupt(format!("reservation {id} has a malformed day `{day}`"))
            })?;
            Ok(PendingRow {
                id: from_sql_int(id),
                key,
                day,
                images: from_sql_int(images),
                cost_micros,
                holder,
            })
        })
        .collect()
}

/// What start-up found pending.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    pub reservations: u64,
    pub images: u64,
    /// An id above every id the table held, so new reservations never collide with one.
    pub next_id: u64,
    /// Reservations with a holder, left pending for their holder to take over.
    pub held: Vec<PendingRow>,
}

/// Charges every pending reservation without a holder in full (the client may have received
/// its images before the crash) and deletes it; returns those with a holder untouched.
pub fn settle_pending(tx: &Transaction<'_>) -> Result<Settled, StorageError> {
    let mut settled = Settled::default();
    for pending in pending_reservations(tx)? {
        settled.next_id = settled.next_id.max(pending.id.saturating_add(1));
        if pending.holder.is_some() {
            settled.held.push(pending);
            continue;
        }
        let tally = Tally {
            requests: 1,
            images: pending.images,
            spend_micros: pending.cost_micros,
            ..Tally::default()
        };
        add_usage(tx, &pending.key, pending.day, &tally)?;
        settled.reservations += 1;
        settled.images = settled.images.saturating_add(pending.images);
        delete_reservation(tx, pending.id)?;
    }
    settled.next_id = settled.next_id.max(1);
    Ok(settled)
}

/// Every usage row with `from <= day <= to`.
pub fn usage_rows(
    conn: &Connection,
    from: UtcDay,
    to: UtcDay,
) -> Result<Vec<UsageRow>, StorageError> {
    let mut statement = conn.prepare_cached(
        "SELECT client, day, model, size, quality, requests, images, cached, failures, spend_micros
         FROM usage_daily WHERE day >= ?1 AND day <= ?2",
    )?;
    let raw = statement
        .query_map([from.to_string(), to.to_string()], |row| {
            Ok((
                row.get::<_, String>(1)?,
                UsageKey {
                    client: row.get(0)?,
                    model: row.get(2)?,
                    size: row.get(3)?,
                    quality: row.get(4)?,
                },
                Tally {
                    requests: from_sql_int(row.get(5)?),
                    images: from_sql_int(row.get(6)?),
                    cached: from_sql_int(row.get(7)?),
                    failures: from_sql_int(row.get(8)?),
                    spend_micros: row.get(9)?,
                },
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    raw.into_iter()
        .map(|(day, key, tally)| {
            let day = UtcDay::parse(&day).ok_or_else(|| {
                StorageError::Corrupt(format!("usage row has a malformed day `{day}`"))
            })?;
            Ok(UsageRow { key, day, tally })
        })
        .collect()
}
