//! `list`, `del`, `features`: the commands that look at or remove existing devices.

use std::time::{Duration, Instant};

use serde::Serialize;
use ublk_fast_engine::ctrl::{list_dev_ids, Control};
use ublk_fast_engine::uapi::{
    feature_names, feature_uapi_name, state_name, ublksrv_ctrl_dev_info, UBLK_S_DEV_LIVE,
};

use ublk_fast_engine::stats::{QueueSnapshot, StatsRegion, COUNTER_NAMES};

use crate::record::{self, Record};
use crate::CliError;

#[derive(Serialize, Debug)]
pub struct DevRow {
    pub id: u32,
    pub block_device: String,
    pub char_device: String,
    pub state: String,
    pub pid: i32,
    pub queues: u16,
    pub depth: u16,
    pub block_size: u32,
    pub physical_block_size: u32,
    pub size_bytes: u64,
    pub max_io_bytes: u32,
    pub target: Option<String>,
    pub args: Vec<String>,
    pub flags: Vec<String>,
    /// The driver's flags of the device, as a number.
    pub flag_bits: u64,
    /// The CPU serving each queue.
    pub queue_cpus: Vec<usize>,
    /// The CPUs serving each queue's tags (more than one where PER_IO_DAEMON spread them).
    pub tag_cpus: Vec<Vec<usize>>,
    /// The kernel's CPUs for each queue (what `queue_cpus` was chosen from).
    pub queue_affinity: Vec<Vec<usize>>,
    /// How the serving daemon set its queues up.
    pub setup: Option<String>,
    /// The daemon's counters summed over its queues (absent if it publishes none).
    pub stats: Option<std::collections::BTreeMap<&'static str, u64>>,
    /// Requests each queue has completed (empty if the daemon publishes no counters).
    pub queue_requests: Vec<u64>,
    /// The age of each queue's oldest request in flight (ms, as of the last once-a-second
    /// check; 0: none).
    pub queue_oldest_io_ms: Vec<u64>,
}

/// Requests completed by each queue of a daemon's stats file.
fn queue_requests(id: u32) -> Vec<u64> {
    let ops = ["reads", "writes", "flushes", "discards", "write_zeroes"];
    StatsRegion::read_file(&record::stats_path(id))
        .map(|rows| rows.iter().map(|r| ops.iter().map(|o| r.counter(o)).sum()).collect())
        .unwrap_or_default()
}

/// Each queue's oldest request in flight, in ms.
fn queue_oldest_io_ms(id: u32) -> Vec<u64> {
    StatsRegion::read_file(&record::stats_path(id))
        .map(|rows| rows.iter().map(|r| r.counter("oldest_io_ns") / 1_000_000).collect())
        .unwrap_or_default()
}

/// Sums the per-queue counters of a daemon's stats file (the oldest request's age: the
/// largest), plus the server round trips of remote targets (`backend_rtt_count`, and their
/// total in `backend_rtt_ns`).
fn stats(id: u32) -> Option<std::collections::BTreeMap<&'static str, u64>> {
    let rows = StatsRegion::read_file(&record::stats_path(id))?;
    let mut m: std::collections::BTreeMap<&'static str, u64> = COUNTER_NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let v = rows.iter().map(|r| r.counters[i]);
            (
                *n,
                if *n == "oldest_io_ns" {
                    v.max().unwrap_or(0)
                } else {
                    v.fold(0u64, u64::wrapping_add)
                },
            )
        })
        .collect();
    let rtt = |f: fn(&QueueSnapshot) -> u64| rows.iter().map(f).fold(0u64, u64::wrapping_add);
    m.insert("backend_rtt_count", rtt(|r| r.backend_rtt.count));
    m.insert("backend_rtt_ns", rtt(|r| r.backend_rtt.sum_ns));
    Some(m)
}

fn no_such_device(id: u32) -> CliError {
    CliError::runtime(format!("no ublk device with id {id} (see `ublk-fast list`)"))
}

/// GET_DEV_INFO, with a missing device reported as such.
pub fn dev_info(c: &mut Control, id: u32) -> Result<ublksrv_ctrl_dev_info, CliError> {
    c.dev_info(id).map_err(|e| match e.raw_errno() {
        libc::ENODEV | libc::ENOENT => no_such_device(id),
        libc::EACCES | libc::EPERM if !record::privileged() => CliError::runtime(format!(
            "device {id} is not yours: only the user who created it, or root, may look at or change it"
        )),
        _ => CliError::runtime(e.to_string()),
    })
}

/// The device's geometry: (logical block, physical block, bytes). From sysfs while its disk
/// exists: GET_PARAMS takes the driver's device lock, which a STOP_DEV still draining I/O
/// holds, and a command stuck behind it would also hold this process at exit.
fn geometry(c: &mut Control, id: u32, live: bool) -> Result<(u32, u32, u64), CliError> {
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/block/ublkb{id}/{f}")).ok()?.trim().parse().ok()
    };
    if let (Some(l), Some(p), Some(sectors)) =
        (read("queue/logical_block_size"), read("queue/physical_block_size"), read("size"))
    {
        return Ok((l as u32, p as u32, sectors << 9));
    }
    if live {
        // LIVE without a disk: a STOP_DEV is removing it (and holds the lock): nothing to ask.
        return Ok((0, 0, 0));
    }
    let params = c.get_params(id).map_err(|e| CliError::runtime(e.to_string()))?;
    Ok((
        1 << params.basic.logical_bs_shift,
        1 << params.basic.physical_bs_shift,
        params.basic.dev_sectors << 9,
    ))
}

fn row(c: &mut Control, id: u32) -> Result<DevRow, CliError> {
    let info = dev_info(c, id)?;
    let live = info.state == UBLK_S_DEV_LIVE;
    let (block_size, physical_block_size, size_bytes) = geometry(c, id, live)?;
    let stopping = live && size_bytes == 0;
    let rec = Record::load(id);
    Ok(DevRow {
        id,
        block_device: format!("/dev/ublkb{id}"),
        char_device: format!("/dev/ublkc{id}"),
        state: if stopping { "STOPPING".into() } else { state_name(info.state).to_string() },
        pid: info.ublksrv_pid,
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        block_size,
        physical_block_size,
        size_bytes,
        max_io_bytes: info.max_io_buf_bytes,
        target: rec.as_ref().map(|r| r.target.clone()),
        setup: rec.as_ref().map(|r| r.setup.clone()),
        queue_cpus: rec.as_ref().map(|r| r.queue_cpus.clone()).unwrap_or_default(),
        tag_cpus: rec.as_ref().map(|r| r.tag_cpus.clone()).unwrap_or_default(),
        queue_affinity: rec.as_ref().map(|r| r.queue_affinity.clone()).unwrap_or_default(),
        args: rec.map(|r| r.args).unwrap_or_default(),
        flags: feature_names(info.flags),
        flag_bits: info.flags,
        stats: stats(id),
        queue_requests: queue_requests(id),
        queue_oldest_io_ms: queue_oldest_io_ms(id),
    })
}

/// `list`: every device (or one), as JSON or in the two-line layout ublksrv's, rublk's and
/// kublk's `list` print (scripts parse it), followed by ublk-fast's own lines; `verbose` adds
/// each queue's CPUs and the counters.
pub fn list(id: Option<u32>, json: bool, verbose: bool) -> Result<(), CliError> {
    let mut c = Control::open().map_err(CliError::from)?;
    let ids = match id {
        Some(i) => vec![i],
        None => list_dev_ids(),
    };
    let mut rows = Vec::with_capacity(ids.len());
    for i in ids {
        // A user sees only the devices they may open: the kernel refuses the others.
        if id.is_none()
            && !record::privileged()
            && c.dev_info(i).is_err_and(|e| matches!(e.raw_errno(), libc::EACCES | libc::EPERM))
        {
            continue;
        }
        match row(&mut c, i) {
            Ok(r) => rows.push(r),
            // A device deleted between the directory scan and the query is simply gone.
            Err(e) if id.is_none() => eprintln!("ublk-fast: {}", e.msg),
            Err(e) => return Err(e),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into()));
        return Ok(());
    }
    for r in rows {
        print!("{}", two_line(&r, verbose));
    }
    Ok(())
}

/// ublksrv's layout: `dev id N: nr_hw_queues Q queue_depth D block size B dev_capacity SECTORS`,
/// then a tab and `max rq size BYTES daemon pid PID flags 0xFLAGS state STATE`; then ours.
fn two_line(r: &DevRow, verbose: bool) -> String {
    let mut out = format!(
        "dev id {}: nr_hw_queues {} queue_depth {} block size {} dev_capacity {}\n\tmax rq size {} daemon pid {} flags {:#x} state {}\n",
        r.id,
        r.queues,
        r.depth,
        r.block_size,
        r.size_bytes >> 9,
        r.max_io_bytes,
        if r.pid > 0 { r.pid } else { -1 },
        r.flag_bits,
        r.state
    );
    let cores: Vec<String> = r
        .queue_cpus
        .iter()
        .enumerate()
        .map(|(q, c)| match r.tag_cpus.get(q).filter(|t| t.len() > 1) {
            // PER_IO_DAEMON: the queue's tags on several cores, its own first.
            Some(t) => format!(
                "{q}->cpu{}",
                t.iter().map(usize::to_string).collect::<Vec<_>>().join("+cpu")
            ),
            None => format!("{q}->cpu{c}"),
        })
        .collect();
    out += &format!(
        "\tqueues {}\n\ttarget {} {}\n",
        if cores.is_empty() { "?".to_string() } else { cores.join(" ") },
        r.target.as_deref().unwrap_or("?"),
        r.args.join(" ")
    );
    if verbose {
        out += &format!("\tflags {}\n", r.flags.join(" "));
        for (q, aff) in r.queue_affinity.iter().enumerate() {
            let n = r.queue_requests.get(q).copied().unwrap_or(0);
            let oldest = r.queue_oldest_io_ms.get(q).copied().unwrap_or(0);
            out += &format!(
                "\tqueue {q}: kernel CPUs {aff:?}, served on cpu{}, {n} requests, oldest in flight {oldest} ms\n",
                r.queue_cpus.get(q).copied().unwrap_or(0)
            );
        }
        if let Some(setup) = &r.setup {
            out += &format!("\tsetup {setup}\n");
        }
        if let Some(st) = &r.stats {
            let s: Vec<String> = st.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out += &format!("\tstats {}\n", s.join(" "));
        }
    }
    out
}

pub fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

pub fn del_one(c: &mut Control, id: u32) -> Result<(), CliError> {
    let info = dev_info(c, id)?;
    // STOP_DEV fails harmlessly on a device that is already stopped or dead. It ends the I/O
    // in flight and makes the daemon's queues exit.
    let _ = c.stop_dev(id);
    c.del_dev_nowait(id).map_err(|e| CliError::runtime(e.to_string()))?;
    Record::remove(id);
    let deadline = Instant::now() + Duration::from_secs(10);
    let gone = || !std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists();
    while (!gone() || process_alive(info.ublksrv_pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !gone() {
        eprintln!(
            "ublk-fast: device {id} is stopped; the kernel removes it when the last program \
             holding /dev/ublkb{id} open closes it"
        );
    }
    Ok(())
}

/// `del` with no service running: one device, or every ublk-fast device (every ublk device
/// with `all_servers`).
pub fn del(id: Option<u32>, all: bool, all_servers: bool) -> Result<(), CliError> {
    let mut c = Control::open().map_err(CliError::from)?;
    if all {
        let mut first_err = None;
        for i in list_dev_ids() {
            if !all_servers && Record::load(i).is_none() {
                eprintln!(
                    "ublk-fast: device {i} is not ublk-fast's: left (--all-servers deletes it)"
                );
                continue;
            }
            if let Err(e) = del_one(&mut c, i) {
                eprintln!("ublk-fast: error: {}", e.msg);
                first_err.get_or_insert(e);
            }
        }
        return first_err.map_or(Ok(()), Err);
    }
    del_one(&mut c, id.expect("clap requires --id or --all"))
}

/// `udev-owner NAME`: "UID GID" of the user who created the unprivileged device behind node
/// NAME, for udev to give them its nodes; exit 1 (udev: the rule does not apply) for a device
/// root created, which keeps root's 0600.
pub fn udev_owner(name: &str) -> Result<(), CliError> {
    let digits = name
        .strip_prefix("ublkc")
        .or_else(|| name.strip_prefix("ublkb"))
        .map(|rest| rest.split('p').next().unwrap_or(rest));
    let Some(id) = digits.and_then(|d| d.parse::<u32>().ok()) else {
        return Err(CliError::usage(format!(
            "udev-owner {name}: not a ublk node name (ublkcN, ublkbN or ublkbNpM)"
        )));
    };
    let mut c = Control::open().map_err(CliError::from)?;
    let info = c.dev_info2(id).map_err(CliError::from)?;
    if info.flags & ublk_fast_engine::uapi::UBLK_F_UNPRIVILEGED_DEV == 0 {
        return Err(CliError::runtime(format!("device {id} is root's: its nodes stay root's")));
    }
    println!("{} {}", info.owner_uid, info.owner_gid);
    Ok(())
}

pub fn features(json: bool) -> Result<(), CliError> {
    let mut c = Control::open().map_err(CliError::from)?;
    let f = c.features().map_err(CliError::from)?;
    let names = feature_names(f);
    if json {
        let v = serde_json::json!({ "flags": f, "names": names });
        println!("{v}");
    } else {
        // As kublk's `features` does: the mask, then one flag a line by its UAPI name.
        println!("ublk driver features: {f:#x}");
        for n in names {
            let bit = ublk_fast_engine::uapi::FEATURE_NAMES
                .iter()
                .find(|(_, s)| *s == n)
                .map_or(String::new(), |(v, _)| format!("{v:#08x}"));
            println!("  {bit:<8} {}", feature_uapi_name(&n));
        }
    }
    Ok(())
}
