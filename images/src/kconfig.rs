//! Checking that a Kconfig fragment survived `make allnoconfig`.
//!
//! Kconfig silently drops a fragment line whose dependencies are not met (or
//! whose symbol does not exist), so after configuring, every assignment and
//! every `# CONFIG_X is not set` line of the fragment is compared with the
//! resolved `.config`.

use std::collections::HashMap;
use std::fmt;

use crate::error::ImagesError;

/// What a fragment line asks for one symbol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Requirement {
    /// Symbol name including the `CONFIG_` prefix.
    pub symbol: String,
    /// `Some(value)` for `CONFIG_X=value`, `None` for "is not set" (or `=n`).
    pub value: Option<String>,
    /// 1-based line number in the fragment.
    pub line: usize,
}

/// A fragment line that did not hold in the resolved configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMismatch {
    /// Symbol name including the `CONFIG_` prefix.
    pub symbol: String,
    /// 1-based line number in the fragment.
    pub line: usize,
    /// What the fragment asked for (`None`: not set).
    pub wanted: Option<String>,
    /// What the resolved configuration has (`None`: not set or absent).
    pub got: Option<String>,
}

impl fmt::Display for ConfigMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |value: &Option<String>| match value {
            Some(value) => format!("={value}"),
            None => " not set".to_owned(),
        };
        write!(
            f,
            "{} (line {}): wanted{}, got{}",
            self.symbol,
            self.line,
            show(&self.wanted),
            show(&self.got)
        )
    }
}

/// Parses `# CONFIG_X is not set` into `CONFIG_X`.
fn not_set_symbol(line: &str) -> Option<&str> {
    let symbol = line.strip_prefix("# ")?.strip_suffix(" is not set")?;
    is_symbol(symbol).then_some(symbol)
}

/// Whether `name` is a `CONFIG_` symbol name.
fn is_symbol(name: &str) -> bool {
    name.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

/// Parses a fragment into its requirements. Comment and blank lines are
/// skipped; any other line that is not an assignment is an error.
pub(crate) fn parse_fragment(text: &str) -> Result<Vec<Requirement>, ImagesError> {
    let mut requirements = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let number = index + 1;
        if let Some(symbol) = not_set_symbol(line) {
            requirements.push(Requirement {
                symbol: symbol.to_owned(),
                value: None,
                line: number,
            });
        } else if line.is_empty() || line.starts_with('#') {
            continue;
        } else if let Some((symbol, value)) = line.split_once('=').filter(|(s, _)| is_symbol(s)) {
            requirements.push(Requirement {
                symbol: symbol.to_owned(),
                value: (value != "n").then(|| value.to_owned()),
                line: number,
            });
        } else {
            return Err(ImagesError::Unexpected(format!(
                "images/kernel/microvm.fragment line {number} is neither a comment nor \
                 `CONFIG_X=value` nor `# CONFIG_X is not set`: {raw:?}"
            )));
        }
    }
    Ok(requirements)
}

/// Parses a resolved `.config` into symbol -> value (`None`: "is not set").
fn parse_config(text: &str) -> HashMap<&str, Option<&str>> {
    let mut symbols = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(symbol) = not_set_symbol(line) {
            symbols.insert(symbol, None);
        } else if let Some((symbol, value)) = line.split_once('=').filter(|(s, _)| is_symbol(s)) {
            symbols.insert(symbol, Some(value));
        }
    }
    symbols
}

/// Returns every fragment requirement that does not hold in `config`.
/// A symbol absent from `config` counts as not set.
pub(crate) fn verify(requirements: &[Requirement], config: &str) -> Vec<ConfigMismatch> {
    let resolved = parse_config(config);
    requirements
        .iter()
        .filter_map(|requirement| {
            let got = resolved
                .get(requirement.symbol.as_str())
                .copied()
                .flatten()
                .filter(|value| *value != "n");
            (got != requirement.value.as_deref()).then(|| ConfigMismatch {
                symbol: requirement.symbol.clone(),
                line: requirement.line,
                wanted: requirement.value.clone(),
                got: got.map(str::to_owned),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAGMENT: &str = "\
# a comment line
CONFIG_SMP=y
CONFIG_NR_CPUS=32
CONFIG_LOCALVERSION=\"-grove\"

# CONFIG_MODULES is not set
# CONFIG_SLUB is not set
CONFIG_DEVPORT=y
";

    const CONFIG: &str = "\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_SMP=y
CONFIG_NR_CPUS=32
CONFIG_LOCALVERSION=\"-grove\"
# CONFIG_MODULES is not set
CONFIG_SLAB=y
# CONFIG_DEVPORT is not set
";

    #[test]
    fn parses_fragment() {
        let requirements = parse_fragment(FRAGMENT).expect("valid fragment");
        assert_eq!(requirements.len(), 6);
        assert_eq!(requirements[0].symbol, "CONFIG_SMP");
        assert_eq!(requirements[0].value.as_deref(), Some("y"));
        assert_eq!(requirements[0].line, 2);
        assert_eq!(requirements[2].value.as_deref(), Some("\"-grove\""));
        assert_eq!(requirements[3].symbol, "CONFIG_MODULES");
        assert_eq!(requirements[3].value, None);
    }

    #[test]
    fn reports_symbol_that_did_not_stick() {
        let requirements = parse_fragment(FRAGMENT).expect("valid fragment");
        let mismatches = verify(&requirements, CONFIG);
        assert_eq!(
            mismatches,
            vec![ConfigMismatch {
                symbol: "CONFIG_DEVPORT".to_owned(),
                line: 8,
                wanted: Some("y".to_owned()),
                got: None,
            }]
        );
        assert_eq!(
            mismatches[0].to_string(),
            "CONFIG_DEVPORT (line 8): wanted=y, got not set"
        );
    }

    #[test]
    fn reports_wrong_value_and_unwanted_symbol() {
        let requirements =
            parse_fragment("CONFIG_NR_CPUS=32\n# CONFIG_SLAB is not set\nCONFIG_MISSING=y\n")
                .expect("valid fragment");
        let config = "CONFIG_NR_CPUS=64\nCONFIG_SLAB=y\n";
        let symbols: Vec<_> = verify(&requirements, config)
            .into_iter()
            .map(|m| (m.symbol, m.wanted, m.got))
            .collect();
        assert_eq!(
            symbols,
            vec![
                (
                    "CONFIG_NR_CPUS".to_owned(),
                    Some("32".to_owned()),
                    Some("64".to_owned())
                ),
                ("CONFIG_SLAB".to_owned(), None, Some("y".to_owned())),
                ("CONFIG_MISSING".to_owned(), Some("y".to_owned()), None),
            ]
        );
    }

    #[test]
    fn all_lines_holding_is_clean() {
        let requirements = parse_fragment(
            "CONFIG_SMP=y\n# CONFIG_MODULES is not set\n# CONFIG_ABSENT is not set\n",
        )
        .expect("valid fragment");
        // CONFIG_ABSENT does not appear at all: that counts as not set.
        assert!(verify(&requirements, CONFIG).is_empty());
    }

    #[test]
    fn rejects_malformed_fragment_line() {
        let error = parse_fragment("CONFIG_SMP=y\nSMP=y\n").expect_err("malformed");
        assert!(error.to_string().contains("line 2"), "{error}");
    }

    #[test]
    fn equals_n_means_not_set() {
        let requirements = parse_fragment("CONFIG_FOO=n\n").expect("valid fragment");
        assert!(verify(&requirements, "# CONFIG_FOO is not set\n").is_empty());
        assert!(verify(&requirements, "").is_empty());
        assert_eq!(verify(&requirements, "CONFIG_FOO=y\n").len(), 1);
    }
}
