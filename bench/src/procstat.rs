//! CPU seconds and peak memory of the processes sharing the machine, read
//! from `/proc`: the relay, PostgreSQL, RabbitMQ and the bench itself.

use anyhow::Context as _;

/// CPU seconds (user + system) and peak RSS (KiB) of a process, from /proc.
pub(crate) fn process_usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    let times = CpuTimes::read(pid).with_context(|| format!("no process {pid}"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Ok((times.own, hwm))
}

/// A process's name and CPU seconds, from `/proc/<pid>/stat`.
struct CpuTimes {
    comm: String,
    /// User and system time of the process itself.
    own: f64,
    /// User and system time of its exited, reaped children.
    children: f64,
}

impl CpuTimes {
    fn read(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        let fields: Vec<f64> = stat[close + 1..]
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        // utime, stime, cutime, cstime are fields 14-17 of stat, 11-14
        // after the name; CLK_TCK is 100 on Linux.
        Some(Self {
            comm: stat[open + 1..close].to_owned(),
            own: (fields.get(11)? + fields.get(12)?) / 100.0,
            children: (fields.get(13)? + fields.get(14)?) / 100.0,
        })
    }
}

/// CPU seconds the processes sharing the machine have used so far, by role.
/// Subtracting two readings gives what a scenario cost each of them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuSplit {
    pub(crate) postgres: f64,
    pub(crate) rabbitmq: f64,
    /// This process: the consumer, and the publisher in the bare runs.
    pub(crate) bench: f64,
    pub(crate) relay: f64,
}

impl CpuSplit {
    /// Reads /proc. PostgreSQL's and RabbitMQ's exited children count through
    /// their parents' `cutime`; the relay and this process count alone.
    pub(crate) fn read(relay: Option<u32>) -> Self {
        let mut split = Self::default();
        let me = std::process::id();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return split;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(t) = CpuTimes::read(pid) else {
                continue;
            };
            if pid == me {
                split.bench += t.own;
            } else if Some(pid) == relay {
                split.relay += t.own;
            } else if t.comm == "postgres" {
                split.postgres += t.own + t.children;
            } else if t.comm == "beam.smp" {
                split.rabbitmq += t.own + t.children;
            }
        }
        split
    }

    /// What was used between `before` and `self`, per 10 000 of `n` messages.
    pub(crate) fn per_10k_since(&self, before: &Self, n: usize) -> Self {
        let scale = 10_000.0 / n as f64;
        Self {
            postgres: (self.postgres - before.postgres) * scale,
            rabbitmq: (self.rabbitmq - before.rabbitmq) * scale,
            bench: (self.bench - before.bench) * scale,
            relay: (self.relay - before.relay) * scale,
        }
    }

    pub(crate) fn total(&self) -> f64 {
        self.postgres + self.rabbitmq + self.bench + self.relay
    }
}

impl std::fmt::Display for CpuSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPU s per 10k messages: relay {:.2}, PostgreSQL {:.2}, RabbitMQ {:.2}, bench {:.2}, total {:.2}",
            self.relay,
            self.postgres,
            self.rabbitmq,
            self.bench,
            self.total()
        )
    }
}
