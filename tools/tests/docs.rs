//! The man pages and completions are generated from the CLI itself (no driver needed: these
//! run in the host's `cargo test`).

mod common;

use std::process::Command;

use common::*;

#[test]
fn man_pages_have_the_operator_sections_and_the_other_servers_spellings() {
    let dir = std::env::temp_dir().join(format!("ublk-fast-man-{}", std::process::id()));
    let o = Command::new(bin()).args(["generate", "man"]).arg(&dir).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let main = std::fs::read_to_string(dir.join("ublk-fast.8")).unwrap();
    for section in
        ["NAME", "SYNOPSIS", "EXAMPLES", "COMPATIBILITY", "FILES", "SIGNALS", "EXIT STATUS"]
    {
        assert!(main.contains(&format!(".SH {section}")), "no {section} section");
    }
    for spelling in ["add \\-t", "\\-\\-number", "\\-\\-buffered_io", "list \\-v", "\\-r 0|1"] {
        assert!(main.contains(spelling), "the man page does not list {spelling}");
    }
    for cmd in ["serve", "resize", "del", "list", "quiesce", "recover", "loop"] {
        assert!(dir.join(format!("ublk-fast-{cmd}.1")).exists(), "no page for {cmd}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn completions_parse_and_know_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let o = Command::new(bin()).args(["generate", "completions", shell]).output().unwrap();
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let text = stdout(&o);
        for cmd in ["serve", "resize", "shutdown", "quiesce", "recover"] {
            assert!(text.contains(cmd), "{shell} completions lack {cmd}");
        }
        if shell == "bash" {
            let path = std::env::temp_dir().join(format!("ublk-fast-compl-{}", std::process::id()));
            std::fs::write(&path, &text).unwrap();
            let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
            let _ = std::fs::remove_file(&path);
            assert!(check.status.success(), "bash -n: {}", stderr(&check));
        }
    }
}
