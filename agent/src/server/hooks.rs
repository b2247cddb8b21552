//! Post-clone hooks: every executable in the hooks directory (`/etc/grove/hooks.d/` in the
//! guest), run one after another in lexical (byte) order of their file names.
//!
//! All hooks run even when one fails: each is an independent clean-up step (scrub a
//! database, rotate a key), and the host sees every result and decides what a failure
//! means. Names starting with `.` and files without an execute bit are skipped, so a hook is
//! disabled with `chmod -x`. Each hook runs with `/` as working directory, stdin
//! `/dev/null`, the agent's environment, and its stdout and stderr in one pipe of which the
//! last [`MAX_HOOK_OUTPUT_BYTES`] are reported.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::{self, RunError};
use crate::protocol::{HookResult, MAX_HOOK_OUTPUT_BYTES};

/// At most this many hooks run (so the report fits in one frame); a directory with more is
/// refused before any runs.
pub(crate) const MAX_HOOKS: usize = 256;

/// Errors listing the hooks directory.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HooksError {
    #[error("cannot read the hooks directory {}", .0.display())]
    ReadDir(PathBuf, #[source] io::Error),
    #[error("the hooks directory {} holds {} hooks, more than the limit of {MAX_HOOKS}", .0.display(), .1)]
    TooMany(PathBuf, usize),
}

/// The hooks in `dir`, in the order they run. A missing directory has none.
pub(crate) fn list(dir: &Path) -> Result<Vec<(OsString, PathBuf)>, HooksError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(HooksError::ReadDir(dir.to_owned(), e)),
    };
    let mut hooks = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| HooksError::ReadDir(dir.to_owned(), e))?;
        let name = entry.file_name();
        if name.as_bytes().starts_with(b".") {
            continue;
        }
        let path = entry.path();
        // Follows symbolic links: a link to an executable is a hook.
        let executable = fs::metadata(&path)
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0);
        if executable {
            hooks.push((name, path));
        }
    }
    if hooks.len() > MAX_HOOKS {
        return Err(HooksError::TooMany(dir.to_owned(), hooks.len()));
    }
    hooks.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(hooks)
}

/// The last `MAX_HOOK_OUTPUT_BYTES` of everything appended.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.0.extend_from_slice(data);
        // Trim in batches, not on every push.
        if self.0.len() > 2 * MAX_HOOK_OUTPUT_BYTES {
            self.0.drain(..self.0.len() - MAX_HOOK_OUTPUT_BYTES);
        }
    }

    fn into_string(mut self) -> String {
        if self.0.len() > MAX_HOOK_OUTPUT_BYTES {
            self.0.drain(..self.0.len() - MAX_HOOK_OUTPUT_BYTES);
        }
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

/// Runs one hook to its end or its time limit.
fn run_one(name: &OsString, path: &Path, timeout: Duration) -> HookResult {
    let mut command = Command::new(path);
    command.current_dir("/");
    let mut tail = Tail::default();
    let result = process::run(command, &[], Some(timeout), true, None, &mut |_, data| {
        tail.push(data);
        Ok(())
    });
    let name = name.to_string_lossy().into_owned();
    match result {
        Ok(status) => HookResult {
            name,
            code: status.code,
            signal: status.signal,
            timed_out: status.timed_out,
            output: tail.into_string(),
        },
        Err(error @ (RunError::Spawn(_) | RunError::Watch(_))) => {
            let cause = std::error::Error::source(&error)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            HookResult {
                name,
                code: None,
                signal: None,
                timed_out: false,
                output: format!("grove-agent: {error}{cause}"),
            }
        }
        // The sink above never fails and no connection is watched.
        Err(RunError::Sink(_) | RunError::HungUp) => HookResult {
            name,
            code: None,
            signal: None,
            timed_out: false,
            output: "grove-agent: the hook's output could not be collected".to_owned(),
        },
    }
}

/// Runs every hook in `dir`, each with `timeout`, and reports each result in order.
pub(crate) fn run_all(dir: &Path, timeout: Duration) -> Result<Vec<HookResult>, HooksError> {
    Ok(list(dir)?
        .iter()
        .map(|(name, path)| run_one(name, path, timeout))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::tests::TempDir;

    fn hook(dir: &Path, name: &str, script: &str, mode: u32) {
        let path = dir.join(name);
        fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("write hook");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn runs_every_executable_in_lexical_order_and_reports_each() {
        let temp = TempDir::new("hooks-order");
        let dir = temp.path();
        let log = dir.join("order.log");
        let log_arg = log.display();
        hook(
            dir,
            "20-second",
            &format!("echo 20 >> {log_arg}; echo two; exit 4"),
            0o755,
        );
        hook(
            dir,
            "10-first",
            &format!("echo 10 >> {log_arg}; echo one >&2"),
            0o755,
        );
        hook(
            dir,
            "30-third",
            &format!("echo 30 >> {log_arg}; kill -KILL $$"),
            0o700,
        );
        hook(dir, "15-disabled", &format!("echo 15 >> {log_arg}"), 0o644);
        hook(dir, ".hidden", &format!("echo hidden >> {log_arg}"), 0o755);
        hook(
            dir,
            "B-upper-before-lower",
            &format!("echo B >> {log_arg}"),
            0o755,
        );
        hook(dir, "a-lower", &format!("echo a >> {log_arg}"), 0o755);
        fs::create_dir(dir.join("40-directory")).expect("dir");
        std::os::unix::fs::symlink(dir.join("10-first"), dir.join("50-link")).expect("link");
        // order.log itself is not executable, so it is not a hook.

        let results = run_all(dir, Duration::from_secs(30)).expect("ran");
        let names: Vec<&str> = results.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "10-first",
                "20-second",
                "30-third",
                "50-link",
                "B-upper-before-lower",
                "a-lower"
            ]
        );
        assert_eq!(
            fs::read_to_string(&log).expect("log"),
            "10\n20\n30\n10\nB\na\n"
        );
        assert_eq!(
            (results[0].code, results[0].output.as_str()),
            (Some(0), "one\n")
        );
        assert_eq!(
            (results[1].code, results[1].output.as_str()),
            (Some(4), "two\n")
        );
        assert_eq!(
            (results[2].code, results[2].signal),
            (None, Some(libc::SIGKILL))
        );
        assert!(!results[2].timed_out);
    }

    #[test]
    fn a_slow_hook_times_out_and_the_next_still_runs() {
        let temp = TempDir::new("hooks-timeout");
        let dir = temp.path();
        hook(dir, "1-slow", "echo started; sleep 30", 0o755);
        hook(dir, "2-next", "echo next", 0o755);
        let results = run_all(dir, Duration::from_millis(300)).expect("ran");
        assert_eq!(results.len(), 2);
        assert!(results[0].timed_out);
        assert_eq!(results[0].output, "started\n");
        assert_eq!(
            (results[1].code, results[1].output.as_str()),
            (Some(0), "next\n")
        );
    }

    #[test]
    fn output_is_cut_to_its_tail() {
        let temp = TempDir::new("hooks-tail");
        let dir = temp.path();
        hook(
            dir,
            "noisy",
            "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done",
            0o755,
        );
        let results = run_all(dir, Duration::from_secs(30)).expect("ran");
        let output = &results[0].output;
        assert_eq!(output.len(), MAX_HOOK_OUTPUT_BYTES);
        assert!(output.ends_with("line-1999\n"), "{output}");
    }

    #[test]
    fn unstartable_hook_is_reported() {
        let temp = TempDir::new("hooks-broken");
        let dir = temp.path();
        let path = dir.join("bad-interpreter");
        fs::write(&path, "#!/nonexistent/interpreter\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        let results = run_all(dir, Duration::from_secs(30)).expect("ran");
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].code, None);
        assert!(
            results[0].output.contains("cannot start"),
            "{:?}",
            results[0]
        );
    }

    #[test]
    fn missing_directory_has_no_hooks() {
        let temp = TempDir::new("hooks-missing");
        assert!(run_all(&temp.path().join("absent"), Duration::from_secs(1))
            .expect("no error")
            .is_empty());
    }

    #[test]
    fn too_many_hooks_are_refused_before_any_runs() {
        let temp = TempDir::new("hooks-many");
        let dir = temp.path();
        let marker = dir.join("ran");
        for i in 0..=MAX_HOOKS {
            hook(
                dir,
                &format!("{i:04}"),
                &format!("touch {}", marker.display()),
                0o755,
            );
        }
        let error = run_all(dir, Duration::from_secs(1)).expect_err("too many");
        assert!(matches!(error, HooksError::TooMany(_, n) if n == MAX_HOOKS + 1));
        assert!(!marker.exists());
    }
}
