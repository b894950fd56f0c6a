#!/usr/bin/env bash
# Builds agentkernel and runs the main job once, in a real image, on a fresh
# Debian/Ubuntu machine. Run it as root, or as a user with sudo (it builds as
# you, with your Rust toolchain, then re-executes itself through sudo):
#   1. installs what the backends need and starts dockerd if needed
#      (scripts/setup.sh; a dockerd it starts is left running, for -B docker,
#      and its PID printed);
#   2. builds target/release/agentkernel;
#   3. gets python:3.12-alpine into agentkernel's image store: pulled from
#      Docker Hub (or a configured mirror) when it can be; offline, the small
#      python image scripts/build-test-images.sh makes from this machine's own
#      python3 is served from the loopback registry setup.sh runs and pulled
#      from there instead — it says which happened;
#   4. runs `agentkernel run python3 -c "print('hello')"` in that image on the
#      default (native) backend;
#   5. stops the loopback registry if it started it (by PID), and says what
#      it left running;
#   6. builds the guest kernel -B qemu boots (scripts/guest-kernel.sh, about
#      six minutes on two cores, once), after the main job so as not to delay it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "quickstart: $*" >&2; }

build() {
  if command -v cargo >/dev/null 2>&1; then
    # From the tree's root, so Cargo reads .cargo/config.toml (the static link).
    (cd "$root" && cargo build --release --quiet)
  elif [ ! -x "$root/target/release/agentkernel" ]; then
    say "cargo is not installed: install Rust (https://rustup.rs), then run this again"
    exit 1
  fi
}

if [ "$(id -u)" -ne 0 ]; then
  # shellcheck source=scripts/as-root.sh
  source "$root/scripts/as-root.sh"
  # Without sudo, as_root says to run as root, before any work is done.
  command -v sudo >/dev/null 2>&1 || as_root "$0" "$@"
  # Build as you (your toolchain, your target/), the rest as root.
  build
  as_root "$0" "$@"
fi

# What setup.sh starts, it records here, so we stop exactly that.
run_dir=$(mktemp -d)
export AGENTKERNEL_DOCKERD_PIDFILE="$run_dir/dockerd.pid"
export AGENTKERNEL_REGISTRY_PIDFILE="$run_dir/registry.pid"
stop_registry() {
  if [ -s "$AGENTKERNEL_REGISTRY_PIDFILE" ]; then
    local pid
    pid=$(cat "$AGENTKERNEL_REGISTRY_PIDFILE")
    kill "$pid" 2>/dev/null || true
    rm -f "$AGENTKERNEL_REGISTRY_PIDFILE"
    say "stopped the loopback docker-registry it started on 127.0.0.1:5055 (PID $pid)"
  fi
}
trap 'stop_registry; rm -rf "$run_dir"' EXIT

AGENTKERNEL_SETUP_GUEST_KERNEL=0 "$root/scripts/setup.sh"
build
ak="$root/target/release/agentkernel"

image=python:3.12-alpine
if pull_error=$("$ak" image pull "$image" 2>&1 >/dev/null); then
  say "pulled $image into agentkernel's image store"
else
  say "cannot pull $image: ${pull_error##*agentkernel: }"
  # setup.sh serves the offline test images on this loopback registry.
  image=127.0.0.1:5055/agentkernel-test/python:3
  "$ak" image pull "$image" >/dev/null 2>&1 || {
    say "cannot pull the offline image $image either; see \`$ak doctor\`"
    exit 1
  }
  say "offline: using $image instead — this machine's own python3 on busybox"
  say "(built by scripts/build-test-images.sh, pulled into agentkernel's store from the loopback registry)"
fi
stop_registry

echo "+ agentkernel run --image $image python3 -c \"print('hello')\"" >&2
status=0
"$ak" run --image "$image" python3 -c "print('hello')" || status=$?

if [ -s "$AGENTKERNEL_DOCKERD_PIDFILE" ]; then
  say "left dockerd running for -B docker (PID $(cat "$AGENTKERNEL_DOCKERD_PIDFILE"); stop it with \`kill $(cat "$AGENTKERNEL_DOCKERD_PIDFILE")\`)"
fi
say "building agentkernel's guest kernel for -B qemu (scripts/guest-kernel.sh; minutes, once)"
if guest_kernel=$("$root/scripts/guest-kernel.sh"); then
  say "-B qemu boots $guest_kernel"
else
  say "the guest kernel did not build (see above); -B qemu boots the distribution's kernel, about 3x slower under emulation"
fi
say "next: \`$ak doctor\` shows every backend, each with a real sandbox"
exit "$status"
