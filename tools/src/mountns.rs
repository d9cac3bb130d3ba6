//! The daemon serves from its own, private mount namespace.
//!
//! Why: a filesystem on a ublk device must never be held by the daemon that serves it. If the
//! daemon's namespace held the last reference to such a mount, the daemon's exit would tear the
//! namespace down, unmount the filesystem and write it back, to a device whose server is the
//! exiting process: a deadlock. So the daemon
//! - unshares its mount namespace before any queue thread exists (threads inherit it),
//! - makes every mount in it private, so mounts made later elsewhere never propagate in, and
//! - detaches the copies of ublk-backed mounts it inherited (a `recover` while a filesystem on
//!   the device is mounted).

use std::ffi::CString;

/// Isolates the calling process's mounts; call while it is still single-threaded. Returns a
/// warning to print where the system does not allow it (e.g. no CAP_SYS_ADMIN in a container);
/// serving still works then, only without this protection.
pub fn isolate() -> Option<String> {
    // SAFETY: unshare only changes this process's namespaces; no memory is passed.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Some(format!(
            "cannot unshare the mount namespace ({}): the daemon shares the caller's mounts",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: NUL-terminated literals; the null pointers are allowed for a propagation change.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Some(format!(
            "cannot make the daemon's mounts private ({})",
            std::io::Error::last_os_error()
        ));
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // Children are listed after their parents: detach from the end.
    for target in ublk_mounts(&info).into_iter().rev() {
        if let Ok(c) = CString::new(target) {
            // SAFETY: a NUL-terminated path; MNT_DETACH only affects this private namespace.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    None
}

/// Mount points (unescaped) of the filesystems on ublk devices, from `/proc/self/mountinfo`.
fn ublk_mounts(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let mount_point = f.nth(4)?;
            // The source follows the "-" separator and the filesystem type.
            let mut rest = l.split(" - ").nth(1)?.split(' ');
            let source = rest.nth(1)?;
            source.starts_with("/dev/ublkb").then(|| unescape(mount_point))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ublk_mounts_only() {
        let info = "\
22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw
36 22 259:0 / /mnt/data\\040disk rw,relatime shared:12 - ext4 /dev/ublkb3 rw
37 22 7:0 / /mnt/loop rw shared:13 - ext4 /dev/loop0 rw
38 36 259:1 / /mnt/data\\040disk/x rw - xfs /dev/ublkb12 rw,attr2
";
        assert_eq!(ublk_mounts(info), ["/mnt/data disk", "/mnt/data disk/x"]);
    }
}
