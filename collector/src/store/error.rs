//! Storage errors, classified for the ack decision.

/// A storage failure, classified for the ack decision.
///
/// The classification decides between "store nothing, retry later" and "isolate the
/// samples PostgreSQL refuses and dead-letter them": a data error taken for an outage holds
/// the whole queue hostage, an outage taken for a data error dead-letters good samples.
/// Classes of SQLSTATE (PostgreSQL's appendix A):
///
/// | class | meaning | here |
/// |---|---|---|
/// | 08, 53, 57, 58, XX, no SQLSTATE (I/O, pool) | connection, resources, shutdown, system | [`Transient`](StoreError::Transient) |
/// | 42 | syntax, undefined table, permission: the schema or the role, not a sample | [`Transient`](StoreError::Transient) (an operator must act; retried, `/health` says so) |
/// | 40, 55, 25 | deadlock, serialization, lock not available, aborted transaction | [`Contended`](StoreError::Contended): retried; if it repeats on the same samples while the database answers, they are isolated |
/// | anything else (22 data, 23 integrity, 54 limits, …) | the data | [`Permanent`](StoreError::Permanent) |
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data itself is unacceptable: retrying cannot help; the offending samples are
    /// isolated and go to the dead-letter queue.
    #[error("rejected by the database: {0}")]
    Permanent(sqlx::Error),
    /// Connection lost, database down, timeouts, a broken schema: retry later, ack nothing.
    #[error("database unavailable: {0}")]
    Transient(sqlx::Error),
    /// A conflict with another transaction: retry; repeated on the same samples while the
    /// database answers other queries, the samples are the cause.
    #[error("conflict with another transaction: {0}")]
    Contended(sqlx::Error),
    /// A sample PostgreSQL could not hold, found before asking it (e.g. a day outside the
    /// years partitions can be named for).
    #[error("rejected before writing: {0}")]
    Refused(String),
}

impl StoreError {
    /// The SQLSTATE of the database's answer, if it gave one.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            StoreError::Permanent(e) | StoreError::Transient(e) | StoreError::Contended(e) => {
                match e {
                    sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
                    _ => None,
                }
            }
            StoreError::Refused(_) => None,
        }
    }

    /// Whether the samples are at fault (never for an outage).
    pub fn is_data(&self) -> bool {
        matches!(self, StoreError::Permanent(_) | StoreError::Refused(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let class = match &e {
            sqlx::Error::Database(db) => db.code().map(|c| c.chars().take(2).collect::<String>()),
            sqlx::Error::Encode(_) | sqlx::Error::TypeNotFound { .. } => {
                return StoreError::Permanent(e);
            }
            _ => None,
        };
        match class.as_deref() {
            None | Some("08" | "53" | "57" | "58" | "XX" | "42") => StoreError::Transient(e),
            Some("40" | "55" | "25") => StoreError::Contended(e),
            Some(_) => StoreError::Permanent(e),
        }
    }
}

/// SQLSTATE 23505.
pub(super) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}
