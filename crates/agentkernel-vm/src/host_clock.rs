//! The host's TSC rate, told to a TCG guest's kernel.
//!
//! Under TCG a guest's RDTSC reads the host's counter (QEMU returns the
//! host's TSC plus an offset), so the guest's TSC runs at the host's rate.
//! A guest kernel would measure that rate against the emulated PIT, and on
//! a busy host the measurement fails about half the time ("tsc: Unable to
//! calibrate against PIT"). A PC guest then falls back to jiffies as its
//! clock and spends ~100 ms calibrating its delay loop by timer ticks; a
//! microvm guest (no HPET, no PM timer) hung for good at that point, with
//! nothing on its console past "Marking TSC unstable". Told the rate
//! (`tsc_early_khz=`), the kernel skips the measurement and keeps the TSC.
//!
//! The rate is measured once per host boot and kept beside the VM images,
//! like the accelerator's verdict ([`crate::vmm::choose_accel`]).

use std::path::Path;
use std::time::{Duration, Instant};

/// The host's TSC rate in kHz, when the host's TSC ticks at one constant
/// rate (`constant_tsc` and `nonstop_tsc`); `None` otherwise, and the guest
/// measures as before.
pub fn host_tsc_khz(cache_dir: &Path) -> Option<u64> {
    agentkernel_core::state::per_boot(&cache_dir.join("tsc-khz"), || {
        measure().map(|khz| khz.to_string()).unwrap_or_default()
    })
    .parse()
    .ok()
    // The cache is a file: a value no TSC has (hand-edited, damaged) is
    // not told to a guest, whose clock and `--timeout` would follow it.
    .filter(|khz| PLAUSIBLE_KHZ.contains(khz))
}

/// A TSC between 100 MHz and 20 GHz; anything else is a bad reading.
const PLAUSIBLE_KHZ: std::ops::Range<u64> = 100_000..20_000_000;

/// How long the TSC is counted against the host's monotonic clock: the
/// two readings' error (~a microsecond) is then under 0.01%.
const MEASURE_FOR: Duration = Duration::from_millis(20);

#[cfg(target_arch = "x86_64")]
fn measure() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
    if !(has("constant_tsc") && has("nonstop_tsc")) {
        return None;
    }
    let (start, start_ticks) = paired_reading()?;
    std::thread::sleep(MEASURE_FOR);
    let (end, end_ticks) = paired_reading()?;
    let nanos = u64::try_from(end.duration_since(start).as_nanos()).ok()?;
    let khz = end_ticks.checked_sub(start_ticks)?.checked_mul(1_000_000)? / nanos.max(1);
    PLAUSIBLE_KHZ.contains(&khz).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure() -> Option<u64> {
    None
}

/// The monotonic clock and the TSC read at (nearly) one moment: the clock
/// between two TSC readings, their midpoint, retried when something (a
/// preemption) came between them.
#[cfg(target_arch = "x86_64")]
fn paired_reading() -> Option<(Instant, u64)> {
    // ~40 µs at a few GHz: far more than a clock read takes undisturbed.
    const CLOSE_ENOUGH: u64 = 100_000;
    for _ in 0..10 {
        let before = tsc();
        let now = Instant::now();
        let after = tsc();
        let between = after.wrapping_sub(before);
        if between < CLOSE_ENOUGH {
            return Some((now, before + between / 2));
        }
    }
    None
}

#[cfg(target_arch = "x86_64")]
fn tsc() -> u64 {
    // SAFETY: RDTSC has no preconditions; it only reads a counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_rate_no_tsc_has_is_not_told_to_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let boot = agentkernel_core::state::boot_id();
        for bad in ["0", "99999999999", "-5", "fast"] {
            std::fs::write(dir.path().join("tsc-khz"), format!("{boot}\n{bad}\n")).unwrap();
            assert_eq!(host_tsc_khz(dir.path()), None, "{bad}");
        }
        std::fs::write(dir.path().join("tsc-khz"), format!("{boot}\n2445400\n")).unwrap();
        assert_eq!(host_tsc_khz(dir.path()), Some(2445400));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn two_measurements_agree_within_a_thousandth() {
        let (Some(a), Some(b)) = (measure(), measure()) else {
            // Only a host whose TSC has no constant rate measures nothing.
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
            assert!(!cpuinfo.contains("nonstop_tsc") || !cpuinfo.contains("constant_tsc"));
            return;
        };
        assert!(a.abs_diff(b) * 1000 < a, "{a} kHz then {b} kHz");
    }
}
