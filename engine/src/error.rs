//! The engine's one error type: what failed, where (device, queue, tag), and the errno.

use std::fmt;
use std::io;

/// Where an error happened. Every field is optional; Display prints those that are set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Where {
    pub dev: Option<u32>,
    pub queue: Option<u16>,
    pub tag: Option<u16>,
}

/// What kind of failure a message-only error is; decides its errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The request or configuration cannot work; the message says what to change (EINVAL).
    Invalid,
    /// The kernel's driver lacks what was asked for (EOPNOTSUPP).
    Unsupported,
    /// A bounded resource is used up: a ring's tables, a memory limit (ENOSPC).
    Exhausted,
    /// A bounded wait ran out (ETIMEDOUT).
    Timeout,
    /// Something that was working stopped: a core thread ended, a queue failed (EIO).
    Failed,
}

#[derive(Debug)]
pub enum Error {
    /// A system call or ublk command failed: `op` names it, `source` carries the errno.
    Os {
        op: &'static str,
        at: Where,
        source: io::Error,
        hint: Option<std::borrow::Cow<'static, str>>,
    },
    /// No errno from the system: the message says what happened and what to do.
    Msg { kind: Kind, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Msg { kind: Kind::Invalid, msg: msg.into() }
    }
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Error::Msg { kind: Kind::Unsupported, msg: msg.into() }
    }
    pub fn exhausted(msg: impl Into<String>) -> Self {
        Error::Msg { kind: Kind::Exhausted, msg: msg.into() }
    }
    pub fn timeout(msg: impl Into<String>) -> Self {
        Error::Msg { kind: Kind::Timeout, msg: msg.into() }
    }
    pub fn failed(msg: impl Into<String>) -> Self {
        Error::Msg { kind: Kind::Failed, msg: msg.into() }
    }

    /// The kind of a message-only error (`None` for a system call's).
    pub fn kind(&self) -> Option<Kind> {
        match self {
            Error::Os { .. } => None,
            Error::Msg { kind, .. } => Some(*kind),
        }
    }

    pub fn os(op: &'static str, source: io::Error) -> Self {
        Error::Os { op, at: Where::default(), source, hint: None }
    }

    /// From a negative errno as io_uring CQEs return it.
    pub fn errno(op: &'static str, neg_errno: i32) -> Self {
        Self::os(op, io::Error::from_raw_os_error(-neg_errno))
    }

    pub fn last_os(op: &'static str) -> Self {
        Self::os(op, io::Error::last_os_error())
    }

    pub fn dev(mut self, id: u32) -> Self {
        if let Error::Os { at, .. } = &mut self {
            at.dev = Some(id);
        }
        self
    }

    pub fn queue(mut self, q: u16) -> Self {
        if let Error::Os { at, .. } = &mut self {
            at.queue = Some(q);
        }
        self
    }

    pub fn hint(mut self, h: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        if let Error::Os { hint, .. } = &mut self {
            *hint = Some(h.into());
        }
        self
    }

    /// The errno to exit with or to report to the kernel (positive).
    pub fn raw_errno(&self) -> i32 {
        match self {
            Error::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Msg { kind, .. } => match kind {
                Kind::Invalid => libc::EINVAL,
                Kind::Unsupported => libc::EOPNOTSUPP,
                Kind::Exhausted => libc::ENOSPC,
                Kind::Timeout => libc::ETIMEDOUT,
                Kind::Failed => libc::EIO,
            },
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Os { op, at, source, hint } => {
                write!(f, "{op}")?;
                if let Some(d) = at.dev {
                    write!(f, " dev={d}")?;
                }
                if let Some(q) = at.queue {
                    write!(f, " queue={q}")?;
                }
                if let Some(t) = at.tag {
                    write!(f, " tag={t}")?;
                }
                write!(f, ": {source}")?;
                if let Some(h) = hint {
                    write!(f, " ({h})")?;
                }
                Ok(())
            }
            Error::Msg { msg, .. } => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Os { source, .. } => Some(source),
            Error::Msg { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_carries_context_and_hint() {
        let e = Error::errno("ADD_DEV", -libc::EEXIST).dev(3).queue(1).hint("pick another -n");
        let s = e.to_string();
        assert!(s.starts_with("ADD_DEV dev=3 queue=1: "), "{s}");
        assert!(s.ends_with("(pick another -n)"), "{s}");
        assert_eq!(e.raw_errno(), libc::EEXIST);
        assert_eq!(Error::invalid("x").raw_errno(), libc::EINVAL);
        assert_eq!(Error::timeout("x").raw_errno(), libc::ETIMEDOUT);
        assert_eq!(Error::failed("a core thread ended").kind(), Some(Kind::Failed));
    }
}
