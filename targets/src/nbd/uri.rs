//! NBD URIs (the NBD project's doc/uri.md, as qemu, nbdkit and libnbd write them):
//!
//! * `nbd://HOST[:PORT][/EXPORT]`: TCP; the port defaults to 10809; `[::1]` for IPv6.
//! * `nbd+unix:///[EXPORT]?socket=PATH`: a Unix socket (`%00` first for the abstract
//!   namespace).
//!
//! The export name is the path less its leading `/`, percent-decoded: `nbd://h//x` is "/x",
//! `nbd://h` and `nbd://h/` are the default export "". TLS (`nbds`, `nbds+unix`, `tls-*`
//! parameters) and vsock are refused with a message that says so.
//!
//! [`Addr::resolve`] gives a [`SockAddr`], a plain value that can be handed to `connect(2)` or
//! to io_uring's CONNECT; [`new_socket`] makes the matching blocking socket.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use ublk_fast_engine::error::{Error, Result};

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;
/// The protocol's limit on a string, an export name included.
pub const MAX_EXPORT_NAME: usize = 4096;

const FORMS: &str = "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub addr: Addr,
    pub export: String,
    /// The URI as given, for messages and listings.
    pub text: String,
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Addr::Tcp { host, port } => write!(f, "{host}:{port}"),
            Addr::Unix { path } => write!(f, "{}", unix_display(path.as_os_str().as_bytes())),
        }
    }
}

/// A Unix socket path for messages: abstract names shown with a leading '@'.
fn unix_display(b: &[u8]) -> String {
    match b.split_first() {
        Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest)),
        _ => String::from_utf8_lossy(b).into_owned(),
    }
}

fn bad(text: &str, what: impl fmt::Display) -> Error {
    Error::invalid(format!("NBD URI {text:?}: {what}"))
}

fn unsupported(text: &str, what: impl fmt::Display) -> Error {
    Error::unsupported(format!("NBD URI {text:?}: {what}"))
}

/// Percent-decodes `s` (RFC 3986; '+' stays '+'). `what` names the part for messages.
fn decode(text: &str, what: &str, s: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            match (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
                (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                _ => {
                    let esc: String = s[i..].chars().take(3).collect();
                    return Err(bad(
                        text,
                        format!(
                            "bad percent-escape {esc:?} in the {what} (write a literal % as %25)"
                        ),
                    ));
                }
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

impl NbdUri {
    pub fn parse(s: &str) -> Result<NbdUri> {
        let text = s;
        if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(text, format!("contains {c:?}; percent-encode it (a space is %20)")));
        }
        let Some((scheme, rest)) = s.split_once(':') else {
            return Err(bad(text, format!("not a URI; expected {FORMS}")));
        };
        let unix = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" | "nbds+vsock" => {
                return Err(unsupported(
                    text,
                    format!("{scheme}:// needs TLS, which is not supported; use nbd:// or nbd+unix:// with a server that does not require TLS"),
                ))
            }
            "nbd+vsock" => {
                return Err(unsupported(
                    text,
                    "nbd+vsock:// (AF_VSOCK) is not supported; use nbd:// or nbd+unix://",
                ))
            }
            "nbd+tcp" => {
                return Err(bad(
                    text,
                    "nbd+tcp: is not an NBD URI scheme; write nbd://HOST[:PORT]/EXPORT",
                ))
            }
            _ => return Err(bad(text, format!("unknown scheme \"{scheme}:\"; expected {FORMS}"))),
        };
        if rest.contains('#') {
            return Err(bad(text, "an NBD URI takes no #fragment; percent-encode '#' as %23"));
        }
        let (hier, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match hier.strip_prefix("//") {
            Some(a) => match a.find('/') {
                Some(i) => (Some(&a[..i]), &a[i..]),
                None => (Some(a), ""),
            },
            None => (None, hier),
        };

        let export = match path {
            "" => String::new(),
            p if p.starts_with('/') => {
                let raw = decode(text, "export name", &p[1..])?;
                if raw.contains(&0) {
                    return Err(bad(text, "the export name contains a NUL (%00)"));
                }
                if raw.len() > MAX_EXPORT_NAME {
                    return Err(bad(
                        text,
                        format!(
                            "the export name is {} bytes; NBD allows at most {MAX_EXPORT_NAME}",
                            raw.len()
                        ),
                    ));
                }
                String::from_utf8(raw)
                    .map_err(|_| bad(text, "the export name is not valid UTF-8"))?
            }
            _ => return Err(bad(text, format!("the export must follow a '/'; expected {FORMS}"))),
        };

        let params = parse_query(text, query)?;
        let addr = if unix {
            if authority.is_some_and(|a| !a.is_empty()) {
                return Err(bad(
                    text,
                    "an nbd+unix URI takes no host or port; write nbd+unix:///EXPORT?socket=PATH",
                ));
            }
            let mut socket = None;
            for (k, v) in params {
                match k.as_str() {
                    "socket" if socket.is_some() => {
                        return Err(bad(text, "socket= is given more than once"))
                    }
                    "socket" => socket = Some(v),
                    k => return Err(unknown_param(text, k, true)),
                }
            }
            let Some(path) = socket else {
                return Err(bad(
                    text,
                    "nbd+unix needs the socket's path: nbd+unix:///EXPORT?socket=PATH",
                ));
            };
            check_unix_path(text, &path)?;
            Addr::Unix { path: PathBuf::from(std::ffi::OsString::from_vec(path)) }
        } else {
            if let Some((k, _)) = params.first() {
                return Err(unknown_param(text, k, false));
            }
            let Some(authority) = authority else {
                return Err(bad(text, format!("no host; expected {FORMS}")));
            };
            let (host, port) = parse_authority(text, authority)?;
            Addr::Tcp { host, port }
        };
        Ok(NbdUri { addr, export, text: text.to_string() })
    }
}

/// `k=v&k2=v2` into decoded pairs (a key without '=' has an empty value).
fn parse_query(text: &str, query: Option<&str>) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for part in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let key = String::from_utf8_lossy(&decode(text, "query", k)?).into_owned();
        out.push((key, decode(text, "query", v)?));
    }
    Ok(out)
}

fn unknown_param(text: &str, key: &str, unix: bool) -> Error {
    if key.starts_with("tls") {
        return unsupported(text, format!("{}=: TLS is not supported", key.escape_debug()));
    }
    if key == "socket" {
        return bad(text, "socket= belongs to nbd+unix URIs; write nbd+unix:///EXPORT?socket=PATH");
    }
    let allowed = if unix { "only socket= is understood" } else { "nbd:// takes none" };
    bad(text, format!("unknown query parameter {key:?} ({allowed})"))
}

/// The longest Unix socket path `sockaddr_un` holds (its NUL terminator excluded).
fn sun_path_max() -> usize {
    let sun = unix_template();
    sun.sun_path.len() - 1
}

fn check_unix_path(text: &str, path: &[u8]) -> Result<()> {
    if path.is_empty() {
        return Err(bad(text, "socket= is empty; give the Unix socket's path"));
    }
    let abstract_ns = path[0] == 0;
    // A filesystem path is NUL-terminated in sun_path; an abstract name uses all of it.
    let max = if abstract_ns { sun_path_max() + 1 } else { sun_path_max() };
    if path.len() > max {
        return Err(bad(
            text,
            format!(
                "the socket path is {} bytes, longer than the {max} a Unix socket address holds; \
                 use a shorter (e.g. relative) path",
                path.len()
            ),
        ));
    }
    if !abstract_ns && path.contains(&0) {
        return Err(bad(text, "the socket path contains a NUL (%00) after its start"));
    }
    Ok(())
}

/// `[userinfo@]host[:port]`: the host (brackets removed, percent-decoded) and the port.
fn parse_authority(text: &str, authority: &str) -> Result<(String, u16)> {
    // The userinfo is for TLS authentication, which this client does not do: ignored.
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let Some((h, after)) = rest.split_once(']') else {
            return Err(bad(text, "an IPv6 address's '[' has no closing ']'"));
        };
        if !h.contains(':') {
            return Err(bad(text, format!("[{h}] is not an IPv6 address")));
        }
        let port = match after {
            "" => None,
            a => match a.strip_prefix(':') {
                Some(p) => Some(p),
                None => return Err(bad(text, format!("unexpected {a:?} after [{h}]"))),
            },
        };
        (h, port)
    } else {
        match hostport.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err(bad(
                    text,
                    "an IPv6 address must be in brackets: nbd://[::1]:10809/EXPORT",
                ))
            }
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(bad(text, format!("no host; expected {FORMS}")));
    }
    let host = String::from_utf8(decode(text, "host", host)?)
        .map_err(|_| bad(text, "the host is not valid UTF-8"))?;
    let port = match port {
        // RFC 3986: an empty port is the default one.
        None | Some("") => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|c| c.is_ascii_digit()) => n,
            _ => {
                return Err(bad(
                    text,
                    format!(
                        "bad port {p:?}: give a number from 1 to 65535 (default {DEFAULT_PORT})"
                    ),
                ))
            }
        },
    };
    Ok((host, port))
}

/// A resolved socket address, ready for `connect(2)` or io_uring's CONNECT: a plain value
/// (no heap), so its address is stable wherever it is stored.
#[derive(Clone, Copy)]
pub struct SockAddr {
    inner: Inner,
}

#[derive(Clone, Copy)]
enum Inner {
    V4(libc::sockaddr_in),
    V6(libc::sockaddr_in6),
    Unix { sun: libc::sockaddr_un, len: libc::socklen_t },
}

fn unix_template() -> libc::sockaddr_un {
    libc::sockaddr_un { sun_family: libc::AF_UNIX as libc::sa_family_t, sun_path: [0; 108] }
}

impl SockAddr {
    pub fn from_std(a: SocketAddr) -> SockAddr {
        let inner = match a {
            SocketAddr::V4(v4) => Inner::V4(libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            }),
            SocketAddr::V6(v6) => Inner::V6(libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: v6.scope_id(),
            }),
        };
        SockAddr { inner }
    }

    /// A Unix socket address; a path starting with a NUL byte names the abstract namespace.
    pub fn unix(path: &Path) -> Result<SockAddr> {
        let b = path.as_os_str().as_bytes();
        let mut sun = unix_template();
        let abstract_ns = b.first() == Some(&0);
        let room = if abstract_ns { sun.sun_path.len() } else { sun.sun_path.len() - 1 };
        if b.is_empty() || b.len() > room || (!abstract_ns && b.contains(&0)) {
            return Err(Error::invalid(format!(
                "Unix socket path {:?}: must be 1 to {room} bytes without NUL; use a shorter \
                 (e.g. relative) path",
                unix_display(b)
            )));
        }
        for (d, s) in sun.sun_path.iter_mut().zip(b) {
            *d = *s as libc::c_char;
        }
        let base = std::mem::offset_of!(libc::sockaddr_un, sun_path);
        // Filesystem paths count their NUL; abstract names are exactly their bytes.
        let len = base + b.len() + usize::from(!abstract_ns);
        Ok(SockAddr { inner: Inner::Unix { sun, len: len as libc::socklen_t } })
    }

    pub fn as_ptr(&self) -> *const libc::sockaddr {
        match &self.inner {
            Inner::V4(a) => a as *const libc::sockaddr_in as *const libc::sockaddr,
            Inner::V6(a) => a as *const libc::sockaddr_in6 as *const libc::sockaddr,
            Inner::Unix { sun, .. } => sun as *const libc::sockaddr_un as *const libc::sockaddr,
        }
    }

    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> libc::socklen_t {
        match &self.inner {
            Inner::V4(_) => std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            Inner::V6(_) => std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            Inner::Unix { len, .. } => *len,
        }
    }

    /// `AF_INET`, `AF_INET6` or `AF_UNIX`.
    pub fn family(&self) -> i32 {
        match &self.inner {
            Inner::V4(_) => libc::AF_INET,
            Inner::V6(_) => libc::AF_INET6,
            Inner::Unix { .. } => libc::AF_UNIX,
        }
    }

    pub fn is_tcp(&self) -> bool {
        self.family() != libc::AF_UNIX
    }

    /// The address as std's type (TCP only).
    pub fn to_std(&self) -> Option<SocketAddr> {
        match &self.inner {
            Inner::V4(a) => Some(SocketAddr::new(
                IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()),
                u16::from_be(a.sin_port),
            )),
            Inner::V6(a) => Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            ))),
            Inner::Unix { .. } => None,
        }
    }
}

impl fmt::Display for SockAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Unix { sun, len } => {
                let base = std::mem::offset_of!(libc::sockaddr_un, sun_path);
                let n = (*len as usize).saturating_sub(base).min(sun.sun_path.len());
                let mut b: Vec<u8> = sun.sun_path[..n].iter().map(|&c| c as u8).collect();
                if b.first() != Some(&0) {
                    b.retain(|&c| c != 0);
                }
                f.write_str(&unix_display(&b))
            }
            _ => match self.to_std() {
                Some(a) => write!(f, "{a}"),
                None => Ok(()),
            },
        }
    }
}

impl fmt::Debug for SockAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SockAddr({self})")
    }
}

impl Addr {
    /// The address to connect to: a TCP host resolved (first address), or the Unix path.
    pub fn resolve(&self) -> Result<SockAddr> {
        match self {
            Addr::Unix { path } => SockAddr::unix(path),
            Addr::Tcp { host, port } => {
                let mut addrs = (host.as_str(), *port).to_socket_addrs().map_err(|e| {
                    Error::invalid(format!(
                        "cannot resolve NBD host \"{host}\": {e} (check the name, or give an IP address)"
                    ))
                })?;
                match addrs.next() {
                    Some(a) => Ok(SockAddr::from_std(a)),
                    None => Err(Error::invalid(format!(
                        "NBD host \"{host}\" resolves to no address (check the name, or give an IP address)"
                    ))),
                }
            }
        }
    }
}

/// A blocking stream socket (close-on-exec) for `addr`'s family, with TCP_NODELAY for TCP.
pub fn new_socket(addr: &SockAddr) -> Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; a negative return is checked before the fd is used.
    let fd = unsafe { libc::socket(addr.family(), libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::last_os("socket").hint("creating the NBD connection's socket"));
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if addr.is_tcp() {
        // Through std's safe wrapper: the fd goes in and comes straight back out.
        let stream = std::net::TcpStream::from(fd);
        stream.set_nodelay(true).map_err(|e| Error::os("setsockopt(TCP_NODELAY)", e))?;
        return Ok(OwnedFd::from(stream));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Addr {
        Addr::Tcp { host: host.into(), port }
    }

    fn unix(p: &str) -> Addr {
        Addr::Unix { path: p.into() }
    }

    #[test]
    fn nbd_uri_good() {
        let cases: &[(&str, Addr, &str)] = &[
            ("nbd://example.com/disk", tcp("example.com", 10809), "disk"),
            ("nbd://example.com:1234/disk", tcp("example.com", 1234), "disk"),
            ("nbd://example.com", tcp("example.com", 10809), ""),
            ("nbd://example.com/", tcp("example.com", 10809), ""),
            ("nbd://example.com:", tcp("example.com", 10809), ""),
            ("nbd://example.com//disk", tcp("example.com", 10809), "/disk"),
            ("nbd://example.com/hello%20world", tcp("example.com", 10809), "hello world"),
            ("nbd://h/a%2Fb%3fc+d", tcp("h", 10809), "a/b?c+d"),
            ("nbd://h/%C3%A9t%C3%A9", tcp("h", 10809), "été"),
            ("nbd://127.0.0.1:10810/x", tcp("127.0.0.1", 10810), "x"),
            ("nbd://[::1]/x", tcp("::1", 10809), "x"),
            ("nbd://[::1]:65535", tcp("::1", 65535), ""),
            ("nbd://[fe80::1%25eth0]:99/", tcp("fe80::1%eth0", 99), ""),
            ("nbd://user@host/x", tcp("host", 10809), "x"),
            ("NBD://Host/X", tcp("Host", 10809), "X"),
            ("nbd+unix:///disk?socket=/tmp/nbd.sock", unix("/tmp/nbd.sock"), "disk"),
            ("nbd+unix:///?socket=nbd.sock", unix("nbd.sock"), ""),
            ("nbd+unix://?socket=nbd.sock", unix("nbd.sock"), ""),
            ("nbd+unix:/e?socket=s", unix("s"), "e"),
            ("nbd+unix:///e?socket=%2Frun%2Fmy%20sock&", unix("/run/my sock"), "e"),
            ("nbd+unix:///?socket=%00/abstract", unix("\0/abstract"), ""),
        ];
        for (text, addr, export) in cases {
            let u = NbdUri::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(&u.addr, addr, "{text}");
            assert_eq!(u.export, *export, "{text}");
            assert_eq!(u.text, *text);
        }
    }

    #[test]
    fn nbd_uri_bad() {
        let long_sock = format!("nbd+unix:///?socket=/{}", "a".repeat(200));
        let long_export = format!("nbd://h/{}", "e".repeat(MAX_EXPORT_NAME + 1));
        let cases: &[(&str, &str)] = &[
            ("nbds://h/x", "TLS"),
            ("nbds+unix:///x?socket=s", "TLS"),
            ("nbd://h/x?tls-type=x509", "TLS"),
            ("nbd+unix:///x?socket=s&tls-verify-peer=0", "TLS"),
            ("nbd+vsock://1:10809/x", "vsock"),
            ("nbd+tcp://h/x", "nbd://"),
            ("http://h/x", "unknown scheme"),
            ("/dev/nbd0", "not a URI"),
            ("nbd+unix:///x", "socket"),
            ("nbd+unix:///x?socket=", "empty"),
            ("nbd+unix:///x?socket=a&socket=b", "more than once"),
            ("nbd+unix://host/x?socket=s", "no host"),
            ("nbd+unix://:10809/x?socket=s", "no host"),
            ("nbd+unix:///x?socket=s&foo=1", "unknown query parameter \"foo\""),
            ("nbd://h/x?socket=s", "nbd+unix"),
            ("nbd://h/x?x-foo=1", "unknown query parameter"),
            ("nbd://h:0/x", "bad port"),
            ("nbd://h:65536/x", "bad port"),
            ("nbd://h:+80/x", "bad port"),
            ("nbd://h:ab/x", "bad port"),
            ("nbd://::1/x", "brackets"),
            ("nbd://[::1/x", "closing"),
            ("nbd://[::1]x/", "unexpected"),
            ("nbd://[host]/", "not an IPv6"),
            ("nbd:///x", "no host"),
            ("nbd://:10809/x", "no host"),
            ("nbd:x", "must follow a '/'"),
            ("nbd:/x", "no host"),
            ("nbd://h/a%2", "percent-escape"),
            ("nbd://h/a%zz", "percent-escape"),
            ("nbd://h/a%00b", "NUL"),
            ("nbd://h/%ff", "UTF-8"),
            ("nbd://h/a b", "percent-encode"),
            ("nbd://h/x#frag", "fragment"),
            (&long_sock, "longer than"),
            (&long_export, "at most 4096"),
            ("", "not a URI"),
            ("nbd://h/%", "percent-escape"),
            ("nbd://h/%é", "percent-escape"),
        ];
        for (text, want) in cases {
            let e = NbdUri::parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text:?}: {e:?} lacks {want:?}");
            assert!(!e.contains('\n'), "{text}: {e}");
            if text.len() < 100 {
                assert!(e.contains(&format!("{text:?}")), "{text}: {e}");
            }
        }
        assert_eq!(NbdUri::parse("nbds://h/x").unwrap_err().raw_errno(), libc::EOPNOTSUPP);
        assert_eq!(NbdUri::parse("nbd://h:0/x").unwrap_err().raw_errno(), libc::EINVAL);
    }

    #[test]
    fn nbd_uri_resolve_and_sockaddr() {
        let a = tcp("127.0.0.1", 10809).resolve().unwrap();
        assert_eq!(a.family(), libc::AF_INET);
        assert_eq!(a.len() as usize, std::mem::size_of::<libc::sockaddr_in>());
        assert_eq!(a.to_string(), "127.0.0.1:10809");
        // SAFETY: as_ptr points at a sockaddr_in of len() bytes that `a` owns.
        let sin = unsafe { &*(a.as_ptr() as *const libc::sockaddr_in) };
        assert_eq!(u16::from_be(sin.sin_port), 10809);
        assert_eq!(sin.sin_addr.s_addr.to_ne_bytes(), [127, 0, 0, 1]);

        let a = tcp("::1", 99).resolve().unwrap();
        assert_eq!(a.family(), libc::AF_INET6);
        assert_eq!(a.to_string(), "[::1]:99");
        assert_eq!(tcp("localhost", 1).resolve().unwrap().to_std().unwrap().port(), 1);

        let a = unix("/tmp/x.sock").resolve().unwrap();
        assert_eq!(a.family(), libc::AF_UNIX);
        assert_eq!(a.len() as usize, 2 + "/tmp/x.sock".len() + 1);
        assert_eq!(a.to_string(), "/tmp/x.sock");
        let a = unix("\0abs").resolve().unwrap();
        assert_eq!(a.len() as usize, 2 + 4);
        assert_eq!(a.to_string(), "@abs");

        let e = tcp("no-such-host.invalid", 1).resolve().unwrap_err().to_string();
        assert!(e.contains("no-such-host.invalid") && !e.contains('\n'), "{e}");
        assert!(SockAddr::unix(Path::new(&"a".repeat(108))).is_err());
        assert!(SockAddr::unix(Path::new("")).is_err());

        for a in [unix("/tmp/x"), tcp("127.0.0.1", 1), tcp("::1", 1)] {
            let sa = a.resolve().unwrap();
            drop(new_socket(&sa).unwrap());
        }
        assert_eq!(format!("{}", tcp("::1", 5)), "[::1]:5");
        assert_eq!(format!("{}", unix("\0x")), "@x");
    }
}
