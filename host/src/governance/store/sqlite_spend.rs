//! SQLite's spend writer: one connection on a thread of its own, holding its inserts prepared.
//!
//! Spend rows are the one write every call makes. Through sqlx each row cost over half as much
//! again as SQLite's own insert of it (each value copied into an argument list on its way to a
//! connection worker, every binding cleared after each statement); here a row's values are bound
//! straight from the batch into statements that stay prepared for the connection's life. **A batch is written in one transaction, all or
//! nothing**, exactly as on Postgres, and the SQL is the same text both engines read.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Statement};
use tokio::sync::oneshot;

use super::{
    delta_sql, delta_values, insert_spend_sql, spend_row_values, Placeholders, SpendBatch,
    SpendRow, SpendValue, StoreError, SPEND_LOG_COLUMNS, SQLITE_INSERT_ROWS,
};

/// As long as sqlx's connections wait for a lock held by another writer.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle on the writer thread; it ends when every handle is dropped or one closes it.
#[derive(Debug, Clone)]
pub(super) struct SqliteSpendWriter {
    jobs: mpsc::Sender<Job>,
}

enum Job {
    Write {
        batch: Arc<SpendBatch>,
        done: oneshot::Sender<rusqlite::Result<()>>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

impl SqliteSpendWriter {
    /// Opens `file`, already created and migrated, and prepares the inserts; an error in either
    /// is the store's error to open.
    pub(super) async fn open(file: PathBuf) -> Result<SqliteSpendWriter, StoreError> {
        let (jobs, queue) = mpsc::channel();
        let (opened, open_result) = oneshot::channel();
        std::thread::Builder::new()
            .name("portcullis-spend".to_owned())
            .spawn(move || run(&file, opened, &queue))
            .map_err(StoreError::SpendThread)?;
        open_result
            .await
            .map_err(|_| StoreError::SpendWriterGone)??;
        Ok(SqliteSpendWriter { jobs })
    }

    pub(super) async fn write(&self, batch: Arc<SpendBatch>) -> Result<(), StoreError> {
        let (done, result) = oneshot::channel();
        self.jobs
            .send(Job::Write { batch, done })
            .map_err(|_| StoreError::SpendWriterGone)?;
        Ok(result.await.map_err(|_| StoreError::SpendWriterGone)??)
    }

    /// Closes the connection, after any write already sent.
    pub(super) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.jobs.send(Job::Close { done }).is_ok() {
            let _ = closed.await;
        }
    }
}

fn run(
    file: &std::path::Path,
    opened: oneshot::Sender<rusqlite::Result<()>>,
    queue: &mpsc::Receiver<Job>,
) {
    let connection = match connect(file) {
        Ok(connection) => connection,
        Err(error) => {
            let _ = opened.send(Err(error));
            return;
        }
    };
    let closing = {
        let mut inserts = match prepare_inserts(&connection) {
            Ok(inserts) => inserts,
            Err(error) => {
                let _ = opened.send(Err(error));
                return;
            }
        };
        let _ = opened.send(Ok(()));
        serve(&connection, &mut inserts, queue)
    };
    // Closed before the closer hears of it, so a shutdown leaves no connection behind.
    drop(connection);
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

fn connect(file: &std::path::Path) -> rusqlite::Result<Connection> {
    let connection = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.busy_timeout(BUSY_TIMEOUT)?;
    Ok(connection)
}

/// One insert per size in [`SQLITE_INSERT_ROWS`], in its order.
fn prepare_inserts(connection: &Connection) -> rusqlite::Result<Vec<Statement<'_>>> {
    SQLITE_INSERT_ROWS
        .iter()
        .map(|&rows| connection.prepare(&insert_spend_sql(rows, Placeholders::Anonymous)))
        .collect()
}

/// Writes until told to close (the closer is returned) or every handle is gone.
fn serve(
    connection: &Connection,
    inserts: &mut [Statement<'_>],
    queue: &mpsc::Receiver<Job>,
) -> Option<oneshot::Sender<()>> {
    while let Ok(job) = queue.recv() {
        match job {
            Job::Write { batch, done } => {
                let result = write(connection, inserts, &batch);
                // The caller takes its batch back whole on failure.
                drop(batch);
                let _ = done.send(result);
            }
            Job::Close { done } => return Some(done),
        }
    }
    None
}

fn write(
    connection: &Connection,
    inserts: &mut [Statement<'_>],
    batch: &SpendBatch,
) -> rusqlite::Result<()> {
    // IMMEDIATE takes the write lock now, so a busy database is waited for here and not
    // half-way through the batch.
    connection.execute_batch("BEGIN IMMEDIATE")?;
    let written = insert_rows(inserts, &batch.rows)
        .and_then(|()| add_deltas(connection, batch))
        .and_then(|()| connection.execute_batch("COMMIT"));
    if written.is_err() {
        let _ = connection.execute_batch("ROLLBACK");
    }
    written
}

/// `rows` as a few statements of the prepared sizes, largest first.
fn insert_rows(inserts: &mut [Statement<'_>], mut rows: &[SpendRow]) -> rusqlite::Result<()> {
    while let Some(size) = SQLITE_INSERT_ROWS.iter().position(|&n| n <= rows.len()) {
        let (chunk, rest) = rows.split_at(SQLITE_INSERT_ROWS[size]);
        let insert = &mut inserts[size];
        for (i, row) in chunk.iter().enumerate() {
            bind_row(insert, i * SPEND_LOG_COLUMNS.len(), row)?;
        }
        insert.raw_execute()?;
        rows = rest;
    }
    Ok(())
}

/// Binds `row` after the first `before` parameters.
fn bind_row(insert: &mut Statement<'_>, before: usize, row: &SpendRow) -> rusqlite::Result<()> {
    for (i, value) in spend_row_values(row).into_iter().enumerate() {
        let index = before + i + 1;
        match value {
            SpendValue::Text(text) => insert.raw_bind_parameter(index, text)?,
            SpendValue::Real(real) => insert.raw_bind_parameter(index, real)?,
            SpendValue::Integer(integer) => insert.raw_bind_parameter(index, integer)?,
        }
    }
    Ok(())
}

fn add_deltas(connection: &Connection, batch: &SpendBatch) -> rusqlite::Result<()> {
    for delta in &batch.deltas {
        // `$1`, `$2`, `$3` first appear in that order, so they bind by position.
        connection.execute(&delta_sql(delta), delta_values(delta))?;
    }
    Ok(())
}
