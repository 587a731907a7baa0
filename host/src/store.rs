//! The `store` import on SQLite: one table of ordered keys, WAL journal.
//!
//! The table has a rowid (and an index on the key): a chunk of a hundred events is a row of
//! about 40 KB, which a rowid table keeps as a page in its leaf and a chain of overflow pages,
//! where a `WITHOUT ROWID` table, whose rows live in an index tree with small cells, needs more
//! pages and costs about half as much CPU again per event. Stores created by earlier builds keep
//! their `WITHOUT ROWID` table; both work alike.
//!
//! Every commit is one SQLite transaction, so it is atomic. Durability is grouped: commits are
//! written to the WAL without waiting for the disk (`synchronous=NORMAL`), and one fsync of the
//! WAL ([`sync_wal`]) makes every commit before it durable. The engine's releaser
//! ([`crate::durable`]) does that for every round of inputs that committed, before anything
//! that depends on the round's commits leaves the process (an enqueue's acknowledgement, a
//! transaction's request). So the enqueues, delivery records and new transactions of one round,
//! and of every round handed over while earlier fsyncs ran, share one; and the engine hands
//! the enqueues of a round over in one call, which writes them in one commit (or, when they
//! hold more than half a MiB of events, in a call and a commit per half a MiB of batches).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};

/// Why a store operation failed, in the plugin's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The database is busy or locked.
    Unavailable(String),
    /// The database answered with an error.
    Failed(String),
}

/// One write inside a commit.
#[derive(Clone, Debug)]
pub enum Write {
    /// Store a value.
    Put(String, Vec<u8>),
    /// Remove a key.
    Delete(String),
    /// Remove `start <= key < end`.
    DeleteRange(String, String),
}

/// A SQLite database holding the plugin's keys.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    /// Commits since the last [`SqliteStore::take_unsynced`].
    unsynced: bool,
    /// Where the WAL is, for the threads that fsync it, each through a file of its own
    /// (`None` for a database in memory).
    wal_path: Option<PathBuf>,
}

impl SqliteStore {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the SQLite store {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // The host is the database's only user (its data folder is locked against a second
        // host), so the connection takes SQLite's lock once and keeps it, before the WAL is
        // first used: SQLite then keeps the WAL's index in this process's memory, not in a
        // shared `-shm` file, and a transaction takes no file locks. That spares every commit
        // and read half a dozen `fcntl` calls (about 15 µs off a lone event's enqueue →
        // arrival). Other programs can open the database only once the host has stopped, and
        // the host cannot start while another program has it open.
        conn.execute_batch("PRAGMA locking_mode=EXCLUSIVE;")?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))
            .with_context(|| {
                format!(
                    "cannot lock the SQLite store {} (is another program, such as a sqlite3 \
                     shell, holding it open?)",
                    path.display()
                )
            })?;
        anyhow::ensure!(
            mode.eq_ignore_ascii_case("wal"),
            "{}: WAL journal not available",
            path.display()
        );
        // The table is created with `synchronous=FULL`, so that it is durable from the start;
        // later commits leave their fsync to `sync_wal`. SQLite opened the WAL file above, and
        // keeps it while the connection is open.
        conn.execute_batch(
            "PRAGMA synchronous=FULL;
             PRAGMA cache_size=-65536;
             CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
             PRAGMA synchronous=NORMAL;",
        )
        .with_context(|| format!("cannot prepare the SQLite store {}", path.display()))?;
        // The database's name as SQLite resolved it (symbolic links followed): its WAL is there.
        let db_path = conn
            .path()
            .map_or_else(|| path.to_owned(), std::path::PathBuf::from);
        let wal_path = wal_path(&db_path);
        // SQLite created the WAL when the journal mode was set; the releaser opens it once per
        // fsync slot, and this finds a WAL that cannot be opened before anything is accepted.
        File::open(&wal_path)
            .with_context(|| format!("cannot open the WAL {}", wal_path.display()))?;
        // The WAL's name in its folder must survive a crash too. (Commits an earlier process
        // left in the operating system's cache only are made durable by the releaser's first
        // fsync, before anything that depends on them leaves; see `crate::durable`.)
        if let Some(dir) = db_path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|dir| dir.sync_all())
                .with_context(|| format!("cannot sync the folder {}", dir.display()))?;
        }
        Ok(SqliteStore {
            conn,
            unsynced: false,
            wal_path: Some(wal_path),
        })
    }

    /// Opens a database that lives only in this process's memory, for simulations: commits are
    /// atomic but do not survive the process.
    pub fn open_in_memory() -> anyhow::Result<Self> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(
            "CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;",
        )?;
        Ok(SqliteStore {
            conn,
            unsynced: false,
            wal_path: None,
        })
    }

    /// Where the WAL is, for a thread that opens it to fsync it ([`sync_wal`]); `None` for a
    /// database in memory.
    pub fn wal_path(&self) -> Option<&Path> {
        self.wal_path.as_deref()
    }

    /// Whether anything was committed since the last call: the caller takes over making it
    /// durable.
    pub fn take_unsynced(&mut self) -> bool {
        std::mem::take(&mut self.unsynced)
    }

    /// Reads one key.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT value FROM kv WHERE key = ?1")
            .map_err(map_error)?;
        stmt.query_row(params![key], |row| row.get(0))
            .optional()
            .map_err(map_error)
    }

    /// Reads up to `limit` entries with `start <= key < end`, in key order.
    pub fn scan(
        &self,
        start: &str,
        end: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT key, value FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key LIMIT ?3",
            )
            .map_err(map_error)?;
        let rows = stmt
            .query_map(params![start, end, limit], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .map_err(map_error)?;
        rows.collect::<Result<_, _>>().map_err(map_error)
    }

    /// Applies `writes` as one atomic transaction; it is durable once the WAL is fsynced
    /// ([`sync_wal`]).
    pub fn commit(&mut self, writes: &[Write]) -> Result<(), StoreError> {
        self.unsynced = true;
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(map_error)?;
        {
            let mut put = tx
                .prepare_cached("INSERT INTO kv (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
                .map_err(map_error)?;
            let mut delete = tx
                .prepare_cached("DELETE FROM kv WHERE key = ?1")
                .map_err(map_error)?;
            let mut delete_range = tx
                .prepare_cached("DELETE FROM kv WHERE key >= ?1 AND key < ?2")
                .map_err(map_error)?;
            for write in writes {
                match write {
                    Write::Put(key, value) => put.execute(params![key, value]),
                    Write::Delete(key) => delete.execute(params![key]),
                    Write::DeleteRange(start, end) => delete_range.execute(params![start, end]),
                }
                .map_err(map_error)?;
            }
        }
        tx.commit().map_err(map_error)
    }

    /// The number of keys with `prefix`, for tests and diagnostics.
    pub fn count_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        let end = format!("{prefix}\u{10FFFF}");
        self.conn
            .query_row(
                "SELECT count(*) FROM kv WHERE key >= ?1 AND key < ?2",
                params![prefix, end],
                |row| row.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(map_error)
    }
}

/// Ordered keys in this process's memory: commits are atomic (they cannot fail half-way) but
/// nothing survives the process. For benchmarks that compare with schedulers that keep no
/// store, and for hosts that accept losing their backlog on a restart.
#[derive(Debug, Default)]
pub struct MemoryStore {
    keys: BTreeMap<String, Vec<u8>>,
}

impl MemoryStore {
    fn scan(&self, start: &str, end: &str, limit: u32) -> Vec<(String, Vec<u8>)> {
        if start >= end {
            return Vec::new();
        }
        self.keys
            .range::<str, _>((
                std::ops::Bound::Included(start),
                std::ops::Bound::Excluded(end),
            ))
            .take(limit as usize)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn commit(&mut self, writes: Vec<Write>) {
        for write in writes {
            match write {
                Write::Put(key, value) => {
                    self.keys.insert(key, value);
                }
                Write::Delete(key) => {
                    self.keys.remove(&key);
                }
                Write::DeleteRange(start, end) => {
                    if start < end {
                        let doomed: Vec<String> = self
                            .keys
                            .range::<str, _>((
                                std::ops::Bound::Included(start.as_str()),
                                std::ops::Bound::Excluded(end.as_str()),
                            ))
                            .map(|(k, _)| k.clone())
                            .collect();
                        for key in doomed {
                            self.keys.remove(&key);
                        }
                    }
                }
            }
        }
    }
}

/// The store behind the plugin's `store` import.
#[derive(Debug)]
pub enum Store {
    /// Durable, on a SQLite file.
    Sqlite(SqliteStore),
    /// In memory only.
    Memory(MemoryStore),
}

impl Store {
    /// Reads one key.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Store::Sqlite(store) => store.get(key),
            Store::Memory(store) => Ok(store.keys.get(key).cloned()),
        }
    }

    /// Reads up to `limit` entries with `start <= key < end`, in key order.
    pub fn scan(
        &self,
        start: &str,
        end: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        match self {
            Store::Sqlite(store) => store.scan(start, end, limit),
            Store::Memory(store) => Ok(store.scan(start, end, limit)),
        }
    }

    /// Whether anything was committed since the last call (never, in memory).
    pub fn take_unsynced(&mut self) -> bool {
        match self {
            Store::Sqlite(store) => store.take_unsynced(),
            Store::Memory(_) => false,
        }
    }

    /// Where the SQLite store's WAL is (see [`SqliteStore::wal_path`]).
    pub fn wal_path(&self) -> Option<&Path> {
        match self {
            Store::Sqlite(store) => store.wal_path(),
            Store::Memory(_) => None,
        }
    }

    /// Applies `writes` atomically; on SQLite they are durable after the next fsync of the WAL
    /// (the releaser's; see [`crate::durable`]).
    pub fn commit(&mut self, writes: Vec<Write>) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(store) => store.commit(&writes),
            Store::Memory(store) => {
                store.commit(writes);
                Ok(())
            }
        }
    }
}

/// Makes every commit written to this WAL so far durable. SQLite writes a commit's frames to
/// the WAL before the commit returns, and a checkpoint syncs them into the database file before
/// the WAL is reused, so one `fdatasync` of the WAL covers every earlier commit; after a crash,
/// SQLite reads the WAL's frames up to the first torn one, so the commits kept are those up to
/// some point, in order.
pub fn sync_wal(wal: &File) -> Result<(), StoreError> {
    wal.sync_data()
        .map_err(|error| StoreError::Failed(format!("fsync of the WAL failed: {error}")))
}

/// Where SQLite keeps the WAL of the database at `db`.
fn wal_path(db: &Path) -> std::path::PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    name.into()
}

fn map_error(error: rusqlite::Error) -> StoreError {
    match error.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StoreError::Unavailable(error.to_string())
        }
        _ => StoreError::Failed(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database path under the temp folder, for one test; its files (the database, its WAL
    /// and any `-shm`) are removed before the test and when this is dropped.
    struct TempDb(PathBuf);

    impl TempDb {
        fn new(name: &str) -> TempDb {
            let db = TempDb(
                std::env::temp_dir()
                    .join(format!("asched-store-{name}-{}.sqlite", std::process::id())),
            );
            db.remove();
            db
        }

        fn remove(&self) {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
            }
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            self.remove();
        }
    }

    /// Commits apply in order; scans return keys in byte order within the range and limit; an
    /// empty or reversed range is empty; deletes remove keys and ranges.
    fn check_semantics(store: &mut Store) {
        store
            .commit(vec![
                Write::Put("q/2".into(), b"two".to_vec()),
                Write::Put("q/1".into(), b"one".to_vec()),
                Write::Put("q/3".into(), b"three".to_vec()),
                Write::Put("r".into(), b"other".to_vec()),
                Write::Put("q/3".into(), b"THREE".to_vec()),
            ])
            .unwrap();
        let all = store.scan("q/", "q0", 10).unwrap();
        let keys: Vec<&str> = all.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["q/1", "q/2", "q/3"]);
        assert_eq!(all[2].1, b"THREE");
        assert_eq!(store.scan("q/", "q0", 2).unwrap().len(), 2);
        assert_eq!(store.scan("q0", "q/", 10).unwrap(), vec![]);
        store
            .commit(vec![
                Write::DeleteRange("q/1".into(), "q/3".into()),
                Write::DeleteRange("z".into(), "a".into()),
                Write::Delete("r".into()),
            ])
            .unwrap();
        assert_eq!(
            store.scan("", "\u{10FFFF}", 10).unwrap(),
            vec![("q/3".to_owned(), b"THREE".to_vec())]
        );
        assert_eq!(store.get("r").unwrap(), None);
        assert_eq!(store.get("q/3").unwrap(), Some(b"THREE".to_vec()));
        assert_eq!(store.take_unsynced(), store.wal_path().is_some());
        if let Some(wal) = store.wal_path().map(|path| File::open(path).unwrap()) {
            sync_wal(&wal).unwrap();
        }
    }

    /// The file a sync flushes is the WAL SQLite writes to, still after checkpoints have
    /// moved its frames into the database and SQLite has started the WAL over.
    #[test]
    fn sync_flushes_the_wal_sqlite_writes() {
        use std::os::unix::fs::MetadataExt;
        let db = TempDb::new("sync");
        let path = db.0.clone();
        let mut store = SqliteStore::open(&path).unwrap();
        let wal = File::open(store.wal_path().expect("a file store has a WAL")).unwrap();
        let chunk = vec![7u8; 40_000];
        for n in 0..400 {
            store
                .commit(&[
                    Write::Put(format!("c/{n:04}"), chunk.clone()),
                    Write::DeleteRange("c/".into(), format!("c/{:04}", n.max(4) - 4)),
                ])
                .unwrap();
            assert!(store.take_unsynced(), "a commit is unsynced until taken");
            assert!(!store.take_unsynced(), "taken once");
            sync_wal(&wal).unwrap();
        }
        let on_disk = std::fs::metadata(wal_path(&path)).unwrap();
        let held = wal.metadata().unwrap();
        assert_eq!((held.dev(), held.ino()), (on_disk.dev(), on_disk.ino()));
        assert!(
            held.len() < 400 * 40_000,
            "checkpoints let SQLite start the WAL over ({} bytes)",
            held.len()
        );
        drop(store);
        let reopened = SqliteStore::open(&path).unwrap();
        assert_eq!(reopened.count_prefix("c/").unwrap(), 5);
        drop(reopened);
    }

    /// The store keeps its database to itself while open, with no shared-memory index beside
    /// it, and lets others in once closed.
    #[test]
    fn the_store_holds_its_database_exclusively_while_open() {
        let db = TempDb::new("lock");
        let path = db.0.clone();
        let mut store = SqliteStore::open(&path).unwrap();
        store
            .commit(&[Write::Put("k".into(), b"v".to_vec())])
            .unwrap();
        assert!(!Path::new(&format!("{}-shm", path.display())).exists());
        let other = Connection::open(&path).unwrap();
        other.busy_timeout(std::time::Duration::ZERO).unwrap();
        let read = other.query_row("SELECT count(*) FROM kv", [], |row| row.get::<_, i64>(0));
        assert_eq!(
            read.unwrap_err().sqlite_error_code(),
            Some(ErrorCode::DatabaseBusy)
        );
        drop(store);
        let read = other.query_row("SELECT count(*) FROM kv", [], |row| row.get::<_, i64>(0));
        assert_eq!(read.unwrap(), 1);
        drop(other);
    }

    /// A database another program holds open is refused at start, after the busy timeout,
    /// with an error that names it and says why.
    #[test]
    fn a_database_held_open_elsewhere_is_refused_with_its_name() {
        let db = TempDb::new("held");
        let path = db.0.clone();
        drop(SqliteStore::open(&path).unwrap());
        let other = Connection::open(&path).unwrap();
        let _: i64 = other
            .query_row("SELECT count(*) FROM kv", [], |row| row.get(0))
            .unwrap();
        let error = format!("{:#}", SqliteStore::open(&path).unwrap_err());
        assert_eq!(
            error,
            format!(
                "cannot lock the SQLite store {} (is another program, such as a sqlite3 shell, \
                 holding it open?): database is locked: Error code 5: database is locked",
                path.display()
            )
        );
        drop(other);
        drop(SqliteStore::open(&path).unwrap());
    }

    /// The memory store behaves as the SQLite one does.
    #[test]
    fn memory_store_has_the_store_semantics() {
        check_semantics(&mut Store::Memory(MemoryStore::default()));
    }

    /// The SQLite store has them too, and what was synced is there after a reopen.
    #[test]
    fn sqlite_store_has_the_store_semantics_and_keeps_synced_commits() {
        let db = TempDb::new("order");
        let path = db.0.clone();
        check_semantics(&mut Store::Sqlite(SqliteStore::open(&path).unwrap()));
        let reopened = SqliteStore::open(&path).unwrap();
        assert_eq!(reopened.get("q/3").unwrap(), Some(b"THREE".to_vec()));
        drop(reopened);
    }
}
