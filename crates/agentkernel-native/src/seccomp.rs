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
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

// Offsets into `struct seccomp_data` (little-endian: the low half of an argument first).
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
const fn offset_arg_low(n: u32) -> u32 {
    16 + 8 * n
}

use agentkernel_core::seccomp::{
    CLONE3, CLONE_NAMESPACE_FLAGS, DEFAULT_DENIED, DENIED_IOCTLS, DENIED_SOCKET_FAMILIES,
    PERSONALITY_ALLOWED, RESTRICTIVE_EXTRA,
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

/// Builds the filter program.
pub fn program(restrictive: bool) -> Vec<Instruction> {
    let mut p = vec![
        stmt(BPF_LD_W_ABS, OFFSET_ARCH),
        jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        errno(libc::EPERM),
        stmt(BPF_LD_W_ABS, OFFSET_NR),
        jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),
        errno(libc::EPERM),
    ];
    let extra: &[(&str, i64)] = if restrictive { RESTRICTIVE_EXTRA } else { &[] };
    for &(_, nr) in DEFAULT_DENIED.iter().chain(extra) {
        p.push(jump(BPF_JEQ_K, nr as u32, 0, 1));
        p.push(errno(libc::EPERM));
    }
    p.push(jump(BPF_JEQ_K, CLONE3.1 as u32, 0, 1));
    p.push(errno(libc::ENOSYS));

    // Each block below leaves the accumulator holding an argument, so every
    // path out of it returns; the syscall number is reloaded for the next.
    // clone: no new namespaces.
    p.extend([
        jump(BPF_JEQ_K, libc::SYS_clone as u32, 0, 4),
        stmt(BPF_LD_W_ABS, offset_arg_low(0)),
        jump(BPF_JSET_K, CLONE_NAMESPACE_FLAGS, 0, 1),
        errno(libc::EPERM),
        allow(),
    ]);
    // socket and ioctl: no listed family / request (compared on the low 32
    // bits, all the kernel reads of these int arguments).
    for (nr, arg, denied) in [
        (libc::SYS_socket, 0, DENIED_SOCKET_FAMILIES),
        (libc::SYS_ioctl, 1, DENIED_IOCTLS),
    ] {
        let n = denied.len() as u8;
        p.push(jump(BPF_JEQ_K, nr as u32, 0, n + 3));
        p.push(stmt(BPF_LD_W_ABS, offset_arg_low(arg)));
        for (i, value) in denied.iter().enumerate() {
            // To the EPERM, over the remaining comparisons and the allow.
            p.push(jump(BPF_JEQ_K, *value, n - i as u8, 0));
        }
        p.push(allow());
        p.push(errno(libc::EPERM));
    }
    // personality: only the values Docker allows (no ADDR_NO_RANDOMIZE and friends).
    let n = PERSONALITY_ALLOWED.len() as u8;
    p.push(jump(BPF_JEQ_K, libc::SYS_personality as u32, 0, n + 3));
    p.push(stmt(BPF_LD_W_ABS, offset_arg_low(0)));
    for (i, value) in PERSONALITY_ALLOWED.iter().enumerate() {
        // Jump over the remaining comparisons and the EPERM to the allow.
        let to_allow = n - i as u8;
        p.push(jump(BPF_JEQ_K, *value, to_allow, 0));
    }
    p.push(errno(libc::EPERM));
    p.push(allow());

    p.push(allow());
    p
}

/// Installs the filter on the calling thread (inherited by children and
/// kept across execve). Needs no_new_privs or CAP_SYS_ADMIN.
pub fn install(restrictive: bool) -> std::io::Result<()> {
    let filter = program(restrictive);
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

    /// A tiny interpreter for the instructions we emit, to check the jumps.
    fn run(p: &[Instruction], arch: u32, nr: u32, args: [u32; 2]) -> u32 {
        let mut pc = 0;
        let mut acc = 0;
        loop {
            let i = p[pc];
            match i.code {
                BPF_LD_W_ABS => {
                    acc = match i.k {
                        OFFSET_NR => nr,
                        OFFSET_ARCH => arch,
                        16 => args[0],
                        24 => args[1],
                        k => panic!("load of offset {k}"),
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
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    const EPERM: u32 = SECCOMP_RET_ERRNO | libc::EPERM as u32;

    #[test]
    fn denies_the_default_list_and_allows_the_rest() {
        let p = program(false);
        let x = AUDIT_ARCH_X86_64;
        assert_eq!(run(&p, x, libc::SYS_mount as u32, [0, 0]), EPERM);
        assert_eq!(run(&p, x, libc::SYS_unshare as u32, [0, 0]), EPERM);
        assert_eq!(run(&p, x, libc::SYS_read as u32, [0, 0]), SECCOMP_RET_ALLOW);
        assert_eq!(
            run(&p, x, libc::SYS_ptrace as u32, [0, 0]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&program(true), x, libc::SYS_ptrace as u32, [0, 0]),
            EPERM
        );
        assert_eq!(
            run(&p, x, libc::SYS_clone3 as u32, [0, 0]),
            SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
    }

    #[test]
    fn other_abis_are_refused() {
        let p = program(false);
        assert_eq!(run(&p, 0x4000_0003, 3, [0, 0]), EPERM);
        assert_eq!(
            run(&p, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 39, [0, 0]),
            EPERM
        );
    }

    #[test]
    fn argument_rules() {
        let p = program(false);
        let x = AUDIT_ARCH_X86_64;
        let clone = libc::SYS_clone as u32;
        assert_eq!(run(&p, x, clone, [0x11, 0]), SECCOMP_RET_ALLOW);
        assert_eq!(run(&p, x, clone, [0x1000_0011, 0]), EPERM); // CLONE_NEWUSER
        let socket = libc::SYS_socket as u32;
        assert_eq!(run(&p, x, socket, [2, 0]), SECCOMP_RET_ALLOW);
        assert_eq!(run(&p, x, socket, [40, 0]), EPERM); // AF_VSOCK
        let ioctl = libc::SYS_ioctl as u32;
        assert_eq!(run(&p, x, ioctl, [0, 0x5401]), SECCOMP_RET_ALLOW);
        assert_eq!(run(&p, x, ioctl, [0, 0x5412]), EPERM); // TIOCSTI
        assert_eq!(run(&p, x, ioctl, [0, 0x541c]), EPERM); // TIOCLINUX
        let pers = libc::SYS_personality as u32;
        for ok in PERSONALITY_ALLOWED {
            assert_eq!(run(&p, x, pers, [ok, 0]), SECCOMP_RET_ALLOW, "{ok:#x}");
        }
        assert_eq!(run(&p, x, pers, [0x0040000, 0]), EPERM);
    }
}
