//! The seccomp filter as a classic BPF program, compiled from the table in
//! `agentkernel_core::seccomp` (the Docker and Podman backends build their
//! JSON profile from the same table).
//!
//! Docker's default profile is an allowlist whose effect, for a container
//! without CAP_SYS_ADMIN, is to deny the listed syscalls and a few argument
//! patterns (namespace flags to `clone`, `AF_VSOCK` sockets, unusual
//! `personality` values). We write that effect as a denylist: the program
//! stays short enough to audit. `clone3` answers ENOSYS, as in Docker, so
//! libc falls back to `clone`, whose flags a filter can inspect.
//!
//! Denied calls fail with EPERM; calls from another ABI (i386 `int 0x80`, x32)
//! fail too, so the filter cannot be sidestepped by changing architecture.

/// `struct sock_filter`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Instruction {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const BPF_JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K

const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
/// x86_64's x32 ABI: the same arch value, numbers with this bit set.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

// Offsets into `struct seccomp_data` (little-endian on both architectures:
// the low half of an argument first).
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
const fn offset_arg_low(n: u32) -> u32 {
    16 + 8 * n
}

pub use agentkernel_core::seccomp::Arch;
use agentkernel_core::seccomp::{
    Condition, ARGUMENT_RULES, CLONE3, DEFAULT_DENIED, RESTRICTIVE_EXTRA,
};

fn stmt(code: u16, k: u32) -> Instruction {
    Instruction {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Instruction {
    Instruction { code, jt, jf, k }
}

fn errno(e: i32) -> Instruction {
    stmt(BPF_RET_K, SECCOMP_RET_ERRNO | (e as u32 & 0xffff))
}

fn allow() -> Instruction {
    stmt(BPF_RET_K, SECCOMP_RET_ALLOW)
}

/// The filter for this machine's architecture.
pub fn program(restrictive: bool) -> std::io::Result<Vec<Instruction>> {
    let arch = Arch::host().ok_or_else(|| {
        std::io::Error::other(format!(
            "no seccomp filter for {}; use -B docker or -B podman",
            std::env::consts::ARCH
        ))
    })?;
    Ok(program_for(arch, restrictive))
}

/// The filter for `arch`, from core's table.
pub fn program_for(arch: Arch, restrictive: bool) -> Vec<Instruction> {
    let mut p = vec![
        stmt(BPF_LD_W_ABS, OFFSET_ARCH),
        jump(BPF_JEQ_K, arch.audit(), 1, 0),
        errno(libc::EPERM),
        stmt(BPF_LD_W_ABS, OFFSET_NR),
    ];
    if arch == Arch::X86_64 {
        p.push(jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1));
        p.push(errno(libc::EPERM));
    }
    let extra = if restrictive { RESTRICTIVE_EXTRA } else { &[] };
    for nr in DEFAULT_DENIED
        .iter()
        .chain(extra)
        .filter_map(|s| s.number(arch))
    {
        p.push(jump(BPF_JEQ_K, nr, 0, 1));
        p.push(errno(libc::EPERM));
    }
    if let Some(nr) = CLONE3.number(arch) {
        p.push(jump(BPF_JEQ_K, nr, 0, 1));
        p.push(errno(libc::ENOSYS));
    }

    // Each block below leaves the accumulator holding an argument, so every
    // path out of it returns; a call that is not the block's skips it with
    // its number still loaded.
    for rule in ARGUMENT_RULES {
        let Some(nr) = rule.syscall.number(arch) else {
            continue;
        };
        let load = stmt(BPF_LD_W_ABS, offset_arg_low(rule.arg));
        match rule.when {
            Condition::AnyBit(mask) => p.extend([
                jump(BPF_JEQ_K, nr, 0, 4),
                load,
                jump(BPF_JSET_K, mask, 0, 1),
                errno(libc::EPERM),
                allow(),
            ]),
            Condition::OneOf(values) | Condition::NoneOf(values) => {
                let n = values.len() as u8;
                p.push(jump(BPF_JEQ_K, nr, 0, n + 3));
                p.push(load);
                for (i, value) in values.iter().enumerate() {
                    // Over the remaining comparisons and the next return.
                    p.push(jump(BPF_JEQ_K, *value, n - i as u8, 0));
                }
                if matches!(rule.when, Condition::OneOf(_)) {
                    p.extend([allow(), errno(libc::EPERM)]);
                } else {
                    p.extend([errno(libc::EPERM), allow()]);
                }
            }
        }
    }
    p.push(allow());
    p
}

/// Runs `program` on one call (`arch` as `seccomp_data.arch`, the low
/// halves of the first arguments) and returns the action: an interpreter
/// for the instructions [`program_for`] emits, so a program built for
/// another architecture can be checked here.
pub fn evaluate(program: &[Instruction], arch: u32, nr: u32, args: [u32; 6]) -> u32 {
    let mut pc = 0;
    let mut acc = 0;
    loop {
        let i = program[pc];
        match i.code {
            BPF_LD_W_ABS => {
                acc = match i.k {
                    OFFSET_NR => nr,
                    OFFSET_ARCH => arch,
                    k => args[((k - 16) / 8) as usize],
                };
                pc += 1;
            }
            BPF_JEQ_K | BPF_JGE_K | BPF_JSET_K => {
                let taken = match i.code {
                    BPF_JEQ_K => acc == i.k,
                    BPF_JGE_K => acc >= i.k,
                    _ => acc & i.k != 0,
                };
                pc += 1 + if taken { i.jt } else { i.jf } as usize;
            }
            BPF_RET_K => return i.k,
            c => panic!("opcode {c:#x} is not one program_for emits"),
        }
    }
}

/// What [`evaluate`] returns for a refused call.
pub const DENIED: u32 = SECCOMP_RET_ERRNO | libc::EPERM as u32;
pub const ALLOWED: u32 = SECCOMP_RET_ALLOW;

/// Installs the filter on the calling thread (inherited by children and
/// kept across execve). Needs no_new_privs or CAP_SYS_ADMIN.
pub fn install(restrictive: bool) -> std::io::Result<()> {
    let filter = program(restrictive)?;
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const Instruction,
    }
    let prog = SockFprog {
        len: filter.len() as u16,
        filter: filter.as_ptr(),
    };
    // SAFETY: `prog` points at `filter`, which outlives the call; the kernel
    // copies the program before returning.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &prog as *const SockFprog as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentkernel_core::seccomp::PERSONALITY_ALLOWED;

    const ENOSYS: u32 = SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

    fn run(p: &[Instruction], arch: Arch, nr: i64, args: [u32; 2]) -> u32 {
        evaluate(p, arch.audit(), nr as u32, [args[0], args[1], 0, 0, 0, 0])
    }

    #[test]
    fn denies_the_default_list_and_allows_the_rest() {
        let p = program(false).unwrap();
        let x = Arch::host().unwrap();
        assert_eq!(run(&p, x, libc::SYS_mount, [0, 0]), DENIED);
        assert_eq!(run(&p, x, libc::SYS_unshare, [0, 0]), DENIED);
        assert_eq!(run(&p, x, libc::SYS_read, [0, 0]), ALLOWED);
        assert_eq!(run(&p, x, libc::SYS_ptrace, [0, 0]), ALLOWED);
        assert_eq!(
            run(&program(true).unwrap(), x, libc::SYS_ptrace, [0, 0]),
            DENIED
        );
        assert_eq!(run(&p, x, libc::SYS_clone3, [0, 0]), ENOSYS);
    }

    #[test]
    fn other_abis_are_refused() {
        let p = program_for(Arch::X86_64, false);
        assert_eq!(evaluate(&p, 0x4000_0003, 3, [0; 6]), DENIED); // i386
        assert_eq!(
            evaluate(&p, Arch::X86_64.audit(), X32_SYSCALL_BIT | 39, [0; 6]),
            DENIED
        );
        // Each program accepts its own architecture only.
        let arm = program_for(Arch::Aarch64, false);
        assert_eq!(evaluate(&arm, Arch::Aarch64.audit(), 63, [0; 6]), ALLOWED); // read
        assert_eq!(evaluate(&arm, Arch::X86_64.audit(), 0, [0; 6]), DENIED);
        assert_eq!(evaluate(&p, Arch::Aarch64.audit(), 0, [0; 6]), DENIED);
        assert_eq!(evaluate(&arm, 0x4000_0028, 3, [0; 6]), DENIED); // AArch32
    }

    /// aarch64's program, built here: its arch check, and its own numbers
    /// (mount is 40 there, 165 on x86_64; read is 63 there).
    #[test]
    fn the_aarch64_program_uses_aarch64_numbers() {
        let arm = program_for(Arch::Aarch64, false);
        assert_eq!(arm[0], stmt(BPF_LD_W_ABS, OFFSET_ARCH));
        assert_eq!(arm[1], jump(BPF_JEQ_K, 0xc000_00b7, 1, 0));
        let a = Arch::Aarch64.audit();
        assert_eq!(evaluate(&arm, a, 40, [0; 6]), DENIED); // mount
        assert_eq!(evaluate(&arm, a, 97, [0; 6]), DENIED); // unshare
        assert_eq!(evaluate(&arm, a, 165, [0; 6]), ALLOWED); // getrusage there
        assert_eq!(evaluate(&arm, a, 435, [0; 6]), ENOSYS); // clone3
        assert_eq!(evaluate(&arm, a, 220, [0x1000_0011, 0, 0, 0, 0, 0]), DENIED); // clone NEWUSER
        assert_eq!(evaluate(&arm, a, 220, [0x11, 0, 0, 0, 0, 0]), ALLOWED);
        assert_eq!(evaluate(&arm, a, 92, [0x0040000, 0, 0, 0, 0, 0]), DENIED); // personality
        assert_eq!(evaluate(&arm, a, 92, [0x8, 0, 0, 0, 0, 0]), ALLOWED);
        // No x32 check on aarch64: the bit is an ordinary number there (allowed).
        assert!(!arm.contains(&jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1)));
    }

    #[test]
    fn argument_rules() {
        for arch in Arch::ALL {
            let p = program_for(arch, false);
            let nr = |s: agentkernel_core::seccomp::Syscall| s.number(arch).unwrap() as i64;
            use agentkernel_core::seccomp::{CLONE, IOCTL, PERSONALITY, SOCKET};
            assert_eq!(run(&p, arch, nr(CLONE), [0x11, 0]), ALLOWED);
            assert_eq!(run(&p, arch, nr(CLONE), [0x1000_0011, 0]), DENIED); // CLONE_NEWUSER
            assert_eq!(run(&p, arch, nr(SOCKET), [2, 0]), ALLOWED);
            assert_eq!(run(&p, arch, nr(SOCKET), [40, 0]), DENIED); // AF_VSOCK
            assert_eq!(run(&p, arch, nr(IOCTL), [0, 0x5401]), ALLOWED);
            assert_eq!(run(&p, arch, nr(IOCTL), [0, 0x5412]), DENIED); // TIOCSTI
            assert_eq!(run(&p, arch, nr(IOCTL), [0, 0x541c]), DENIED); // TIOCLINUX
            for ok in PERSONALITY_ALLOWED {
                assert_eq!(run(&p, arch, nr(PERSONALITY), [ok, 0]), ALLOWED, "{ok:#x}");
            }
            assert_eq!(run(&p, arch, nr(PERSONALITY), [0x0040000, 0]), DENIED);
        }
    }
}
