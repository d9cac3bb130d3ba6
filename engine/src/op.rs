//! What each SQE on a core ring is for, encoded in its `user_data` and decoded from its CQE:
//! one typed kind per operation, so a completion is dispatched by what it is, not by a number.
//!
//! Layout: tag (0..16) | kind (16..24) | target's sub-op byte (24..32) | generation (32..48) |
//! queue slot on the ring (48..64). The generation changes with every request a tag serves, so
//! a late completion from an earlier request is never taken for the current one.

/// What a completion belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A per-tag FETCH_REQ or COMMIT_AND_FETCH_REQ: its completion delivers the tag's next
    /// request (or aborts the tag).
    Fetch,
    /// BATCH_IO: the PREP_IO_CMDS that hands the driver every tag.
    BatchPrep,
    /// BATCH_IO: the multishot FETCH_IO_CMDS.
    BatchFetch,
    /// BATCH_IO: a COMMIT_IO_CMDS; `UserData::tag` is the index of its element array.
    BatchCommit,
    /// A backend operation the target queued for the tag, with the target's sub-op byte.
    Target(u8),
    /// REGISTER_IO_BUF of the tag's request (the zero-copy fallback).
    RegBuf,
    /// UNREGISTER_IO_BUF of the tag's request.
    UnregBuf,
    /// User copy: write data from the request's pages into the tag's buffer.
    CopyIn,
    /// User copy: read data from the tag's buffer into the request's pages.
    CopyOut,
    /// Integrity: a WRITE's metadata from the request into the tag's metadata buffer.
    MetaIn,
    /// Integrity: a READ's metadata from the tag's metadata buffer into the request.
    MetaOut,
    /// The core's wake-up eventfd is readable (a stop was asked for); not tied to a queue.
    Wake,
    /// A queue-level operation of the target (not tied to a request), with its sub-op byte;
    /// `UserData::tag` carries the target's token.
    Queue(u8),
    /// The core's once-a-second timer (slow-I/O checks); not tied to a queue.
    Tick,
}

impl Op {
    fn code(self) -> (u8, u8) {
        match self {
            Op::Fetch => (0, 0),
            Op::BatchPrep => (1, 0),
            Op::BatchFetch => (2, 0),
            Op::BatchCommit => (3, 0),
            Op::Target(sub) => (4, sub),
            Op::RegBuf => (5, 0),
            Op::UnregBuf => (6, 0),
            Op::CopyIn => (7, 0),
            Op::CopyOut => (8, 0),
            Op::Wake => (9, 0),
            Op::Queue(sub) => (10, sub),
            Op::Tick => (11, 0),
            Op::MetaIn => (12, 0),
            Op::MetaOut => (13, 0),
        }
    }

    fn from_code(kind: u8, sub: u8) -> Option<Op> {
        Some(match kind {
            0 => Op::Fetch,
            1 => Op::BatchPrep,
            2 => Op::BatchFetch,
            3 => Op::BatchCommit,
            4 => Op::Target(sub),
            5 => Op::RegBuf,
            6 => Op::UnregBuf,
            7 => Op::CopyIn,
            8 => Op::CopyOut,
            9 => Op::Wake,
            10 => Op::Queue(sub),
            11 => Op::Tick,
            12 => Op::MetaIn,
            13 => Op::MetaOut,
            _ => return None,
        })
    }
}

/// One SQE's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserData {
    /// Which of the ring's queues it belongs to (its slot on the core).
    pub queue: u16,
    pub tag: u16,
    pub op: Op,
    pub gen: u16,
}

impl UserData {
    pub fn new(queue: u16, tag: u16, op: Op, gen: u16) -> Self {
        UserData { queue, tag, op, gen }
    }

    pub fn encode(self) -> u64 {
        let (kind, sub) = self.op.code();
        u64::from(self.tag)
            | u64::from(kind) << 16
            | u64::from(sub) << 24
            | u64::from(self.gen) << 32
            | u64::from(self.queue) << 48
    }

    /// `None` for a kind this build never issues (a corrupted or foreign value).
    pub fn decode(v: u64) -> Option<Self> {
        let op = Op::from_code((v >> 16) as u8, (v >> 24) as u8)?;
        Some(UserData { queue: (v >> 48) as u16, tag: v as u16, op, gen: (v >> 32) as u16 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        let ops = [
            Op::Fetch,
            Op::BatchPrep,
            Op::BatchFetch,
            Op::BatchCommit,
            Op::Target(0),
            Op::Target(255),
            Op::RegBuf,
            Op::UnregBuf,
            Op::CopyIn,
            Op::CopyOut,
            Op::MetaIn,
            Op::MetaOut,
            Op::Wake,
            Op::Queue(0),
            Op::Queue(200),
            Op::Tick,
        ];
        for (i, op) in ops.into_iter().enumerate() {
            for (queue, tag, gen) in [(0u16, 0u16, 0u16), (65535, 4095, 65535), (7, 65535, 1)] {
                let u = UserData::new(queue, tag, op, gen.wrapping_add(i as u16));
                assert_eq!(UserData::decode(u.encode()), Some(u));
            }
        }
        assert_eq!(UserData::decode(14 << 16), None);
        assert_eq!(UserData::decode(u64::MAX), None);
    }
}
