//! Human sizes: `4096`, `512K`, `1G`, `1GiB`, `2T` (binary multiples, as dd and fio read them).

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
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
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use K, M, G, T or P)")),
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
