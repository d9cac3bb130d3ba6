//! CPU lists (`0-3,8,10-11`), the online set, queue placement and thread pinning.

use std::io;

use crate::error::{Error, Result};

/// Parses a cpulist as the kernel prints it (`/sys/devices/system/cpu/online`) and users type it.
/// The result is sorted and has no duplicates.
pub fn parse_cpu_list(s: &str) -> std::result::Result<Vec<usize>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty CPU list".into());
    }
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let num = |t: &str| -> std::result::Result<usize, String> {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{}` is not a CPU number", t.escape_debug()))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range `{}` runs backwards", part.escape_debug()));
                }
                if b >= 65536 {
                    return Err(format!("CPU {b} is out of range"));
                }
                cpus.extend(a..=b);
            }
            None => {
                let c = num(part)?;
                if c >= 65536 {
                    return Err(format!("CPU {c} is out of range"));
                }
                cpus.push(c);
            }
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

pub fn online_cpus() -> Result<Vec<usize>> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .map_err(|e| Error::os("read /sys/devices/system/cpu/online", e))?;
    parse_cpu_list(&s).map_err(|m| Error::invalid(format!("/sys/devices/system/cpu/online: {m}")))
}

/// Picks one CPU per queue: from `allowed` (the user's `--cpus`) that is also in the queue's
/// kernel affinity, preferring CPUs no earlier queue took. Where the two sets do not meet, the
/// queue still gets a CPU of `allowed` (round robin) so it never lands outside the user's set.
pub fn place_queues(allowed: &[usize], affinity: &[Vec<usize>]) -> Vec<usize> {
    assert!(!allowed.is_empty());
    let mut taken: Vec<usize> = Vec::with_capacity(affinity.len());
    for (q, aff) in affinity.iter().enumerate() {
        let both: Vec<usize> = allowed.iter().copied().filter(|c| aff.contains(c)).collect();
        let pick = both
            .iter()
            .copied()
            .find(|c| !taken.contains(c))
            .or_else(|| both.first().copied())
            .or_else(|| allowed.iter().copied().find(|c| !taken.contains(c)))
            .unwrap_or(allowed[q % allowed.len()]);
        taken.push(pick);
    }
    taken
}

/// Pins the calling thread to `cpu`, reporting the real errno.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bitmask; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `set` is a valid cpu_set_t and `cpu` is inside it (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 means the calling thread; `set` is valid for the call.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_ranges_and_singles() {
        assert_eq!(parse_cpu_list("0-3,8,10-11").unwrap(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list("0,2,4-5").unwrap(), vec![0, 2, 4, 5]);
        assert_eq!(parse_cpu_list("7").unwrap(), vec![7]);
        assert_eq!(parse_cpu_list("3,1,1-2\n").unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "a", "1-", "-1", "3-1", "1,,2", "0-99999", "1.5"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn placement_prefers_affinity_and_spreads() {
        // Two queues, kernel maps q0 -> {0,1}, q1 -> {2,3}; user allows all.
        let p = place_queues(&[0, 1, 2, 3], &[vec![0, 1], vec![2, 3]]);
        assert_eq!(p, vec![0, 2]);
        // User allows only 1 and 3.
        assert_eq!(place_queues(&[1, 3], &[vec![0, 1], vec![2, 3]]), vec![1, 3]);
        // No overlap: stay inside the user's set.
        assert_eq!(place_queues(&[5], &[vec![0], vec![1]]), vec![5, 5]);
        // Two queues on the same affinity spread over it.
        assert_eq!(place_queues(&[0, 1], &[vec![0, 1], vec![0, 1]]), vec![0, 1]);
    }
}
