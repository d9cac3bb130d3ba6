//! The ublk user API, written from the kernel's `include/uapi/linux/ublk_cmd.h` (7.x).
//!
//! Plain `#[repr(C)]` structs and constants; the layout of every struct is asserted against the
//! header (sizes and field offsets) in the tests below, so a wrong field cannot silently shift
//! the data the kernel reads.
#![allow(non_camel_case_types)]

use std::mem::size_of;

// ---- ioctl encoding (asm-generic/ioctl.h) ----
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    // size is at most 14 bits; every struct here is far below that.
    (dir << 30) | ((size as u32) << 16) | ((b'u' as u32) << 8) | nr
}
const fn ior(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ, nr, size)
}
const fn iowr(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, size)
}
const CTRL: usize = size_of::<ublksrv_ctrl_cmd>();
const IO: usize = size_of::<ublksrv_io_cmd>();
const BATCH: usize = size_of::<ublk_batch_io>();

// ---- control commands (on /dev/ublk-control) ----
pub const UBLK_U_CMD_GET_QUEUE_AFFINITY: u32 = ior(0x01, CTRL);
pub const UBLK_U_CMD_GET_DEV_INFO: u32 = ior(0x02, CTRL);
pub const UBLK_U_CMD_ADD_DEV: u32 = iowr(0x04, CTRL);
pub const UBLK_U_CMD_DEL_DEV: u32 = iowr(0x05, CTRL);
pub const UBLK_U_CMD_START_DEV: u32 = iowr(0x06, CTRL);
pub const UBLK_U_CMD_STOP_DEV: u32 = iowr(0x07, CTRL);
pub const UBLK_U_CMD_SET_PARAMS: u32 = iowr(0x08, CTRL);
pub const UBLK_U_CMD_GET_PARAMS: u32 = ior(0x09, CTRL);
pub const UBLK_U_CMD_START_USER_RECOVERY: u32 = iowr(0x10, CTRL);
pub const UBLK_U_CMD_END_USER_RECOVERY: u32 = iowr(0x11, CTRL);
pub const UBLK_U_CMD_GET_DEV_INFO2: u32 = ior(0x12, CTRL);
pub const UBLK_U_CMD_GET_FEATURES: u32 = ior(0x13, CTRL);
pub const UBLK_U_CMD_DEL_DEV_ASYNC: u32 = ior(0x14, CTRL);
pub const UBLK_U_CMD_UPDATE_SIZE: u32 = iowr(0x15, CTRL);
pub const UBLK_U_CMD_QUIESCE_DEV: u32 = iowr(0x16, CTRL);
pub const UBLK_U_CMD_TRY_STOP_DEV: u32 = iowr(0x17, CTRL);
pub const UBLK_U_CMD_REG_BUF: u32 = iowr(0x18, CTRL);
pub const UBLK_U_CMD_UNREG_BUF: u32 = iowr(0x19, CTRL);

/// Length of the GET_FEATURES answer.
pub const UBLK_FEATURES_LEN: usize = 8;

// ---- I/O commands (on /dev/ublkcN) ----
pub const UBLK_U_IO_FETCH_REQ: u32 = iowr(0x20, IO);
pub const UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 = iowr(0x21, IO);
pub const UBLK_U_IO_NEED_GET_DATA: u32 = iowr(0x22, IO);
pub const UBLK_U_IO_REGISTER_IO_BUF: u32 = iowr(0x23, IO);
pub const UBLK_U_IO_UNREGISTER_IO_BUF: u32 = iowr(0x24, IO);
pub const UBLK_U_IO_PREP_IO_CMDS: u32 = iowr(0x25, BATCH);
pub const UBLK_U_IO_COMMIT_IO_CMDS: u32 = iowr(0x26, BATCH);
pub const UBLK_U_IO_FETCH_IO_CMDS: u32 = iowr(0x27, BATCH);

/// FETCH/COMMIT_AND_FETCH completed with a new request for the tag.
pub const UBLK_IO_RES_OK: i32 = 0;
/// The driver wants `NEED_GET_DATA` before the write's data is there (UBLK_F_NEED_GET_DATA).
pub const UBLK_IO_RES_NEED_GET_DATA: i32 = 1;
/// The device is going away: this tag must not be fetched again.
pub const UBLK_IO_RES_ABORT: i32 = -libc::ENODEV;

pub const UBLKSRV_CMD_BUF_OFFSET: u64 = 0;
pub const UBLKSRV_IO_BUF_OFFSET: u64 = 0x8000_0000;
pub const UBLK_MAX_QUEUE_DEPTH: u16 = 4096;
pub const UBLK_IO_BUF_BITS: u32 = 25;
pub const UBLK_TAG_OFF: u32 = UBLK_IO_BUF_BITS;
pub const UBLK_TAG_BITS: u32 = 16;
pub const UBLK_QID_OFF: u32 = UBLK_TAG_OFF + UBLK_TAG_BITS;
pub const UBLK_QID_BITS: u32 = 12;
pub const UBLK_MAX_NR_QUEUES: u32 = 1 << UBLK_QID_BITS;

// ---- device feature flags (ublksrv_ctrl_dev_info.flags, GET_FEATURES) ----
pub const UBLK_F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
pub const UBLK_F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
pub const UBLK_F_NEED_GET_DATA: u64 = 1 << 2;
pub const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
pub const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const UBLK_F_UNPRIVILEGED_DEV: u64 = 1 << 5;
pub const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
pub const UBLK_F_USER_COPY: u64 = 1 << 7;
pub const UBLK_F_ZONED: u64 = 1 << 8;
pub const UBLK_F_USER_RECOVERY_FAIL_IO: u64 = 1 << 9;
pub const UBLK_F_UPDATE_SIZE: u64 = 1 << 10;
pub const UBLK_F_AUTO_BUF_REG: u64 = 1 << 11;
pub const UBLK_F_QUIESCE: u64 = 1 << 12;
pub const UBLK_F_PER_IO_DAEMON: u64 = 1 << 13;
pub const UBLK_F_BUF_REG_OFF_DAEMON: u64 = 1 << 14;
pub const UBLK_F_BATCH_IO: u64 = 1 << 15;
pub const UBLK_F_INTEGRITY: u64 = 1 << 16;
pub const UBLK_F_SAFE_STOP_DEV: u64 = 1 << 17;
pub const UBLK_F_NO_AUTO_PART_SCAN: u64 = 1 << 18;
pub const UBLK_F_SHMEM_ZC: u64 = 1 << 19;
/// The descriptor's size is in `ublksrv_ctrl_dev_info` (7.3+).
pub const UBLK_F_IO_DESC_SIZE: u64 = 1 << 20;

/// Every flag this build knows, with its name as `ublk-fast features` prints it.
pub const FEATURE_NAMES: &[(u64, &str)] = &[
    (UBLK_F_SUPPORT_ZERO_COPY, "ZERO_COPY"),
    (UBLK_F_URING_CMD_COMP_IN_TASK, "URING_CMD_COMP_IN_TASK"),
    (UBLK_F_NEED_GET_DATA, "NEED_GET_DATA"),
    (UBLK_F_USER_RECOVERY, "USER_RECOVERY"),
    (UBLK_F_USER_RECOVERY_REISSUE, "USER_RECOVERY_REISSUE"),
    (UBLK_F_UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV"),
    (UBLK_F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"),
    (UBLK_F_USER_COPY, "USER_COPY"),
    (UBLK_F_ZONED, "ZONED"),
    (UBLK_F_USER_RECOVERY_FAIL_IO, "USER_RECOVERY_FAIL_IO"),
    (UBLK_F_UPDATE_SIZE, "UPDATE_SIZE"),
    (UBLK_F_AUTO_BUF_REG, "AUTO_BUF_REG"),
    (UBLK_F_QUIESCE, "QUIESCE"),
    (UBLK_F_PER_IO_DAEMON, "PER_IO_DAEMON"),
    (UBLK_F_BUF_REG_OFF_DAEMON, "BUF_REG_OFF_DAEMON"),
    (UBLK_F_BATCH_IO, "BATCH_IO"),
    (UBLK_F_INTEGRITY, "INTEGRITY"),
    (UBLK_F_SAFE_STOP_DEV, "SAFE_STOP_DEV"),
    (UBLK_F_NO_AUTO_PART_SCAN, "NO_AUTO_PART_SCAN"),
    (UBLK_F_SHMEM_ZC, "SHMEM_ZC"),
    (UBLK_F_IO_DESC_SIZE, "IO_DESC_SIZE"),
];

/// The UAPI's own name of a feature flag (`UBLK_F_SUPPORT_ZERO_COPY`), as `ublk_cmd.h` spells it.
pub fn feature_uapi_name(short: &str) -> String {
    match short {
        "ZERO_COPY" => "UBLK_F_SUPPORT_ZERO_COPY".into(),
        n if n.starts_with("BIT") => n.into(),
        n => format!("UBLK_F_{n}"),
    }
}

// ---- device states ----
pub const UBLK_S_DEV_DEAD: u16 = 0;
pub const UBLK_S_DEV_LIVE: u16 = 1;
pub const UBLK_S_DEV_QUIESCED: u16 = 2;
pub const UBLK_S_DEV_FAIL_IO: u16 = 3;

// ---- request ops and flags (ublksrv_io_desc.op_flags) ----
pub const UBLK_IO_OP_READ: u8 = 0;
pub const UBLK_IO_OP_WRITE: u8 = 1;
pub const UBLK_IO_OP_FLUSH: u8 = 2;
pub const UBLK_IO_OP_DISCARD: u8 = 3;
pub const UBLK_IO_OP_WRITE_SAME: u8 = 4;
pub const UBLK_IO_OP_WRITE_ZEROES: u8 = 5;
pub const UBLK_IO_OP_ZONE_OPEN: u8 = 10;
pub const UBLK_IO_OP_ZONE_CLOSE: u8 = 11;
pub const UBLK_IO_OP_ZONE_FINISH: u8 = 12;
pub const UBLK_IO_OP_ZONE_APPEND: u8 = 13;
pub const UBLK_IO_OP_ZONE_RESET_ALL: u8 = 14;
pub const UBLK_IO_OP_ZONE_RESET: u8 = 15;
pub const UBLK_IO_OP_REPORT_ZONES: u8 = 18;

pub const UBLK_IO_F_FAILFAST_DEV: u32 = 1 << 8;
pub const UBLK_IO_F_FAILFAST_TRANSPORT: u32 = 1 << 9;
pub const UBLK_IO_F_FAILFAST_DRIVER: u32 = 1 << 10;
pub const UBLK_IO_F_META: u32 = 1 << 11;
pub const UBLK_IO_F_FUA: u32 = 1 << 13;
pub const UBLK_IO_F_NOUNMAP: u32 = 1 << 15;
pub const UBLK_IO_F_SWAP: u32 = 1 << 16;
pub const UBLK_IO_F_NEED_REG_BUF: u32 = 1 << 17;
pub const UBLK_IO_F_INTEGRITY: u32 = 1 << 18;
pub const UBLK_IO_F_SHMEM_ZC: u32 = 1 << 19;

/// Auto buffer registration: fall back to the copy path instead of failing the request.
pub const UBLK_AUTO_BUF_REG_FALLBACK: u8 = 1 << 0;

// ---- basic parameter attributes ----
pub const UBLK_ATTR_READ_ONLY: u32 = 1 << 0;
pub const UBLK_ATTR_ROTATIONAL: u32 = 1 << 1;
pub const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
pub const UBLK_ATTR_FUA: u32 = 1 << 3;

// ---- parameter types ----
pub const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;
pub const UBLK_PARAM_TYPE_DEVT: u32 = 1 << 2;
pub const UBLK_PARAM_TYPE_ZONED: u32 = 1 << 3;
pub const UBLK_PARAM_TYPE_DMA_ALIGN: u32 = 1 << 4;
pub const UBLK_PARAM_TYPE_SEGMENT: u32 = 1 << 5;
pub const UBLK_PARAM_TYPE_INTEGRITY: u32 = 1 << 6;

/// Shipped in `sqe->cmd` of a control `URING_CMD` (needs an SQE128 ring).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublksrv_ctrl_cmd {
    pub dev_id: u32,
    /// `u16::MAX` unless the command is for one queue.
    pub queue_id: u16,
    pub len: u16,
    pub addr: u64,
    pub data: [u64; 1],
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublksrv_ctrl_dev_info {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    /// For the server's own use; the driver stores it and never reads it.
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// One request, written by the driver into the queue's shared descriptor array at its tag.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublksrv_io_desc {
    /// op: bits 0-7, flags: bits 8-31.
    pub op_flags: u32,
    /// `nr_zones` for REPORT_ZONES.
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

impl ublksrv_io_desc {
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }
    /// The flags in the header's own bit positions (`UBLK_IO_F_*` are pre-shifted).
    pub fn flags(&self) -> u32 {
        self.op_flags & !0xff
    }
}

/// Shipped in `sqe->cmd` of an I/O `URING_CMD` on `/dev/ublkcN` (fits a 64-byte SQE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublksrv_io_cmd {
    pub q_id: u16,
    pub tag: u16,
    pub result: i32,
    /// Buffer address for FETCH/COMMIT (copy mode); zone-append LBA for zoned commits.
    pub addr: u64,
}

impl ublksrv_io_cmd {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.tag.to_ne_bytes());
        b[4..8].copy_from_slice(&self.result.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b
    }
}

/// `sqe->addr` of FETCH/COMMIT under UBLK_F_AUTO_BUF_REG.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublk_auto_buf_reg {
    pub index: u16,
    pub flags: u8,
    pub reserved0: u8,
    pub reserved1: u32,
}

impl ublk_auto_buf_reg {
    pub fn to_sqe_addr(self) -> u64 {
        u64::from(self.index)
            | u64::from(self.flags) << 16
            | u64::from(self.reserved0) << 24
            | u64::from(self.reserved1) << 32
    }
}

/// Per-element header of the batch commands (UBLK_F_BATCH_IO).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublk_elem_header {
    pub tag: u16,
    pub buf_index: u16,
    pub result: i32,
}

impl ublk_elem_header {
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..2].copy_from_slice(&self.tag.to_ne_bytes());
        b[2..4].copy_from_slice(&self.buf_index.to_ne_bytes());
        b[4..8].copy_from_slice(&self.result.to_ne_bytes());
        b
    }

    pub fn from_bytes(b: [u8; 8]) -> Self {
        ublk_elem_header {
            tag: u16::from_ne_bytes([b[0], b[1]]),
            buf_index: u16::from_ne_bytes([b[2], b[3]]),
            result: i32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

pub const UBLK_BATCH_F_HAS_ZONE_LBA: u16 = 1 << 0;
pub const UBLK_BATCH_F_HAS_BUF_ADDR: u16 = 1 << 1;
pub const UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK: u16 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublk_batch_io {
    pub q_id: u16,
    pub flags: u16,
    pub nr_elem: u16,
    pub elem_bytes: u8,
    pub reserved: u8,
    pub reserved2: u64,
}

impl ublk_batch_io {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.flags.to_ne_bytes());
        b[4..6].copy_from_slice(&self.nr_elem.to_ne_bytes());
        b[6] = self.elem_bytes;
        b[7] = self.reserved;
        b[8..16].copy_from_slice(&self.reserved2.to_ne_bytes());
        b
    }
}

/// UBLK_U_CMD_REG_BUF argument (UBLK_F_SHMEM_ZC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublk_shmem_buf_reg {
    pub addr: u64,
    pub len: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublk_param_basic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublk_param_discard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

/// Read-only: filled by GET_PARAMS once the device exists.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublk_param_devt {
    pub char_major: u32,
    pub char_minor: u32,
    pub disk_major: u32,
    pub disk_minor: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublk_param_zoned {
    pub max_open_zones: u32,
    pub max_active_zones: u32,
    pub max_zone_append_sectors: u32,
    pub reserved: [u8; 20],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublk_param_dma_align {
    pub alignment: u32,
    pub pad: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublk_param_segment {
    pub seg_boundary_mask: u64,
    pub max_segment_size: u32,
    pub max_segments: u16,
    pub pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublk_param_integrity {
    pub flags: u32,
    pub max_integrity_segments: u16,
    pub interval_exp: u8,
    pub metadata_size: u8,
    pub pi_offset: u8,
    pub csum_type: u8,
    pub tag_size: u8,
    pub pad: [u8; 5],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ublk_params {
    /// Total length; the driver accepts shorter (older) layouts and says what it used.
    pub len: u32,
    pub types: u32,
    pub basic: ublk_param_basic,
    pub discard: ublk_param_discard,
    pub devt: ublk_param_devt,
    pub zoned: ublk_param_zoned,
    pub dma: ublk_param_dma_align,
    pub seg: ublk_param_segment,
    pub integrity: ublk_param_integrity,
}

pub const IO_DESC_SIZE: usize = size_of::<ublksrv_io_desc>();

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// Bytes to mmap for one queue's descriptor array: the driver insists on exactly this.
pub fn queue_desc_map_len(depth: u16, page: u64) -> u64 {
    round_up(u64::from(depth) * IO_DESC_SIZE as u64, page)
}

/// mmap offset of queue `q`'s descriptor array on `/dev/ublkcN`. The stride is the size for the
/// *maximum* depth, not the device's depth: getting this wrong maps another queue's requests.
pub fn queue_desc_map_offset(q: u16, page: u64) -> u64 {
    UBLKSRV_CMD_BUF_OFFSET + u64::from(q) * queue_desc_map_len(UBLK_MAX_QUEUE_DEPTH, page)
}

/// User-copy mode: the pread/pwrite offset on `/dev/ublkcN` of byte `off` of a request.
/// Integrity: ORed into a user-copy offset, it addresses the request's metadata instead of
/// its data (the offset below it then counts metadata bytes).
pub const UBLKSRV_IO_INTEGRITY_FLAG: u64 = 1 << 62;

/// `LBMD_PI_CAP_*` and `LBMD_PI_CSUM_*` (linux/fs.h), for the integrity parameters.
pub const LBMD_PI_CAP_INTEGRITY: u32 = 1 << 0;
pub const LBMD_PI_CAP_REFTAG: u32 = 1 << 1;
pub const LBMD_PI_CSUM_NONE: u8 = 0;
pub const LBMD_PI_CSUM_IP: u8 = 1;
pub const LBMD_PI_CSUM_CRC16_T10DIF: u8 = 2;
pub const LBMD_PI_CSUM_CRC64_NVME: u8 = 4;

pub fn user_copy_offset(q: u16, tag: u16, off: u64) -> u64 {
    UBLKSRV_IO_BUF_OFFSET
        + ((u64::from(q) << UBLK_QID_OFF) | (u64::from(tag) << UBLK_TAG_OFF) | off)
}

/// Names of the known flags set in `flags`, plus `BIT<n>` for any this build does not know.
pub fn feature_names(flags: u64) -> Vec<String> {
    let mut names = Vec::new();
    for bit in 0..64 {
        let f = 1u64 << bit;
        if flags & f == 0 {
            continue;
        }
        match FEATURE_NAMES.iter().find(|(v, _)| *v == f) {
            Some((_, n)) => names.push((*n).to_string()),
            None => names.push(format!("BIT{bit}")),
        }
    }
    names
}

pub fn state_name(state: u16) -> &'static str {
    match state {
        UBLK_S_DEV_DEAD => "DEAD",
        UBLK_S_DEV_LIVE => "LIVE",
        UBLK_S_DEV_QUIESCED => "QUIESCED",
        UBLK_S_DEV_FAIL_IO => "FAIL_IO",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn struct_sizes_match_the_header() {
        assert_eq!(size_of::<ublksrv_ctrl_cmd>(), 32);
        assert_eq!(size_of::<ublksrv_ctrl_dev_info>(), 64);
        assert_eq!(size_of::<ublksrv_io_desc>(), 24);
        assert_eq!(size_of::<ublksrv_io_cmd>(), 16);
        assert_eq!(size_of::<ublk_auto_buf_reg>(), 8);
        assert_eq!(size_of::<ublk_elem_header>(), 8);
        assert_eq!(size_of::<ublk_batch_io>(), 16);
        assert_eq!(size_of::<ublk_shmem_buf_reg>(), 16);
        assert_eq!(size_of::<ublk_param_basic>(), 32);
        assert_eq!(size_of::<ublk_param_discard>(), 20);
        assert_eq!(size_of::<ublk_param_devt>(), 16);
        assert_eq!(size_of::<ublk_param_zoned>(), 32);
        assert_eq!(size_of::<ublk_param_dma_align>(), 8);
        assert_eq!(size_of::<ublk_param_segment>(), 16);
        assert_eq!(size_of::<ublk_param_integrity>(), 16);
        assert_eq!(size_of::<ublk_params>(), 152);
    }

    #[test]
    fn ctrl_cmd_offsets() {
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, dev_id), 0);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, queue_id), 4);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, len), 6);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, addr), 8);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, data), 16);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, dev_path_len), 24);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, pad), 26);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, reserved), 28);
    }

    #[test]
    fn dev_info_offsets() {
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, nr_hw_queues), 0);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, queue_depth), 2);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, state), 4);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, pad0), 6);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, max_io_buf_bytes), 8);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, dev_id), 12);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, ublksrv_pid), 16);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, pad1), 20);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, flags), 24);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, ublksrv_flags), 32);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, owner_uid), 40);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, owner_gid), 44);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, reserved1), 48);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, reserved2), 56);
    }

    #[test]
    fn io_desc_and_cmd_offsets() {
        assert_eq!(offset_of!(ublksrv_io_desc, op_flags), 0);
        assert_eq!(offset_of!(ublksrv_io_desc, nr_sectors), 4);
        assert_eq!(offset_of!(ublksrv_io_desc, start_sector), 8);
        assert_eq!(offset_of!(ublksrv_io_desc, addr), 16);
        assert_eq!(offset_of!(ublksrv_io_cmd, q_id), 0);
        assert_eq!(offset_of!(ublksrv_io_cmd, tag), 2);
        assert_eq!(offset_of!(ublksrv_io_cmd, result), 4);
        assert_eq!(offset_of!(ublksrv_io_cmd, addr), 8);
        assert_eq!(offset_of!(ublk_elem_header, tag), 0);
        assert_eq!(offset_of!(ublk_elem_header, buf_index), 2);
        assert_eq!(offset_of!(ublk_elem_header, result), 4);
        assert_eq!(offset_of!(ublk_batch_io, q_id), 0);
        assert_eq!(offset_of!(ublk_batch_io, flags), 2);
        assert_eq!(offset_of!(ublk_batch_io, nr_elem), 4);
        assert_eq!(offset_of!(ublk_batch_io, elem_bytes), 6);
        assert_eq!(offset_of!(ublk_batch_io, reserved), 7);
        assert_eq!(offset_of!(ublk_batch_io, reserved2), 8);
    }

    #[test]
    fn params_offsets() {
        assert_eq!(offset_of!(ublk_params, len), 0);
        assert_eq!(offset_of!(ublk_params, types), 4);
        assert_eq!(offset_of!(ublk_params, basic), 8);
        assert_eq!(offset_of!(ublk_params, discard), 40);
        assert_eq!(offset_of!(ublk_params, devt), 60);
        assert_eq!(offset_of!(ublk_params, zoned), 76);
        assert_eq!(offset_of!(ublk_params, dma), 108);
        assert_eq!(offset_of!(ublk_params, seg), 120);
        assert_eq!(offset_of!(ublk_params, integrity), 136);
        assert_eq!(offset_of!(ublk_param_basic, attrs), 0);
        assert_eq!(offset_of!(ublk_param_basic, logical_bs_shift), 4);
        assert_eq!(offset_of!(ublk_param_basic, physical_bs_shift), 5);
        assert_eq!(offset_of!(ublk_param_basic, io_opt_shift), 6);
        assert_eq!(offset_of!(ublk_param_basic, io_min_shift), 7);
        assert_eq!(offset_of!(ublk_param_basic, max_sectors), 8);
        assert_eq!(offset_of!(ublk_param_basic, chunk_sectors), 12);
        assert_eq!(offset_of!(ublk_param_basic, dev_sectors), 16);
        assert_eq!(offset_of!(ublk_param_basic, virt_boundary_mask), 24);
        assert_eq!(offset_of!(ublk_param_discard, discard_alignment), 0);
        assert_eq!(offset_of!(ublk_param_discard, discard_granularity), 4);
        assert_eq!(offset_of!(ublk_param_discard, max_discard_sectors), 8);
        assert_eq!(offset_of!(ublk_param_discard, max_write_zeroes_sectors), 12);
        assert_eq!(offset_of!(ublk_param_discard, max_discard_segments), 16);
        assert_eq!(offset_of!(ublk_param_segment, seg_boundary_mask), 0);
        assert_eq!(offset_of!(ublk_param_segment, max_segment_size), 8);
        assert_eq!(offset_of!(ublk_param_segment, max_segments), 12);
        assert_eq!(offset_of!(ublk_param_integrity, max_integrity_segments), 4);
        assert_eq!(offset_of!(ublk_param_integrity, interval_exp), 6);
        assert_eq!(offset_of!(ublk_param_integrity, tag_size), 10);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_encoding() {
        // Values computed by hand from _IOR/_IOWR('u', nr, size) in the header.
        assert_eq!(UBLK_U_CMD_GET_QUEUE_AFFINITY, 0x8020_7501);
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(UBLK_U_CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(UBLK_U_CMD_DEL_DEV, 0xc020_7505);
        assert_eq!(UBLK_U_CMD_START_DEV, 0xc020_7506);
        assert_eq!(UBLK_U_CMD_STOP_DEV, 0xc020_7507);
        assert_eq!(UBLK_U_CMD_SET_PARAMS, 0xc020_7508);
        assert_eq!(UBLK_U_CMD_GET_PARAMS, 0x8020_7509);
        assert_eq!(UBLK_U_CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(UBLK_U_CMD_DEL_DEV_ASYNC, 0x8020_7514);
        assert_eq!(UBLK_U_CMD_QUIESCE_DEV, 0xc020_7516);
        assert_eq!(UBLK_U_IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
        assert_eq!(UBLK_U_IO_NEED_GET_DATA, 0xc010_7522);
        assert_eq!(UBLK_U_IO_REGISTER_IO_BUF, 0xc010_7523);
        assert_eq!(UBLK_U_IO_UNREGISTER_IO_BUF, 0xc010_7524);
        assert_eq!(UBLK_U_IO_PREP_IO_CMDS, 0xc010_7525);
        assert_eq!(UBLK_U_IO_COMMIT_IO_CMDS, 0xc010_7526);
        assert_eq!(UBLK_U_IO_FETCH_IO_CMDS, 0xc010_7527);
    }

    #[test]
    fn queue_desc_offsets_use_the_max_depth_stride() {
        // 4096 tags * 24 bytes = 98304 = 24 pages of 4 KiB.
        assert_eq!(queue_desc_map_offset(0, 4096), 0);
        assert_eq!(queue_desc_map_offset(1, 4096), 98304);
        assert_eq!(queue_desc_map_offset(3, 4096), 3 * 98304);
        assert_eq!(queue_desc_map_len(128, 4096), 4096);
        assert_eq!(queue_desc_map_len(200, 4096), 8192);
        assert_eq!(queue_desc_map_len(4096, 4096), 98304);
        // 64 KiB pages (arm64): stride rounds 98304 up to 131072.
        assert_eq!(queue_desc_map_offset(1, 65536), 131072);
    }

    #[test]
    fn user_copy_offsets() {
        assert_eq!(user_copy_offset(0, 0, 0), 0x8000_0000);
        assert_eq!(user_copy_offset(0, 1, 0), 0x8000_0000 + (1 << 25));
        assert_eq!(user_copy_offset(2, 3, 512), 0x8000_0000 + (2 << 41) + (3 << 25) + 512);
    }

    #[test]
    fn auto_buf_reg_encoding() {
        let r = ublk_auto_buf_reg {
            index: 0x1234,
            flags: UBLK_AUTO_BUF_REG_FALLBACK,
            ..Default::default()
        };
        assert_eq!(r.to_sqe_addr(), 0x1_1234);
    }

    #[test]
    fn io_cmd_bytes_are_the_struct_bytes() {
        let c = ublksrv_io_cmd { q_id: 1, tag: 2, result: -5, addr: 0x1122_3344_5566_7788 };
        let b = c.to_bytes();
        // SAFETY: ublksrv_io_cmd is repr(C), 16 bytes, no padding; reading its bytes is sound.
        let raw: [u8; 16] = unsafe { std::mem::transmute(c) };
        assert_eq!(b, raw);
    }

    #[test]
    fn batch_bytes_are_the_struct_bytes() {
        let c =
            ublk_batch_io { q_id: 3, flags: 6, nr_elem: 77, elem_bytes: 16, ..Default::default() };
        // SAFETY: ublk_batch_io is repr(C), 16 bytes, no padding; reading its bytes is sound.
        let raw: [u8; 16] = unsafe { std::mem::transmute(c) };
        assert_eq!(c.to_bytes(), raw);
        let e = ublk_elem_header { tag: 9, buf_index: 9, result: -28 };
        // SAFETY: ublk_elem_header is repr(C), 8 bytes, no padding.
        let raw: [u8; 8] = unsafe { std::mem::transmute(e) };
        assert_eq!(e.to_bytes(), raw);
        let back = ublk_elem_header::from_bytes(raw);
        assert_eq!((back.tag, back.buf_index, back.result), (9, 9, -28));
    }

    #[test]
    fn feature_names_cover_known_and_unknown_bits() {
        assert_eq!(
            feature_names(UBLK_F_USER_COPY | UBLK_F_AUTO_BUF_REG),
            ["USER_COPY", "AUTO_BUF_REG"]
        );
        assert_eq!(feature_names(1 << 20), ["IO_DESC_SIZE"]);
        assert_eq!(feature_names(1 << 21), ["BIT21"]);
        assert_eq!(FEATURE_NAMES.len(), 21);
        assert_eq!(feature_uapi_name("ZERO_COPY"), "UBLK_F_SUPPORT_ZERO_COPY");
        assert_eq!(feature_uapi_name("BATCH_IO"), "UBLK_F_BATCH_IO");
    }

    #[test]
    fn desc_op_and_flags() {
        let d = ublksrv_io_desc {
            op_flags: u32::from(UBLK_IO_OP_WRITE) | UBLK_IO_F_FUA,
            ..Default::default()
        };
        assert_eq!(d.op(), UBLK_IO_OP_WRITE);
        assert_eq!(d.flags() & UBLK_IO_F_FUA, UBLK_IO_F_FUA);
    }
}
