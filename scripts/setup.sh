#!/usr/bin/env bash
# Everything agentkernel's backends and its tests need on a Debian/Ubuntu
# machine, idempotently: packages, a running dockerd, the offline test
# images, and the guest kernel -B qemu boots. Run as root; as another user it re-executes itself through sudo.
# If this script starts dockerd, it writes its PID to $AGENTKERNEL_DOCKERD_PIDFILE
# (default /run/agentkernel-ci-dockerd.pid) so the caller can stop exactly it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/as-root.sh
source "$root/scripts/as-root.sh"
as_root "$0" "$@"
pidfile=${AGENTKERNEL_DOCKERD_PIDFILE:-/run/agentkernel-ci-dockerd.pid}

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v busybox >/dev/null || need+=(busybox-static)
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
# Podman's container init: tini, as `apt-get install podman` brings on Debian
# (not catatonit, Podman's default); agentkernel gives Podman whichever exists.
command -v tini-static >/dev/null || need+=(tini)
command -v hyperfine >/dev/null || need+=(hyperfine)
# glibc's static library: agentkernel's executables are linked static-pie
# (.cargo/rustc-static-executables), which falls back to a dynamic link without it.
[ -f "$(${CC:-cc} -print-file-name=libc.a 2>/dev/null)" ] || need+=(libc6-dev)
command -v git >/dev/null || need+=(git)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)   # the receipts' DSSE check (below)
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)   # build-test-images.sh checks the node tarball
command -v file >/dev/null || need+=(file)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v skopeo >/dev/null || need+=(skopeo)
command -v bwrap >/dev/null || need+=(bubblewrap)   # bench/native.sh compares with it
command -v slirp4netns >/dev/null || need+=(slirp4netns)   # rootless native networking
command -v passt >/dev/null || need+=(passt)               # a VM's network without root
# -B qemu: QEMU, a guest kernel with its modules, mkfs.erofs for image disks
# (mkfs.ext4: native's workspace disks)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v mkfs.erofs >/dev/null || need+=(erofs-utils)
command -v ssh >/dev/null || need+=(openssh-client)   # tests/ssh.rs drives --ssh with the real client
command -v script >/dev/null || need+=(bsdutils)   # `script` gives ssh a terminal in tests/ssh.rs
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Rootless native sandboxes get their network through slirp4netns, which
# opens the tap device as the user: udev makes it 0666 on every distribution;
# machines without udev (containers, minimal VMs) may leave it 0600.
if [ -c /dev/net/tun ] && [ "$(stat -c %a /dev/net/tun)" != 666 ]; then
  echo "setup: chmod 0666 /dev/net/tun (udev's default mode)" >&2
  chmod 0666 /dev/net/tun
fi

# Python tools the tests drive, in one venv (Debian's pip is externally
# managed): the official MCP client SDK (`mcp`) for tests/mcp_client.py.
# Appends to the venv, never replaces it: other tools share it.
pytools=/opt/agentkernel-pytools
if [ ! -x "$pytools/bin/pip" ]; then
  python3 -c 'import ensurepip' 2>/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  }
  python3 -m venv "$pytools"
fi
if ! "$pytools/bin/python" -c 'import mcp' 2>/dev/null; then
  echo "setup: installing the MCP Python SDK into $pytools" >&2
  "$pytools/bin/pip" install -q mcp
fi

if ! docker info >/dev/null 2>&1; then
  echo "setup: starting dockerd (log: /var/log/agentkernel-dockerd.log)" >&2
  dockerd >/var/log/agentkernel-dockerd.log 2>&1 &
  echo $! > "$pidfile"
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start; see /var/log/agentkernel-dockerd.log" >&2; exit 1; }
fi

# Built by scripts/build-test-images.sh (which lists what each is).
test_images="agentkernel-test/busybox:1 agentkernel-test/nobody:1 agentkernel-test/python:3 agentkernel-test/curl:1 agentkernel-test/node:24 agentkernel-test/hostile-sh:1"
for image in $test_images; do
  if ! docker image inspect "$image" >/dev/null 2>&1; then
    "$root/scripts/build-test-images.sh" docker
    break
  fi
done
# The same images for Podman, which keeps its own store.
for image in $test_images; do
  if ! podman image exists "$image" 2>/dev/null; then
    docker save "$image" | podman load -q >/dev/null
  fi
done

# The native backend pulls from registries: serve the test images from a
# loopback registry (started once; its PID in $AGENTKERNEL_REGISTRY_PIDFILE,
# default /run/agentkernel-ci-registry.pid) and push the current builds to it.
registry_pidfile=${AGENTKERNEL_REGISTRY_PIDFILE:-/run/agentkernel-ci-registry.pid}
registry=127.0.0.1:5055
if ! curl -fsS "http://$registry/v2/" >/dev/null 2>&1; then
  echo "setup: starting docker-registry on $registry (log: /var/log/agentkernel-registry.log)" >&2
  mkdir -p /var/lib/agentkernel-test-registry
  cat > /var/lib/agentkernel-test-registry/config.yml <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: /var/lib/agentkernel-test-registry/storage
http:
  addr: $registry
YML
  docker-registry serve /var/lib/agentkernel-test-registry/config.yml >/var/log/agentkernel-registry.log 2>&1 &
  echo $! > "$registry_pidfile"
  for _ in $(seq 1 50); do
    curl -fsS "http://$registry/v2/" >/dev/null 2>&1 && break
    sleep 0.2
  done
  curl -fsS "http://$registry/v2/" >/dev/null || { echo "setup: docker-registry did not start; see /var/log/agentkernel-registry.log" >&2; exit 1; }
fi
for image in $test_images; do
  # Push only when the registry's copy is not this build (same config digest).
  want=$(docker image inspect -f '{{.Id}}' "$image")
  have=$(skopeo inspect --tls-verify=false --raw "docker://$registry/$image" 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["config"]["digest"])' 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    skopeo copy --quiet --dest-tls-verify=false "docker-daemon:$image" "docker://$registry/$image"
  fi
done

# The receipts' DSSE envelopes are checked by standard tooling (PyPI's
# securesystemslib and in-toto) in its own venv: Debian's pip is externally
# managed.
pytools=/opt/agentkernel-pytools
if ! "$pytools/bin/python" -c 'import securesystemslib.dsse, in_toto' 2>/dev/null; then
  echo "setup: installing securesystemslib and in-toto into $pytools" >&2
  python3 -m venv "$pytools"
  "$pytools/bin/pip" install --quiet securesystemslib in-toto
fi

# -B qemu boots agentkernel's own guest kernel once it is built
# (scripts/guest-kernel.sh: about six minutes on two quiet cores the first
# time, a check afterwards; docs/qemu.md says why). AGENTKERNEL_SETUP_GUEST_KERNEL=0
# skips it: the quick start builds it after its main job instead.
if [ "${AGENTKERNEL_SETUP_GUEST_KERNEL:-1}" != 0 ]; then
  "$root/scripts/guest-kernel.sh" >/dev/null
fi
