//! `loop --metadata-size`: per-sector metadata (UBLK_F_INTEGRITY, Linux 7.0+) kept in a file
//! beside the data. The metadata of data bytes `[o, o + n)` lives at `[o / interval × size,
//! n / interval × size)` of that file, so it survives a restart or a crash just as the data
//! does. A new (or empty) file is filled with 0xFF: in protection information that is the
//! escape pattern, which the kernel does not check, so never-written sectors read back
//! without an error.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use ublk_fast_engine::target::Integrity;
use ublk_fast_engine::uapi::*;
use ublk_fast_engine::{Error, Result};

/// What `--metadata-size`, `--pi`, `--pi-offset` and `--pi-reftag` ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaSpec {
    pub metadata_size: u8,
    /// `LBMD_PI_CSUM_*`.
    pub csum: u8,
    pub pi_offset: u8,
    /// Type 1 protection: the reference tag carries the sector number.
    pub reftag: bool,
}

/// The PI tuple's size for a checksum type (the driver derives it the same way).
pub fn tuple_size(csum: u8) -> u8 {
    match csum {
        LBMD_PI_CSUM_IP | LBMD_PI_CSUM_CRC16_T10DIF => 8,
        LBMD_PI_CSUM_CRC64_NVME => 16,
        _ => 0,
    }
}

/// The names `--pi` takes, and back.
pub fn csum_name(csum: u8) -> &'static str {
    match csum {
        LBMD_PI_CSUM_IP => "ip",
        LBMD_PI_CSUM_CRC16_T10DIF => "t10dif",
        LBMD_PI_CSUM_CRC64_NVME => "nvme",
        _ => "none",
    }
}

impl MetaSpec {
    /// The driver's rules (SET_PARAMS refuses the rest with a bare EINVAL), as one line each.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.metadata_size == 0 {
            return Err("--metadata-size must be 1 to 255 bytes".into());
        }
        let t = tuple_size(self.csum);
        if u16::from(self.pi_offset) + u16::from(t) > u16::from(self.metadata_size) {
            return Err(format!(
                "--pi {} needs {t} bytes at --pi-offset {} inside --metadata-size {}: grow the metadata or lower the offset",
                csum_name(self.csum),
                self.pi_offset,
                self.metadata_size
            ));
        }
        if self.reftag && t == 0 {
            return Err("--pi-reftag needs a checksum: add --pi ip, t10dif or nvme".into());
        }
        Ok(())
    }

    /// The device's integrity parameters, for `logical_block`-byte intervals.
    pub fn integrity(&self, logical_block: u32) -> Integrity {
        let mut flags = 0;
        if self.reftag {
            flags |= LBMD_PI_CAP_REFTAG;
        }
        Integrity {
            metadata_size: self.metadata_size,
            interval_exp: logical_block.trailing_zeros() as u8,
            pi_offset: self.pi_offset,
            csum: self.csum,
            flags,
            tag_size: 0,
        }
    }
}

/// The metadata file of a `loop` device.
pub struct MetaStore {
    pub file: File,
    pub path: PathBuf,
    pub spec: MetaSpec,
    pub integrity: Integrity,
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::invalid(format!("loop --metadata-file {}: {what}", path.display()))
}

impl MetaStore {
    /// Opens the metadata file for `data_bytes` of data, creating it (filled with 0xFF) where
    /// it is missing or empty.
    pub fn open(
        path: &Path,
        spec: MetaSpec,
        data_bytes: u64,
        logical_block: u32,
        read_only: bool,
    ) -> Result<MetaStore> {
        spec.check().map_err(|m| invalid(path, m))?;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .create(!read_only)
            .truncate(false)
            .open(path)
            .map_err(|e| invalid(path, e))?;
        let integrity = spec.integrity(logical_block);
        let need = integrity.bytes_for(data_bytes);
        let have = file.metadata().map_err(|e| invalid(path, e))?.len();
        if have == 0 && !read_only {
            fill_escape(&file, need).map_err(|e| invalid(path, format!("filling it: {e}")))?;
        }
        Self::adopt(file, path, spec, data_bytes, logical_block)
    }

    /// Serves `file`, opened as `open` opens `path`: the same checks and lock.
    pub fn adopt(
        file: File,
        path: &Path,
        spec: MetaSpec,
        data_bytes: u64,
        logical_block: u32,
    ) -> Result<MetaStore> {
        spec.check().map_err(|m| invalid(path, m))?;
        let meta = file.metadata().map_err(|e| invalid(path, e))?;
        if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
            return Err(invalid(path, "is neither a regular file nor a block device"));
        }
        let integrity = spec.integrity(logical_block);
        let need = integrity.bytes_for(data_bytes);
        if meta.len() < need && meta.file_type().is_file() {
            return Err(invalid(
                path,
                format!(
                    "is {} bytes, the data needs {need} ({} per {logical_block}-byte block): give another file, or remove this one to start afresh",
                    meta.len(),
                    spec.metadata_size
                ),
            ));
        }
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(invalid(path, "is already in use by another ublk-fast device"));
        }
        Ok(MetaStore { file, path: path.to_path_buf(), spec, integrity })
    }

    /// The options that recreate this store (for the device's record).
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--metadata-size={}", self.spec.metadata_size),
            format!("--metadata-file={}", self.path.display()),
            format!("--pi={}", csum_name(self.spec.csum)),
            format!("--pi-offset={}", self.spec.pi_offset),
        ];
        if self.spec.reftag {
            a.push("--pi-reftag".into());
        }
        a
    }
}

/// Writes `len` bytes of 0xFF from the start of `file`.
fn fill_escape(mut file: &File, len: u64) -> io::Result<()> {
    let block = vec![0xffu8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(md: u8, csum: u8, off: u8, reftag: bool) -> MetaSpec {
        MetaSpec { metadata_size: md, csum, pi_offset: off, reftag }
    }

    #[test]
    fn the_drivers_rules_are_checked_with_a_reason() {
        assert!(spec(8, LBMD_PI_CSUM_CRC16_T10DIF, 0, true).check().is_ok());
        assert!(spec(64, LBMD_PI_CSUM_IP, 56, false).check().is_ok());
        assert!(spec(16, LBMD_PI_CSUM_CRC64_NVME, 0, true).check().is_ok());
        assert!(spec(8, LBMD_PI_CSUM_NONE, 0, false).check().is_ok());
        assert!(spec(0, LBMD_PI_CSUM_NONE, 0, false).check().unwrap_err().contains("1 to 255"));
        assert!(spec(8, LBMD_PI_CSUM_CRC64_NVME, 0, false).check().unwrap_err().contains("16"));
        assert!(spec(8, LBMD_PI_CSUM_IP, 1, false).check().is_err());
        assert!(spec(8, LBMD_PI_CSUM_NONE, 0, true).check().unwrap_err().contains("--pi ip"));
    }

    #[test]
    fn metadata_is_addressed_per_interval() {
        let i = spec(8, LBMD_PI_CSUM_CRC16_T10DIF, 0, true).integrity(512);
        assert_eq!(i.interval_exp, 9);
        assert_eq!(i.flags, LBMD_PI_CAP_REFTAG);
        assert_eq!(i.bytes_for(4096), 64);
        assert_eq!(spec(16, 4, 0, false).integrity(4096).bytes_for(1 << 20), 4096);
    }

    #[test]
    fn a_new_file_is_filled_with_the_escape_pattern_and_an_old_one_kept() {
        let p = std::env::temp_dir().join(format!("ublk-fast-meta-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let s = spec(8, LBMD_PI_CSUM_CRC16_T10DIF, 0, true);
        let m = MetaStore::open(&p, s, 1 << 20, 512, false).unwrap();
        drop(m);
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len(), 16 << 10);
        assert!(bytes.iter().all(|&b| b == 0xff));
        // Written metadata is kept on the next open.
        std::fs::write(&p, vec![1u8; 16 << 10]).unwrap();
        drop(MetaStore::open(&p, s, 1 << 20, 512, false).unwrap());
        assert!(std::fs::read(&p).unwrap().iter().all(|&b| b == 1));
        // Too small for the data: refused, not grown.
        let e = MetaStore::open(&p, s, 2 << 20, 512, false).err().unwrap().to_string();
        assert!(e.contains("the data needs 32768"), "{e}");
        std::fs::remove_file(&p).unwrap();
    }
}
