//! The embedded SQLite database: opening and migrating the file, the one writer thread with
//! group commit, and a read-only connection for reports.
//!
//! Every write in the process goes through [`Writer`]: a dedicated OS thread owns the write
//! connection (rusqlite is blocking, and one writer is what SQLite wants anyway), drains every
//! job already queued, runs them in ONE transaction with a savepoint each, and answers each
//! caller only after COMMIT returned. So a caller told "ok" is on disk (`synchronous=FULL`),
//! and under load many callers share one fsync. Writes nobody waits for (settling a quota
//! reservation that is already durable, cached-hit counts) can be queued lazily instead
//! ([`Writer::submit_lazy`]): they wake no thread, ride along in the next transaction, and a
//! transaction made only of them commits without an fsync of its own (`synchronous=NORMAL`,
//! so a process crash keeps them; a power cut can lose the last ones, never a reservation).
//! Reads go through [`Reader`] on the blocking pool; WAL lets them run while the writer
//! writes.
//!
//! This module owns the schema (one ordered list of migrations for the whole file) but not the
//! meaning of the rows: domain modules pass their own SQL in closures. It must not be called
//! with blocking work from async threads: [`Database::open`] blocks and belongs in
//! `spawn_blocking`, everything else here is async or runs on its own thread.

use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::task::{Context, Poll};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};
use tokio::sync::oneshot;

use super::StorageError;

/// The schema, as forward migrations applied in order; `PRAGMA user_version` is how many have
/// been applied. Append new steps, never edit or reorder old ones: files in the field already
/// ran them.
const MIGRATIONS: &[&str] = &[
    // 1: the usage ledger.
    // usage_daily: settled usage per client, model, size, quality and UTC day. Month totals
    // are sums over days; the key starts with client and day so per-client ranges are one
    // index walk.
    // reservations: a row exists exactly while a quota reservation is pending; it is deleted
    // in the same transaction that writes its outcome into usage_daily, so a crash can leave
    // only pending rows, which the next start settles as charged.
    "CREATE TABLE usage_daily (
        client       TEXT    NOT NULL,
        day          TEXT    NOT NULL,
        model        TEXT    NOT NULL,
        size         TEXT    NOT NULL,
        quality      TEXT    NOT NULL,
        requests     INTEGER NOT NULL DEFAULT 0,
        images       INTEGER NOT NULL DEFAULT 0,
        cached       INTEGER NOT NULL DEFAULT 0,
        failures     INTEGER NOT NULL DEFAULT 0,
        spend_micros INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (client, day, model, size, quality)
    ) WITHOUT ROWID;
    CREATE INDEX usage_daily_by_day ON usage_daily (day);
    CREATE TABLE reservations (
        id          INTEGER PRIMARY KEY,
        client      TEXT    NOT NULL,
        model       TEXT    NOT NULL,
        size        TEXT    NOT NULL,
        quality     TEXT    NOT NULL,
        day         TEXT    NOT NULL,
        images      INTEGER NOT NULL,
        cost_micros INTEGER NOT NULL,
        created_at  INTEGER NOT NULL
    );",
    // 2: async tasks.
    // reservations.holder: the task id that holds a reservation across restarts; such rows
    // are not settled at start but handed back to their task.
    // tasks: one row per async task, from submit until `expires_at` (set when it finishes).
    // `request` is the submitted body as JSON, re-validated when the task runs; `result` is
    // the upstream's ImagesResponse bytes. The unique index makes an Idempotency-Key name at
    // most one task per client.
    "ALTER TABLE reservations ADD COLUMN holder TEXT;
    CREATE TABLE tasks (
        id              TEXT    PRIMARY KEY,
        client          TEXT    NOT NULL,
        state           TEXT    NOT NULL,
        mode            TEXT    NOT NULL,
        request         TEXT    NOT NULL,
        cache_read      INTEGER NOT NULL,
        cache_store     INTEGER NOT NULL,
        idempotency_key TEXT,
        request_hash    BLOB    NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        upstream        TEXT,
        upstream_key    TEXT,
        upstream_task   TEXT,
        images          INTEGER,
        result          BLOB,
        error           TEXT,
        created_at      INTEGER NOT NULL,
        started_at      INTEGER,
        finished_at     INTEGER,
        expires_at      INTEGER
    );
    CREATE UNIQUE INDEX tasks_by_idempotency_key ON tasks (client, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX tasks_pending ON tasks (created_at) WHERE state IN ('queued', 'processing');
    CREATE INDEX tasks_by_expiry ON tasks (expires_at) WHERE expires_at IS NOT NULL;",
];

/// The schema version this build writes and understands.
pub fn schema_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

/// How long a statement waits for a lock held by another connection (a reader's checkpoint,
/// an operator's `sqlite3` shell) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most jobs in one group transaction: bounds the latency a job can add to the others.
const MAX_BATCH: usize = 512;

/// The longest a lazy write waits for a transaction to ride along in before the writer runs
/// one for it. Bounds how stale another process's view of the file can be (`imagegate
/// usage`); readers in this process flush first (see [`Writer::flush`]).
const LAZY_FLUSH: Duration = Duration::from_millis(200);

/// An open database file: its writer and its reader.
#[derive(Clone)]
pub struct Database {
    path: PathBuf,
    writer: Writer,
    reader: Reader,
    /// Held while any clone lives: see [`lock_exclusively`].
    _lock: Arc<std::fs::File>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Opens (creating it and its directory if needed) and migrates the file, then starts the
    /// writer thread. Blocking: call it from `spawn_blocking` or start-up code.
    pub fn open(path: &Path) -> Result<Database, StorageError> {
        let open_error = |reason: String| StorageError::Open {
            path: path.display().to_string(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                open_error(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let lock = lock_exclusively(path).map_err(open_error)?;
        let mut conn = Connection::open(path).map_err(|e| open_error(e.to_string()))?;
        configure_write_connection(&conn).map_err(open_error)?;
        migrate(&mut conn, path)?;
        // The reader opens after migration so it never sees a half-made schema.
        let reader = Reader::open(path)?;
        let writer = Writer::spawn(conn).map_err(|e| open_error(e.to_string()))?;
        Ok(Database {
            path: path.to_owned(),
            writer,
            reader,
            _lock: Arc::new(lock),
        })
    }

    /// [`Database::open`] on the blocking pool, for async start-up code.
    pub async fn open_async(path: &Path) -> Result<Database, StorageError> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || Database::open(&path))
            .await
            .map_err(|_| StorageError::Panicked)?
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    pub fn reader(&self) -> &Reader {
        &self.reader
    }
}

/// Takes an exclusive lock on `<path>.lock` for as long as the returned file lives. A second
/// gateway on the same file would settle the first one's in-flight reservations as charged at
/// its start and split the single-writer design; the lock makes it refuse to start instead. The
/// OS drops the lock when the process dies, `kill -9` included. Readers (`imagegate usage`) do
/// not take it.
fn lock_exclusively(path: &Path) -> Result<std::fs::File, String> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            format!(
                "cannot open lock file {}: {e}",
                Path::new(&lock_path).display()
            )
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(
            "another imagegate process is using this file (its .lock is held); each gateway needs its own storage.path"
                .to_owned(),
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", Path::new(&lock_path).display())),
    }
}

fn configure_write_connection(conn: &Connection) -> Result<(), String> {
    conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| e.to_string())?;
    // WAL: readers do not block the writer and a commit is one sequential append.
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(|e| e.to_string())?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!(
            "journal_mode is {mode}, WAL is required (is the file on a network filesystem?)"
        ));
    }
    // FULL: in WAL mode, NORMAL could lose the last commits on power loss, and a caller told
    // that its reservation is durable must be able to rely on it. (The writer switches to
    // NORMAL only for transactions made of lazy writes alone; see `run_writer`.)
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| e.to_string())?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Applies every migration the file has not seen, in one transaction, so a crash mid-way
/// leaves the old version intact.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StorageError> {
    let known = schema_version();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > known {
        return Err(StorageError::SchemaTooNew {
            path: path.display().to_string(),
            found,
            known,
        });
    }
    let applied = usize::try_from(found)
        .map_err(|_| StorageError::Corrupt(format!("negative schema version {found}")))?;
    for (index, step) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(step)?;
        tracing::info!(
            path = %path.display(),
            version = index + 1,
            "applied database schema migration"
        );
    }
    if found < known {
        tx.pragma_update(None, "user_version", known)?;
    }
    tx.commit()?;
    Ok(())
}

/// Read-only access for reports, on the blocking pool so async threads never wait on disk.
#[derive(Clone)]
pub struct Reader {
    // One connection, serialised by the mutex: reads are reports and task polls, each one
    // indexed lookup or a small range, so they queue briefly rather than contend.
    conn: Arc<Mutex<Connection>>,
}

impl Reader {
    fn open(path: &Path) -> Result<Reader, StorageError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StorageError::Open {
            path: path.display().to_string(),
            reason: format!("read connection: {e}"),
        })?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(Reader {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// A read-only view of an existing database that another process may be serving from
    /// (`imagegate usage`): nothing is created, migrated or settled. Refuses a file that is
    /// not an imagegate database or is newer than this build.
    pub async fn open_existing(path: &Path) -> Result<Reader, StorageError> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            if !path.is_file() {
                return Err(StorageError::Open {
                    path: path.display().to_string(),
                    reason: "no such file".to_owned(),
                });
            }
            let reader = Reader::open(&path)?;
            let found: i64 = {
                let conn = reader.conn.lock().unwrap_or_else(PoisonError::into_inner);
                conn.pragma_query_value(None, "user_version", |row| row.get(0))?
            };
            if found > schema_version() {
                return Err(StorageError::SchemaTooNew {
                    path: path.display().to_string(),
                    found,
                    known: schema_version(),
                });
            }
            if found < 1 {
                return Err(StorageError::Open {
                    path: path.display().to_string(),
                    reason: "not an imagegate database (no schema)".to_owned(),
                });
            }
            Ok(reader)
        })
        .await
        .map_err(|_| StorageError::Panicked)?
    }

    /// Runs `read` in one read transaction, so everything it queries is one consistent
    /// snapshot.
    pub async fn read<T, F>(&self, read: F) -> Result<T, StorageError>
    where
        F: FnOnce(&Connection) -> Result<T, StorageError> + Send + 'static,
        T: Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            // A panic in an earlier read leaves no state worth refusing over: its statements
            // and transaction were rolled back when they were dropped.
            let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            let tx = conn.unchecked_transaction()?;
            read(&tx)
        })
        .await
        .map_err(|_| StorageError::Panicked)?
    }
}

/// A job for the writer thread.
trait Job: Send {
    /// Runs inside the group transaction; `false` when the job failed (the writer then rolls
    /// back to the job's savepoint).
    fn run(&mut self, tx: &Transaction<'_>) -> bool;
    /// Called once the group transaction's fate is known: `Err` carries why it did not commit.
    fn finish(self: Box<Self>, committed: Result<(), &str>);
    /// Called instead of running it when the job cannot be run at all.
    fn refuse(self: Box<Self>, error: StorageError);
}

/// A lazy job's callback, told how its write ended.
type Then = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

enum Reply<T> {
    To(oneshot::Sender<Result<T, StorageError>>),
    /// Nobody waits: a failure is logged, naming what the write was for.
    Log(&'static str),
    /// As `Log`, then the outcome is handed to a callback (on the writer thread).
    Then(&'static str, Then),
}

impl<T> Reply<T> {
    fn deliver(self, result: Result<T, StorageError>) {
        match self {
            Reply::To(sender) => {
                // The caller may have gone away (cancelled request); the write stands anyway.
                let _ = sender.send(result);
            }
            Reply::Log(what) => log_failure(what, result.err()),
            Reply::Then(what, then) => {
                let result = result.map(|_| ());
                log_failure(what, result.as_ref().err());
                then(result);
            }
        }
    }
}

fn log_failure(what: &'static str, error: Option<impl fmt::Display>) {
    if let Some(e) = error {
        tracing::error!(error = %e, what, "background database write failed");
    }
}

struct ClosureJob<T, F> {
    work: Option<F>,
    outcome: Option<Result<T, StorageError>>,
    reply: Reply<T>,
}

impl<T, F> Job for ClosureJob<T, F>
where
    F: FnOnce(&Transaction<'_>) -> Result<T, StorageError> + Send,
    T: Send,
{
    fn run(&mut self, tx: &Transaction<'_>) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        // A panicking job must not take the writer thread (and every later write) with it.
        let outcome = catch_unwind(AssertUnwindSafe(|| work(tx))).unwrap_or_else(|_| {
            tracing::error!("a database write job panicked; its writes were rolled back");
            Err(StorageError::Panicked)
        });
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn finish(self: Box<Self>, committed: Result<(), &str>) {
        let result = match (committed, self.outcome) {
            (Ok(()), Some(outcome)) => outcome,
            // The job's own error says more than the batch's.
            (Err(_), Some(Err(own))) => Err(own),
            (Err(reason), _) => Err(StorageError::TransactionFailed(reason.to_owned())),
            (Ok(()), None) => Err(StorageError::TransactionFailed(
                "the job was not run".to_owned(),
            )),
        };
        self.reply.deliver(result);
    }

    fn refuse(self: Box<Self>, error: StorageError) {
        self.reply.deliver(Err(error));
    }
}

enum Command {
    Job(Box<dyn Job>),
    Close(oneshot::Sender<()>),
}

/// Lazy writes waiting for the writer's next transaction.
#[derive(Default)]
struct LazyQueue {
    jobs: Vec<Box<dyn Job>>,
    /// The writer thread has taken its last batch: later lazy writes are refused, not lost
    /// without a word.
    stopped: bool,
}

impl LazyQueue {
    fn lock(queue: &Mutex<LazyQueue>) -> MutexGuard<'_, LazyQueue> {
        // Pushing and taking cannot leave the vector half-changed.
        queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The handle to the single writer thread. Cheap to clone; the thread stops when
/// [`Writer::close`] is called or every handle is dropped.
#[derive(Clone)]
pub struct Writer {
    commands: mpsc::Sender<Command>,
    /// Writes queued by [`Writer::submit_lazy`]: taken into the writer's next transaction.
    lazy: Arc<Mutex<LazyQueue>>,
}

impl Writer {
    fn spawn(conn: Connection) -> std::io::Result<Writer> {
        let (commands, queue) = mpsc::channel();
        let lazy = Arc::new(Mutex::new(LazyQueue::default()));
        let thread_lazy = Arc::clone(&lazy);
        std::thread::Builder::new()
            .name("imagegate-db-writer".to_owned())
            .spawn(move || run_writer(conn, queue, &thread_lazy))?;
        Ok(Writer { commands, lazy })
    }

    /// Queues `work` to run in the writer's next transaction and returns at once; the
    /// returned future resolves after COMMIT. The job is queued even if that future is never
    /// awaited or is dropped, which is what lets a cancelled caller's write still happen.
    pub fn submit<T, F>(&self, work: F) -> Result<PendingWrite<T>, StorageError>
    where
        F: FnOnce(&Transaction<'_>) -> Result<T, StorageError> + Send + 'static,
        T: Send + 'static,
    {
        let (sender, receiver) = oneshot::channel();
        self.send(Box::new(ClosureJob {
            work: Some(work),
            outcome: None,
            reply: Reply::To(sender),
        }))?;
        Ok(PendingWrite(receiver))
    }

    /// Runs `work` in the writer's transaction and returns its result once committed. If
    /// `work` fails, only its own writes are rolled back; if the transaction fails, every job
    /// in it gets an error and none of their writes happened.
    pub async fn execute<T, F>(&self, work: F) -> Result<T, StorageError>
    where
        F: FnOnce(&Transaction<'_>) -> Result<T, StorageError> + Send + 'static,
        T: Send + 'static,
    {
        self.submit(work)?.await
    }

    /// Queues `work` with nobody waiting for it; a failure is logged with `what`. For
    /// compensating writes from places that cannot await (`Drop`).
    pub fn submit_detached<F>(&self, what: &'static str, work: F) -> Result<(), StorageError>
    where
        F: FnOnce(&Transaction<'_>) -> Result<(), StorageError> + Send + 'static,
    {
        self.send(Box::new(ClosureJob {
            work: Some(work),
            outcome: None,
            reply: Reply::Log(what),
        }))
    }

    /// Queues `work` lazily: nobody waits for it and no thread is woken. It runs in the
    /// writer's next transaction, whatever wakes the writer (a [`submit`](Writer::submit), a
    /// [`flush`](Writer::flush)), or at most [`LAZY_FLUSH`] later, without an fsync of its own
    /// when nothing durable rides with it. Only for writes whose loss in a power cut is
    /// covered by something already durable, like the settlement of a durable reservation
    /// (the next start charges the reservation in full). A failure is logged with `what`,
    /// including a write queued after the writer stopped.
    pub fn submit_lazy<F>(&self, what: &'static str, work: F)
    where
        F: FnOnce(&Transaction<'_>) -> Result<(), StorageError> + Send + 'static,
    {
        self.push_lazy(Box::new(ClosureJob {
            work: Some(work),
            outcome: None,
            reply: Reply::Log(what),
        }));
    }

    /// As [`submit_lazy`](Writer::submit_lazy), then `then` is told the outcome on the
    /// writer thread: `Ok` once committed, `Err` if the write did not happen (the transaction
    /// failed, the job was refused, or the writer had stopped; then `then` runs at once, on the
    /// caller's thread, so the caller must not hold a lock that `then` takes).
    pub fn submit_lazy_then<F, C>(&self, what: &'static str, work: F, then: C)
    where
        F: FnOnce(&Transaction<'_>) -> Result<(), StorageError> + Send + 'static,
        C: FnOnce(Result<(), StorageError>) + Send + 'static,
    {
        self.push_lazy(Box::new(ClosureJob {
            work: Some(work),
            outcome: None,
            reply: Reply::Then(what, Box::new(then)),
        }));
    }

    fn push_lazy(&self, job: Box<dyn Job>) {
        let mut queue = LazyQueue::lock(&self.lazy);
        if queue.stopped {
            drop(queue);
            job.refuse(StorageError::WriterStopped);
        } else {
            queue.jobs.push(job);
        }
    }

    /// Returns once every write queued before this call, lazy ones included, is committed:
    /// for readers that must see them. (Committed as each write asked: an earlier lazy write
    /// may still be waiting for its fsync, since an empty transaction writes nothing to sync.)
    pub async fn flush(&self) -> Result<(), StorageError> {
        self.execute(|_tx| Ok(())).await
    }

    /// Finishes every job queued before this call, closes the connection (checkpointing the
    /// WAL) and stops the thread. Later writes fail with [`StorageError::WriterStopped`].
    pub async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.commands.send(Command::Close(ack)).is_ok() {
            let _ = done.await;
        }
    }

    fn send(&self, job: Box<dyn Job>) -> Result<(), StorageError> {
        self.commands
            .send(Command::Job(job))
            .map_err(|_| StorageError::WriterStopped)
    }
}

/// A write queued on the [`Writer`]; resolves once its transaction committed (or failed).
#[must_use = "the write happens anyway, but its outcome is only known by awaiting this"]
pub struct PendingWrite<T>(oneshot::Receiver<Result<T, StorageError>>);

impl<T> Future for PendingWrite<T> {
    type Output = Result<T, StorageError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(StorageError::WriterStopped)))
    }
}

/// The writer thread: wait for a job (at most [`LAZY_FLUSH`], then look for lazy writes),
/// take whatever is queued and the lazy writes, run them in one transaction, answer everyone,
/// repeat.
fn run_writer(conn: Connection, queue: mpsc::Receiver<Command>, lazy: &Mutex<LazyQueue>) {
    let mut conn = conn;
    let mut sync = SyncMode::Full;
    let mut close_ack = None;
    let take_lazy = || std::mem::take(&mut LazyQueue::lock(lazy).jobs);
    while close_ack.is_none() {
        let first = match queue.recv_timeout(LAZY_FLUSH) {
            Ok(command) => Some(command),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break, // every handle dropped
        };
        let lazy_only = first.is_none();
        let mut batch = Vec::new();
        let mut next = first;
        while let Some(command) = next.take() {
            match command {
                Command::Job(job) => batch.push(job),
                Command::Close(ack) => {
                    close_ack = Some(ack);
                    break;
                }
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
            next = queue.try_recv().ok();
        }
        // Taken after the commands, so every lazy write queued before any of them is in this
        // batch: that is what a flush promises. Ahead of them, in the order they were queued.
        let mut lazy_jobs = take_lazy();
        if !lazy_jobs.is_empty() {
            lazy_jobs.append(&mut batch);
            batch = lazy_jobs;
        }
        if !batch.is_empty() {
            let wanted = if lazy_only {
                SyncMode::Normal
            } else {
                SyncMode::Full
            };
            run_synced(&mut conn, &mut sync, wanted, batch);
        }
    }
    // Lazy writes queued after the last batch (or when every handle was dropped); later ones
    // are refused by `push_lazy`.
    let rest = {
        let mut queue = LazyQueue::lock(lazy);
        queue.stopped = true;
        std::mem::take(&mut queue.jobs)
    };
    if !rest.is_empty() {
        run_synced(&mut conn, &mut sync, SyncMode::Full, rest);
    }
    if close_ack.is_some() {
        // Graceful stop: fold the WAL into the main file now, since the read connection may
        // outlive this one and a read-only connection never checkpoints. Best effort: the
        // WAL is durable either way and the next open replays it.
        let checkpoint = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        if let Err(e) = checkpoint {
            tracing::warn!(error = %e, "checkpointing the database at shutdown failed");
        }
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the database write connection failed");
    }
    if let Some(ack) = close_ack {
        let _ = ack.send(());
    }
}

/// The write connection's `synchronous` setting. FULL fsyncs the WAL at every commit; NORMAL
/// leaves the commit in the OS's cache until the next FULL commit or checkpoint syncs the file
/// (WAL frames are appended in order, so that sync covers every earlier commit too).
#[derive(Clone, Copy, PartialEq, Eq)]
enum SyncMode {
    Full,
    Normal,
}

/// Runs `batch` with `wanted` durability. A batch that needs FULL is refused (every job gets
/// an error) if the connection cannot be switched back to it: a caller told "durable" must be.
/// Failing to switch to NORMAL only leaves the connection on FULL, which is safe.
fn run_synced(
    conn: &mut Connection,
    current: &mut SyncMode,
    wanted: SyncMode,
    batch: Vec<Box<dyn Job>>,
) {
    if *current != wanted {
        let value = match wanted {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        };
        match conn.pragma_update(None, "synchronous", value) {
            Ok(()) => *current = wanted,
            Err(e) => {
                tracing::error!(error = %e, value, "could not set the database's synchronous mode");
                if wanted == SyncMode::Full {
                    let reason = format!("cannot make the write durable: {e}");
                    for job in batch {
                        job.finish(Err(&reason));
                    }
                    return;
                }
            }
        }
    }
    apply_batch(conn, batch);
}

fn apply_batch(conn: &mut Connection, mut batch: Vec<Box<dyn Job>>) {
    let failure = match run_batch(conn, &mut batch) {
        Ok(()) => None,
        Err(e) => {
            tracing::error!(
                error = %e,
                jobs = batch.len(),
                "database write transaction failed; every write in it is refused"
            );
            Some(e.to_string())
        }
    };
    for job in batch {
        job.finish(failure.as_deref().map_or(Ok(()), Err));
    }
}

fn run_batch(conn: &mut Connection, batch: &mut [Box<dyn Job>]) -> rusqlite::Result<()> {
    // IMMEDIATE takes the write lock up front, so contention shows up (after busy_timeout)
    // before any work is done rather than at COMMIT.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for job in batch.iter_mut() {
        // One savepoint per job: a job that fails takes only its own writes back.
        tx.prepare_cached("SAVEPOINT job")?.execute([])?;
        if job.run(&tx) {
            tx.prepare_cached("RELEASE job")?.execute([])?;
        } else {
            tx.execute_batch("ROLLBACK TO job; RELEASE job")?;
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_gateway_on_the_same_file_is_refused_until_the_first_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("imagegate.db");
        let first = Database::open(&path).unwrap();
        let err = Database::open(&path)
            .expect_err("second open refused")
            .to_string();
        assert!(err.contains("another imagegate process"), "{err}");
        // Readers (`imagegate usage`) do not take the lock.
        Reader::open_existing(&path)
            .await
            .expect("a reader opens while the gateway holds the lock");
        drop(first);
        Database::open(&path).expect("free again once the first is dropped");
    }

    fn count(conn: &Connection) -> Result<i64, StorageError> {
        Ok(conn.query_row("SELECT COUNT(*) FROM usage_daily", [], |r| r.get(0))?)
    }

    fn insert(tx: &Transaction<'_>, client: &str) -> Result<(), StorageError> {
        tx.execute(
            "INSERT INTO usage_daily (client, day, model, size, quality) VALUES (?1, '2026-11-25', 'm', 's', 'q')",
            [client],
        )?;
        Ok(())
    }

    #[tokio::test]
    async fn open_creates_directory_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/deeper/imagegate.db");
        let db = Database::open(&path).unwrap();
        assert!(path.exists());
        db.writer().execute(|tx| insert(tx, "a")).await.unwrap();
        assert_eq!(db.reader().read(count).await.unwrap(), 1);
        db.writer().close().await;
    }

    #[tokio::test]
    async fn reopening_is_idempotent_and_keeps_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let db = Database::open(&path).unwrap();
        db.writer().execute(|tx| insert(tx, "a")).await.unwrap();
        db.writer().close().await;
        drop(db);
        for _ in 0..2 {
            let db = Database::open(&path).unwrap();
            assert_eq!(db.reader().read(count).await.unwrap(), 1);
            let version: i64 = db
                .reader()
                .read(|c| Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?))
                .await
                .unwrap();
            assert_eq!(version, schema_version());
            db.writer().close().await;
        }
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = Database::open(&path).unwrap_err();
        assert!(matches!(err, StorageError::SchemaTooNew { found: 99, .. }));
        let message = err.to_string();
        assert!(
            message.contains("schema version 99") && message.contains("newer"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn an_existing_file_can_be_read_without_writing_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        assert!(Reader::open_existing(&path).await.is_err());
        assert!(!path.exists(), "a read-only open must not create the file");
        let db = Database::open_async(&path).await.unwrap();
        db.writer().execute(|tx| insert(tx, "a")).await.unwrap();
        // While the writer is open, and after it closed and the WAL was folded in.
        let live = Reader::open_existing(&path).await.unwrap();
        assert_eq!(live.read(count).await.unwrap(), 1);
        db.writer().close().await;
        drop((db, live));
        let after = Reader::open_existing(&path).await.unwrap();
        assert_eq!(after.read(count).await.unwrap(), 1);
        let written = after.read(|c| Ok(insert_via(c)?)).await;
        assert!(written.is_err(), "the reader must not be able to write");
    }

    fn insert_via(conn: &Connection) -> rusqlite::Result<usize> {
        conn.execute(
            "INSERT INTO usage_daily (client, day, model, size, quality) VALUES ('x', '2026-11-25', 'm', 's', 'q')",
            [],
        )
    }

    #[tokio::test]
    async fn a_failing_job_rolls_back_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(&dir.path().join("db.sqlite")).unwrap();
        let writer = db.writer().clone();
        // Queue several at once so they share a transaction.
        let ok_a = writer.submit(|tx| insert(tx, "a")).unwrap();
        let bad = writer
            .submit(|tx| {
                insert(tx, "half-done")?;
                insert(tx, "a-duplicate-of-itself")?;
                insert(tx, "a-duplicate-of-itself")
            })
            .unwrap();
        let ok_b = writer.submit(|tx| insert(tx, "b")).unwrap();
        assert!(ok_a.await.is_ok());
        assert!(matches!(bad.await, Err(StorageError::Sqlite(_))));
        assert!(ok_b.await.is_ok());
        assert_eq!(db.reader().read(count).await.unwrap(), 2);
        writer.close().await;
    }

    #[tokio::test]
    async fn a_panicking_job_does_not_stop_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(&dir.path().join("db.sqlite")).unwrap();
        let panicked = db
            .writer()
            .execute(|_tx| -> Result<(), StorageError> { panic!("job bug") })
            .await;
        assert!(matches!(panicked, Err(StorageError::Panicked)));
        db.writer().execute(|tx| insert(tx, "a")).await.unwrap();
        assert_eq!(db.reader().read(count).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_lazy_write_rides_with_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(&dir.path().join("db.sqlite")).unwrap();
        let writer = db.writer().clone();
        writer.submit_lazy("test", |tx| insert(tx, "lazy"));
        // Riding along: committed by the time a later write's commit is acknowledged.
        writer.execute(|tx| insert(tx, "eager")).await.unwrap();
        assert_eq!(db.reader().read(count).await.unwrap(), 2);
        // `flush` is such a write.
        writer.submit_lazy("test", |tx| insert(tx, "lazy-2"));
        writer.flush().await.unwrap();
        assert_eq!(db.reader().read(count).await.unwrap(), 3);
        writer.close().await;
    }

    #[tokio::test]
    async fn a_lazy_write_alone_is_written_within_the_flush_interval_and_at_close() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(&dir.path().join("db.sqlite")).unwrap();
        let writer = db.writer().clone();
        writer.submit_lazy("test", |tx| insert(tx, "lazy"));
        let deadline = std::time::Instant::now() + LAZY_FLUSH * 20;
        while db.reader().read(count).await.unwrap() < 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "lazy write never landed"
            );
            tokio::time::sleep(LAZY_FLUSH / 4).await;
        }
        // A durable write after a lazy-only (NORMAL) batch: the connection is back on FULL.
        writer.execute(|tx| insert(tx, "eager")).await.unwrap();
        let sync: i64 = writer
            .execute(|tx| Ok(tx.pragma_query_value(None, "synchronous", |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(sync, 2, "synchronous=FULL for awaited writes");
        // Queued right before close: written by the close.
        writer.submit_lazy("test", |tx| insert(tx, "at-close"));
        writer.close().await;
        drop(db);
        let after = Reader::open_existing(&dir.path().join("db.sqlite"))
            .await
            .unwrap();
        assert_eq!(after.read(count).await.unwrap(), 3);
    }

    #[tokio::test]
    async fn writes_after_close_fail_instead_of_vanishing() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(&dir.path().join("db.sqlite")).unwrap();
        db.writer().close().await;
        let err = db.writer().execute(|tx| insert(tx, "a")).await.unwrap_err();
        assert!(matches!(err, StorageError::WriterStopped), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_covers_every_lazy_write_queued_before_it_even_with_commands_racing() {
        // The writer used to take the lazy writes right after waking and drain the channel
        // after: a flush drained in that pass could be answered before a lazy write queued
        // just ahead of it (about 2 in 1 000 here). Other writers keep the channel busy.
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(&dir.path().join("db.sqlite")).unwrap();
        let writer = db.writer().clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy: Vec<_> = (0..4)
            .map(|_| {
                let (writer, stop) = (writer.clone(), Arc::clone(&stop));
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        writer.flush().await.unwrap();
                    }
                })
            })
            .collect();
        for i in 0..3_000_i64 {
            writer.submit_lazy("test", move |tx| insert(tx, &format!("lazy-{i}")));
            writer.flush().await.unwrap();
            assert_eq!(db.reader().read(count).await.unwrap(), i + 1, "write {i}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for task in busy {
            task.await.unwrap();
        }
        writer.close().await;
    }

    #[tokio::test]
    async fn a_lazy_write_after_the_writer_stopped_is_refused_and_its_callback_told() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(&dir.path().join("db.sqlite")).unwrap();
        let writer = db.writer().clone();
        let (told, outcome) = std::sync::mpsc::channel();
        let told_ok = told.clone();
        writer.submit_lazy_then(
            "test",
            |tx| insert(tx, "before"),
            move |r| told_ok.send(r.is_ok()).unwrap(),
        );
        writer.close().await;
        assert_eq!(
            outcome.try_recv(),
            Ok(true),
            "written and told by the close"
        );
        writer.submit_lazy_then(
            "test",
            |tx| insert(tx, "after"),
            move |r| {
                told.send(matches!(r, Err(StorageError::WriterStopped)))
                    .unwrap()
            },
        );
        assert_eq!(
            outcome.try_recv(),
            Ok(true),
            "refused at once, not queued forever"
        );
    }
}
