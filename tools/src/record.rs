//! `/run/ublk-fast/<id>.json`: how the service created a device. `list` reads it for the
//! target and its arguments, a new service takes the device over from it; it is written
//! atomically (0600, never through a symlink) and removed with the device.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Record {
    pub id: u32,
    pub pid: i32,
    pub target: String,
    pub args: Vec<String>,
    /// The backing store's path, if the target has one.
    #[serde(default)]
    pub backing: String,
    pub queues: u16,
    pub depth: u16,
    /// The CPU each queue's thread is pinned to.
    pub queue_cpus: Vec<usize>,
    /// The CPUs whose threads serve each queue's tags (PER_IO_DAEMON; `queue_cpus`'s first).
    #[serde(default)]
    pub tag_cpus: Vec<Vec<usize>>,
    /// The kernel's CPUs for each queue (GET_QUEUE_AFFINITY), which `queue_cpus` was chosen
    /// from.
    #[serde(default)]
    pub queue_affinity: Vec<Vec<usize>>,
    /// The command line that created the device (without the program name), so `recover`
    /// can rebuild the same target.
    #[serde(default)]
    pub argv: Vec<String>,
    /// The directory relative paths in `argv` are relative to.
    #[serde(default)]
    pub cwd: String,
    /// How the daemon set its queues up (ring flags, buffers).
    #[serde(default)]
    pub setup: String,
    /// What the backing store was when the device was created: a take-over refuses another.
    #[serde(default)]
    pub backing_id: Option<BackingId>,
}

/// A backing store's identity: the same file (device and inode) and the same size.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackingId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
}

impl BackingId {
    /// Of the file or block device at `path` now.
    pub fn of(path: &str) -> std::io::Result<BackingId> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        // A block device's size is where its end is; a file's is its length.
        let size = std::fs::File::open(path)?.seek(SeekFrom::End(0))?;
        Ok(BackingId { dev: m.dev(), ino: m.ino(), size })
    }
}

/// Whether the record at `path` belongs to this process's user (a record someone else wrote
/// must not steer a take-over).
pub fn owned_by_us(id: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    std::fs::symlink_metadata(path(id)).is_ok_and(|m| m.uid() == me && m.file_type().is_file())
}

/// Where the service keeps its socket, lock, log, records and counters: `/run/ublk-fast` for
/// root's service; `$XDG_RUNTIME_DIR/ublk-fast` for a user's own (unprivileged devices), so
/// that one user's service and records are out of every other user's reach.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("UBLK_FAST_RUN_DIR") {
        return d.into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(x) if !privileged() => PathBuf::from(x).join("ublk-fast"),
        _ => "/run/ublk-fast".into(),
    }
}

/// Whether this process drives ublk as root (CAP_SYS_ADMIN), or only its own unprivileged
/// devices.
pub fn privileged() -> bool {
    !ublk_fast_engine::ctrl::unprivileged()
}

pub fn path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.json"))
}

/// Ids of the devices with a record.
pub fn recorded_ids() -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir(run_dir())
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".json")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

/// The counters the daemon publishes (see `ublk_fast_engine::stats`).
pub fn stats_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.stats"))
}

impl Record {
    /// Write to a temporary name, fsync, rename: readers see the old file or the new, never half.
    pub fn save(&self) -> std::io::Result<()> {
        let dir = run_dir();
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{}.json.tmp", self.id));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(serde_json::to_string_pretty(self)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path(self.id))
    }

    pub fn load(id: u32) -> Option<Record> {
        serde_json::from_str(&std::fs::read_to_string(path(id)).ok()?).ok()
    }

    /// Removes the record only if it is still `pid`'s: a device deleted from outside may already
    /// have a successor with the same id.
    pub fn remove_if_owned(id: u32, pid: i32) {
        if Record::load(id).is_some_and(|r| r.pid == pid) {
            Record::remove(id);
        }
    }

    /// Removes the record and the daemon's counters file.
    pub fn remove(id: u32) {
        let _ = std::fs::remove_file(path(id));
        let _ = std::fs::remove_file(stats_path(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_remove() {
        let dir = std::env::temp_dir().join(format!("ublk-fast-rec-{}", std::process::id()));
        std::env::set_var("UBLK_FAST_RUN_DIR", &dir);
        let r = Record {
            id: 7,
            pid: 42,
            target: "null".into(),
            args: vec!["--size=1024".into()],
            queues: 2,
            depth: 64,
            queue_cpus: vec![0, 1],
            tag_cpus: vec![vec![0], vec![1]],
            queue_affinity: vec![vec![0], vec![1]],
            backing: String::new(),
            cwd: "/".into(),
            backing_id: None,
            argv: vec!["null".into()],
            setup: "ring DEFER_TASKRUN".into(),
        };
        r.save().unwrap();
        assert_eq!(Record::load(7), Some(r));
        assert_eq!(recorded_ids(), vec![7]);
        Record::remove(7);
        assert_eq!(Record::load(7), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
mod prop_tests {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        "(.|[\"\\\\\n\u{0}é𝄞])*"
    }

    fn record() -> impl Strategy<Value = Record> {
        let cpus = || prop::collection::vec(any::<usize>(), 0..8);
        let backing_id = prop::option::of(any::<(u64, u64, u64)>())
            .prop_map(|b| b.map(|(dev, ino, size)| BackingId { dev, ino, size }));
        (
            (any::<u32>(), any::<i32>(), text(), prop::collection::vec(text(), 0..4), text()),
            (any::<u16>(), any::<u16>(), cpus(), prop::collection::vec(cpus(), 0..4)),
            (prop::collection::vec(text(), 0..4), text(), text(), backing_id),
        )
            .prop_map(|(a, b, c)| Record {
                id: a.0,
                pid: a.1,
                target: a.2,
                args: a.3,
                backing: a.4,
                queues: b.0,
                depth: b.1,
                queue_cpus: b.2,
                tag_cpus: Vec::new(),
                queue_affinity: b.3,
                argv: c.0,
                cwd: c.1,
                setup: c.2,
                backing_id: c.3,
            })
    }

    fn check_any(s: &str) {
        if let Err(e) = serde_json::from_str::<Record>(s) {
            let e = e.to_string();
            assert!(!e.is_empty() && !e.contains(['\n', '\r']), "{s:?}: {e:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::with_cases(1000)
        })]

        #[test]
        fn arbitrary_strings(s in any::<String>()) {
            check_any(&s);
        }

        /// A record's JSON with one byte changed, cut short or with a field's value replaced.
        #[test]
        fn damaged_records(
            r in record(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<bool>(),
        ) {
            let mut b = serde_json::to_string_pretty(&r).unwrap().into_bytes();
            let i = at.index(b.len());
            if cut {
                b.truncate(i);
            } else {
                b[i] = byte;
            }
            check_any(&String::from_utf8_lossy(&b));
        }

        /// What `save` writes (pretty) and the compact form read back as the same record.
        #[test]
        fn records_round_trip(r in record()) {
            let pretty = serde_json::to_string_pretty(&r).unwrap();
            prop_assert_eq!(serde_json::from_str::<Record>(&pretty).unwrap(), r.clone());
            let compact = serde_json::to_string(&r).unwrap();
            prop_assert_eq!(serde_json::from_str::<Record>(&compact).unwrap(), r);
        }
    }
}
