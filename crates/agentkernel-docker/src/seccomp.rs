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
    Condition, ARGUMENT_RULES, CLONE3, DEFAULT_DENIED, RESTRICTIVE_EXTRA,
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

/// Each set bit of `bits`, as a one-bit mask.
fn each_bit(bits: u32) -> impl Iterator<Item = u64> {
    (0..32)
        .map(|bit| 1u64 << bit)
        .filter(move |flag| u64::from(bits) & flag != 0)
}

pub fn profile(restrictive: bool) -> Value {
    let extra = if restrictive { RESTRICTIVE_EXTRA } else { &[] };
    let denied: Vec<&str> = DEFAULT_DENIED.iter().chain(extra).map(|s| s.name).collect();
    let mut rules = vec![
        json!({ "names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM }),
        json!({ "names": [CLONE3.name], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS }),
    ];
    // A rule's conditions are ANDed, rules are ORed: one rule per bit or value.
    for rule in ARGUMENT_RULES {
        let (name, arg) = (rule.syscall.name, rule.arg);
        match rule.when {
            Condition::AnyBit(mask) => {
                for flag in each_bit(mask) {
                    rules.push(deny_when_low_bits(name, arg, flag, flag));
                }
            }
            Condition::OneOf(values) => {
                for value in values {
                    rules.push(deny_when_low_bits(name, arg, LOW_32, (*value).into()));
                }
            }
            // Refuse any value with a bit outside the allowed values'.
            // libseccomp cannot express "except 0xffffffff" (an
            // unconditional or overlapping ERRNO rule wins over an ALLOW
            // one), so `personality`'s query value is refused here too:
            // the one difference from native.
            Condition::NoneOf(values) => {
                let allowed_bits = values
                    .iter()
                    .filter(|v| **v != u32::MAX)
                    .fold(0u32, |acc, v| acc | v);
                for flag in each_bit(!allowed_bits) {
                    rules.push(deny_when_low_bits(name, arg, flag, flag));
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use agentkernel_core::seccomp::{Arch, Syscall, CLONE, IOCTL, PERSONALITY, SOCKET};
    use agentkernel_native::seccomp::{evaluate, program_for, DENIED};

    /// What the engine does with the JSON profile for one call: EPERM when
    /// an ERRNO rule names the call and all its argument conditions hold.
    fn engine_refuses(profile: &Value, name: &str, args: [u32; 6]) -> bool {
        profile["syscalls"].as_array().unwrap().iter().any(|rule| {
            rule["errnoRet"] == libc::EPERM
                && rule["names"].as_array().unwrap().iter().any(|n| n == name)
                && rule["args"].as_array().is_none_or(|conds| {
                    conds.iter().all(|c| {
                        let arg = u64::from(args[c["index"].as_u64().unwrap() as usize]);
                        arg & c["value"].as_u64().unwrap() == c["valueTwo"].as_u64().unwrap()
                    })
                })
        })
    }

    /// Both backends' filters come from core's table; this checks that they
    /// refuse exactly the same calls: every listed syscall (plain), and the
    /// argument-conditioned ones over every single bit and listed value, on
    /// both architectures native builds for.
    #[test]
    fn docker_and_native_deny_exactly_the_same_set() {
        let conditioned = [CLONE, SOCKET, IOCTL, PERSONALITY];
        for restrictive in [false, true] {
            let profile = profile(restrictive);
            for arch in Arch::ALL {
                let bpf = program_for(arch, restrictive);
                let native_refuses = |s: &Syscall, args: [u32; 6]| {
                    s.number(arch)
                        .is_some_and(|nr| evaluate(&bpf, arch.audit(), nr, args) == DENIED)
                };
                let plain = DEFAULT_DENIED.iter().chain(RESTRICTIVE_EXTRA);
                for s in plain.chain(&conditioned) {
                    if s.number(arch).is_none() {
                        continue; // nothing to refuse on this architecture
                    }
                    let mut samples: Vec<u32> = vec![0, u32::MAX - 1];
                    samples.extend((0..32).map(|bit| 1u32 << bit));
                    samples.extend([40, 0x5401, 0x5412, 0x541c, 0x8, 0x20000, 0x20008]);
                    for value in samples {
                        let mut args = [0u32; 6];
                        let arg = if s.name == "ioctl" { 1 } else { 0 };
                        args[arg] = value;
                        assert_eq!(
                            engine_refuses(&profile, s.name, args),
                            native_refuses(s, args),
                            "{} with {value:#x} on {arch:?} (restrictive: {restrictive})",
                            s.name
                        );
                    }
                }
            }
        }
    }
}
