//! Names of images and environments: git-branch-like, and safe anywhere a name ends up
//! (URLs, log lines, database rows). Names never become file names: files are named by
//! database ids.

use crate::error::ApiError;

/// Longest name accepted.
pub const MAX_NAME_LEN: usize = 100;

/// Checks `name` for an image or environment: 1 to 100 characters of ASCII letters, digits,
/// `-`, `_`, `.` and `/`; `/`-separated parts that are non-empty and do not start with `.`
/// or `-`; no `..`, no part ending in `.lock` (git's rules, minus what git allows but a URL
/// or a shell makes awkward).
pub fn validate(kind: &str, name: &str) -> Result<(), ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("invalid {kind} name {name:?}: {why}"));
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad(&format!("it is longer than {MAX_NAME_LEN} characters")));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')))
    {
        return Err(bad(&format!(
            "{c:?} is not allowed (letters, digits, - _ . / only)"
        )));
    }
    if name.contains("..") {
        return Err(bad("it contains \"..\""));
    }
    for part in name.split('/') {
        if part.is_empty() {
            return Err(bad("it has an empty part between slashes"));
        }
        if part.starts_with('.') || part.starts_with('-') {
            return Err(bad("a part starts with \".\" or \"-\""));
        }
        if part.ends_with(".lock") || part.ends_with('.') {
            return Err(bad("a part ends with \".lock\" or \".\""));
        }
    }
    Ok(())
}

/// The hostname a guest gets for environment `name`: lowercase letters, digits and `-`
/// (every other character becomes `-`), no leading or trailing `-`, at most 63 characters
/// (one DNS label); `grove` if nothing is left.
pub fn hostname_for(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let mut label = mapped.trim_matches('-').to_string();
    label.truncate(63);
    let label = label.trim_end_matches('-');
    if label.is_empty() {
        "grove".to_string()
    } else {
        label.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::{hostname_for, validate};

    #[test]
    fn hostnames_are_dns_labels() {
        assert_eq!(hostname_for("main"), "main");
        assert_eq!(hostname_for("feature/X_1.2"), "feature-x-1-2");
        assert_eq!(hostname_for("_x_"), "x");
        assert_eq!(hostname_for("___"), "grove");
        let long = format!("{}-b", "a".repeat(62));
        assert_eq!(hostname_for(&long), "a".repeat(62));
        assert_eq!(hostname_for(&"b".repeat(100)).len(), 63);
    }

    #[test]
    fn branch_like_names_pass() {
        for n in [
            "main",
            "feature-x",
            "feature/x",
            "release/1.2",
            "a",
            "JIRA_123",
            "v1.0",
        ] {
            validate("environment", n).unwrap_or_else(|e| panic!("{n}: {e}"));
        }
    }

    #[test]
    fn path_tricks_and_junk_fail() {
        let long = "x".repeat(101);
        for n in [
            "", "..", "../etc", "a/../b", "/abs", "a/", "a//b", ".hidden", "-rf", "a b", "a\0b",
            "a\nb", "é", "x.lock", "x.", "a/.b", "a;b", "$(id)", "a%2Fb", &long,
        ] {
            assert!(validate("environment", n).is_err(), "{n:?} should fail");
        }
    }
}
