//! What the operating system tells about a process: CPU time and resident
//! memory from `/proc`, and the open-file limit that many sessions need.

use std::time::Duration;

use super::error::{Context, Error, Result};

/// CPU time and memory of a process at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    /// User plus system CPU time since the process started.
    pub(crate) cpu: Duration,
    /// Resident set size now, in bytes.
    pub(crate) rss_bytes: u64,
    /// Largest resident set size so far, in bytes.
    pub(crate) peak_rss_bytes: u64,
}

impl Usage {
    /// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`; `None` means this
    /// process (`/proc/self`).
    pub(crate) fn of(pid: Option<u32>) -> Result<Self> {
        let dir = match pid {
            Some(pid) => format!("/proc/{pid}"),
            None => "/proc/self".to_owned(),
        };
        let stat = std::fs::read_to_string(format!("{dir}/stat"))
            .with_context(|| format!("cannot read {dir}/stat"))?;
        let status = std::fs::read_to_string(format!("{dir}/status"))
            .with_context(|| format!("cannot read {dir}/status"))?;
        let ticks =
            cpu_ticks(&stat).ok_or_else(|| Error::Proc(format!("unexpected {dir}/stat")))?;
        Ok(Self {
            cpu: ticks_to_duration(ticks, clock_ticks_per_second()),
            rss_bytes: status_kib(&status, "VmRSS:")
                .ok_or_else(|| Error::Proc(format!("no VmRSS in {dir}/status")))?
                * 1024,
            peak_rss_bytes: status_kib(&status, "VmHWM:").unwrap_or(0) * 1024,
        })
    }
}

/// CPU time spent between two readings; `None` unless both were taken.
pub(crate) fn cpu_between(before: Option<Usage>, after: Option<Usage>) -> Option<Duration> {
    Some(after?.cpu.saturating_sub(before?.cpu))
}

/// `utime + stime` of a `/proc/<pid>/stat` line, in clock ticks. The command
/// name (field 2) may hold spaces and parentheses, so fields are counted
/// from the last `)`: state is field 3, utime 14 and stime 15.
pub(crate) fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` line of `/proc/<pid>/status`, e.g. `VmRSS:   1234 kB`.
pub(crate) fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    let per_second = per_second.max(1);
    Duration::from_secs(ticks / per_second)
        + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second)
}

/// Clock ticks per second of `/proc` CPU times (`_SC_CLK_TCK`, almost
/// always 100).
fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 on error.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// Makes sure this process may open at least `needed` files, raising the
/// soft limit (up to the hard limit) when it is lower. Child processes
/// started afterwards inherit the raised limit. Returns the soft limit now
/// in force.
pub(crate) fn ensure_open_files(needed: u64) -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    // `rlim_t` is `u64` on 64-bit Linux but narrower elsewhere.
    #[allow(clippy::unnecessary_cast)]
    let (soft, hard) = (limit.rlim_cur as u64, limit.rlim_max as u64);
    if soft >= needed {
        return Ok(soft);
    }
    if hard < needed {
        return Err(Error::Scenario(format!(
            "about {needed} open files are needed but the hard limit is {hard}: \
             raise it (e.g. `ulimit -Hn {needed}` as root, or LimitNOFILE= in a \
             systemd unit) or use fewer sessions"
        )));
    }
    limit.rlim_cur = hard as libc::rlim_t;
    // SAFETY: setrlimit reads the struct we pass; raising the soft limit up
    // to the hard limit needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    tracing::info!(from = soft, to = hard, "raised the open-file soft limit");
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let stat = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 8 0 1000 123456 789 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(325));
        assert_eq!(cpu_ticks("garbage"), None);
        assert_eq!(ticks_to_duration(325, 100), Duration::from_millis(3250));
    }

    #[test]
    fn status_lines_are_read_in_kib() {
        let status = "Name:\tleasehold\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(status_kib(status, "VmHWM:"), Some(20480));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn this_process_can_be_measured() {
        let usage = Usage::of(None).unwrap();
        assert!(usage.rss_bytes > 0);
        assert!(usage.peak_rss_bytes >= usage.rss_bytes);
        let soft = ensure_open_files(16).unwrap();
        assert!(soft >= 16);
    }
}
