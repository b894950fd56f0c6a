#!/usr/bin/env bash
# Exercises the native backend's cgroup v2 code paths for real: boots the
# host's Debian kernel under QEMU (TCG; no KVM needed) with a pure cgroup v2
# hierarchy at /sys/fs/cgroup and runs agentkernel there. Hosts with v1 or
# hybrid cgroups (like CI) never reach those paths otherwise.
#
# Usage (as root): scripts/cgroup2-vm.sh [AGENTKERNEL_BINARY]
#   Without a binary, `cargo build --release` and target/release/agentkernel.
#   CGROUP2_VM_TIMEOUT  seconds before the VM is killed (default 600)
#   CGROUP2_VM_CONSOLE  also save the VM's serial console to this file
# Prints one `AKTEST PASS|FAIL <check>` line per check; exits non-zero if a
# check failed or did not report (crash, timeout).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
timeout_s=${CGROUP2_VM_TIMEOUT:-600}
registry=http://127.0.0.1:5055
image=agentkernel-test/busybox:1
# Every check the VM runs, in order: one missing from the console is a failure.
checks="vm-setup proc-self-cgroup cgroup-limits memory-oom disk-cap pids-forkbomb cpu-throttle
        kept-exec kept-stop kept-start kept-remove kill9-gc nothing-left"

die() { echo "cgroup2-vm: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "run as root (installs packages, builds device nodes)"

tmp=$(mktemp -d /tmp/cgroup2-vm.XXXXXX)
qemu_pid=
cleanup() {
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------- host packages
updated=
apt_install() {
  export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
  echo "cgroup2-vm: installing $*" >&2
  if ! apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; then
    # Unknown package: the lists may be stale (or absent); update once.
    [ -z "$updated" ] || die "apt-get install $* failed"
    apt-get update -qq && updated=1
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null || die "apt-get install $* failed"
  fi
}
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v cpio >/dev/null || need+=(cpio)
# The initramfs has no libc of its own for busybox: it must be the static one.
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || need+=(busybox-static)
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"

# The newest kernel that has its modules installed.
kver=
for k in $(ls /boot/vmlinuz-* 2>/dev/null | sed 's|^/boot/vmlinuz-||' | sort -V); do
  [ -d "/lib/modules/$k" ] && kver=$k
done
if [ -z "$kver" ]; then
  apt_install linux-image-amd64
  for k in $(ls /boot/vmlinuz-* | sed 's|^/boot/vmlinuz-||' | sort -V); do
    [ -d "/lib/modules/$k" ] && kver=$k
  done
fi
[ -n "$kver" ] || die "no /boot/vmlinuz-* with modules in /lib/modules"
kernel=/boot/vmlinuz-$kver
moddir=/lib/modules/$kver

# ------------------------------------------------------------- agentkernel
if [ $# -ge 1 ]; then
  bin_src=$1
  [ -x "$bin_src" ] || die "$bin_src is not an executable"
else
  (cd "$root" && cargo build --release --quiet) || die "cargo build --release failed"
  bin_src=${CARGO_TARGET_DIR:-$root/target}/release/agentkernel
fi
# Our own copy: a rebuild elsewhere must not change the binary mid-run.
cp "$bin_src" "$tmp/agentkernel"
bin=$tmp/agentkernel

# The image store the VM uses, filled through the real pull path on the host
# (the VM has no network). scripts/setup.sh starts the test registry and
# pushes the test images when they are missing.
pull() {
  HOME=$tmp AGENTKERNEL_HOME=$tmp/akhome AGENTKERNEL_REGISTRY_MIRRORS=$registry \
    "$bin" image pull "$image" >/dev/null
}
if ! pull 2>/dev/null; then
  echo "cgroup2-vm: cannot pull $image from $registry; running scripts/setup.sh" >&2
  "$root/scripts/setup.sh" >&2
  pull || die "cannot pull $image from the test registry $registry"
fi

# ------------------------------------------------------------- initramfs
r=$tmp/root
mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,etc,dev,proc,sys,tmp,run,root,var/lib,var/tmp,lib/modules}
cp /bin/busybox "$r/bin/busybox"
for applet in $(/bin/busybox --list-full); do
  [ -e "$r/$applet" ] || ln -s /bin/busybox "$r/$applet"
done
cp "$bin" "$r/usr/local/bin/agentkernel"
# Its shared libraries and the loader, at the paths ldd names (dereferenced).
for lib in $(ldd "$bin" 2>/dev/null | grep -o '/[^ ]*'); do
  cp -L --parents "$lib" "$r/"
done
cp -a "$tmp/akhome" "$r/var/lib/agentkernel"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$r/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$r/etc/group"
# The kernel opens /dev/console for /init's stdio before anything is mounted.
mknod -m 600 "$r/dev/console" c 5 1
mknod -m 666 "$r/dev/null" c 1 3

# Kernel modules the sandboxes need that Debian's kernel may build as
# modules: overlay (the sandbox's root), loop and ext4 (the disk-capped
# copy-on-write workspace). Each with its dependencies, decompressed here
# (busybox insmod reads plain .ko), listed in load order (modules.dep names
# dependencies last-loaded-first; a module already listed is skipped).
: >"$r/lib/modules/load-order"
add_module() { # NAME CONFIG_SYMBOL
  grep -q "^CONFIG_$2=y" "/boot/config-$kver" 2>/dev/null && return 0
  line=$(grep -E "(^|/)$1\.ko(\.[a-z]+)?:" "$moddir/modules.dep") ||
    die "no $1 module in $moddir/modules.dep"
  mods=$(echo "${line#*:}" | tr ' ' '\n' | sed '/^$/d' | tac; echo "${line%%:*}")
  for m in $mods; do
    name=$(basename "$m"); name=${name%%.ko*}.ko
    grep -qx "$name" "$r/lib/modules/load-order" && continue
    case "$m" in
      *.ko) cp "$moddir/$m" "$r/lib/modules/$name" ;;
      *.ko.xz) command -v xz >/dev/null || apt_install xz-utils; xz -dc "$moddir/$m" >"$r/lib/modules/$name" ;;
      *.ko.zst) command -v zstd >/dev/null || apt_install zstd; zstd -qdc "$moddir/$m" >"$r/lib/modules/$name" ;;
      *.ko.gz) gzip -dc "$moddir/$m" >"$r/lib/modules/$name" ;;
      *) die "unknown module format: $m" ;;
    esac
    echo "$name" >>"$r/lib/modules/load-order"
  done
}
add_module overlay OVERLAY_FS
add_module loop BLK_DEV_LOOP
# ext4 loads its checksum driver at every mount, crc32c, only a soft
# dependency (modules.softdep), which insmod does not follow.
add_module crc32c_generic CRYPTO_CRC32C
add_module ext4 EXT4_FS
# mkfs.ext4 formats the disk cap's template (e2fsprogs), with its libraries.
mkfs=$(command -v mkfs.ext4) || die "no mkfs.ext4 (e2fsprogs) on this host"
cp -L "$mkfs" "$r/sbin/mkfs.ext4"
for lib in $(ldd "$mkfs" 2>/dev/null | grep -o '/[^ ]*'); do
  cp -L --parents "$lib" "$r/"
done

# Stage 1. pivot_root(2), which every sandbox does, refuses to move the
# initramfs's rootfs: copy everything into a tmpfs and switch_root there.
cat >"$r/init" <<'EOF'
#!/bin/sh
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir /newroot
mount -t tmpfs -o mode=755 tmpfs /newroot
for f in /*; do
  case "$f" in
    /newroot|/proc|/sys|/dev) mkdir -p "/newroot$f" ;;
    *) cp -a "$f" /newroot/ ;;
  esac
done
umount /dev /sys /proc
exec switch_root /newroot /stage2
echo "AKTEST FAIL vm-setup: switch_root failed"
EOF

# Stage 2 (PID 1 on the tmpfs root): a pure cgroup v2 hierarchy mounted as
# systemd mounts it, overlay,
# /tmp; the checks run as a child so this shell only waits (and reaps the
# orphans a kept sandbox's holder leaves), then the VM powers off.
cat >"$r/stage2" <<'EOF'
#!/bin/sh
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# With systemd's options: nsdelegate changes who may move processes
# between groups from inside a cgroup namespace (exec does).
mount -t cgroup2 -o nsdelegate,memory_recursiveprot none /sys/fs/cgroup
mount -t tmpfs -o mode=1777 tmpfs /tmp
while read -r m; do
  insmod "/lib/modules/$m" || echo "stage2: insmod $m failed"
done </lib/modules/load-order
# Kernel messages (the OOM killer's) must not split our result lines.
echo 1 >/proc/sys/kernel/printk
sh /checks.sh
poweroff -f
EOF

# The checks. Each prints exactly one AKTEST line; the expectations are the
# integration tests' (tests/common/mod.rs, profiles.rs, native.rs,
# exit_codes.rs), with longer timeouts: TCG is some 10-50x slower.
cat >"$r/checks.sh" <<'EOF'
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
export AGENTKERNEL_HOME=/var/lib/agentkernel HOME=/root
IMG=agentkernel-test/busybox:1
CG=/sys/fs/cgroup/agentkernel
O=/tmp/ak-out
mkdir -p $O /tmp/proj
cd /tmp/proj
# No per-user process limit: a fork that fails with EAGAIN in the sandbox
# can then only have met the pids controller.
ulimit -u unlimited
# The profile's CPU limit means "at most 2": on this 1-vCPU VM, 1 (run.rs).
ncpu=$(nproc); [ $ncpu -le 2 ] || ncpu=2
CPU_MAX="${ncpu}00000 100000"

pass() { echo "AKTEST PASS $1"; }
fail() { printf 'AKTEST FAIL %s: %s\n' "$1" "$(printf %s "$2" | tr '\n' '|' | cut -c1-600)"; }
# agentkernel with a hard limit, stdin closed (no terminal); sets rc, out, err.
ak() {
  timeout 240 agentkernel "$@" </dev/null >$O/out 2>$O/err
  rc=$?; out=$(cat $O/out); err=$(cat $O/err)
}
run() { ak run -B native --no-network -i $IMG "$@"; }
show() { echo "rc=$rc out=[$out] err=[$err]"; }
# Alive and not a zombie.
alive() { [ -n "$1" ] && [ -e /proc/$1 ] && ! grep -q ') Z ' /proc/$1/stat 2>/dev/null; }
dead() { ! alive "$1"; }
# Whether path $1 no longer exists.
gone() { [ ! -e "$1" ]; }
# Whether word $1 is in the list $2.
has() { echo " $2 " | grep -q " $1 "; }
cmdline() { tr '\0' ' ' </proc/$1/cmdline 2>/dev/null; }
# The run-* group holding a process with this command line: sets dir, sleeper.
find_in_run() {
  for d in $CG/run-*; do
    for p in $(cat $d/cgroup.procs 2>/dev/null); do
      [ "$(cmdline $p)" = "$1" ] && { dir=$d; sleeper=$p; return 0; }
    done
  done
  return 1
}
# Polls (every 0.2 s, up to $1 s) until the rest of the line succeeds.
until_true() {
  n=$(( $1 * 5 )); shift
  while [ $n -gt 0 ]; do "$@" && return 0; sleep 0.2; n=$((n - 1)); done
  return 1
}

# --- the VM is what this script is about: pure v2, and native sees it so
controllers=$(cat /sys/fs/cgroup/cgroup.controllers 2>&1)
ak doctor
native=$(echo "$out" | grep '^native')
if ! grep -q '^[^ ]* /sys/fs/cgroup cgroup2 .*nsdelegate' /proc/mounts; then
  fail vm-setup "/sys/fs/cgroup is not cgroup2 (nsdelegate): $(grep cgroup /proc/mounts)"
elif grep -q ' cgroup ' /proc/mounts; then
  fail vm-setup "a cgroup v1 hierarchy is mounted: $(grep ' cgroup ' /proc/mounts)"
elif ! has memory "$controllers" || ! has cpu "$controllers" || ! has pids "$controllers"; then
  fail vm-setup "root controllers: $controllers"
elif ! grep -q overlay /proc/filesystems; then
  fail vm-setup "no overlayfs (insmod failed?)"
# (This VM has no bridge/veth modules: doctor's networked run fails and its
# --no-network one runs, "no network"; every check below uses --no-network.)
elif ! echo "$native" | grep -Eq '(ready|no network).*cgroup v2'; then
  fail vm-setup "doctor: $native $err"
else
  pass vm-setup
fi

# --- a: the cgroup namespace is rooted at the sandbox's group
run cat /proc/self/cgroup
if [ $rc = 0 ] && [ "$out" = "0::/" ]; then pass proc-self-cgroup
else fail proc-self-cgroup "$(show)"; fi

# --- b: the moderate profile's limits, seen from the VM while the run
# lives, and read-only from inside
inside='cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max /sys/fs/cgroup/cpu.max
grep " /sys/fs/cgroup " /proc/mounts | cut -d" " -f3,4 | cut -d, -f1
if echo 1 2>/dev/null >/sys/fs/cgroup/pids.max; then echo WRITABLE; else echo refused; fi
cat /sys/fs/cgroup/pids.max
sleep 3'
timeout 240 agentkernel run -B native --no-network -i $IMG sh -c "$inside" </dev/null >$O/b.out 2>$O/b.err &
supervisor=$!   # timeout and then agentkernel exec in place: this is the supervisor
dir= sleeper= init=
problems=
if until_true 120 find_in_run "sleep 3 "; then
  procs=$(tr '\n' ' ' <$dir/cgroup.procs)
  for p in $procs; do
    case "$(cmdline $p)" in agentkernel*) init=$p ;; esac
  done
  mem=$(cat $dir/memory.max) pids=$(cat $dir/pids.max) cpu=$(cat $dir/cpu.max)
  swap=$(cat $dir/memory.swap.max 2>/dev/null || echo absent)
  [ "$mem" = 2147483648 ] || problems="$problems memory.max=$mem"
  [ "$pids" = 4096 ] || problems="$problems pids.max=$pids"
  [ "$cpu" = "$CPU_MAX" ] || problems="$problems cpu.max=$cpu"
  case "$swap" in 0|absent) ;; *) problems="$problems memory.swap.max=$swap" ;; esac
  [ -n "$init" ] || problems="$problems no-init-in-group(procs:$procs)"
  has $supervisor "$procs" && problems="$problems supervisor-$supervisor-in-group"
else
  problems="no $CG/run-*/cgroup.procs with the sandbox's sleep in 120s: $(ls $CG 2>&1)"
fi
wait $supervisor
rc=$?; out=$(cat $O/b.out); err=$(cat $O/b.err)
expected="2147483648
4096
$CPU_MAX
cgroup2 ro
refused
4096"
[ $rc = 0 ] && [ "$out" = "$expected" ] || problems="$problems inside: $(show)"
# The cleanup process removes the group after the caller has its exit code.
[ -n "$dir" ] && ! until_true 30 gone "$dir" && problems="$problems $dir left after the run"
if [ -z "$problems" ]; then pass cgroup-limits; else fail cgroup-limits "$problems"; fi

# --- c: the memory limit bites, and agentkernel names the OOM kill
run --memory 32m --timeout 120s sh -c 'x=a; while :; do x=$x$x; done'
if [ $rc = 137 ] && echo "$err" | grep -qi 'out of memory'; then pass memory-oom
else fail memory-oom "$(show)"; fi

# --- the copy-on-write workspace's disk cap: a loop-mounted ext4 layer
run --disk 16m sh -c 'err=$(dd if=/dev/zero of=/workspace/big bs=1M count=32 2>&1 >/dev/null); case "$err" in *"No space"*) echo ENOSPC;; *) echo "WROTE $err";; esac'
# The loop device is released by the run's cleanup process, after the
# caller has its exit code: wait for that (boundedly).
# (The disk pool's devices, attached ahead for the next runs and never
# mounted, stay by design: at most two, under <state>/disk-pool/.)
no_loop() {
  ! cat /sys/block/loop*/loop/backing_file 2>/dev/null | grep "$AGENTKERNEL_HOME" | grep -qv "/disk-pool/"
}
pool_bounded() { [ "$(cat /sys/block/loop*/loop/backing_file 2>/dev/null | grep -c "/disk-pool/")" -le 2 ]; }
if [ $rc = 0 ] && [ "$out" = ENOSPC ] && [ -z "$(ls -A /tmp/proj)" ] && until_true 20 no_loop && pool_bounded; then pass disk-cap
else fail disk-cap "$(show) proj=[$(ls -A /tmp/proj)] loops=[$(cat /sys/block/loop*/loop/backing_file 2>/dev/null)]"; fi

# --- d: the pids limit contains a fork bomb (restrictive: pids.max 512)
fork_bomb='for i in $(seq 1 2000); do sleep 30 & done; echo spawned'
start=$(date +%s)
run -p restrictive --timeout 120s sh -c "$fork_bomb"
took=$(( $(date +%s) - start ))
bomb="$(show) took=${took}s"
problems=
echo "$err" | grep -q -e "can't fork" -e 'Resource temporarily unavailable' ||
  problems="fork never failed:"
[ $rc != 124 ] || problems="$problems ran into the timeout:"
for p in /proc/[0-9]*; do
  [ "$(cmdline ${p#/proc/})" = "sleep 30 " ] && { problems="$problems sleep left in the VM:"; break; }
done
run echo alive
[ $rc = 0 ] && [ "$out" = alive ] || problems="$problems not responsive after it: $(show);"
# ...and the limit that bit is the profile's.
run -p restrictive cat /sys/fs/cgroup/pids.max
[ $rc = 0 ] && [ "$out" = 512 ] || problems="$problems restrictive pids.max: $(show);"
if [ -z "$problems" ]; then pass pids-forkbomb; else fail pids-forkbomb "$problems $bomb"; fi

# --- e: the CPU limit: quota, and a busy loop gets throttled
run --cpus 0.5 sh -c 'cat /sys/fs/cgroup/cpu.max
end=$(( $(date +%s) + 2 )); while [ $(date +%s) -lt $end ]; do :; done
grep nr_throttled /sys/fs/cgroup/cpu.stat'
quota=$(echo "$out" | sed -n 1p)
throttled=$(echo "$out" | sed -n 's/^nr_throttled \([0-9]*\)$/\1/p')
if [ $rc = 0 ] && [ "$quota" = "50000 100000" ] && [ "${throttled:-0}" -gt 0 ]; then pass cpu-throttle
else fail cpu-throttle "$(show)"; fi

# --- f: a kept sandbox: its group is created before init (kept.rs), exec
# moves into it (join.rs), stop/start freeze and thaw it, remove removes it
K=$CG/k1
held=$AGENTKERNEL_HOME/sandboxes/k1/native.json
run --name k1 true
problems=
[ $rc = 0 ] || problems="run --name k1: $(show);"
holder=$(sed -n 's/.*"holder":"[^:]*:\([0-9]*\):.*/\1/p' $held 2>/dev/null)
kinit=$(sed -n 's/.*"init_pid":\([0-9]*\).*/\1/p' $held 2>/dev/null)
ak exec k1 cat /proc/self/cgroup
[ $rc = 0 ] && [ "$out" = "0::/" ] || problems="$problems exec: $(show);"
if [ -d $K ]; then
  [ "$(cat $K/memory.max) $(cat $K/pids.max) $(cat $K/cpu.max)" = "2147483648 4096 $CPU_MAX" ] ||
    problems="$problems limits: $(cat $K/memory.max) $(cat $K/pids.max) $(cat $K/cpu.max);"
  has "$kinit" "$(tr '\n' ' ' <$K/cgroup.procs)" ||
    problems="$problems init ${kinit:-?} not in $K/cgroup.procs: $(tr '\n' ' ' <$K/cgroup.procs);"
else
  problems="$problems no $K: $(ls $CG 2>&1);"
fi
if [ -z "$problems" ]; then pass kept-exec; else fail kept-exec "$problems"; fi

frozen() { grep -qx "frozen $1" $K/cgroup.events 2>/dev/null; }
only_init() { [ "$(tr '\n' ' ' <$K/cgroup.procs)" = "$kinit " ]; }
# stop really stops: every process but the sandbox's init ends, files stay.
ak exec --detach k1 sleep 300
ak sandbox stop k1
problems=
[ $rc = 0 ] || problems="stop: $(show);"
until_true 30 only_init || problems="$problems left in $K/cgroup.procs: $(tr '\n' ' ' <$K/cgroup.procs 2>&1);"
ak sandbox list
echo "$out" | grep '^k1 ' | grep -q stopped || problems="$problems list: $(show);"
ak exec k1 true
[ $rc = 125 ] && echo "$err" | grep -q stopped || problems="$problems exec while stopped: $(show);"
if [ -z "$problems" ]; then pass kept-stop; else fail kept-stop "$problems"; fi

# start lets commands in again; pause/resume freeze and thaw through cgroup v2's freezer.
ak sandbox start k1
problems=
[ $rc = 0 ] || problems="start: $(show);"
ak exec k1 echo started
[ $rc = 0 ] && [ "$out" = started ] || problems="$problems exec after start: $(show);"
ak sandbox pause k1
[ $rc = 0 ] || problems="$problems pause: $(show);"
until_true 30 frozen 1 || problems="$problems paused, cgroup.events: $(tr '\n' ' ' <$K/cgroup.events 2>&1);"
ak sandbox resume k1
[ $rc = 0 ] || problems="$problems resume: $(show);"
until_true 30 frozen 0 || problems="$problems resumed, cgroup.events: $(tr '\n' ' ' <$K/cgroup.events 2>&1);"
ak exec k1 echo thawed
[ $rc = 0 ] && [ "$out" = thawed ] || problems="$problems exec: $(show);"
if [ -z "$problems" ]; then pass kept-start; else fail kept-start "$problems"; fi

ak sandbox remove k1
problems=
[ $rc = 0 ] || problems="remove: $(show);"
[ -d $K ] && problems="$problems $K left: $(tr '\n' ' ' <$K/cgroup.procs);"
[ -e $AGENTKERNEL_HOME/sandboxes/k1 ] && problems="$problems $AGENTKERNEL_HOME/sandboxes/k1 left;"
[ -n "$holder" ] && [ -n "$kinit" ] || problems="$problems no holder/init pid in $held;"
alive "$holder" && problems="$problems holder $holder alive: $(cmdline $holder);"
alive "$kinit" && problems="$problems init $kinit alive;"
if [ -z "$problems" ]; then pass kept-remove; else fail kept-remove "$problems"; fi

# --- after kill -9 of agentkernel, its sandbox dies with it and `sandbox
# gc` removes the group and scratch it left (gc.rs: Cgroup::of on v2)
timeout 240 agentkernel run -B native --no-network -i $IMG sleep 60 </dev/null >$O/k.out 2>$O/k.err &
supervisor=$!
dir= sleeper=
problems=
if until_true 120 find_in_run "sleep 60 "; then
  kill -9 $supervisor
  wait $supervisor
  until_true 30 dead $sleeper || problems="the sandbox's sleep outlived its agentkernel;"
  ak sandbox gc
  [ $rc = 0 ] || problems="$problems gc: $(show);"
  [ -d $dir ] && problems="$problems $dir left: $(tr '\n' ' ' <$dir/cgroup.procs);"
  [ -e $AGENTKERNEL_HOME/runs/${dir##*/} ] && problems="$problems scratch ${dir##*/} left;"
else
  problems="no $CG/run-* with the sandbox's sleep in 120s: $(ls $CG 2>&1)"
  kill -9 $supervisor; wait $supervisor
fi
if [ -z "$problems" ]; then pass kill9-gc; else fail kill9-gc "$problems"; fi

# --- g: nothing left behind: groups, scratch, kept sandboxes, processes
# (once `pool prune` has stopped the disk keeper, which by design outlives
# runs until it is idle for a minute)
problems=
ak pool prune
[ $rc = 0 ] || problems="pool prune: $(show);"
[ -d $CG ] || problems="no $CG at all;"
left=$(find $CG -mindepth 1 -type d 2>/dev/null | tr '\n' ' ')
[ -z "$left" ] || problems="$problems groups: $left;"
left=$(ls -A $AGENTKERNEL_HOME/runs 2>/dev/null | tr '\n' ' ')
[ -z "$left" ] || problems="$problems runs: $left;"
left=$(ls -A $AGENTKERNEL_HOME/sandboxes 2>/dev/null | tr '\n' ' ')
[ -z "$left" ] || problems="$problems sandboxes: $left;"
for p in /proc/[0-9]*; do
  [ "$(readlink $p/exe 2>/dev/null)" = /usr/local/bin/agentkernel ] &&
    problems="$problems process ${p#/proc/}: $(cmdline ${p#/proc/});"
done
if [ -z "$problems" ]; then pass nothing-left; else fail nothing-left "$problems"; fi

echo "AKTEST DONE"
EOF
chmod +x "$r/init" "$r/stage2"

(cd "$r" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$tmp/initrd.gz"

# ------------------------------------------------------------- the VM
# TCG only (nested KVM hangs on some hosts), one vCPU, niced: other work on
# this machine comes first. cgroup_no_v1=all: nothing can mount v1.
echo "cgroup2-vm: booting $kernel under QEMU/TCG (about a minute)" >&2
started=$SECONDS
nice -n 10 qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m 1536 -nographic -no-reboot \
  -kernel "$kernel" -initrd "$tmp/initrd.gz" \
  -append "console=ttyS0 panic=-1 quiet cgroup_no_v1=all" \
  </dev/null >"$tmp/console.log" 2>&1 &
qemu_pid=$!
while kill -0 "$qemu_pid" 2>/dev/null && [ $((SECONDS - started)) -lt "$timeout_s" ]; do
  sleep 1
done
timed_out=
if kill -0 "$qemu_pid" 2>/dev/null; then
  timed_out=1
  kill "$qemu_pid" 2>/dev/null || true
fi
wait "$qemu_pid" 2>/dev/null || true
qemu_pid=
[ -z "${CGROUP2_VM_CONSOLE:-}" ] || cp "$tmp/console.log" "$CGROUP2_VM_CONSOLE"

# ------------------------------------------------------------- the verdict
tr -d '\r' <"$tmp/console.log" >"$tmp/console.txt"
# (The first line follows the firmware's escape sequences.)
results=$(sed -n 's/^.*\(AKTEST \(PASS\|FAIL\|DONE\)\)/\1/p' "$tmp/console.txt")
failed=0
echo "$results" | grep -v -e '^AKTEST DONE$' -e '^$' || true
for c in $checks; do
  echo "$results" | grep -q -e "^AKTEST PASS $c\$" -e "^AKTEST FAIL $c:" ||
    { echo "AKTEST FAIL $c: no result from the VM"; failed=1; }
done
echo "$results" | grep -q '^AKTEST FAIL' && failed=1
if ! echo "$results" | grep -q '^AKTEST DONE$'; then
  failed=1
  if [ -n "$timed_out" ]; then
    echo "cgroup2-vm: the VM did not finish within ${timeout_s}s; last 40 lines of its console:"
  else
    echo "cgroup2-vm: the VM stopped before the checks finished; last 40 lines of its console:"
  fi
  tail -n 40 "$tmp/console.txt"
fi
echo "cgroup2-vm: $([ $failed = 0 ] && echo passed || echo FAILED); the VM ran $((SECONDS - started))s" >&2
exit $failed
