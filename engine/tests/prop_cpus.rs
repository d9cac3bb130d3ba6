//! Property tests (inputs fuzzed) of the CPU-list parser: no input panics it, every refusal
//! is one line, and well-formed lists parse to the set they name.

use std::collections::BTreeSet;

use proptest::prelude::*;
use ublk_fast_engine::cpus::parse_cpu_list;

/// `cases` runs, no regression files written into the tree.
fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(cases) }
}

/// A refusal must be one non-empty line.
fn assert_one_line(input: &str, e: &str) {
    assert!(!e.is_empty(), "{input:?}: empty error");
    assert!(!e.contains(['\n', '\r']), "{input:?}: error is not one line: {e:?}");
}

/// Whatever the input: an error of one line, or a sorted, duplicate-free, in-range set that
/// parses again from its own listing.
fn check_any(s: &str) {
    match parse_cpu_list(s) {
        Err(e) => assert_one_line(s, &e),
        Ok(cpus) => {
            assert!(!cpus.is_empty(), "{s:?}: accepted as no CPU");
            assert!(cpus.windows(2).all(|w| w[0] < w[1]), "{s:?}: {cpus:?} not sorted/unique");
            assert!(cpus.iter().all(|&c| c < 65536), "{s:?}: {cpus:?} out of range");
            let again: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
            assert_eq!(parse_cpu_list(&again.join(",")).as_ref(), Ok(&cpus), "{s:?}");
        }
    }
}

#[derive(Clone, Debug)]
enum Item {
    One(usize),
    Range(usize, usize),
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        (0usize..4096).prop_map(Item::One),
        (0usize..4096, 0usize..64).prop_map(|(a, n)| Item::Range(a, a + n)),
    ]
}

/// Blanks the parser allows around numbers and items.
fn pad() -> impl Strategy<Value = &'static str> {
    prop_oneof![4 => Just(""), 1 => Just(" "), 1 => Just("\t")]
}

proptest! {
    #![proptest_config(cfg(2000))]

    #[test]
    fn arbitrary_strings(s in any::<String>()) {
        check_any(&s);
    }

    #[test]
    fn list_like_strings(s in "[0-9,\\- \t\n+a.]{0,24}") {
        check_any(&s);
    }

    #[test]
    fn big_numbers(a in any::<u64>(), b in any::<u64>(), range in any::<bool>()) {
        let s = if range { format!("{a}-{b}") } else { format!("{a}") };
        let got = parse_cpu_list(&s);
        let (lo, hi) = if range { (a, b) } else { (a, a) };
        if lo <= hi && hi < 65536 {
            prop_assert_eq!(got, Ok((lo as usize..=hi as usize).collect::<Vec<_>>()));
        } else {
            prop_assert!(got.is_err(), "{:?} accepted", s);
            check_any(&s);
        }
    }
}

proptest! {
    #![proptest_config(cfg(1000))]

    #[test]
    fn valid_lists_parse_to_their_set(
        items in prop::collection::vec((item(), pad(), pad()), 1..12),
        trail in pad(),
    ) {
        let mut want = BTreeSet::new();
        let mut parts = Vec::new();
        for (it, p1, p2) in &items {
            match *it {
                Item::One(c) => {
                    want.insert(c);
                    parts.push(format!("{p1}{c}{p2}"));
                }
                Item::Range(a, b) => {
                    want.extend(a..=b);
                    parts.push(format!("{p1}{a}{p2}-{p1}{b}{p2}"));
                }
            }
        }
        let s = format!("{}{trail}\n", parts.join(","));
        prop_assert_eq!(parse_cpu_list(&s), Ok(want.into_iter().collect::<Vec<_>>()));
    }
}
