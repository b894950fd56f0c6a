#!/usr/bin/env bash
# The test command: sets up what the tests need (scripts/setup.sh), checks
# formatting and lints (stopping at the first problem), then runs every test
# pass — unit tests, the integration suite against Docker, Podman and native,
# the VM tests and the backend-neutral suites against qemu, and native on
# cgroup v2 in a VM — whatever an earlier pass did, and ends
# with a summary: per pass and backend, how many tests passed, failed and were
# ignored or filtered out, the failing tests by name, and a last line
# `N passed, N failed`. Exits non-zero if anything failed. Run it as root,
# or as a user with sudo: it then re-executes itself through sudo with your
# Rust toolchain (the tests need root: namespaces, cgroups, the engines),
# building into target/as-root with its own cargo home there, so nothing
# under your ~/.cargo or target/ becomes root's.
#
# Backend scopes: every integration test file runs against every backend;
# tests in `mod native_only`, `mod own_root_only` (native and qemu: the
# backends whose root agentkernel builds), `mod engine_only` (docker and podman),
# `mod docker_only`, `mod podman_only` and `mod qemu_only` are skipped by name (`--skip
# native_only::`) on the backends they do not apply to, so they count as
# "filtered out", never as passed. The scope names must match
# BACKEND_SCOPES in crates/agentkernel/tests/common/mod.rs, whose check makes
# a scoped test fail if it ever runs on the wrong backend.
#
# Sourcing this file (`source scripts/test.sh`) only defines the functions.
set -uo pipefail

# `--skip` arguments for the scopes that do not apply to backend $1.
scope_skips() {
  local scope applies
  for scope in native_only own_root_only engine_only docker_only podman_only qemu_only; do
    case "$scope:$1" in
      native_only:native | own_root_only:native | own_root_only:qemu | engine_only:docker | engine_only:podman | docker_only:docker | podman_only:podman | qemu_only:qemu) applies=1 ;;
      *) applies=0 ;;
    esac
    [ "$applies" = 1 ] || printf -- '--skip %s:: ' "$scope"
  done
}

# The integration test files the qemu pass runs (`--test NAME` each).
qemu_suites() {
  local suite
  for suite in qemu exit_codes io profiles cli config upstream_files ports kept cleanup egress secrets receipts; do
    printf -- '--test %s ' "$suite"
  done
}

# Results, one row per pass: label, backend, passed, failed, ignored, filtered.
summary_rows=()
failed_tests=()
total_passed=0
total_failed=0

# Adds a pass's counts from its log (cargo test's `test result:` lines, or
# the VM's `AKTEST PASS|FAIL` lines) and its exit status to the summary.
record_pass() {
  local label=$1 backend=$2 status=$3 log=$4
  local passed=0 failed=0 ignored=0 filtered=0 line n
  while IFS= read -r line; do
    n=$(sed -n 's/.* \([0-9]*\) passed.*/\1/p' <<<"$line"); passed=$((passed + ${n:-0}))
    n=$(sed -n 's/.* \([0-9]*\) failed.*/\1/p' <<<"$line"); failed=$((failed + ${n:-0}))
    n=$(sed -n 's/.* \([0-9]*\) ignored.*/\1/p' <<<"$line"); ignored=$((ignored + ${n:-0}))
    n=$(sed -n 's/.* \([0-9]*\) filtered out.*/\1/p' <<<"$line"); filtered=$((filtered + ${n:-0}))
  done < <(grep -a '^test result: ' "$log")
  passed=$((passed + $(grep -ac '^AKTEST PASS ' "$log")))
  failed=$((failed + $(grep -ac '^AKTEST FAIL ' "$log")))
  while IFS= read -r line; do
    failed_tests+=("[$label] $line")
  done < <(sed -n -e 's/^test \(.*\) \.\.\. FAILED$/\1/p' -e 's/^AKTEST FAIL \([^:]*\):.*/\1/p' "$log")
  if [ "$status" != 0 ] && [ "$failed" = 0 ]; then
    # A build error, a crash or a test binary that died: one failure, named.
    failed=1
    failed_tests+=("[$label] the pass itself exited $status without a failing test (build error or crash; see above)")
  fi
  summary_rows+=("$label|$backend|$passed|$failed|$ignored|$filtered")
  total_passed=$((total_passed + passed))
  total_failed=$((total_failed + failed))
}

# run_pass LABEL BACKEND COMMAND...: runs it to the end (output live and in a
# log), then records its results.
run_pass() {
  local label=$1 backend=$2 log status
  shift 2
  log=$(mktemp "${TMPDIR:-/tmp}/agentkernel-test-$label.XXXXXX")
  echo "=== pass $label (backend $backend): $*" >&2
  "$@" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  record_pass "$label" "$backend" "$status" "$log"
  rm -f "$log"
}

print_summary() {
  local row
  echo
  echo "=== summary"
  printf '%-12s %-8s %6s %8s %8s %8s %9s\n' pass backend ran passed failed ignored filtered
  for row in "${summary_rows[@]}"; do
    IFS='|' read -r label backend passed failed ignored filtered <<<"$row"
    printf '%-12s %-8s %6s %8s %8s %8s %9s\n' "$label" "$backend" "$((passed + failed))" \
      "$passed" "$failed" "$ignored" "$filtered"
  done
  if [ "${#failed_tests[@]}" -gt 0 ]; then
    echo "failed:"
    printf '  %s\n' "${failed_tests[@]}"
  fi
  echo "$total_passed passed, $total_failed failed"
}

# As a user with sudo: the same script as root, with this user's toolchain.
run_as_root_with_my_toolchain() {
  local here
  here=$(cd "$(dirname "$0")/.." && pwd)
  # shellcheck source=scripts/as-root.sh
  source "$here/scripts/as-root.sh"
  # Without sudo, as_root says to run as root, before any work is done.
  command -v sudo >/dev/null 2>&1 || as_root "$0" "$@"
  command -v cargo >/dev/null 2>&1 || {
    echo "test.sh: cargo is not installed: install Rust (https://rustup.rs), then run this again" >&2
    exit 1
  }
  local toolchain=()
  if command -v rustup >/dev/null 2>&1; then
    toolchain=("RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}"
      "RUSTUP_TOOLCHAIN=$(rustup show active-toolchain | cut -d' ' -f1)")
  fi
  exec sudo env "PATH=$PATH" "${toolchain[@]}" \
    "CARGO_HOME=$here/target/as-root/cargo-home" \
    "CARGO_TARGET_DIR=$here/target/as-root" \
    ${CI:+CI=$CI} bash "$0" "$@"
}

main() {
  set -e
  [ "$(id -u)" -eq 0 ] || run_as_root_with_my_toolchain "$@"
  # Globals, not locals: the EXIT trap reads them after main has returned.
  local threads
  root=$(cd "$(dirname "$0")/.." && pwd)
  pidfile=${AGENTKERNEL_DOCKERD_PIDFILE:-/run/agentkernel-ci-dockerd.pid}
  registry_pidfile=${AGENTKERNEL_REGISTRY_PIDFILE:-/run/agentkernel-ci-registry.pid}
  rm -f "$pidfile" "$registry_pidfile"
  "$root/scripts/setup.sh"
  # Stop what we started, by PID and only that: the dockerd and the test
  # registry setup.sh started, and the private `podman system service`
  # agentkernel started for the tests.
  podman_pidfile=/run/agentkernel/podman/service.pid
  podman_before=$(cat "$podman_pidfile" 2>/dev/null || true)
  stop_started() {
    for f in "$pidfile" "$registry_pidfile"; do
      if [ -s "$f" ]; then
        kill "$(cat "$f")" 2>/dev/null || true
        rm -f "$f"
      fi
    done
    podman_now=$(cat "$podman_pidfile" 2>/dev/null || true)
    if [ -n "$podman_now" ] && [ "$podman_now" != "$podman_before" ]; then
      kill "$podman_now" 2>/dev/null || true
    fi
  }
  trap stop_started EXIT
  cd "$root"
  # Tests that need Docker fail (never skip) when it is missing under CI=true.
  export CI=true
  cargo fmt --all -- --check
  cargo clippy --workspace --all-targets --quiet -- -D warnings
  set +e
  threads=${AGENTKERNEL_TEST_THREADS:-4}
  # The rootless tests drive the native backend as other users whatever the
  # backend under test: they run once, in the native pass.
  # shellcheck disable=SC2046 # scope_skips prints separate arguments
  run_pass unit+docker docker cargo test --workspace --no-fail-fast -- \
    --test-threads "$threads" --skip rootless_ $(scope_skips docker)
  # shellcheck disable=SC2046
  AGENTKERNEL_TEST_BACKEND=podman run_pass podman podman \
    cargo test -p agentkernel --tests --no-fail-fast -- \
    --test-threads "$threads" --skip rootless_ $(scope_skips podman)
  # shellcheck disable=SC2046
  AGENTKERNEL_TEST_BACKEND=native run_pass native native \
    cargo test -p agentkernel --tests --no-fail-fast -- \
    --test-threads "$threads" $(scope_skips native)
  # Most users' hosts have cgroup v2, this one (and CI) v1: the v2 paths —
  # clone3 into the cgroup, limits, OOM, fork bomb, freezer, cleanup — are
  # tested in a QEMU VM booting Debian's kernel with pure cgroup v2.
  # -B qemu: VMs under TCG boot in seconds each, so the VM's own tests
  # (tests/qemu.rs) and the backend-neutral suites run on it, two at a
  # time: exit codes, I/O, profiles, CLI, config and [[files]], ports,
  # kept sandboxes, cleanup.
  # shellcheck disable=SC2046
  AGENTKERNEL_TEST_BACKEND=qemu run_pass qemu qemu \
    cargo test -p agentkernel --no-fail-fast $(qemu_suites) -- \
    --test-threads 2 $(scope_skips qemu)
  run_pass cgroup2-vm native \
    "$root/scripts/cgroup2-vm.sh" "${CARGO_TARGET_DIR:-$root/target}/debug/agentkernel"
  print_summary
  [ "$total_failed" = 0 ]
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
