//! The seccomp profile of every container, in Docker's JSON format, built
//! from the table the native backend compiles too (core `seccomp.rs`), so a
//! profile means the same syscalls on every backend.
//!
//! A custom profile replaces the engine's default. Ours allows by default and
//! refuses what the table lists: Docker's default denials, io_uring (which
//! Docker 20.10's default allows), namespace flags to `clone` (clone3 answers
//! ENOSYS so libc falls back to clone), AF_VSOCK sockets (20.10 allows them
//! too), TIOCSTI/TIOCLINUX, and `personality` values outside Docker's list;
//! restrictive adds ptrace. No `architectures` are listed, so calls from
//! another ABI (i386, x32) meet libseccomp's bad-architecture action and are
//! refused, as on native.

use agentkernel_core::seccomp::{
    CLONE3, CLONE_NAMESPACE_FLAGS, DEFAULT_DENIED, DENIED_IOCTLS, DENIED_SOCKET_FAMILIES,
    PERSONALITY_ALLOWED, RESTRICTIVE_EXTRA,
};
use serde_json::{json, Value};

/// The kernel reads these arguments as 32-bit ints; libseccomp compares 64
/// bits, so a value with junk in the upper half would slip past a plain
/// equality. Compare the low half only, as the BPF of the native backend does.
const LOW_32: u64 = 0xffff_ffff;

fn deny_when_low_bits(syscall: &str, index: u32, mask: u64, value: u64) -> Value {
    json!({
        "names": [syscall],
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": libc::EPERM,
        "args": [{ "index": index, "value": mask, "valueTwo": value, "op": "SCMP_CMP_MASKED_EQ" }],
    })
}

pub fn profile(restrictive: bool) -> Value {
    let extra: &[(&str, i64)] = if restrictive { RESTRICTIVE_EXTRA } else { &[] };
    let denied: Vec<&str> = DEFAULT_DENIED
        .iter()
        .chain(extra)
        .map(|(name, _)| *name)
        .collect();
    let mut rules = vec![
        json!({ "names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM }),
        json!({ "names": [CLONE3.0], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS }),
    ];
    // One rule per flag: a rule's conditions are ANDed, rules are ORed.
    for bit in 0..32 {
        let flag = 1u64 << bit;
        if u64::from(CLONE_NAMESPACE_FLAGS) & flag != 0 {
            rules.push(deny_when_low_bits("clone", 0, flag, flag));
        }
    }
    for family in DENIED_SOCKET_FAMILIES {
        rules.push(deny_when_low_bits("socket", 0, LOW_32, (*family).into()));
    }
    for request in DENIED_IOCTLS {
        rules.push(deny_when_low_bits("ioctl", 1, LOW_32, (*request).into()));
    }
    // personality: refuse any value with a bit outside the allowed ones.
    // libseccomp cannot express "except 0xffffffff" (an unconditional or
    // overlapping ERRNO rule wins over an ALLOW one), so the query value is
    // refused here too: the one difference from native.
    let allowed_bits = PERSONALITY_ALLOWED
        .iter()
        .filter(|v| **v != u32::MAX)
        .fold(0u32, |acc, v| acc | v);
    for bit in 0..32 {
        let flag = 1u32 << bit;
        if allowed_bits & flag == 0 {
            rules.push(deny_when_low_bits(
                "personality",
                0,
                flag.into(),
                flag.into(),
            ));
        }
    }
    json!({ "defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules })
}

/// Writes `profile` to the state directory (once per content) and returns its path.
pub fn profile_file(profile: &str) -> agentkernel_core::Result<std::path::PathBuf> {
    let dir = agentkernel_core::paths::state_dir().join("seccomp");
    std::fs::create_dir_all(&dir).map_err(|e| agentkernel_core::Error::state(&dir, e))?;
    let path = dir.join(format!(
        "profile-{:016x}.json",
        agentkernel_core::names::stable_hash(profile.as_bytes())
    ));
    if !path.exists() {
        agentkernel_core::state::write_atomic(&path, profile.as_bytes())?;
    }
    Ok(path)
}
