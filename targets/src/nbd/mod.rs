//! `nbd`: the device is an export of an NBD server (nbdkit, qemu-nbd, another node), reached
//! over TCP or a Unix socket. Size, read-only and block sizes come from the server; the
//! features it offers (flush, FUA, trim, write zeroes) are the features the device advertises.
//!
//! One connection per queue: a server that offers CAN_MULTI_CONN gets as many as the device
//! has queues (`--connections` caps them); one that does not gets one connection, so the
//! device has one queue (writes on several connections of such a server need not be coherent).

pub mod handshake;
mod queue;
pub mod rx;
pub mod uri;
pub mod wire;

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ublk_fast_engine::error::{Error, Result};
use ublk_fast_engine::target::{DiscardLimits, QueueHandler, Target, TargetParams};
use ublk_fast_engine::uapi::*;

use handshake::ExportInfo;
use uri::{NbdUri, SockAddr};

#[derive(Clone, Debug)]
pub struct NbdOptions {
    /// At most this many connections (and so queues); `None`: one per queue.
    pub connections: Option<u16>,
    /// How long requests wait for a lost server before failing with EIO.
    pub reconnect_timeout: Duration,
    /// Bounds the first connection and handshake.
    pub connect_timeout: Duration,
    /// Zero copy (`--zero-copy on`): socket I/O from and into the requests' own pages. Simple
    /// replies are asked for then (see `rx`).
    pub zero_copy: bool,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            connections: None,
            reconnect_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            zero_copy: false,
        }
    }
}

/// What every queue of the device shares.
pub(crate) struct Shared {
    pub uri: NbdUri,
    pub addr: SockAddr,
    pub info: ExportInfo,
    pub reconnect_timeout: Duration,
}

pub struct NbdTarget {
    shared: Arc<Shared>,
    opts: NbdOptions,
    /// The first connection (made to learn the export), for queue 0.
    first: Mutex<Option<OwnedFd>>,
    logical_block: u32,
}

impl NbdTarget {
    /// Connects to the server and negotiates the export: every problem (a bad URI, no
    /// server, no such export, an empty or odd-sized export) is a one-line error here, before
    /// any device exists.
    pub fn connect(text: &str, opts: &NbdOptions) -> Result<NbdTarget> {
        let uri = NbdUri::parse(text)?;
        if opts.connections == Some(0) {
            return Err(Error::invalid("--connections 0: give 1 or more"));
        }
        let addr = uri.addr.resolve()?;
        // Structured replies are asked for (the server decides), except in zero copy.
        let structured = !opts.zero_copy;
        let (sock, info) = handshake::connect_blocking(&uri, opts.connect_timeout, structured)?;
        // The device's block size: the server's minimum, within what a block device can be.
        let logical_block = info.min_block.clamp(512, 4096).next_power_of_two();
        if !info.size.is_multiple_of(u64::from(logical_block)) {
            return Err(Error::invalid(format!(
                "{}: the export is {} bytes, not a multiple of its {logical_block}-byte block size",
                uri.text, info.size
            )));
        }
        let shared =
            Arc::new(Shared { uri, addr, info, reconnect_timeout: opts.reconnect_timeout });
        Ok(NbdTarget { shared, opts: opts.clone(), first: Mutex::new(Some(sock)), logical_block })
    }

    pub fn export(&self) -> &ExportInfo {
        &self.shared.info
    }

    fn has(&self, flag: u16) -> bool {
        self.shared.info.flags & flag != 0
    }
}

impl Target for NbdTarget {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec![self.shared.uri.text.clone()];
        if let Some(n) = self.opts.connections {
            a.push(format!("--connections={n}"));
        }
        if self.opts.reconnect_timeout != NbdOptions::default().reconnect_timeout {
            a.push(format!("--reconnect-timeout={}", self.opts.reconnect_timeout.as_secs()));
        }
        a
    }

    fn backing(&self) -> Option<String> {
        Some(self.shared.uri.text.clone())
    }

    fn params(&self) -> TargetParams {
        let mut attrs = 0;
        if self.has(wire::FLAG_READ_ONLY) {
            attrs |= UBLK_ATTR_READ_ONLY;
        }
        if self.has(wire::FLAG_SEND_FLUSH) {
            attrs |= UBLK_ATTR_VOLATILE_CACHE;
            if self.has(wire::FLAG_SEND_FUA) {
                attrs |= UBLK_ATTR_FUA;
            }
        }
        if self.has(wire::FLAG_ROTATIONAL) {
            attrs |= UBLK_ATTR_ROTATIONAL;
        }
        let info = &self.shared.info;
        let pref = info.pref_block.clamp(self.logical_block, 65536);
        let physical = if pref.is_power_of_two() { pref } else { self.logical_block };
        // A feature the server lacks is not advertised: the kernel never sends it.
        let max = (info.max_block.min(1 << 30) >> 9).max(1);
        let trim = self.has(wire::FLAG_SEND_TRIM);
        let zeroes = self.has(wire::FLAG_SEND_WRITE_ZEROES);
        let discard = (trim || zeroes).then_some(DiscardLimits {
            granularity: self.logical_block,
            max_discard_sectors: if trim { max } else { 0 },
            max_write_zeroes_sectors: if zeroes { max } else { 0 },
        });
        TargetParams {
            size_bytes: info.size,
            logical_block: self.logical_block,
            physical_block: physical,
            attrs,
            discard,
        }
    }

    fn max_queues(&self) -> u16 {
        if self.has(wire::FLAG_CAN_MULTI_CONN) {
            self.opts.connections.unwrap_or(u16::MAX)
        } else {
            1
        }
    }

    /// Only when asked for: a 4k read then costs a receive of its header and a READ_FIXED of
    /// its data, where copy mode's one receive brings many replies.
    fn supports_zero_copy(&self) -> bool {
        self.opts.zero_copy
    }

    fn max_io_bytes(&self) -> Option<u32> {
        // The largest power of two the server takes in one request.
        let m = self.shared.info.max_block;
        (m > 0).then(|| 1u32 << (31 - m.leading_zeros()))
    }

    fn queue_handler(&self, q: u16, depth: u16) -> Result<Box<dyn QueueHandler>> {
        let first = self.first.lock().unwrap_or_else(|e| e.into_inner()).take();
        let sock = match first {
            Some(s) => s,
            None => {
                let (s, info) = handshake::connect_blocking(
                    &self.shared.uri,
                    self.opts.connect_timeout,
                    self.shared.info.structured,
                )?;
                if info.size != self.shared.info.size || info.flags != self.shared.info.flags {
                    return Err(Error::failed(format!(
                        "{}: connection {q} sees another export (size {}, flags {:#x}; the first saw {}, {:#x})",
                        self.shared.uri.text,
                        info.size,
                        info.flags,
                        self.shared.info.size,
                        self.shared.info.flags
                    )));
                }
                s
            }
        };
        Ok(Box::new(queue::NbdQueue::new(self.shared.clone(), q, depth, sock, self.opts.zero_copy)))
    }
}
