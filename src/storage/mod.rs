//! Durable storage backends, shared by the usage ledger and the task store.
//!
//! [`sqlite`] is the embedded default: one file, one writer thread with group commit, a
//! read-only connection for reports, and the ordered schema migrations of the whole file. The
//! shared Redis backend will live beside it and implement the domain traits
//! ([`crate::usage::LedgerStore`]) directly.
//!
//! This module owns connections, transactions and the schema; it must not make domain
//! decisions (quotas, task states): those belong to the modules that call
//! [`sqlite::Writer::execute`] with their own SQL.

pub mod sqlite;

pub use sqlite::{Database, PendingWrite, Reader, Writer};

/// Why a storage operation failed. Messages may name files and SQLite errors: they are for
/// operators' logs, never for clients.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot open database {path}: {reason}")]
    Open { path: String, reason: String },
    #[error(
        "database {path} has schema version {found}, newer than this build knows ({known}); refusing to start rather than misread it (run the newer imagegate, or restore a backup)"
    )]
    SchemaTooNew {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The group transaction this write was part of did not commit, so nothing of it is on
    /// disk; `reason` is the error of the failing statement or of COMMIT.
    #[error("write transaction failed: {0}")]
    TransactionFailed(String),
    #[error("the database writer has stopped")]
    WriterStopped,
    #[error("a storage job panicked")]
    Panicked,
    /// Stored data that this build cannot interpret (e.g. a malformed day).
    #[error("unexpected stored data: {0}")]
    Corrupt(String),
}
