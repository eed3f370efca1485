//! Where task rows live: the [`TaskStore`] seam, and its embedded implementations (the SQLite
//! file shared with the ledger, or memory for the demo and tests).
//!
//! A store keeps what a task needs to survive a restart: owner, state, the submitted request,
//! the upstream's task reference (native mode), and the result or error until the row expires.
//! It makes no decisions: the [`Tasks`](super::Tasks) service decides transitions and the store
//! records them. Every write goes through the database's one writer (group commit,
//! `synchronous=FULL`), so a write that returned `Ok` survives `kill -9`.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, ready};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};

use super::{TaskId, TaskState};
use crate::config::TaskMode;
use crate::storage::{Database, StorageError};

/// Where a native-mode task lives upstream. Never shown to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeRef {
    pub upstream: String,
    pub key_id: String,
    pub upstream_task_id: String,
}

/// A task as stored.
#[derive(Debug, Clone)]
pub struct TaskRecord {
    pub id: TaskId,
    pub client: String,
    pub state: TaskState,
    pub mode: TaskMode,
    /// The submitted body (without `async`), re-validated when the task runs.
    pub request: String,
    pub cache_read: bool,
    pub cache_store: bool,
    pub idempotency_key: Option<String>,
    /// SHA-256 of the normalised request, to tell an idempotent replay from a conflict.
    pub request_hash: [u8; 32],
    /// How many times a worker started it (a crash mid-run leaves it `processing`).
    pub attempts: u32,
    pub native: Option<NativeRef>,
    /// Images produced, once completed.
    pub images: Option<u32>,
    /// The upstream's `ImagesResponse`, once completed.
    pub result: Option<Bytes>,
    /// The OpenAI-shaped `error` object (JSON text), once failed.
    pub error: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Unix seconds after which the row is gone (set when the task finishes).
    pub expires_at: Option<i64>,
}

impl TaskRecord {
    /// Whether a client may still see it at `now` (unix seconds).
    pub fn is_live(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

/// The outcome of an insert.
#[derive(Debug)]
pub enum Inserted {
    Created,
    /// The client already has a task under this idempotency key; nothing was written.
    Existing(Box<TaskRecord>),
}

/// How a task ended, as recorded.
#[derive(Debug, Clone)]
pub enum Finish {
    Completed { body: Bytes, images: u32 },
    Failed { error: String },
}

type StoreResult<'a, T> = BoxFuture<'a, Result<T, StorageError>>;

/// A task backend. Object-safe: the service holds an `Arc<dyn TaskStore>`.
pub trait TaskStore: Send + Sync + 'static {
    /// Records a new queued task, unless the client already has one under the same
    /// idempotency key (then returns that one and writes nothing).
    fn insert(&self, task: TaskRecord) -> StoreResult<'_, Inserted>;

    /// The task with this id, whatever its state or expiry.
    fn get<'a>(&'a self, id: &'a str) -> StoreResult<'a, Option<TaskRecord>>;

    /// The client's task under an idempotency key.
    fn find_idempotent<'a>(
        &'a self,
        client: &'a str,
        key: &'a str,
    ) -> StoreResult<'a, Option<TaskRecord>>;

    /// `queued`/`processing` → `processing`, one more attempt; returns the attempt count.
    fn start<'a>(&'a self, id: &'a TaskId, now: i64) -> StoreResult<'a, u32>;

    /// Remembers where a native task lives upstream.
    fn set_native<'a>(&'a self, id: &'a TaskId, native: &'a NativeRef) -> StoreResult<'a, ()>;

    /// Finishes a task; it is kept until `expires_at`.
    fn finish<'a>(
        &'a self,
        id: &'a TaskId,
        finish: Finish,
        now: i64,
        expires_at: i64,
    ) -> StoreResult<'a, ()>;

    /// Every queued or processing task, oldest first (for resuming after a restart).
    fn pending(&self) -> StoreResult<'_, Vec<TaskRecord>>;

    /// Deletes finished tasks whose `expires_at` is at or before `now`, with their results.
    fn remove_expired(&self, now: i64) -> StoreResult<'_, u64>;
}

/// The embedded store: the SQLite file, or memory.
pub enum LocalTaskStore {
    Memory(Mutex<HashMap<String, TaskRecord>>),
    Sqlite(Database),
}

impl LocalTaskStore {
    pub fn in_memory() -> LocalTaskStore {
        LocalTaskStore::Memory(Mutex::default())
    }

    pub fn sqlite(db: Database) -> LocalTaskStore {
        LocalTaskStore::Sqlite(db)
    }

    /// Runs `change` on the row of `id` in memory.
    fn update_memory<T>(
        rows: &Mutex<HashMap<String, TaskRecord>>,
        id: &TaskId,
        change: impl FnOnce(&mut TaskRecord) -> T,
    ) -> Result<T, StorageError> {
        let mut rows = rows.lock().unwrap_or_else(PoisonError::into_inner);
        let row = rows
            .get_mut(id.as_str())
            .ok_or_else(|| StorageError::Corrupt(format!("task {id} is not stored")))?;
        Ok(change(row))
    }
}

impl TaskStore for LocalTaskStore {
    fn insert(&self, task: TaskRecord) -> StoreResult<'_, Inserted> {
        match self {
            LocalTaskStore::Memory(rows) => {
                let mut rows = rows.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(key) = &task.idempotency_key
                    && let Some(existing) = rows.values().find(|r| {
                        r.client == task.client && r.idempotency_key.as_ref() == Some(key)
                    })
                {
                    return ready(Ok(Inserted::Existing(Box::new(existing.clone())))).boxed();
                }
                rows.insert(task.id.as_str().to_owned(), task);
                ready(Ok(Inserted::Created)).boxed()
            }
            LocalTaskStore::Sqlite(db) => {
                let writer = db.writer().clone();
                async move { writer.execute(move |tx| sql::insert(tx, &task)).await }.boxed()
            }
        }
    }

    fn get<'a>(&'a self, id: &'a str) -> StoreResult<'a, Option<TaskRecord>> {
        match self {
            LocalTaskStore::Memory(rows) => ready(Ok(rows
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(id)
                .cloned()))
            .boxed(),
            LocalTaskStore::Sqlite(db) => {
                let id = id.to_owned();
                let reader = db.reader().clone();
                async move { reader.read(move |conn| sql::get(conn, &id)).await }.boxed()
            }
        }
    }

    fn find_idempotent<'a>(
        &'a self,
        client: &'a str,
        key: &'a str,
    ) -> StoreResult<'a, Option<TaskRecord>> {
        match self {
            LocalTaskStore::Memory(rows) => ready(Ok(rows
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .find(|r| r.client == client && r.idempotency_key.as_deref() == Some(key))
                .cloned()))
            .boxed(),
            LocalTaskStore::Sqlite(db) => {
                let (client, key) = (client.to_owned(), key.to_owned());
                let reader = db.reader().clone();
                async move {
                    reader
                        .read(move |conn| sql::find_idempotent(conn, &client, &key))
                        .await
                }
                .boxed()
            }
        }
    }

    fn start<'a>(&'a self, id: &'a TaskId, now: i64) -> StoreResult<'a, u32> {
        match self {
            LocalTaskStore::Memory(rows) => ready(Self::update_memory(rows, id, |row| {
                row.state = TaskState::Processing;
                row.attempts += 1;
                row.started_at = Some(now);
                row.attempts
            }))
            .boxed(),
            LocalTaskStore::Sqlite(db) => {
                let writer = db.writer().clone();
                let id = id.clone();
                async move { writer.execute(move |tx| sql::start(tx, &id, now)).await }.boxed()
            }
        }
    }

    fn set_native<'a>(&'a self, id: &'a TaskId, native: &'a NativeRef) -> StoreResult<'a, ()> {
        match self {
            LocalTaskStore::Memory(rows) => ready(Self::update_memory(rows, id, |row| {
                row.native = Some(native.clone());
            }))
            .boxed(),
            LocalTaskStore::Sqlite(db) => {
                let writer = db.writer().clone();
                let (id, native) = (id.clone(), native.clone());
                async move {
                    writer
                        .execute(move |tx| sql::set_native(tx, &id, &native))
                        .await
                }
                .boxed()
            }
        }
    }

    fn finish<'a>(
        &'a self,
        id: &'a TaskId,
        finish: Finish,
        now: i64,
        expires_at: i64,
    ) -> StoreResult<'a, ()> {
        match self {
            LocalTaskStore::Memory(rows) => ready(Self::update_memory(rows, id, |row| {
                match finish {
                    Finish::Completed { body, images } => {
                        row.state = TaskState::Completed;
                        row.result = Some(body);
                        row.images = Some(images);
                    }
                    Finish::Failed { error } => {
                        row.state = TaskState::Failed;
                        row.error = Some(error);
                    }
                }
                row.finished_at = Some(now);
                row.expires_at = Some(expires_at);
            }))
            .boxed(),
            LocalTaskStore::Sqlite(db) => {
                let writer = db.writer().clone();
                let id = id.clone();
                async move {
                    writer
                        .execute(move |tx| sql::finish(tx, &id, &finish, now, expires_at))
                        .await
                }
                .boxed()
            }
        }
    }

    fn pending(&self) -> StoreResult<'_, Vec<TaskRecord>> {
        match self {
            LocalTaskStore::Memory(rows) => {
                let mut pending: Vec<TaskRecord> = rows
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .values()
                    .filter(|r| !r.state.is_finished())
                    .cloned()
                    .collect();
                pending.sort_by_key(|r| r.created_at);
                ready(Ok(pending)).boxed()
            }
            LocalTaskStore::Sqlite(db) => {
                let reader = db.reader().clone();
                async move { reader.read(sql::pending).await }.boxed()
            }
        }
    }

    fn remove_expired(&self, now: i64) -> StoreResult<'_, u64> {
        match self {
            LocalTaskStore::Memory(rows) => {
                let mut rows = rows.lock().unwrap_or_else(PoisonError::into_inner);
                let before = rows.len();
                rows.retain(|_, r| r.is_live(now));
                ready(Ok((before - rows.len()) as u64)).boxed()
            }
            LocalTaskStore::Sqlite(db) => {
                let writer = db.writer().clone();
                async move { writer.execute(move |tx| sql::remove_expired(tx, now)).await }.boxed()
            }
        }
    }
}

/// The task SQL over the `tasks` table (created by the migrations in
/// [`crate::storage::sqlite`]).
mod sql {
    use super::*;

    const COLUMNS: &str = "id, client, state, mode, request, cache_read, cache_store, \
        idempotency_key, request_hash, attempts, upstream, upstream_key, upstream_task, images, \
        result, error, created_at, started_at, finished_at, expires_at";

    pub fn insert(tx: &Transaction<'_>, task: &TaskRecord) -> Result<Inserted, StorageError> {
        if let Some(key) = &task.idempotency_key
            && let Some(existing) = find_idempotent(tx, &task.client, key)?
        {
            return Ok(Inserted::Existing(Box::new(existing)));
        }
        tx.prepare_cached(
            "INSERT INTO tasks (id, client, state, mode, request, cache_read, cache_store,
                 idempotency_key, request_hash, attempts, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?
        .execute(params![
            task.id.as_str(),
            task.client,
            task.state.as_str(),
            mode_str(task.mode),
            task.request,
            task.cache_read,
            task.cache_store,
            task.idempotency_key,
            &task.request_hash[..],
            task.attempts,
            task.created_at,
        ])?;
        Ok(Inserted::Created)
    }

    pub fn get(conn: &Connection, id: &str) -> Result<Option<TaskRecord>, StorageError> {
        conn.prepare_cached(&format!("SELECT {COLUMNS} FROM tasks WHERE id = ?1"))?
            .query_row([id], from_row)
            .optional()?
            .transpose()
    }

    pub fn find_idempotent(
        conn: &Connection,
        client: &str,
        key: &str,
    ) -> Result<Option<TaskRecord>, StorageError> {
        conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM tasks WHERE client = ?1 AND idempotency_key = ?2"
        ))?
        .query_row([client, key], from_row)
        .optional()?
        .transpose()
    }

    pub fn start(tx: &Transaction<'_>, id: &TaskId, now: i64) -> Result<u32, StorageError> {
        let attempts: Option<u32> = tx
            .prepare_cached(
                "UPDATE tasks SET state = 'processing', attempts = attempts + 1, started_at = ?2
                 WHERE id = ?1 AND state IN ('queued', 'processing') RETURNING attempts",
            )?
            .query_row(params![id.as_str(), now], |row| row.get(0))
            .optional()?;
        attempts.ok_or_else(|| StorageError::Corrupt(format!("task {id} is not pending")))
    }

    pub fn set_native(
        tx: &Transaction<'_>,
        id: &TaskId,
        native: &NativeRef,
    ) -> Result<(), StorageError> {
        tx.prepare_cached(
            "UPDATE tasks SET upstream = ?2, upstream_key = ?3, upstream_task = ?4 WHERE id = ?1",
        )?
        .execute(params![
            id.as_str(),
            native.upstream,
            native.key_id,
            native.upstream_task_id
        ])?;
        Ok(())
    }

    pub fn finish(
        tx: &Transaction<'_>,
        id: &TaskId,
        finish: &Finish,
        now: i64,
        expires_at: i64,
    ) -> Result<(), StorageError> {
        let (state, result, images, error) = match finish {
            Finish::Completed { body, images } => {
                (TaskState::Completed, Some(&body[..]), Some(*images), None)
            }
            Finish::Failed { error } => (TaskState::Failed, None, None, Some(error.as_str())),
        };
        tx.prepare_cached(
            "UPDATE tasks SET state = ?2, result = ?3, images = ?4, error = ?5,
                 finished_at = ?6, expires_at = ?7
             WHERE id = ?1",
        )?
        .execute(params![
            id.as_str(),
            state.as_str(),
            result,
            images,
            error,
            now,
            expires_at
        ])?;
        Ok(())
    }

    pub fn pending(conn: &Connection) -> Result<Vec<TaskRecord>, StorageError> {
        conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM tasks WHERE state IN ('queued', 'processing')
             ORDER BY created_at"
        ))?
        .query_map([], from_row)?
        .map(|row| row?)
        .collect()
    }

    pub fn remove_expired(tx: &Transaction<'_>, now: i64) -> Result<u64, StorageError> {
        let removed = tx
            .prepare_cached("DELETE FROM tasks WHERE expires_at IS NOT NULL AND expires_at <= ?1")?
            .execute([now])?;
        Ok(removed as u64)
    }

    fn mode_str(mode: TaskMode) -> &'static str {
        match mode {
            TaskMode::Gateway => "gateway",
            TaskMode::Native => "native",
        }
    }

    /// A row, or why it cannot be read. The outer `Result` is rusqlite's, for `query_row`.
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Result<TaskRecord, StorageError>> {
        let id: String = row.get(0)?;
        let state: String = row.get(2)?;
        let mode: String = row.get(3)?;
        let hash: Vec<u8> = row.get(8)?;
        let upstream: Option<String> = row.get(10)?;
        let upstream_key: Option<String> = row.get(11)?;
        let upstream_task: Option<String> = row.get(12)?;
        let result: Option<Vec<u8>> = row.get(14)?;
        let corrupt = |what: &str| Err(StorageError::Corrupt(format!("task {id}: {what}")));
        let Some(state) = TaskState::parse(&state) else {
            return Ok(corrupt("unknown state"));
        };
        let mode = match mode.as_str() {
            "gateway" => TaskMode::Gateway,
            "native" => TaskMode::Native,
            _ => return Ok(corrupt("unknown mode")),
        };
        let Ok(request_hash) = <[u8; 32]>::try_from(hash.as_slice()) else {
            return Ok(corrupt("malformed request hash"));
        };
        let Some(task_id) = TaskId::parse(&id) else {
            return Ok(corrupt("malformed id"));
        };
        let native = match (upstream, upstream_key, upstream_task) {
            (Some(upstream), Some(key_id), Some(upstream_task_id)) => Some(NativeRef {
                upstream,
                key_id,
                upstream_task_id,
            }),
            _ => None,
        };
        Ok(Ok(TaskRecord {
            id: task_id,
            client: row.get(1)?,
            state,
            mode,
            request: row.get(4)?,
            cache_read: row.get(5)?,
            cache_store: row.get(6)?,
            idempotency_key: row.get(7)?,
            request_hash,
            attempts: row.get(9)?,
            native,
            images: row.get(13)?,
            result: result.map(Bytes::from),
            error: row.get(15)?,
            created_at: row.get(16)?,
            started_at: row.get(17)?,
            finished_at: row.get(18)?,
            expires_at: row.get(19)?,
        }))
    }
}
