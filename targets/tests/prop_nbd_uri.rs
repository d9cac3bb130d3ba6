//! Property tests (inputs fuzzed) of the NBD URI parser: no input panics it, every refusal is
//! one line (EINVAL or EOPNOTSUPP), and URIs built from a host, port, export and socket path
//! parse back to them.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use proptest::prelude::*;
use ublk_fast_targets::nbd::uri::{Addr, NbdUri, DEFAULT_PORT, MAX_EXPORT_NAME};

/// `cases` runs, no regression files written into the tree.
fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(cases) }
}

fn check_any(s: &str) {
    match NbdUri::parse(s) {
        Ok(u) => {
            assert_eq!(u.text, s);
            assert!(u.export.len() <= MAX_EXPORT_NAME && !u.export.contains('\0'), "{s:?}");
            match &u.addr {
                Addr::Tcp { host, port } => assert!(!host.is_empty() && *port != 0, "{s:?}"),
                Addr::Unix { path } => assert!(!path.as_os_str().is_empty(), "{s:?}"),
            }
        }
        Err(e) => {
            let m = e.to_string();
            assert!(!m.is_empty(), "{s:?}: empty error");
            assert!(!m.contains(['\n', '\r']), "{s:?}: error is not one line: {m:?}");
            assert!([libc::EINVAL, libc::EOPNOTSUPP].contains(&e.raw_errno()), "{s:?}: {m}");
        }
    }
}

/// Percent-encodes every byte but RFC 3986's unreserved ones, in upper or lower case hex.
fn encode(b: &[u8], lower: bool) -> String {
    let mut s = String::new();
    for &c in b {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            s.push(c as char);
        } else if lower {
            s.push_str(&format!("%{c:02x}"));
        } else {
            s.push_str(&format!("%{c:02X}"));
        }
    }
    s
}

/// A host as a URI names it, and as the parser should return it.
fn host() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        "[a-zA-Z0-9]([a-zA-Z0-9.-]{0,30}[a-zA-Z0-9])?".prop_map(|h| (h.clone(), h)),
        any::<[u8; 4]>().prop_map(|o| {
            let h = Ipv4Addr::from(o).to_string();
            (h.clone(), h)
        }),
        any::<[u8; 16]>().prop_map(|o| {
            let h = Ipv6Addr::from(o).to_string();
            (format!("[{h}]"), h)
        }),
    ]
}

/// URI-ish text: a scheme the parser knows (or not) and a tail rich in URI punctuation.
fn uri_like() -> impl Strategy<Value = String> {
    let scheme = prop_oneof![
        Just("nbd://"),
        Just("nbd+unix://"),
        Just("nbd+unix:///"),
        Just("nbds://"),
        Just("nbd:"),
        Just("NBD+UNIX:"),
        Just(""),
    ];
    let tail = "[a-z0-9:/@\\[\\]%?&=#.+ \n\u{0}é-]{0,40}";
    (scheme, tail).prop_map(|(a, b)| format!("{a}{b}"))
}

proptest! {
    #![proptest_config(cfg(2000))]

    #[test]
    fn arbitrary_strings(s in any::<String>()) {
        check_any(&s);
    }

    #[test]
    fn uri_like_strings(s in uri_like()) {
        check_any(&s);
    }

    #[test]
    fn query_and_escapes(
        unix in any::<bool>(),
        pairs in prop::collection::vec((
            "(%0[0-9a-fA-F]|%[0-9a-fA-FgG]{0,2}|[a-z]|tls|socket){1,3}",
            "(%[0-9a-fA-F]{2}|[a-z/]){0,6}",
        ), 0..4),
    ) {
        let q: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let s = if unix {
            format!("nbd+unix:///e?{}", q.join("&"))
        } else {
            format!("nbd://h/e?{}", q.join("&"))
        };
        check_any(&s);
    }
}

proptest! {
    #![proptest_config(cfg(1000))]

    #[test]
    fn tcp_uris_round_trip(
        (text_host, want_host) in host(),
        port in prop::option::of(1u16..=65535),
        export in "[^\u{0}]{0,40}",
        lower in any::<bool>(),
        slash in any::<bool>(),
    ) {
        let port_part = port.map(|p| format!(":{p}")).unwrap_or_default();
        let path = if export.is_empty() && !slash {
            String::new()
        } else {
            format!("/{}", encode(export.as_bytes(), lower))
        };
        let s = format!("nbd://{text_host}{port_part}{path}");
        let u = NbdUri::parse(&s).map_err(|e| TestCaseError::fail(format!("{s:?}: {e}")))?;
        prop_assert_eq!(u.addr, Addr::Tcp { host: want_host, port: port.unwrap_or(DEFAULT_PORT) });
        prop_assert_eq!(u.export, export);
        prop_assert_eq!(u.text, s);
    }

    #[test]
    fn unix_uris_round_trip(
        export in "[^\u{0}]{0,40}",
        socket in prop::collection::vec(1u8..=255, 1..=107),
        abstract_ns in any::<bool>(),
        lower in any::<bool>(),
    ) {
        let mut path = socket;
        if abstract_ns {
            path.insert(0, 0);
        }
        let s = format!(
            "nbd+unix:///{}?socket={}",
            encode(export.as_bytes(), lower),
            encode(&path, lower)
        );
        let u = NbdUri::parse(&s).map_err(|e| TestCaseError::fail(format!("{s:?}: {e}")))?;
        let path = PathBuf::from(std::ffi::OsString::from_vec(path));
        prop_assert_eq!(u.addr, Addr::Unix { path });
        prop_assert_eq!(u.export, export);
    }
}
