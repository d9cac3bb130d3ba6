//! From a parsed command line to what the engine needs: the target, and the device's
//! configuration on the service's CPUs. Used by the CLI (to refuse bad input before anything
//! starts) and by the service (which builds the real thing).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ublk_fast_engine::cpus::parse_cpu_list;
use ublk_fast_engine::device::DeviceConfig;
use ublk_fast_engine::target::Target;
use ublk_fast_targets::{
    FaultSpec, FaultTarget, LoopOptions, LoopTarget, MetaSpec, NbdOptions, NbdTarget, NullTarget,
    StripeTarget,
};

use crate::cli::{
    AddOpts, FaultArgs, InnerTarget, LoopArgs, NbdArgs, NullArgs, StripeArgs, TargetCmd,
};
use crate::{record, size, CliError};

fn null_target(a: &NullArgs) -> Result<Arc<dyn Target>, CliError> {
    let size =
        size::parse_size(&a.size).map_err(|m| CliError::usage(format!("null --size: {m}")))?;
    if size == 0 || size % 512 != 0 {
        return Err(CliError::usage(format!(
            "null --size {}: must be a non-zero multiple of 512 bytes",
            a.size
        )));
    }
    Ok(Arc::new(NullTarget::new(size)?))
}

fn loop_target(
    a: &LoopArgs,
    cwd: &Path,
    given: &mut Vec<std::fs::File>,
) -> Result<Arc<dyn Target>, CliError> {
    let opts = LoopOptions {
        buffered: a.buffered,
        read_only: a.read_only,
        block_size: a.block_size,
        discard: !a.no_discard,
    };
    let path = cwd.join(&a.path);
    let usage = |e: ublk_fast_engine::Error| CliError::usage(e.to_string());
    let t = match given.pop() {
        Some(f) => LoopTarget::adopt(f, &path, &opts),
        None => LoopTarget::open(&path, &opts),
    }
    .map_err(usage)?;
    let Some(metadata_size) = a.metadata_size else { return Ok(Arc::new(t)) };
    let meta_path = match &a.metadata_file {
        Some(p) => cwd.join(p),
        None if t.is_blkdev() => {
            return Err(CliError::usage(format!(
                "loop {}: --metadata-size on a block device needs --metadata-file PATH",
                path.display()
            )))
        }
        None => {
            let mut p = path.clone().into_os_string();
            p.push(".meta");
            p.into()
        }
    };
    let spec =
        MetaSpec { metadata_size, csum: a.pi.csum(), pi_offset: a.pi_offset, reftag: a.pi_reftag };
    Ok(Arc::new(t.with_metadata(given.pop(), &meta_path, spec).map_err(usage)?))
}

fn stripe_target(
    a: &StripeArgs,
    cwd: &Path,
    given: &mut Vec<std::fs::File>,
) -> Result<Arc<dyn Target>, CliError> {
    let chunk =
        size::parse_size(&a.chunk).map_err(|m| CliError::usage(format!("stripe --chunk: {m}")))?;
    let chunk = u32::try_from(chunk).map_err(|_| {
        CliError::usage(format!("stripe --chunk {}: must be a power of two from 4K to 1M", a.chunk))
    })?;
    let opts =
        LoopOptions { buffered: a.buffered, read_only: false, block_size: None, discard: false };
    let paths: Vec<std::path::PathBuf> = a.paths.iter().map(|p| cwd.join(p)).collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let t = StripeTarget::open(&refs, chunk, &opts, &mut || given.pop())
        .map_err(|e| CliError::usage(e.to_string()))?;
    Ok(Arc::new(t))
}

fn nbd_target(a: &NbdArgs, zero_copy: bool) -> Result<Arc<dyn Target>, CliError> {
    let opts = NbdOptions {
        connections: a.connections,
        reconnect_timeout: Duration::from_secs(a.reconnect_timeout),
        zero_copy,
        ..NbdOptions::default()
    };
    let t = NbdTarget::connect(&a.uri, &opts).map_err(|e| CliError::usage(e.to_string()))?;
    Ok(Arc::new(t))
}

fn fault_target(
    f: &FaultArgs,
    cwd: &Path,
    given: &mut Vec<std::fs::File>,
) -> Result<Arc<dyn Target>, CliError> {
    if f.fail.is_none() && f.delay_ms.is_none() {
        return Err(CliError::usage(
            "fault: nothing to inject: give --fail[=ERRNO] and/or --delay-ms MS",
        ));
    }
    let inner = match &f.inner {
        InnerTarget::Null(a) => null_target(a)?,
        InnerTarget::Loop(a) => loop_target(a, cwd, given)?,
    };
    let spec = FaultSpec {
        op: f.op.ublk_op(),
        every: f.every,
        errno: f.fail.map(|e| e.errno()),
        delay: Duration::from_millis(f.delay_ms.unwrap_or(0)),
    };
    Ok(Arc::new(FaultTarget::new(inner, spec)))
}

/// The CLI's check of a target before it asks the service for the device: opens it (its files
/// then go to the service), except `nbd`, whose URI is only parsed here: the service makes
/// the connections (a server limited to one client, or one that exits when its first client
/// leaves, must not meet a probe of ours first).
pub fn precheck(t: &TargetCmd, cwd: &Path) -> Result<Option<Arc<dyn Target>>, CliError> {
    if let TargetCmd::Nbd(a) = t {
        ublk_fast_targets::nbd::uri::NbdUri::parse(&a.uri)
            .map_err(|e| CliError::usage(e.to_string()))?;
        return Ok(None);
    }
    // `nbd`, the only target that looks at zero copy, returned above.
    target(t, cwd, false).map(Some)
}

/// Builds (opens) the target; relative paths are taken from `cwd`. `zero_copy`: the device
/// asks for zero copy (`--zero-copy on`), which `nbd` serves only when asked.
pub fn target(t: &TargetCmd, cwd: &Path, zero_copy: bool) -> Result<Arc<dyn Target>, CliError> {
    target_with(t, cwd, Vec::new(), zero_copy)
}

/// Builds the target from files already opened for it (in `Target::files` order, as the CLI
/// sends them), opening by path what is not given.
pub fn target_with(
    t: &TargetCmd,
    cwd: &Path,
    given: Vec<std::fs::File>,
    zero_copy: bool,
) -> Result<Arc<dyn Target>, CliError> {
    let mut given: Vec<std::fs::File> = given.into_iter().rev().collect();
    match t {
        TargetCmd::Null(a) => null_target(a),
        TargetCmd::Loop(a) => loop_target(a, cwd, &mut given),
        TargetCmd::Fault(f) => fault_target(f, cwd, &mut given),
        TargetCmd::Nbd(a) => nbd_target(a, zero_copy),
        TargetCmd::Stripe(a) => stripe_target(a, cwd, &mut given),
    }
}

/// The CPUs of `--cpus` (all of `allowed` without it), each of which must be in `allowed`
/// (the online CPUs for a new service, the service's CPUs for a device).
pub fn cpus(spec: Option<&str>, allowed: &[usize], what: &str) -> Result<Vec<usize>, CliError> {
    let Some(s) = spec else { return Ok(allowed.to_vec()) };
    let cpus = parse_cpu_list(s).map_err(|m| CliError::usage(format!("--cpus {s}: {m}")))?;
    let outside: Vec<String> =
        cpus.iter().filter(|c| !allowed.contains(c)).map(|c| c.to_string()).collect();
    if !outside.is_empty() {
        return Err(CliError::usage(format!(
            "--cpus {s}: CPU {} is not {what} ({what}: {})",
            outside.join(","),
            list_str(allowed)
        )));
    }
    Ok(cpus)
}

/// `0-3,8`
pub fn list_str(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
        i = j + 1;
    }
    out.join(",")
}

/// The device's configuration from its options, on `service_cpus`.
pub fn device_config(opts: &AddOpts, service_cpus: &[usize]) -> Result<DeviceConfig, CliError> {
    let cpus = cpus(opts.cpus.as_deref(), service_cpus, "one of the service's CPUs")?;
    Ok(DeviceConfig {
        dev_id: opts.id,
        queues: opts.queues.unwrap_or(cpus.len().min(4096) as u16),
        depth: opts.depth.unwrap_or(128),
        cpus,
        max_io_bytes: DeviceConfig::DEFAULT_MAX_IO_BYTES,
        stats_dir: Some(record::run_dir()),
        zero_copy: opts.zero_copy.unwrap_or_default().into(),
        recovery: opts.recovery.map(Into::into).unwrap_or_default(),
        user_copy: opts.user_copy,
        batch: opts.batch_io,
        no_part_scan: opts.no_part_scan,
        spread_tags: opts.spread_tags,
        poll_us: opts.poll_us.unwrap_or(0),
        slow_io_ms: opts.slow_io_ms.unwrap_or(5000),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_print_as_ranges() {
        assert_eq!(list_str(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(list_str(&[5]), "5");
        assert_eq!(list_str(&[]), "");
    }

    #[test]
    fn cpus_must_be_allowed() {
        assert_eq!(cpus(None, &[0, 1], "x").unwrap(), vec![0, 1]);
        assert_eq!(cpus(Some("1"), &[0, 1], "x").unwrap(), vec![1]);
        let e = cpus(Some("0-2"), &[0, 1], "one of the service's CPUs").unwrap_err();
        assert_eq!(e.code, 2);
        assert!(e.msg.contains("CPU 2 is not one of the service's CPUs"), "{}", e.msg);
    }
}

#[cfg(test)]
mod prop_tests {
    use super::*;
    use proptest::prelude::*;

    /// Lists as users type them: items, ranges (some backwards), blanks after commas.
    const LIST: &str = "[0-9]{1,3}(-[0-9]{1,3})?(, ?[0-9]{1,3}(-[0-9]{1,3})?){0,6}";

    proptest! {
        #![proptest_config(ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::with_cases(1000)
        })]

        /// `list_str` is `parse_cpu_list`'s inverse on any CPU set, and prints it canonically:
        /// increasing items, a range only for 2 or more CPUs, no two items adjacent.
        #[test]
        fn list_str_round_trips(
            cpus in prop::collection::btree_set(prop_oneof![0usize..48, 0usize..65536], 1..64),
        ) {
            let cpus: Vec<usize> = cpus.into_iter().collect();
            let s = list_str(&cpus);
            prop_assert_eq!(parse_cpu_list(&s), Ok(cpus.clone()), "{}", s);
            let mut last: Option<usize> = None;
            for item in s.split(',') {
                let (a, b) = match item.split_once('-') {
                    Some((a, b)) => (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()),
                    None => (item.parse().unwrap(), item.parse().unwrap()),
                };
                prop_assert!(a <= b && last.is_none_or(|l| l + 1 < a), "{}", s);
                prop_assert!(item.contains('-') == (a < b), "{}", s);
                last = Some(b);
            }
        }

        /// Whatever a user types that parses, its listing parses to the same set.
        #[test]
        fn parsed_lists_print_canonically(s in LIST) {
            if let Ok(cpus) = parse_cpu_list(&s) {
                prop_assert_eq!(parse_cpu_list(&list_str(&cpus)), Ok(cpus));
            }
        }
    }
}
