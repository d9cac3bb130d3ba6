//! How a device's request data moves and how its queues talk to the driver, decided once when
//! the device is created (or taken over) and read by every queue as one value.

use crate::uapi::*;

/// Where request data lives while the server serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Data {
    /// UBLK_F_AUTO_BUF_REG: the request's own pages are registered as the ring's fixed buffer
    /// while it is served; nobody copies.
    ZeroCopy,
    /// The driver copies between the request's pages and the tag's buffer in the queue's arena.
    Copy,
    /// UBLK_F_USER_COPY: the server moves the data between the request's pages and the tag's
    /// buffer with reads and writes on `/dev/ublkcN`.
    UserCopy,
}

/// How a queue exchanges requests with the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commands {
    /// One FETCH_REQ, then one COMMIT_AND_FETCH_REQ per request, per tag.
    PerTag,
    /// UBLK_F_BATCH_IO: per-queue PREP / multishot FETCH / COMMIT_IO_CMDS.
    Batch,
}

/// A device's engine mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode {
    pub data: Data,
    pub commands: Commands,
}

impl Mode {
    /// The mode a device's driver flags describe (for a device taken over from the kernel).
    pub fn from_flags(flags: u64) -> Mode {
        let data = if flags & UBLK_F_AUTO_BUF_REG != 0 {
            Data::ZeroCopy
        } else if flags & UBLK_F_USER_COPY != 0 {
            Data::UserCopy
        } else {
            Data::Copy
        };
        let commands =
            if flags & UBLK_F_BATCH_IO != 0 { Commands::Batch } else { Commands::PerTag };
        Mode { data, commands }
    }

    /// The ADD_DEV flags this mode needs (SUPPORT_ZERO_COPY only where `features` has it).
    pub fn flags(self, features: u64) -> u64 {
        let data = match self.data {
            // SUPPORT_ZERO_COPY lets the queue register a request's buffer itself
            // (REGISTER_IO_BUF) when the driver's automatic registration fails; it changes
            // nothing else for an AUTO_BUF_REG device.
            Data::ZeroCopy => UBLK_F_AUTO_BUF_REG | (UBLK_F_SUPPORT_ZERO_COPY & features),
            Data::Copy => 0,
            Data::UserCopy => UBLK_F_USER_COPY,
        };
        data | if self.batch() { UBLK_F_BATCH_IO } else { 0 }
    }

    pub fn zero_copy(self) -> bool {
        self.data == Data::ZeroCopy
    }

    pub fn user_copy(self) -> bool {
        self.data == Data::UserCopy
    }

    pub fn batch(self) -> bool {
        self.commands == Commands::Batch
    }

    /// The queue's arena buffers carry request data (copy and user copy): they are locked and
    /// registered with the ring.
    pub fn uses_arena(self) -> bool {
        self.data != Data::ZeroCopy
    }

    /// Fixed-buffer slots a queue of `depth` tags needs on its ring: zero copy, one per tag for
    /// the driver's registration and one per tag for the fallback; otherwise one per tag's
    /// arena buffer.
    pub fn buffer_slots(self, depth: u16) -> u32 {
        match self.data {
            Data::ZeroCopy => 2 * u32::from(depth),
            Data::Copy | Data::UserCopy => u32::from(depth),
        }
    }

    /// For the log and `list`: `zero copy`, `copy, batch`, ...
    pub fn describe(self) -> String {
        let data = match self.data {
            Data::ZeroCopy => "zero copy",
            Data::Copy => "copy",
            Data::UserCopy => "user copy",
        };
        format!("{data}{}", if self.batch() { ", BATCH_IO commands" } else { ", per-tag commands" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_round_trip() {
        for data in [Data::ZeroCopy, Data::Copy, Data::UserCopy] {
            for commands in [Commands::PerTag, Commands::Batch] {
                let m = Mode { data, commands };
                assert_eq!(Mode::from_flags(m.flags(u64::MAX)), m);
            }
        }
        let zc = Mode { data: Data::ZeroCopy, commands: Commands::PerTag };
        assert_eq!(zc.flags(0), UBLK_F_AUTO_BUF_REG, "SUPPORT_ZERO_COPY only where offered");
        assert_eq!(zc.buffer_slots(128), 256);
    }
}
