#!/usr/bin/env python3
"""A/B of a qemu sandbox's cold boot: boots QEMU the way `-B qemu --no-network`
does (same machine, devices, kernel, initramfs and image disk, taken from an
agentkernel state directory) with variants of the guest kernel's command line,
guest RAM or vCPUs, interleaved, and prints each variant's median and minimum
wall time from QEMU's start to the guest agent's hello (its first frame on the
agent port), with the guest's own marks (its uptime when the agent started,
when its modules were loaded, when it was ready). Nothing of agentkernel runs:
this isolates the boot.

  bench/qemu_boot.py RUNS NAME=EXTRA_CMDLINE | NAME={"extra": "...", "mem": "400M", "smp": "2"} ...
  e.g. bench/qemu_boot.py 5 base= nokaslr=nokaslr 'small={"extra":"","mem":"400M"}'

A variant may also name the guest kernel and initramfs ("kernel", "initrd":
a path or a glob, newest match; default the state directory's vmlinux-* and
initramfs-*.cpio) and replace the base command line ("cmdline"), e.g. to
compare Debian's kernel with one from scripts/guest-kernel.sh (whose
initramfs, without modules, is the one a run with `[qemu] kernel` set
builds; both stay in the state directory, so name each by its path):
  bench/qemu_boot.py 5 debian= 'own={"kernel":"/usr/local/lib/agentkernel/guest-kernel/vmlinux","initrd":"/var/tmp/own.cpio"}'

The state directory is $AGENTKERNEL_HOME (default ~/.local/share/agentkernel);
run one `agentkernel run -B qemu -i IMAGE true` first so that the initramfs and
the image's disk exist. The guest's clock under TCG is only roughly right: judge
by the wall times, over several runs, on a quiet host.
"""
import glob
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

# Keep in sync with kernel_command_line(Tcg) in crates/agentkernel-vm/src/vmm.rs
# (and the default cpu below with its TCG_CPU).
BASE = ("console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init i8042.noaux i8042.nomux "
        "i8042.nopnp i8042.nokbd no_timer_check rcupdate.rcu_expedited=1 noreplace-smp "
        "cryptomgr.notests acpi=off initcall_blacklist=init_kprobe_trace,crypto_kdf108_init "
        "noapictimer")


def base(vm_dir):
    """BASE plus the TSC's rate, as a TCG run passes it once agentkernel has
    measured it (host_clock.rs: the rate is cached in the VM directory)."""
    try:
        with open(os.path.join(vm_dir, "tsc-khz")) as f:
            khz = f.read().split("\n")[1].strip()
    except (OSError, IndexError):
        khz = ""
    return f"{BASE} tsc_early_khz={khz} tsc=nowatchdog" if khz else BASE


def newest(pattern):
    found = glob.glob(pattern)
    if not found:
        sys.exit(f"qemu_boot: nothing matches {pattern}; run `agentkernel run -B qemu -i IMAGE true` first")
    return max(found, key=os.path.getmtime)


def firmware():
    """qboot where QEMU ships it, as agentkernel does (vmm.rs, fast_firmware)."""
    for path in ("/usr/share/qemu/qboot.rom", "/usr/share/qemu-kvm/qboot.rom"):
        if os.path.exists(path):
            return ["-bios", path]
    return []


def boot(vm_dir, work, extra="", mem="2240M", smp="1", kernel=None, initrd=None, cmdline=None, cpu="max,erms=off",
         machine="pc", nic=False):
    cmdline = base(vm_dir) if cmdline is None else cmdline
    kernel = newest(kernel or f"{vm_dir}/vmlinux-*")
    initrd = newest(initrd or f"{vm_dir}/initramfs-*.cpio")
    disk = newest(f"{vm_dir}/disks/*.erofs")
    path = os.path.join(work, "agent.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(120)
    command = [
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
        "-monitor", "none", "-serial", "null", *firmware(), "-accel", "tcg", "-M", machine, "-cpu", cpu,
        "-smp", smp, "-m", mem, "-kernel", kernel, "-initrd", initrd,
        "-append", f"{cmdline} {extra}".strip(),
        "-drive", f"file={disk},if=none,id=root,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=root", "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={path}",
        "-device", "virtserialport,chardev=agent,name=agentkernel",
        # A NIC as a networked run has (on a hub port: nothing is sent anywhere).
        *(["-netdev", "hubport,id=net0,hubid=0", "-device", "virtio-net-pci,netdev=net0,romfile="]
          if nic else ["-nic", "none"]),
    ]
    start = time.monotonic()
    qemu = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        conn, _ = listener.accept()
        conn.settimeout(120)
        header = conn.recv(4, socket.MSG_WAITALL)
        if len(header) < 4:
            raise RuntimeError("the agent's port closed before its hello")
        body = conn.recv(struct.unpack(">I", header)[0], socket.MSG_WAITALL)
        return (time.monotonic() - start) * 1000, json.loads(body)
    finally:
        qemu.kill()
        qemu.wait()
        listener.close()
        os.unlink(path)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    runs = int(sys.argv[1])
    variants = {}
    for arg in sys.argv[2:]:
        name, _, spec = arg.partition("=")
        variants[name] = json.loads(spec) if spec.startswith("{") else {"extra": spec}
    home = os.environ.get("AGENTKERNEL_HOME") or os.path.expanduser("~/.local/share/agentkernel")
    vm_dir = os.path.join(home, "images", "vm")
    results = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(runs):
            for name, spec in variants.items():
                results[name].append(boot(vm_dir, work, **spec))
    for name, rows in results.items():
        walls = sorted(wall for wall, _ in rows)
        marks = rows[len(rows) // 2][1].get("Ready", {})
        print(f"{name:12s} median {statistics.median(walls):6.0f} ms  min {walls[0]:6.0f} ms  "
              f"guest: agent started {marks.get('started_ms')} ms, modules {marks.get('modules_ms')} ms")


if __name__ == "__main__":
    main()
