#!/usr/bin/env bash
# The long fuzz run of docs/fuzzing.md: every target (or the ones named) until it has used
# CPU_SECONDS of CPU time (default 3600), not wall-clock time, so a run on a machine that
# also does other work still gives each target its full hour. JOBS targets run at once
# (default 1), each under `nice -n 19`. New inputs go to fuzz/run-long/<target>/ (the
# committed corpus is only read); crashes to fuzz/artifacts-long/<target>/. A summary line
# per target is appended to fuzz/run-long/summary.txt. The harnesses' scratch files (the
# disk targets write every input to one) go to TMPDIR, by default /dev/shm when it is
# writable: on a disk, qcow2_image spends a third of its wall time waiting for writes.
#
#   integration/fuzz/long-run.sh                      # all nine targets, one at a time
#   JOBS=2 integration/fuzz/long-run.sh qcow2_image   # a subset, two at a time
#
# Needs the targets built first (what .ci/run does):
#   cd integration && cargo +nightly fuzz build --fuzz-dir fuzz --target-dir ~/.cache/grove/fuzz-target
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
bin="${FUZZ_BIN_DIR:-$HOME/.cache/grove/fuzz-target/x86_64-unknown-linux-gnu/release}"
cpu_seconds="${CPU_SECONDS:-3600}"
jobs="${JOBS:-1}"
ticks="$(getconf CLK_TCK)"
out="$here/run-long"
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then export TMPDIR=/dev/shm; fi
mkdir -p "$out"

if [ "$#" -eq 0 ]; then
  set -- $(cd "$here/fuzz_targets" && ls | sed 's/\.rs$//')
fi
for target in "$@"; do
  [ -x "$bin/$target" ] || { echo "long-run: $bin/$target is not built (see the header)" >&2; exit 2; }
done

# Runs one target until its CPU time reaches the budget, then interrupts it: libFuzzer prints
# its final statistics and exits with code 72 (libFuzzer's -interrupted_exitcode); any
# other exit is a finding (a crash, a timeout, running out of memory or a leak).
run_one() {
  local target="$1" start pid cpu=0 rc stat
  mkdir -p "$out/$target" "$here/artifacts-long/$target"
  # A second run of the same target would truncate the first one's log: one at a time. The
  # lock is held by this subshell and inherited by the fuzzer.
  exec {lock}>"$out/$target.lock"
  if ! flock -n "$lock"; then
    echo "long-run: $target is already running (fuzz/run-long/$target.lock)" >&2
    return 1
  fi
  start="$(date +%s)"
  nice -n 19 "$bin/$target" "$out/$target" "$here/corpus/$target" \
    -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -max_total_time=86400 \
    -artifact_prefix="$here/artifacts-long/$target/" >"$out/$target.log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 10
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || break
    # utime and stime are fields 14 and 15; the command name (field 2) has no spaces here.
    cpu=$(( ($(echo "$stat" | cut -d' ' -f14) + $(echo "$stat" | cut -d' ' -f15)) / ticks ))
    if [ "$cpu" -ge "$cpu_seconds" ]; then kill -INT "$pid" 2>/dev/null || true; fi
  done
  rc=0; wait "$pid" || rc=$?
  # An interrupted input leaves its scratch file (vsock: directory) behind, named after the pid.
  rm -rf "${TMPDIR:-/tmp}"/grove-fuzz-*-"$pid"-* || true
  local verdict="finding (exit $rc, see $out/$target.log)"
  if [ "$rc" -gt 128 ]; then
    # Killed without libFuzzer's own report (it handles the usual crash signals itself).
    verdict="finding (killed by signal $((rc - 128)) after ${cpu}s, see $out/$target.log)"
  fi
  if [ "$rc" -eq 72 ] && [ "$cpu" -ge "$cpu_seconds" ]; then verdict="no finding"; fi
  # A run that died abruptly has no final statistics: the line is still written.
  local execs edges
  execs="$(grep -ao 'stat::number_of_executed_units: [0-9]*' "$out/$target.log" | tail -n 1 | awk '{print $2}')" || true
  [ -n "$execs" ] || execs="$(grep -ao '^#[0-9]*' "$out/$target.log" | tail -n 1 | tr -d '#')" || true
  edges="$(grep -ao 'cov: [0-9]*' "$out/$target.log" | tail -n 1 | awk '{print $2}')" || true
  echo "$(date -u +%FT%TZ) $target: cpu ${cpu}s, wall $(( $(date +%s) - start ))s, executions ${execs:-?}, edges ${edges:-?}: $verdict" \
    | tee -a "$out/summary.txt"
  [ "$verdict" = "no finding" ]
}

# Exits 1 if any target had a finding (or could not run), after all of them have ended.
running=0 failed=0
for target in "$@"; do
  run_one "$target" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then wait -n || failed=1; running=$((running - 1)); fi
done
while [ "$running" -gt 0 ]; do wait -n || failed=1; running=$((running - 1)); done
exit "$failed"
