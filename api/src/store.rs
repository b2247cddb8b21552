//! The daemon's state in SQLite: images, environments, snapshots and frozen disk layers.
//!
//! One database file in the data directory, opened with WAL journaling, `synchronous=FULL`
//! and foreign keys on. Every change is one transaction. The files a row points to are
//! created before the row is committed and deleted after it is removed, so after a crash
//! a row never points to a missing file; files without rows are swept at start
//! (`Orchestrator::recover`).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use crate::model::{EnvState, Image};

/// The schema version this build writes (`PRAGMA user_version`): [`SCHEMA`] is version 1,
/// and `MIGRATIONS[i]` takes a database from version `i + 1` to `i + 2`.
const SCHEMA_VERSION: i64 = 1 + MIGRATIONS.len() as i64;

/// Schema changes, oldest first. A database is brought to [`SCHEMA_VERSION`] by running the
/// ones it lacks, in one transaction with the version bump.
const MIGRATIONS: &[&str] = &[
    // 2: networking. One /30 of the pool per environment (its slot) and its outbound choice;
    // the TCP ports published for it. Both go with the environment's row.
    "
CREATE TABLE networks (
    env_id         INTEGER PRIMARY KEY REFERENCES environments(id) ON DELETE CASCADE,
    slot           INTEGER NOT NULL UNIQUE,
    allow_outbound INTEGER NOT NULL
);
CREATE TABLE ports (
    env_id     INTEGER NOT NULL REFERENCES environments(id) ON DELETE CASCADE,
    guest_port INTEGER NOT NULL,
    host_addr  TEXT NOT NULL,
    PRIMARY KEY (env_id, guest_port)
);
",
];

const SCHEMA: &str = "
CREATE TABLE images (
    name     TEXT PRIMARY KEY,
    kernel   TEXT NOT NULL,
    rootfs   TEXT NOT NULL,
    initrd   TEXT,
    created  INTEGER NOT NULL
);
CREATE TABLE environments (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    parent      TEXT,
    image       TEXT NOT NULL REFERENCES images(name),
    state       TEXT NOT NULL,
    vcpus       INTEGER NOT NULL,
    memory_mib  INTEGER NOT NULL,
    created     INTEGER NOT NULL,
    snapshot    TEXT,
    exit_reason TEXT,
    pid         INTEGER,
    dir         TEXT NOT NULL,
    base_layer  TEXT NOT NULL
);
CREATE TABLE snapshots (
    id           TEXT PRIMARY KEY,
    environment  TEXT NOT NULL,
    parent       TEXT,
    dir          TEXT NOT NULL,
    created      INTEGER NOT NULL,
    pause_ms     REAL NOT NULL,
    frozen_layer TEXT
);
CREATE TABLE layers (
    path     TEXT PRIMARY KEY,
    backing  TEXT NOT NULL,
    owner    TEXT NOT NULL
);
";

/// An environment as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvRow {
    pub id: i64,
    pub name: String,
    pub parent: Option<String>,
    pub image: String,
    pub state: EnvState,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub created: u64,
    pub snapshot: Option<String>,
    pub exit_reason: Option<String>,
    pub pid: Option<u32>,
    /// Its directory (overlay, control socket, console log).
    pub dir: PathBuf,
    /// The layer its overlay is backed by: a frozen layer, or its image's root filesystem.
    pub base_layer: PathBuf,
}

/// A snapshot as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow {
    pub id: String,
    pub environment: String,
    pub parent: Option<String>,
    pub dir: PathBuf,
    pub created: u64,
    pub pause_ms: f64,
    /// The layer its environment's disk was frozen into.
    pub frozen_layer: Option<PathBuf>,
}

/// An environment's network as stored: its slot in the pool and its outbound choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkRow {
    pub env_id: i64,
    pub slot: u32,
    pub allow_outbound: bool,
}

/// A published port as stored: the environment's TCP port and where the host listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRow {
    pub env_id: i64,
    pub guest_port: u16,
    pub host_addr: String,
}

/// A frozen disk layer as stored: its file, the layer below it, the environment whose
/// directory holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRow {
    pub path: PathBuf,
    pub backing: PathBuf,
    pub owner: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{0} already exists")]
    Exists(String),
    #[error("no free address: all {0} /30 subnets of the network pool are in use")]
    PoolFull(u32),
    #[error(
        "the database at {path} has schema version {found}; this groved knows {SCHEMA_VERSION}"
    )]
    Schema { path: String, found: i64 },
}

pub type Result<T> = std::result::Result<T, StoreError>;

fn state_name(s: EnvState) -> &'static str {
    match s {
        EnvState::Starting => "starting",
        EnvState::Running => "running",
        EnvState::Paused => "paused",
        EnvState::Stopped => "stopped",
        EnvState::Failed => "failed",
    }
}

fn parse_state(s: &str) -> EnvState {
    match s {
        "starting" => EnvState::Starting,
        "running" => EnvState::Running,
        "paused" => EnvState::Paused,
        "stopped" => EnvState::Stopped,
        _ => EnvState::Failed,
    }
}

fn path(s: String) -> PathBuf {
    PathBuf::from(s)
}

fn text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn env_row(r: &Row<'_>) -> rusqlite::Result<EnvRow> {
    Ok(EnvRow {
        id: r.get(0)?,
        name: r.get(1)?,
        parent: r.get(2)?,
        image: r.get(3)?,
        state: parse_state(&r.get::<_, String>(4)?),
        vcpus: r.get(5)?,
        memory_mib: r.get::<_, i64>(6)? as u64,
        created: r.get::<_, i64>(7)? as u64,
        snapshot: r.get(8)?,
        exit_reason: r.get(9)?,
        pid: r.get(10)?,
        dir: path(r.get(11)?),
        base_layer: path(r.get(12)?),
    })
}

const ENV_COLUMNS: &str = "id, name, parent, image, state, vcpus, memory_mib, created, snapshot, \
                           exit_reason, pid, dir, base_layer";

fn snapshot_row(r: &Row<'_>) -> rusqlite::Result<SnapshotRow> {
    Ok(SnapshotRow {
        id: r.get(0)?,
        environment: r.get(1)?,
        parent: r.get(2)?,
        dir: path(r.get(3)?),
        created: r.get::<_, i64>(4)? as u64,
        pause_ms: r.get(5)?,
        frozen_layer: r.get::<_, Option<String>>(6)?.map(path),
    })
}

fn unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
    )
}

/// The database. Calls are short; one connection behind a mutex.
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let pending = match version {
            0 => format!("{SCHEMA}{}", MIGRATIONS.concat()),
            1..=SCHEMA_VERSION => MIGRATIONS[usize::try_from(version - 1).unwrap_or(0)..].concat(),
            found => {
                return Err(StoreError::Schema {
                    path: path.display().to_string(),
                    found,
                })
            }
        };
        if version != SCHEMA_VERSION {
            conn.execute_batch(&format!(
                "BEGIN; {pending} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` in one transaction, committed when it returns Ok.
    pub fn transaction<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    // Images.

    pub fn insert_image(&self, image: &Image) -> Result<()> {
        let r = self.conn().execute(
            "INSERT INTO images (name, kernel, rootfs, initrd, created) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                image.name,
                text(&image.kernel),
                text(&image.rootfs),
                image.initrd.as_deref().map(text),
                image.created as i64
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(e) if unique_violation(&e) => {
                Err(StoreError::Exists(format!("image {}", image.name)))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn images(&self) -> Result<Vec<Image>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT name, kernel, rootfs, initrd, created FROM images ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(Image {
                name: r.get(0)?,
                kernel: path(r.get(1)?),
                rootfs: path(r.get(2)?),
                initrd: r.get::<_, Option<String>>(3)?.map(path),
                created: r.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn image(&self, name: &str) -> Result<Option<Image>> {
        Ok(self.images()?.into_iter().find(|i| i.name == name))
    }

    /// Environments using the image.
    pub fn image_users(&self, name: &str) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name FROM environments WHERE image = ?1")?;
        let rows = stmt.query_map([name], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn delete_image(&self, name: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM images WHERE name = ?1", [name])?
            > 0)
    }

    // Environments.

    /// Inserts a new environment (its `id` is ignored and assigned); returns the id.
    pub fn insert_env(tx: &Transaction<'_>, env: &EnvRow) -> Result<i64> {
        let r = tx.execute(
            "INSERT INTO environments (name, parent, image, state, vcpus, memory_mib, created, \
             snapshot, exit_reason, pid, dir, base_layer) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                env.name,
                env.parent,
                env.image,
                state_name(env.state),
                env.vcpus,
                env.memory_mib as i64,
                env.created as i64,
                env.snapshot,
                env.exit_reason,
                env.pid,
                text(&env.dir),
                text(&env.base_layer)
            ],
        );
        match r {
            Ok(_) => Ok(tx.last_insert_rowid()),
            Err(e) if unique_violation(&e) => {
                Err(StoreError::Exists(format!("environment {}", env.name)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reserves an environment name with a placeholder row in state `starting`; returns its
    /// id (used to name its directory).
    pub fn reserve_env(&self, env: &EnvRow) -> Result<i64> {
        self.transaction(|tx| Self::insert_env(tx, env))
    }

    pub fn envs(&self) -> Result<Vec<EnvRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {ENV_COLUMNS} FROM environments ORDER BY id"
        ))?;
        let rows = stmt.query_map([], env_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn env(&self, name: &str) -> Result<Option<EnvRow>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!("SELECT {ENV_COLUMNS} FROM environments WHERE name = ?1"),
                [name],
                env_row,
            )
            .optional()?)
    }

    /// Replaces every field of the environment with this id.
    pub fn update_env(&self, env: &EnvRow) -> Result<()> {
        self.conn().execute(
            "UPDATE environments SET name = ?2, parent = ?3, image = ?4, state = ?5, vcpus = ?6, \
             memory_mib = ?7, created = ?8, snapshot = ?9, exit_reason = ?10, pid = ?11, \
             dir = ?12, base_layer = ?13 WHERE id = ?1",
            params![
                env.id,
                env.name,
                env.parent,
                env.image,
                state_name(env.state),
                env.vcpus,
                env.memory_mib as i64,
                env.created as i64,
                env.snapshot,
                env.exit_reason,
                env.pid,
                text(&env.dir),
                text(&env.base_layer)
            ],
        )?;
        Ok(())
    }

    pub fn set_state(
        &self,
        name: &str,
        state: EnvState,
        pid: Option<u32>,
        exit_reason: Option<&str>,
    ) -> Result<()> {
        self.conn().execute(
            "UPDATE environments SET state = ?2, pid = ?3, exit_reason = ?4 WHERE name = ?1",
            params![name, state_name(state), pid, exit_reason],
        )?;
        Ok(())
    }

    /// Removes the environment; its children lose their parent link.
    pub fn delete_env(&self, name: &str) -> Result<()> {
        self.transaction(|tx| {
            tx.execute("DELETE FROM environments WHERE name = ?1", [name])?;
            tx.execute(
                "UPDATE environments SET parent = NULL WHERE parent = ?1",
                [name],
            )?;
            Ok(())
        })
    }

    pub fn children(&self, name: &str) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name FROM environments WHERE parent = ?1")?;
        let rows = stmt.query_map([name], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // Snapshots and layers.

    pub fn insert_snapshot(tx: &Transaction<'_>, s: &SnapshotRow) -> Result<()> {
        tx.execute(
            "INSERT INTO snapshots (id, environment, parent, dir, created, pause_ms, frozen_layer) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                s.id,
                s.environment,
                s.parent,
                text(&s.dir),
                s.created as i64,
                s.pause_ms,
                s.frozen_layer.as_deref().map(text)
            ],
        )?;
        Ok(())
    }

    pub fn insert_layer(tx: &Transaction<'_>, l: &LayerRow) -> Result<()> {
        tx.execute(
            "INSERT OR REPLACE INTO layers (path, backing, owner) VALUES (?1, ?2, ?3)",
            params![text(&l.path), text(&l.backing), l.owner],
        )?;
        Ok(())
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, environment, parent, dir, created, pause_ms, frozen_layer FROM snapshots \
             ORDER BY created, id",
        )?;
        let rows = stmt.query_map([], snapshot_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn snapshot(&self, id: &str) -> Result<Option<SnapshotRow>> {
        Ok(self.snapshots()?.into_iter().find(|s| s.id == id))
    }

    pub fn layers(&self) -> Result<Vec<LayerRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT path, backing, owner FROM layers")?;
        let rows = stmt.query_map([], |r| {
            Ok(LayerRow {
                path: path(r.get(0)?),
                backing: path(r.get(1)?),
                owner: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM snapshots WHERE id = ?1", [id])?;
        Ok(())
    }

    pub fn delete_layer(&self, path: &Path) -> Result<()> {
        self.conn()
            .execute("DELETE FROM layers WHERE path = ?1", [text(path)])?;
        Ok(())
    }

    // Networks and published ports.

    /// Gives environment `env_id` the lowest free slot of `0..slots` (one /30 of the pool
    /// each) in one transaction.
    pub fn allocate_network(
        &self,
        env_id: i64,
        slots: u32,
        allow_outbound: bool,
    ) -> Result<NetworkRow> {
        self.transaction(|tx| {
            let used = {
                let mut stmt = tx.prepare("SELECT slot FROM networks")?;
                let rows = stmt.query_map([], |r| r.get::<_, u32>(0))?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            let slot =
                crate::network::first_free_slot(&used, slots).ok_or(StoreError::PoolFull(slots))?;
            tx.execute(
                "INSERT INTO networks (env_id, slot, allow_outbound) VALUES (?1, ?2, ?3)",
                params![env_id, slot, allow_outbound],
            )?;
            Ok(NetworkRow {
                env_id,
                slot,
                allow_outbound,
            })
        })
    }

    pub fn networks(&self) -> Result<Vec<NetworkRow>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT env_id, slot, allow_outbound FROM networks ORDER BY env_id")?;
        let rows = stmt.query_map([], |r| {
            Ok(NetworkRow {
                env_id: r.get(0)?,
                slot: r.get(1)?,
                allow_outbound: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn network(&self, env_id: i64) -> Result<Option<NetworkRow>> {
        Ok(self.networks()?.into_iter().find(|n| n.env_id == env_id))
    }

    /// Records (or moves) a published port.
    pub fn set_port(&self, port: &PortRow) -> Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO ports (env_id, guest_port, host_addr) VALUES (?1, ?2, ?3)",
            params![port.env_id, port.guest_port, port.host_addr],
        )?;
        Ok(())
    }

    /// Every published port, by environment and guest port.
    pub fn ports(&self) -> Result<Vec<PortRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT env_id, guest_port, host_addr FROM ports ORDER BY env_id, guest_port",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(PortRow {
                env_id: r.get(0)?,
                guest_port: r.get(1)?,
                host_addr: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The next number for a snapshot of `env` (`<env>@<n>` ids).
    pub fn next_snapshot_number(&self, env: &str) -> Result<u64> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM snapshots WHERE environment = ?1",
            [env],
            |r| r.get(0),
        )?;
        Ok(n as u64 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db(tag: &str) -> (PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!("grove-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("grove.db")).unwrap();
        (dir, store)
    }

    fn image(name: &str) -> Image {
        Image {
            name: name.into(),
            kernel: "/k".into(),
            rootfs: "/r".into(),
            initrd: None,
            created: 1,
        }
    }

    fn env(name: &str, parent: Option<&str>) -> EnvRow {
        EnvRow {
            id: 0,
            name: name.into(),
            parent: parent.map(String::from),
            image: "default".into(),
            state: EnvState::Starting,
            vcpus: 1,
            memory_mib: 128,
            created: 2,
            snapshot: None,
            exit_reason: None,
            pid: None,
            dir: format!("/data/envs/{name}").into(),
            base_layer: "/r".into(),
        }
    }

    #[test]
    fn rows_round_trip_and_names_are_unique() {
        let (dir, s) = temp_db("rt");
        s.insert_image(&image("default")).unwrap();
        assert!(matches!(
            s.insert_image(&image("default")),
            Err(StoreError::Exists(_))
        ));
        let id = s.reserve_env(&env("main", None)).unwrap();
        assert!(matches!(
            s.reserve_env(&env("main", None)),
            Err(StoreError::Exists(_))
        ));
        let mut main = s.env("main").unwrap().unwrap();
        assert_eq!(main.id, id);
        main.state = EnvState::Running;
        main.pid = Some(42);
        s.update_env(&main).unwrap();
        assert_eq!(s.env("main").unwrap().unwrap(), main);
        s.reserve_env(&env("feature/x", Some("main"))).unwrap();
        assert_eq!(s.children("main").unwrap(), vec!["feature/x".to_string()]);
        assert_eq!(s.image_users("default").unwrap().len(), 2);
        s.transaction(|tx| {
            Store::insert_snapshot(
                tx,
                &SnapshotRow {
                    id: "main@1".into(),
                    environment: "main".into(),
                    parent: None,
                    dir: "/data/snapshots/1".into(),
                    created: 3,
                    pause_ms: 1.5,
                    frozen_layer: Some("/data/envs/main/vm@1.qcow2".into()),
                },
            )?;
            Store::insert_layer(
                tx,
                &LayerRow {
                    path: "/data/envs/main/vm@1.qcow2".into(),
                    backing: "/r".into(),
                    owner: "main".into(),
                },
            )
        })
        .unwrap();
        assert_eq!(s.snapshots().unwrap().len(), 1);
        assert_eq!(s.next_snapshot_number("main").unwrap(), 2);
        assert_eq!(s.layers().unwrap().len(), 1);
        s.delete_env("main").unwrap();
        assert_eq!(s.env("feature/x").unwrap().unwrap().parent, None);
        // The image is still used by feature/x: the foreign key refuses its deletion.
        assert!(s.delete_image("default").is_err());
        drop(s);
        // Reopening keeps everything.
        let s = Store::open(&dir.join("grove.db")).unwrap();
        assert_eq!(s.envs().unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_transaction_leaves_nothing() {
        let (dir, s) = temp_db("tx");
        s.insert_image(&image("default")).unwrap();
        let r: Result<()> = s.transaction(|tx| {
            Store::insert_env(tx, &env("a", None))?;
            Store::insert_env(tx, &env("a", None))?;
            Ok(())
        });
        assert!(r.is_err());
        assert!(s.envs().unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_version_1_database_is_migrated_and_keeps_its_rows() {
        let dir = std::env::temp_dir().join(format!("grove-store-v1-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("grove.db");
        {
            // What a version-1 groved wrote.
            let conn = Connection::open(&db).unwrap();
            conn.execute_batch(&format!("BEGIN; {SCHEMA} PRAGMA user_version = 1; COMMIT;"))
                .unwrap();
            conn.execute(
                "INSERT INTO images (name, kernel, rootfs, initrd, created) \
                 VALUES ('default', '/k', '/r', NULL, 1)",
                [],
            )
            .unwrap();
            conn.execute(
                &format!(
                    "INSERT INTO environments ({}) VALUES (4, 'main', NULL, 'default', \
                     'running', 1, 128, 2, NULL, NULL, 99, '/d/envs/4', '/r')",
                    ENV_COLUMNS
                ),
                [],
            )
            .unwrap();
        }
        let s = Store::open(&db).unwrap();
        let version: i64 = s
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let main = s.env("main").unwrap().unwrap();
        assert_eq!((main.id, main.pid), (4, Some(99)));
        // The environment from before networking has no network until it gets one.
        assert_eq!(s.network(4).unwrap(), None);
        let row = s.allocate_network(4, 8, false).unwrap();
        assert_eq!((row.slot, row.allow_outbound), (0, false));
        drop(s);
        // Opening again migrates nothing twice.
        let s = Store::open(&db).unwrap();
        assert_eq!(s.network(4).unwrap(), Some(row));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn networks_take_the_lowest_free_slot_and_leave_with_their_environment() {
        let (dir, s) = temp_db("net");
        s.insert_image(&image("default")).unwrap();
        let a = s.reserve_env(&env("a", None)).unwrap();
        let b = s.reserve_env(&env("b", Some("a"))).unwrap();
        let c = s.reserve_env(&env("c", Some("a"))).unwrap();
        assert_eq!(s.allocate_network(a, 2, true).unwrap().slot, 0);
        assert_eq!(s.allocate_network(b, 2, false).unwrap().slot, 1);
        assert!(matches!(
            s.allocate_network(c, 2, false),
            Err(StoreError::PoolFull(2))
        ));
        // One network per environment.
        assert!(s.allocate_network(a, 8, true).is_err());
        s.set_port(&PortRow {
            env_id: b,
            guest_port: 8080,
            host_addr: "127.0.0.1:40000".into(),
        })
        .unwrap();
        s.set_port(&PortRow {
            env_id: b,
            guest_port: 8080,
            host_addr: "127.0.0.1:40001".into(),
        })
        .unwrap();
        assert_eq!(s.ports().unwrap().len(), 1);
        assert_eq!(s.ports().unwrap()[0].host_addr, "127.0.0.1:40001");
        // Deleting the environment frees its slot and its ports.
        s.delete_env("b").unwrap();
        assert_eq!(s.network(b).unwrap(), None);
        assert!(s.ports().unwrap().is_empty());
        assert_eq!(s.allocate_network(c, 2, false).unwrap().slot, 1);
        assert_eq!(s.networks().unwrap().len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let (dir, s) = temp_db("schema");
        s.conn().pragma_update(None, "user_version", 99).unwrap();
        drop(s);
        let e = Store::open(&dir.join("grove.db")).err().unwrap();
        assert!(e.to_string().contains("schema version 99"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
