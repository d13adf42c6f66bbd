//! The emulator's module boundary, checked on its sources: it names nothing of the connector
//! (`crate::` paths only into `crate::emulator`), the SQL rules do not reach back into the
//! session that drives them, and no file grows past ~800 lines.

use std::path::{Path, PathBuf};

fn sources() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, found: &mut Vec<(PathBuf, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                found.push((path, text));
            }
        }
    }
    let mut found = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/emulator"),
        &mut found,
    );
    assert!(found.len() > 10, "the emulator's sources were not found");
    found
}

/// Code lines (comments, doc links included, may name the connector).
fn code(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim_start().starts_with("//"))
        .map(|(n, line)| (n + 1, line))
}

#[test]
fn the_emulator_names_nothing_of_the_connector() {
    let needle = concat!("crate", "::");
    let mut found = Vec::new();
    for (path, text) in sources() {
        for (n, line) in code(&text) {
            for (at, _) in line.match_indices(needle) {
                let after = &line[at + needle.len()..];
                let word_start = at == 0
                    || !line.as_bytes()[at - 1].is_ascii_alphanumeric()
                        && line.as_bytes()[at - 1] != b'_';
                if word_start && !after.starts_with("emulator") {
                    found.push(format!("{}:{n}: {}", path.display(), line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "the emulator reaches into the connector:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_sql_rules_do_not_reach_back_into_the_session() {
    let mut found = Vec::new();
    for (path, text) in sources() {
        if !path.components().any(|c| c.as_os_str() == "sql") {
            continue;
        }
        for (n, line) in code(&text) {
            if line.contains(concat!("session", "::"))
                || line.contains(concat!("emulator::", "session"))
            {
                found.push(format!("{}:{n}: {}", path.display(), line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "an import circle:\n{}", found.join("\n"));
}

#[test]
fn no_file_is_over_800_lines() {
    let long: Vec<String> = sources()
        .into_iter()
        .filter(|(_, text)| text.lines().count() > 800)
        .map(|(path, text)| format!("{}: {} lines", path.display(), text.lines().count()))
        .collect();
    assert!(long.is_empty(), "split these:\n{}", long.join("\n"));
}
