//! Human sizes: `4096`, `512K`, `1G`, `1GiB`, `2T` (binary multiples, as dd and fio read them).

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    // Escaped: a message stays one line whatever the input holds.
    let s = s.escape_debug();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("`{s}` is not a size (examples: 4096, 512M, 1G)"));
    }
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is too large"))?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        _ => {
            let unit = unit.escape_debug();
            return Err(format!("`{s}`: unknown unit `{unit}` (use K, M, G, T or P)"));
        }
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("256g").unwrap(), 256 << 30);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size("8k").unwrap(), 8192);
    }

    #[test]
    fn rejects_bad_sizes() {
        for bad in ["", "G", "-1", "1X", "1.5G", "99999999999999999999", "16777216T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }
}

#[cfg(test)]
mod prop_tests {
    use super::*;
    use proptest::prelude::*;

    const UNITS: &[(&str, u32)] = &[
        ("", 0),
        ("b", 0),
        ("k", 10),
        ("kb", 10),
        ("kib", 10),
        ("m", 20),
        ("mib", 20),
        ("g", 30),
        ("gb", 30),
        ("t", 40),
        ("tib", 40),
        ("p", 50),
        ("pb", 50),
    ];

    fn check_any(s: &str) {
        if let Err(e) = parse_size(s) {
            assert!(!e.is_empty() && !e.contains(['\n', '\r']), "{s:?}: {e:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::with_cases(2000)
        })]

        #[test]
        fn arbitrary_strings(s in any::<String>()) {
            check_any(&s);
        }

        #[test]
        fn size_like_strings(s in "[ \t\n]?[0-9]{0,22}[ \n.]?[kKmMgGtTpPbBiIx]{0,4}[ \t\n]?") {
            check_any(&s);
        }

        /// `<n><unit>` is n times the unit, or (past u64) an error, never a wrapped number.
        #[test]
        fn numbers_with_units(
            n in prop_oneof![0u64..1 << 20, any::<u64>()],
            unit in 0..UNITS.len(),
            upper in any::<bool>(),
            zeros in 0usize..3,
            blank in prop_oneof![Just(""), Just(" "), Just("\n")],
        ) {
            let (u, shift) = UNITS[unit];
            let u = if upper { u.to_ascii_uppercase() } else { u.to_string() };
            let s = format!("{blank}{}{n}{u}{blank}", "0".repeat(zeros));
            match n.checked_mul(1 << shift) {
                Some(v) => prop_assert_eq!(parse_size(&s), Ok(v), "{:?}", s),
                None => {
                    let e = parse_size(&s).expect_err(&s);
                    prop_assert!(e.contains("too large") && !e.contains('\n'), "{:?}: {:?}", s, e);
                }
            }
        }
    }
}
