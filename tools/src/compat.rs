//! Other ublk servers' command lines, as their users' scripts type them. Most spellings are
//! clap aliases on our options (`--number`, `-z`, `-u`, `-b`, `-r/-i/-e`, `--buffered_io`,
//! `list -a`, `list -v`); the one that changes the command's shape is ublksrv's and kublk's
//! `add -t TYPE -f FILE ...`, which this turns into ours, `add TYPE FILE ...`, before parsing.

/// `add -t loop -f disk.img -q 2` → `add loop disk.img -q 2`; anything else is left as it is.
pub fn rewrite(args: Vec<String>) -> Vec<String> {
    let Some(add) = args.iter().position(|a| a == "add") else { return args };
    let rest = &args[add + 1..];
    let mut target = None;
    let mut files = Vec::new();
    let mut others = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        let a = rest[i].as_str();
        let value = |i: usize| rest.get(i + 1).cloned();
        match a {
            "-t" | "--type" if value(i).is_some() => {
                target = value(i);
                i += 2;
            }
            "-f" | "--file" if value(i).is_some() => {
                files.extend(value(i));
                i += 2;
            }
            _ => {
                if let Some(t) = a.strip_prefix("--type=") {
                    target = Some(t.to_string());
                } else if let Some(f) = a.strip_prefix("--file=") {
                    files.push(f.to_string());
                } else {
                    others.push(rest[i].clone());
                }
                i += 1;
            }
        }
    }
    let Some(target) = target else { return args };
    let mut out = args[..=add].to_vec();
    out.push(target);
    out.extend(files);
    out.extend(others);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn type_and_file_become_our_shape() {
        assert_eq!(
            rewrite(v("ublk-fast add -t loop -f a.img -q 2 -z")),
            v("ublk-fast add loop a.img -q 2 -z")
        );
        assert_eq!(
            rewrite(v("ublk-fast add -q 1 --type=null -n 3")),
            v("ublk-fast add null -q 1 -n 3")
        );
        assert_eq!(rewrite(v("ublk-fast add --file=b.img -t loop")), v("ublk-fast add loop b.img"));
        // Ours, and commands that are not `add`, are untouched.
        for same in [
            "ublk-fast add loop a.img -q 2",
            "ublk-fast loop a.img",
            "ublk-fast del -a",
            "ublk-fast add -t",
        ] {
            assert_eq!(rewrite(v(same)), v(same));
        }
    }
}
