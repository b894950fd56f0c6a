#!/usr/bin/env bash
# Builds a small guest kernel for the qemu backend from Debian's
# linux-source-6.1 package: everything the guest agent needs built in (no
# modules to load at boot), and what only costs time under emulation left
# out. Debian's generic kernel spends ~1.8 s under TCG before /init and
# ~0.5-0.9 s more in the agent loading its modules; see docs/qemu.md for the
# figures and for how to make agentkernel use the result:
#
#   [qemu]
#   kernel = "/usr/local/lib/agentkernel/guest-kernel/vmlinux"
#
# Usage: scripts/guest-kernel.sh [OUT_DIR]   (default /usr/local/lib/agentkernel/guest-kernel)
# Env:   BUILD_DIR (default /var/tmp/guest-kernel-build), JOBS (default 2).
# The build runs under `nice -n 19`: it takes minutes and the machine may be shared.
set -euo pipefail
# The kernel is booted by root's runs: nobody else may write what this makes.
umask 022

out=${1:-/usr/local/lib/agentkernel/guest-kernel}
build=${BUILD_DIR:-/var/tmp/guest-kernel-build}
jobs=${JOBS:-2}
tarball=/usr/src/linux-source-6.1.tar.xz

mkdir -p "$build"
# The guest's needs, from crates/agentkernel-guest/src/agent.rs and the
# commands a sandbox runs: `=y` lines must come out set (checked below),
# `=n` lines are what tinyconfig might leave on and costs boot time.
fragment="$build/agentkernel.config"
cat > "$fragment" <<'EOF'
# The machine: 64-bit, SMP (--cpus), a paravirt guest booted by QEMU's
# PVH entry (an ELF vmlinux is loaded as is, no decompressor under TCG).
CONFIG_64BIT=y
CONFIG_SMP=y
CONFIG_NR_CPUS=64
CONFIG_HYPERVISOR_GUEST=y
CONFIG_PARAVIRT=y
CONFIG_KVM_GUEST=y
CONFIG_PVH=y
CONFIG_X86_MPPARSE=y
CONFIG_HPET_TIMER=y
CONFIG_HIGH_RES_TIMERS=y
CONFIG_NO_HZ_IDLE=y
CONFIG_CC_OPTIMIZE_FOR_PERFORMANCE=y
CONFIG_SLUB=y
CONFIG_KERNEL_LZ4=y
# ACPI: not used (agentkernel boots the guest with `acpi=off` and the agent
# ends the VM with a reboot, which QEMU's -no-reboot makes its exit); kept
# built in as the config this script was measured with. The firmware's MP
# table (CONFIG_X86_MPPARSE) describes the CPUs instead.
CONFIG_ACPI=y
# Console and errors on the first serial port.
CONFIG_PRINTK=y
CONFIG_BUG=y
CONFIG_TTY=y
CONFIG_SERIAL_8250=y
CONFIG_SERIAL_8250_CONSOLE=y
CONFIG_SERIAL_8250_NR_UARTS=1
CONFIG_SERIAL_8250_RUNTIME_UARTS=1
CONFIG_UNIX98_PTYS=y
# The agent as /init in an uncompressed cpio.
CONFIG_BLK_DEV_INITRD=y
CONFIG_RD_GZIP=n
CONFIG_RD_BZIP2=n
CONFIG_RD_LZMA=n
CONFIG_RD_XZ=n
CONFIG_RD_LZO=n
CONFIG_RD_LZ4=n
CONFIG_RD_ZSTD=n
CONFIG_BINFMT_ELF=y
CONFIG_BINFMT_SCRIPT=y
CONFIG_COREDUMP=y
CONFIG_ELF_CORE=y
# What ordinary programs in an image expect of a Linux kernel.
CONFIG_MULTIUSER=y
CONFIG_SYSVIPC=y
CONFIG_POSIX_MQUEUE=y
CONFIG_FHANDLE=y
CONFIG_POSIX_TIMERS=y
CONFIG_FUTEX=y
CONFIG_EPOLL=y
CONFIG_SIGNALFD=y
CONFIG_TIMERFD=y
CONFIG_EVENTFD=y
CONFIG_SHMEM=y
CONFIG_AIO=y
CONFIG_IO_URING=y
CONFIG_ADVISE_SYSCALLS=y
CONFIG_MEMBARRIER=y
CONFIG_KCMP=y
CONFIG_RSEQ=y
CONFIG_FILE_LOCKING=y
CONFIG_INOTIFY_USER=y
CONFIG_FANOTIFY=y
CONFIG_CROSS_MEMORY_ATTACH=y
CONFIG_SWAP=y
# /proc/vmstat: the agent tells an OOM kill by its oom_kill count.
CONFIG_VM_EVENT_COUNTERS=y
CONFIG_PROC_PAGE_MONITOR=y
CONFIG_PROC_FS=y
CONFIG_PROC_SYSCTL=y
CONFIG_SYSFS=y
CONFIG_DEVTMPFS=y
CONFIG_TMPFS=y
CONFIG_TMPFS_POSIX_ACL=y
CONFIG_TMPFS_XATTR=y
CONFIG_RANDOMIZE_BASE=n
# The agent's sandbox: cgroup v2 with the pids, memory and cpu controllers,
# seccomp filters, namespaces (for what the command itself may unshare).
CONFIG_CGROUPS=y
CONFIG_MEMCG=y
CONFIG_CGROUP_PIDS=y
CONFIG_CGROUP_SCHED=y
CONFIG_FAIR_GROUP_SCHED=y
CONFIG_CFS_BANDWIDTH=y
CONFIG_NAMESPACES=y
CONFIG_UTS_NS=y
CONFIG_IPC_NS=y
CONFIG_PID_NS=y
CONFIG_NET_NS=y
CONFIG_USER_NS=y
CONFIG_SECCOMP=y
CONFIG_SECCOMP_FILTER=y
# Devices: virtio over PCI (image disk, agent port, NIC, shares)...
CONFIG_PCI=y
CONFIG_PCI_MSI=y
CONFIG_VIRTIO_MENU=y
CONFIG_VIRTIO=y
CONFIG_VIRTIO_PCI=y
# ...and over MMIO, found through ACPI: QEMU's microvm machine, which a
# KVM host boots.
CONFIG_VIRTIO_MMIO=y
CONFIG_BLOCK=y
CONFIG_BLK_DEV=y
CONFIG_VIRTIO_BLK=y
CONFIG_VIRTIO_CONSOLE=y
CONFIG_NETDEVICES=y
CONFIG_NET_CORE=y
CONFIG_VIRTIO_NET=y
# Networking: unix, inet (v4 and v6), packet sockets; netlink is always
# there (the agent configures its NIC with rtnetlink). No netfilter: the
# host filters the VM's traffic.
CONFIG_NET=y
CONFIG_UNIX=y
CONFIG_INET=y
CONFIG_IPV6=y
# No sit0 tunnel device in every network namespace: a --no-network
# sandbox has lo and nothing else.
CONFIG_IPV6_SIT=n
CONFIG_PACKET=y
# Filesystems: the image (EROFS, with the crc32c its superblock checksum
# needs), the overlays, the workspace and volumes (9p over virtio).
# EROFS sits under the "Miscellaneous filesystems" menu, which tinyconfig
# leaves off in later 6.1 sources: ask for it.
CONFIG_MISC_FILESYSTEMS=y
CONFIG_EROFS_FS=y
CONFIG_EROFS_FS_XATTR=y
CONFIG_EROFS_FS_POSIX_ACL=y
CONFIG_EROFS_FS_SECURITY=y
CONFIG_CRYPTO_CRC32C=y
CONFIG_OVERLAY_FS=y
CONFIG_NETWORK_FILESYSTEMS=y
CONFIG_NET_9P=y
CONFIG_NET_9P_VIRTIO=y
CONFIG_9P_FS=y
CONFIG_9P_FS_POSIX_ACL=y
# Nothing to load: everything above is built in.
CONFIG_MODULES=n
# Costs time under emulation, of no use in a throwaway VM: Spectre/Meltdown
# mitigations (page-table isolation flushes on every syscall), tracing and
# probes, crypto self-tests, debugging, sound, graphics, USB, input.
CONFIG_SPECULATION_MITIGATIONS=n
CONFIG_PAGE_TABLE_ISOLATION=n
CONFIG_RETPOLINE=n
CONFIG_KPROBES=n
CONFIG_FTRACE=n
CONFIG_PROFILING=n
CONFIG_CRYPTO_MANAGER_DISABLE_TESTS=y
CONFIG_DEBUG_KERNEL=n
CONFIG_VT=n
CONFIG_INPUT=n
CONFIG_SOUND=n
CONFIG_DRM=n
CONFIG_USB_SUPPORT=n
CONFIG_WIRELESS=n
CONFIG_WLAN=n
CONFIG_SUSPEND=n
CONFIG_HIBERNATION=n
CONFIG_CPU_FREQ=n
CONFIG_EFI=n
EOF

# Up to date: built from this fragment and, while linux-source-6.1 is
# installed, from its current version. setup.sh runs this every time.
source_version() { dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || true; }
fragment_hash=$(sha256sum < "$fragment" | cut -d' ' -f1)
if [ -f "$out/vmlinux" ] && [ -f "$out/built-from" ]; then
    read -r built_hash built_version < "$out/built-from" || true
    if [ "$built_hash" = "$fragment_hash" ] && { [ -z "$(source_version)" ] || [ "$built_version" = "$(source_version)" ]; }; then
        echo "guest-kernel: $out/vmlinux is up to date" >&2
        echo "$out/vmlinux"
        exit 0
    fi
fi

need=()
[ -f "$tarball" ] || need+=(linux-source-6.1)
for tool in flex bison bc make gcc; do
    command -v "$tool" >/dev/null || need+=("$tool")
done
[ -f /usr/include/libelf.h ] || need+=(libelf-dev)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
    echo "guest-kernel: installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2
fi

src="$build/linux-source-6.1"
# A newer linux-source (a Debian security update) replaces the tree.
if [ ! -f "$src/Makefile" ] || [ "$(cat "$build/unpacked-version" 2>/dev/null)" != "$(source_version)" ]; then
    echo "guest-kernel: unpacking $tarball into $build" >&2
    rm -rf "$src"
    nice -n 19 tar -xf "$tarball" -C "$build"
    source_version > "$build/unpacked-version"
fi
cd "$src"

echo "guest-kernel: configuring in $src" >&2
# ARCH=x86_64: tinyconfig is allnoconfig-based, which would pick 32-bit.
nice -n 19 make -s ARCH=x86_64 tinyconfig >/dev/null
./scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
nice -n 19 make -s olddefconfig >&2
# A `=y` that did not stick is a missing dependency: say which, stop.
missing=$(grep -E '^CONFIG_[A-Z0-9_]+=(y|[0-9]+)$' "$fragment" | while IFS= read -r line; do
    grep -qxF "$line" .config || echo "${line%%=*}"
done)
if [ -n "$missing" ]; then
    echo "guest-kernel: not set after olddefconfig (a dependency is missing): $(echo $missing)" >&2
    exit 1
fi

echo "guest-kernel: building with nice -n 19 make -j$jobs" >&2
nice -n 19 make -s -j"$jobs" bzImage vmlinux >&2

mkdir -p "$out"
release=$(make -s kernelrelease)
cp arch/x86/boot/bzImage "$out/bzImage.tmp" && mv "$out/bzImage.tmp" "$out/bzImage"
# The ELF with the PVH entry, without symbols: what QEMU loads fastest.
strip -o "$out/vmlinux.tmp" vmlinux && mv "$out/vmlinux.tmp" "$out/vmlinux"
cp .config "$out/config"
echo "$release" > "$out/release"
echo "$fragment_hash $(source_version)" > "$out/built-from"
ls -l "$out" >&2
echo "$out/vmlinux"
