//! `--metrics ADDR:PORT`: Prometheus text exposition of every device's counters, one endpoint
//! per node, served by its own thread. The cores never see it: it reads their counter blocks
//! (`StatsRegion::snapshot`), sums nothing on their behalf and allocates only while rendering
//! a scrape, so its cost does not grow with the I/O rate. Devices appear and disappear with
//! add and del; every series carries `dev="ID"` (and `device="ublkbN"`), per queue `queue="Q"`.
//!
//! Names mirror node_exporter's diskstats under `ublk_fast_`.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use ublk_fast_engine::stats::{OpSnapshot, QueueSnapshot, StatsRegion, LAT_BOUNDS_NS, OP_NAMES};

use crate::CliError;

/// What the exporter says about one device.
pub struct DeviceMeta {
    pub id: u32,
    pub target: String,
    pub backing: String,
    pub queues: u16,
    pub depth: u16,
    pub zero_copy: &'static str,
    /// The CPU serving each queue.
    pub cpus: Vec<usize>,
    pub stats: Arc<StatsRegion>,
}

impl DeviceMeta {
    /// The labels naming the device on every series.
    fn labels(&self) -> String {
        format!("dev=\"{}\",device=\"ublkb{}\"", self.id, self.id)
    }
}

/// The devices the exporter shows: replaced by the service on every add and del.
#[derive(Default)]
pub struct Exporter {
    devs: Mutex<Vec<DeviceMeta>>,
}

impl Exporter {
    pub fn set(&self, devs: Vec<DeviceMeta>) {
        *self.devs.lock().unwrap_or_else(|e| e.into_inner()) = devs;
    }

    fn render(&self) -> String {
        render(&self.devs.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Parses `ADDR:PORT`; a bare `PORT` (or `:PORT`) is on loopback.
pub fn parse_addr(addr: &str) -> Result<SocketAddr, CliError> {
    let port = addr.strip_prefix(':').unwrap_or(addr);
    if let Ok(p) = port.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], p)));
    }
    addr.parse().map_err(|_| {
        CliError::usage(format!("--metrics {addr}: not an ADDR:PORT (e.g. 127.0.0.1:9633)"))
    })
}

/// Parses and binds `ADDR:PORT` now, so a bad or busy address fails before any device exists.
pub fn bind(addr: &str) -> Result<TcpListener, CliError> {
    let sa = parse_addr(addr)?;
    TcpListener::bind(sa).map_err(|e| {
        CliError::runtime(format!("--metrics {addr}: cannot listen: {e} (pick a free port)"))
    })
}

/// The plain counters: (metric name, HELP, type, counter name in the stats block, scale).
const COUNTERS: &[(&str, &str, &str, &str, f64)] = &[
    ("reads_completed_total", "Read requests completed.", "counter", "reads", 1.0),
    ("writes_completed_total", "Write requests completed.", "counter", "writes", 1.0),
    ("read_bytes_total", "Bytes read.", "counter", "read_bytes", 1.0),
    ("written_bytes_total", "Bytes written.", "counter", "written_bytes", 1.0),
    ("flush_requests_total", "Flush requests completed.", "counter", "flushes", 1.0),
    ("discards_completed_total", "Discard requests completed.", "counter", "discards", 1.0),
    (
        "write_zeroes_completed_total",
        "Write-zeroes requests completed.",
        "counter",
        "write_zeroes",
        1.0,
    ),
    ("fua_writes_total", "Writes with FUA (force unit access).", "counter", "fua_writes", 1.0),
    ("io_now", "Requests in flight.", "gauge", "io_now", 1.0),
    (
        "io_time_seconds_total",
        "Seconds with at least one request in flight.",
        "counter",
        "io_time_ns",
        1e-9,
    ),
    (
        "ring_submits_total",
        "io_uring_enter calls by the core thread serving the queue (counted on its first queue).",
        "counter",
        "ring_enters",
        1.0,
    ),
    ("sqes_submitted_total", "SQEs queued on the queue ring.", "counter", "sqes", 1.0),
    (
        "backend_fsyncs_total",
        "fdatasync operations issued to the backing store.",
        "counter",
        "backend_fsyncs",
        1.0,
    ),
    (
        "zero_copy_fallbacks_total",
        "Zero-copy requests whose automatic buffer registration failed (served after a manual one).",
        "counter",
        "zero_copy_fallbacks",
        1.0,
    ),
    (
        "unexpected_completions_total",
        "Completions that matched nothing in flight (stale or unknown): logged, never applied.",
        "counter",
        "unexpected_completions",
        1.0,
    ),
    (
        "backend_connected",
        "Remote targets (nbd): 1 while the queue's connection to its server is up, 0 while it is down.",
        "gauge",
        "backend_connected",
        1.0,
    ),
    (
        "backend_reconnects_total",
        "Remote targets (nbd): connections re-established after a loss.",
        "counter",
        "backend_reconnects",
        1.0,
    ),
    (
        "backend_resent_total",
        "Remote targets (nbd): requests sent again on a new connection after one was lost.",
        "counter",
        "backend_resent",
        1.0,
    ),
    (
        "poll_seconds_total",
        "Latency mode (--poll-us): seconds the core thread serving the queue spent polling after busy turns (counted on its first queue).",
        "counter",
        "poll_ns",
        1e-9,
    ),
    (
        "poll_hits_total",
        "Latency mode: polls that a completion ended (a sleep and a wake-up saved).",
        "counter",
        "poll_hits",
        1.0,
    ),
    (
        "poll_misses_total",
        "Latency mode: polls that ran out (the core then slept).",
        "counter",
        "poll_misses",
        1.0,
    ),
    (
        "slow_ios_total",
        "Requests outstanding longer than the device's --slow-io-ms (each counted once, logged).",
        "counter",
        "slow_ios",
        1.0,
    ),
    (
        "oldest_io_seconds",
        "Age of the oldest request in flight on the queue (checked every second; 0 when none).",
        "gauge",
        "oldest_io_ns",
        1e-9,
    ),
    (
        "backend_dsync_writes_total",
        "Writes issued to the backing store with RWF_DSYNC.",
        "counter",
        "backend_dsync_writes",
        1.0,
    ),
];

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders every device's metrics in the Prometheus text format (0.0.4).
pub fn render(devs: &[DeviceMeta]) -> String {
    let snaps: Vec<Vec<QueueSnapshot>> = devs.iter().map(|d| d.stats.snapshot()).collect();
    let mut out = String::with_capacity(16 * 1024);
    for &(name, help, kind, key, scale) in COUNTERS {
        let _ = writeln!(out, "# HELP ublk_fast_{name} {help}\n# TYPE ublk_fast_{name} {kind}");
        for (d, snap) in devs.iter().zip(&snaps) {
            for (q, s) in snap.iter().enumerate() {
                let v = s.counter(key) as f64 * scale;
                let _ = writeln!(out, "ublk_fast_{name}{{{},queue=\"{q}\"}} {v}", d.labels());
            }
        }
    }
    let name = "ublk_fast_io_errors_total";
    let _ = writeln!(out, "# HELP {name} Requests completed with an error, by op.");
    let _ = writeln!(out, "# TYPE {name} counter");
    for (d, snap) in devs.iter().zip(&snaps) {
        for (q, s) in snap.iter().enumerate() {
            for (o, op) in OP_NAMES.iter().enumerate() {
                let v = s.ops[o].errors;
                let _ = writeln!(out, "{name}{{{},queue=\"{q}\",op=\"{op}\"}} {v}", d.labels());
            }
        }
    }
    let name = "ublk_fast_io_latency_seconds";
    let _ = writeln!(out, "# HELP {name} Time from a request's delivery to its commit, by op.");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (d, snap) in devs.iter().zip(&snaps) {
        for (q, s) in snap.iter().enumerate() {
            for (o, op) in OP_NAMES.iter().enumerate() {
                let l = format!("{},queue=\"{q}\",op=\"{op}\"", d.labels());
                histogram(&mut out, name, &l, &s.ops[o]);
            }
        }
    }
    // Only remote targets have a server to time.
    let name = "ublk_fast_backend_rtt_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Remote targets (nbd): a request's round trip to its server, from its last byte sent to its reply."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (d, snap) in devs.iter().zip(&snaps).filter(|(d, _)| d.target == "nbd") {
        for (q, s) in snap.iter().enumerate() {
            histogram(&mut out, name, &format!("{},queue=\"{q}\"", d.labels()), &s.backend_rtt);
        }
    }
    let name = "ublk_fast_device_info";
    let _ = writeln!(out, "# HELP {name} The device's configuration; the value is always 1.");
    let _ = writeln!(out, "# TYPE {name} gauge");
    for d in devs {
        let _ = writeln!(
            out,
            "{name}{{{},target=\"{}\",backing=\"{}\",queues=\"{}\",depth=\"{}\",zero_copy=\"{}\",cpus=\"{}\"}} 1",
            d.labels(),
            esc(&d.target),
            esc(&d.backing),
            d.queues,
            d.depth,
            d.zero_copy,
            crate::build::list_str(&d.cpus)
        );
    }
    out
}

/// One histogram's samples: cumulative buckets (seconds), sum and count.
fn histogram(out: &mut String, name: &str, labels: &str, h: &OpSnapshot) {
    let mut cum = 0;
    for (b, bound) in LAT_BOUNDS_NS.iter().enumerate() {
        cum += h.buckets[b];
        let le = *bound as f64 / 1e9;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cum}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", cum + h.overflow);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum_ns as f64 / 1e9);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

/// Serves `/metrics` on its own thread until the process exits (`http`: bounded connections,
/// whole-request deadline, size limit).
pub fn spawn(listener: TcpListener, exporter: Arc<Exporter>) {
    let _ = std::thread::Builder::new().name("metrics".into()).spawn(move || {
        crate::http::serve(listener, |line| {
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let get = line.starts_with("GET ");
            if get && (path == "/metrics" || path.starts_with("/metrics?")) {
                ("200 OK", "text/plain; version=0.0.4; charset=utf-8", exporter.render())
            } else {
                ("404 Not Found", "text/plain", "try /metrics\n".to_string())
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use ublk_fast_engine::stats::QueueStats;

    #[test]
    fn renders_counters_histograms_and_info() {
        let stats = Arc::new(StatsRegion::create(None, 2).unwrap());
        QueueStats::bump(&stats.queue(1).written_bytes, 8192);
        stats.queue(0).lat[1].record(3_000, false);
        stats.queue(0).lat[1].record(7_000, true);
        let d = DeviceMeta {
            id: 3,
            target: "loop".into(),
            backing: "/x \"y\"".into(),
            queues: 2,
            depth: 64,
            zero_copy: "off",
            cpus: vec![0, 1],
            stats,
        };
        let n = DeviceMeta {
            id: 4,
            target: "nbd".into(),
            backing: "nbd://h/e".into(),
            queues: 1,
            depth: 64,
            zero_copy: "off",
            cpus: vec![0],
            stats: Arc::new(StatsRegion::create(None, 1).unwrap()),
        };
        n.stats.queue(0).backend_rtt.record(700_000, false);
        let t = render(&[d, n]);
        let r = "ublk_fast_backend_rtt_seconds";
        assert!(
            t.contains(&format!(
                "{r}_bucket{{dev=\"4\",device=\"ublkb4\",queue=\"0\",le=\"0.001\"}} 1\n"
            )),
            "{t}"
        );
        assert!(t.contains(&format!("{r}_count{{dev=\"4\",device=\"ublkb4\",queue=\"0\"}} 1\n")));
        // Only remote targets have a round trip to show.
        assert!(!t.contains(&format!("{r}_count{{dev=\"3\"")));
        assert!(t.contains(
            "ublk_fast_written_bytes_total{dev=\"3\",device=\"ublkb3\",queue=\"1\"} 8192\n"
        ));
        let w = "ublk_fast_io_latency_seconds_bucket{dev=\"3\",device=\"ublkb3\",queue=\"0\",op=\"write\"";
        assert!(t.contains(&format!("{w},le=\"0.0000025\"}} 0\n")), "{t}");
        assert!(t.contains(&format!("{w},le=\"0.000005\"}} 1\n")));
        assert!(t.contains(&format!("{w},le=\"0.00001\"}} 2\n")));
        assert!(t.contains(&format!("{w},le=\"+Inf\"}} 2\n")));
        assert!(t.contains(
            "ublk_fast_io_latency_seconds_count{dev=\"3\",device=\"ublkb3\",queue=\"0\",op=\"write\"} 2\n"
        ));
        assert!(t.contains(
            "ublk_fast_io_errors_total{dev=\"3\",device=\"ublkb3\",queue=\"0\",op=\"write\"} 1\n"
        ));
        assert!(t.contains("backing=\"/x \\\"y\\\"\""));
        // Every family has HELP and TYPE, and every sample line belongs to a declared family.
        let families: Vec<&str> =
            t.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
        assert_eq!(families.len(), COUNTERS.len() + 4);
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            assert!(families.iter().any(|f| l.starts_with(f)), "undeclared sample {l}");
        }
    }

    #[test]
    fn bad_addresses_are_refused() {
        assert!(bind("nonsense").unwrap_err().msg.contains("not an ADDR:PORT"));
        let l = bind("127.0.0.1:0").unwrap();
        let taken = l.local_addr().unwrap().to_string();
        assert!(bind(&taken).unwrap_err().msg.contains("cannot listen"));
    }
}
