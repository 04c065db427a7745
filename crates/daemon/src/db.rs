//! Durable state in embedded SQLite (WAL, `synchronous=FULL`): every cell and exec session the
//! daemon knows, so a restarted daemon finds them all. A create's idempotency key is unique per
//! client, so a retried create can never make two cells.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

/// The schema; each statement is idempotent.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cells (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    image TEXT NOT NULL,
    cpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    idle_timeout_secs INTEGER NOT NULL,
    idempotency_key TEXT,
    created_ms INTEGER NOT NULL,
    last_active_ms INTEGER NOT NULL,
    request TEXT NOT NULL,
    supervisor_pid INTEGER,
    vmm_pid INTEGER,
    launch_digest TEXT,
    boot_ms INTEGER,
    outcome TEXT,
    exit_receipt TEXT,
    error TEXT,
    UNIQUE (owner, idempotency_key)
);
CREATE TABLE IF NOT EXISTS sessions (
    cell TEXT NOT NULL,
    id INTEGER NOT NULL,
    program TEXT NOT NULL,
    tty INTEGER NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    signal INTEGER,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    PRIMARY KEY (cell, id)
);
";

/// A cell's row.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CellRow {
    /// The cell's id.
    pub id: String,
    /// The client that created it.
    pub owner: String,
    /// `creating`, `running`, `deleting`, `ended` or `failed`.
    pub state: String,
    /// The image as the client named it.
    pub image: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Seconds without activity after which the cell is deleted (0: never).
    pub idle_timeout_secs: u64,
    /// When it was asked for (ms since the epoch).
    pub created_ms: u64,
    /// Its last API activity (ms since the epoch).
    pub last_active_ms: u64,
    /// The launch digest, once admitted.
    pub launch_digest: Option<String>,
    /// The VMM's pid on this host while it runs.
    pub vmm_pid: Option<u32>,
    /// Boot time to the agent's hello, ms.
    pub boot_ms: Option<u64>,
    /// How it ended.
    pub outcome: Option<String>,
    /// Its signed exit receipt.
    pub exit_receipt: Option<String>,
    /// Why it failed to start.
    pub error: Option<String>,
    /// The supervisor's pid (not shown to clients).
    #[serde(skip)]
    pub supervisor_pid: Option<u32>,
    /// The create request (not shown to clients).
    #[serde(skip)]
    pub request: String,
}

/// An exec session's row.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionRow {
    /// The cell.
    pub cell: String,
    /// The session's id in the cell.
    pub id: u64,
    /// The program.
    pub program: String,
    /// Whether it has a terminal.
    pub tty: bool,
    /// `running`, `exited` or `lost` (its cell ended first).
    pub state: String,
    /// Its exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// When it started (ms since the epoch).
    pub started_ms: u64,
    /// When it ended.
    pub ended_ms: Option<u64>,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The database; clones share one connection (SQLite serialises writers anyway).
#[derive(Clone)]
pub struct Db(Arc<Mutex<Connection>>);

/// A database failure.
pub type DbResult<T> = Result<T, rusqlite::Error>;

const CELL_COLUMNS: &str = "id, owner, state, image, cpus, memory_mib, idle_timeout_secs, created_ms, \
     last_active_ms, launch_digest, vmm_pid, boot_ms, outcome, exit_receipt, error, supervisor_pid, request";

fn cell_row(r: &rusqlite::Row<'_>) -> DbResult<CellRow> {
    Ok(CellRow {
        id: r.get(0)?,
        owner: r.get(1)?,
        state: r.get(2)?,
        image: r.get(3)?,
        cpus: r.get(4)?,
        memory_mib: r.get(5)?,
        idle_timeout_secs: r.get(6)?,
        created_ms: r.get(7)?,
        last_active_ms: r.get(8)?,
        launch_digest: r.get(9)?,
        vmm_pid: r.get(10)?,
        boot_ms: r.get(11)?,
        outcome: r.get(12)?,
        exit_receipt: r.get(13)?,
        error: r.get(14)?,
        supervisor_pid: r.get(15)?,
        request: r.get(16)?,
    })
}

fn session_row(r: &rusqlite::Row<'_>) -> DbResult<SessionRow> {
    Ok(SessionRow {
        cell: r.get(0)?,
        id: r.get(1)?,
        program: r.get(2)?,
        tty: r.get(3)?,
        state: r.get(4)?,
        exit_code: r.get(5)?,
        signal: r.get(6)?,
        started_ms: r.get(7)?,
        ended_ms: r.get(8)?,
    })
}

/// What a new cell takes from the host, for the capacity check.
pub struct Claim<'a> {
    /// The row to insert.
    pub row: &'a CellRow,
    /// Its idempotency key.
    pub idempotency_key: Option<&'a str>,
    /// Most guest memory all live cells together may have, MiB.
    pub memory_limit_mib: u64,
    /// Most vCPUs all live cells together may have.
    pub cpu_limit: u64,
}

/// The outcome of [`Db::claim`].
pub enum Claimed {
    /// The row was inserted.
    New,
    /// The same client made this create before: that cell.
    Existing(Box<CellRow>),
    /// It does not fit: (memory in use, vCPUs in use).
    Full(u64, u64),
}

impl Db {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> DbResult<Db> {
        let c = Connection::open(path)?;
        c.pragma_update(None, "journal_mode", "WAL")?;
        c.pragma_update(None, "synchronous", "FULL")?;
        c.busy_timeout(std::time::Duration::from_secs(10))?;
        c.execute_batch(SCHEMA)?;
        Ok(Db(Arc::new(Mutex::new(c))))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> DbResult<T>) -> DbResult<T> {
        let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c)
    }

    /// Inserts a new cell if the client has not made this create before and it fits: the
    /// check and the insert are one transaction, so concurrent creates never overcommit.
    pub fn claim(&self, claim: &Claim<'_>) -> DbResult<Claimed> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if let Some(key) = claim.idempotency_key {
                let existing = tx
                    .query_row(
                        &format!(
                            "SELECT {CELL_COLUMNS} FROM cells WHERE owner = ?1 AND idempotency_key = ?2"
                        ),
                        params![claim.row.owner, key],
                        cell_row,
                    )
                    .optional()?;
                if let Some(row) = existing {
                    return Ok(Claimed::Existing(Box::new(row)));
                }
            }
            let (memory, cpus): (u64, u64) = tx.query_row(
                "SELECT COALESCE(SUM(memory_mib), 0), COALESCE(SUM(cpus), 0) FROM cells \
                 WHERE state IN ('creating', 'running', 'deleting')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let row = claim.row;
            if memory + row.memory_mib > claim.memory_limit_mib
                || cpus + u64::from(row.cpus) > claim.cpu_limit
            {
                return Ok(Claimed::Full(memory, cpus));
            }
            tx.execute(
                "INSERT INTO cells (id, owner, state, image, cpus, memory_mib, idle_timeout_secs, \
                 idempotency_key, created_ms, last_active_ms, request) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10)",
                params![
                    row.id,
                    row.owner,
                    row.state,
                    row.image,
                    row.cpus,
                    row.memory_mib,
                    row.idle_timeout_secs,
                    claim.idempotency_key,
                    row.created_ms,
                    row.request
                ],
            )?;
            tx.commit()?;
            Ok(Claimed::New)
        })
    }

    /// One cell.
    pub fn cell(&self, id: &str) -> DbResult<Option<CellRow>> {
        self.with(|c| {
            c.query_row(&format!("SELECT {CELL_COLUMNS} FROM cells WHERE id = ?1"), [id], cell_row)
                .optional()
        })
    }

    /// Cells, newest first: those of `owner`, or all.
    pub fn cells(&self, owner: Option<&str>) -> DbResult<Vec<CellRow>> {
        self.with(|c| {
            let sql = format!(
                "SELECT {CELL_COLUMNS} FROM cells WHERE (?1 IS NULL OR owner = ?1) ORDER BY created_ms DESC"
            );
            let mut st = c.prepare(&sql)?;
            let rows = st.query_map([owner], cell_row)?;
            rows.collect()
        })
    }

    /// Cells in one of `states`.
    pub fn cells_in(&self, states: &[&str]) -> DbResult<Vec<CellRow>> {
        Ok(self.cells(None)?.into_iter().filter(|c| states.contains(&c.state.as_str())).collect())
    }

    /// The cell came up.
    pub fn set_running(
        &self,
        id: &str,
        supervisor_pid: Option<u32>,
        vmm_pid: Option<u32>,
        launch_digest: &str,
        boot_ms: u64,
    ) -> DbResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE cells SET state = 'running', supervisor_pid = ?2, vmm_pid = ?3, \
                 launch_digest = ?4, boot_ms = ?5 WHERE id = ?1",
                params![id, supervisor_pid, vmm_pid, launch_digest, boot_ms],
            )
            .map(drop)
        })
    }

    /// Records the supervisor's pid as soon as it exists.
    pub fn set_supervisor(&self, id: &str, pid: Option<u32>) -> DbResult<()> {
        self.with(|c| {
            c.execute("UPDATE cells SET supervisor_pid = ?2 WHERE id = ?1", params![id, pid])
                .map(drop)
        })
    }

    /// Moves a cell to `state` (only from a state that is not final).
    pub fn set_state(&self, id: &str, state: &str) -> DbResult<bool> {
        self.with(|c| {
            c.execute(
                "UPDATE cells SET state = ?2 WHERE id = ?1 AND state NOT IN ('ended', 'failed')",
                params![id, state],
            )
            .map(|n| n > 0)
        })
    }

    /// The cell did not start.
    pub fn set_failed(&self, id: &str, error: &str) -> DbResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE cells SET state = 'failed', error = ?2 WHERE id = ?1",
                params![id, error],
            )?;
            c.execute(
                "UPDATE sessions SET state = 'lost' WHERE cell = ?1 AND state = 'running'",
                [id],
            )
            .map(drop)
        })
    }

    /// The cell ended; sessions still marked running were lost with it. False if it had
    /// already been recorded as ended.
    pub fn set_ended(&self, id: &str, outcome: &str, exit_receipt: Option<&str>) -> DbResult<bool> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE cells SET state = 'ended', outcome = ?2, exit_receipt = ?3, vmm_pid = NULL \
                 WHERE id = ?1 AND state NOT IN ('ended', 'failed')",
                params![id, outcome, exit_receipt],
            )?;
            c.execute(
                "UPDATE sessions SET state = 'lost', ended_ms = ?2 WHERE cell = ?1 AND state = 'running'",
                params![id, now_ms()],
            )?;
            Ok(n > 0)
        })
    }

    /// Notes API activity on a cell (for its idle timeout).
    pub fn touch(&self, id: &str) -> DbResult<()> {
        self.with(|c| {
            c.execute("UPDATE cells SET last_active_ms = ?2 WHERE id = ?1", params![id, now_ms()])
                .map(drop)
        })
    }

    /// A new session in `cell`; returns its id.
    pub fn new_session(&self, cell: &str, program: &str, tty: bool) -> DbResult<u64> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let id: u64 = tx.query_row(
                "SELECT COALESCE(MAX(id), 0) + 1 FROM sessions WHERE cell = ?1",
                [cell],
                |r| r.get(0),
            )?;
            tx.execute(
                "INSERT INTO sessions (cell, id, program, tty, state, started_ms) \
                 VALUES (?1, ?2, ?3, ?4, 'running', ?5)",
                params![cell, id, program, tty, now_ms()],
            )?;
            tx.execute(
                "UPDATE cells SET last_active_ms = ?2 WHERE id = ?1",
                params![cell, now_ms()],
            )?;
            tx.commit()?;
            Ok(id)
        })
    }

    /// A session ended.
    pub fn session_ended(
        &self,
        cell: &str,
        id: u64,
        exit_code: Option<i32>,
        signal: Option<i32>,
    ) -> DbResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE sessions SET state = 'exited', exit_code = ?3, signal = ?4, ended_ms = ?5 \
                 WHERE cell = ?1 AND id = ?2 AND state = 'running'",
                params![cell, id, exit_code, signal, now_ms()],
            )?;
            c.execute("UPDATE cells SET last_active_ms = ?2 WHERE id = ?1", params![cell, now_ms()])
                .map(drop)
        })
    }

    /// One session.
    pub fn session(&self, cell: &str, id: u64) -> DbResult<Option<SessionRow>> {
        self.with(|c| {
            c.query_row(
                "SELECT cell, id, program, tty, state, exit_code, signal, started_ms, ended_ms \
                 FROM sessions WHERE cell = ?1 AND id = ?2",
                params![cell, id],
                session_row,
            )
            .optional()
        })
    }

    /// The sessions of `cell` (all cells if `None`) in `state` (any if `None`).
    pub fn sessions(&self, cell: Option<&str>, state: Option<&str>) -> DbResult<Vec<SessionRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT cell, id, program, tty, state, exit_code, signal, started_ms, ended_ms \
                 FROM sessions WHERE (?1 IS NULL OR cell = ?1) AND (?2 IS NULL OR state = ?2) \
                 ORDER BY cell, id",
            )?;
            let rows = st.query_map(params![cell, state], session_row)?;
            rows.collect()
        })
    }

    /// Live sessions of `cell`.
    pub fn running_sessions(&self, cell: &str) -> DbResult<u64> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM sessions WHERE cell = ?1 AND state = 'running'",
                [cell],
                |r| r.get(0),
            )
        })
    }
}
