//! The man page and the shell completions against `--help`: every flag, nothing hidden.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use super::{ok, output};
use crate::support::{evidence, product};

/// Long flags (`--name`) in `text`, without the dashes.
fn long_flags(text: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i + 2 < bytes.len() {
        let starts = bytes[i] == b'-'
            && bytes[i + 1] == b'-'
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'-'));
        if starts {
            let name: String = text[i + 2..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                .collect();
            if name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                i += 2 + name.len();
                flags.insert(name);
                continue;
            }
        }
        i += 1;
    }
    flags
}

/// The subcommands `sockmap-gc --help` lists (without `help`).
fn help_subcommands(bin: &Path) -> Vec<String> {
    let help = ok(Command::new(bin).arg("--help"));
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// The long flags `sockmap-gc SUB --help` lists in its options.
fn help_flags(bin: &Path, sub: &str) -> BTreeSet<String> {
    let help = ok(Command::new(bin).args([sub, "--help"]));
    let options: String = help
        .lines()
        .filter(|l| l.trim_start().starts_with('-'))
        .collect::<Vec<_>>()
        .join("\n");
    long_flags(&options)
}

/// The roff text of the man page's section `.SH NAME` up to the next `.SH`, without font
/// changes and with plain dashes.
fn man_section(page: &str, name: &str) -> String {
    let mut page = page.replace("\\-", "-");
    for font in ["\\fB", "\\fI", "\\fR", "\\fP"] {
        page = page.replace(font, "");
    }
    let mut lines = page.lines().skip_while(|l| *l != format!(".SH {name}"));
    let first = lines.next();
    assert!(
        first.is_some(),
        "no section {name} in the man page:\n{page}"
    );
    lines
        .take_while(|l| !l.starts_with(".SH "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn generate(bin: &Path, what: &str) -> String {
    ok(Command::new(bin).args(["generate", what]))
}

#[test]
fn man_page_and_completions_list_every_flag_of_help_and_nothing_hidden() {
    let bin = product();
    let subs = help_subcommands(&bin);
    assert_eq!(subs, ["decode", "audit", "sweep", "daemon"], "--help lists");
    let help = ok(Command::new(&bin).arg("--help"));
    assert!(
        !help.contains("generate"),
        "--help lists the hidden subcommand:\n{help}"
    );

    let man = generate(&bin, "man");
    let bash = generate(&bin, "complete-bash");
    let zsh = generate(&bin, "complete-zsh");
    let fish = generate(&bin, "complete-fish");
    for (name, text) in [
        ("man", &man),
        ("bash", &bash),
        ("zsh", &zsh),
        ("fish", &fish),
    ] {
        assert!(
            !text.contains("generate") && !text.replace("\\-", "-").contains("--root"),
            "the {name} output offers a hidden subcommand or flag"
        );
    }
    for sub in &subs {
        assert!(
            man_section(&man, "SUBCOMMANDS").lines().any(|l| l == sub),
            "{sub} missing from the man page's SUBCOMMANDS"
        );
    }
    for sub in &subs {
        let want = help_flags(&bin, sub);
        assert!(want.contains("help") && want.len() >= 2, "{sub}: {want:?}");

        let in_man = long_flags(&man_section(&man, &sub.to_uppercase()));
        assert_eq!(
            in_man,
            want,
            "man page section {} vs --help",
            sub.to_uppercase()
        );

        let opts = bash
            .lines()
            .skip_while(|l| {
                let l = l.trim();
                !l.ends_with(&format!("__subcmd__{sub})")) || l.contains("help__subcmd")
            })
            .find_map(|l| l.trim().strip_prefix("opts=\""))
            .unwrap_or_else(|| panic!("no bash case for {sub}:\n{bash}"));
        assert_eq!(long_flags(opts), want, "bash completion of {sub} vs --help");

        // The first `(SUB)` case is the subcommand's arguments (later ones are `help SUB`);
        // each option is a line of its own: `'--name...`, `'*--name...` when repeatable,
        // `'(--other)--name...` when it conflicts with another.
        let zsh_flags: BTreeSet<String> = zsh
            .lines()
            .skip_while(|l| l.trim() != format!("({sub})"))
            .skip(1)
            .take_while(|l| l.trim() != ";;")
            .filter_map(|l| {
                let spec = l.strip_prefix('\'')?;
                // `(--other)` names the flags it conflicts with.
                let spec = match spec.strip_prefix('(') {
                    Some(rest) => rest.split_once(')')?.1,
                    None => spec,
                };
                let spec = spec.trim_start_matches('*');
                spec.starts_with("--").then(|| spec.to_string())
            })
            .flat_map(|l| long_flags(&l).into_iter().take(1))
            .collect();
        assert_eq!(zsh_flags, want, "zsh completion of {sub} vs --help");

        let condition = format!("__fish_sockmap_gc_using_subcommand {sub}\"");
        let fish_flags: BTreeSet<String> = fish
            .lines()
            .filter(|l| l.contains(&condition))
            .filter_map(|l| l.split(" -l ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .collect();
        assert_eq!(fish_flags, want, "fish completion of {sub} vs --help");
    }
    let page = std::env::temp_dir().join(format!("sockmap-gc-man-{}.1", std::process::id()));
    std::fs::write(&page, &man).expect("write the page");
    let out = output(
        Command::new("groff")
            .args(["-ww", "-man", "-Tutf8", "-z"])
            .arg(&page),
    );
    let _ = std::fs::remove_file(&page);
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && warnings.trim().is_empty(),
        "groff warns about the man page:\n{warnings}"
    );
    evidence(&format!(
        "man page and bash/zsh/fish completions list exactly --help's flags for {}",
        subs.join(", ")
    ));
}
