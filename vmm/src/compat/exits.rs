//! Per-vCPU exit counters by reason, logged when the vCPU thread ends (`--log-level info`), so
//! the cost of this machine's workarounds can be measured (tern-bench `linux`). Counting is a
//! plain array increment on the vCPU's own thread.

use kvm_ioctls::VcpuExit;

use super::syscall::{PAGE_FAULTS, SYSCALLS};

const NAMES: [&str; 9] = [
    "io", "mmio", "debug", "internal", "intr", "hlt", "msr", "errno", "other",
];

#[derive(Debug, Default)]
pub struct ExitCounts {
    counts: [u64; NAMES.len()],
    started: Option<std::time::Instant>,
}

impl ExitCounts {
    /// Counts one KVM_RUN return.
    pub fn record<E>(&mut self, exit: &Result<VcpuExit<'_>, E>) {
        self.started.get_or_insert_with(std::time::Instant::now);
        let i = match exit {
            Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => 0,
            Ok(VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)) => 1,
            Ok(VcpuExit::Debug(_)) => 2,
            Ok(VcpuExit::InternalError) => 3,
            Ok(VcpuExit::Intr) => 4,
            Ok(VcpuExit::Hlt) => 5,
            Ok(VcpuExit::X86Rdmsr(_) | VcpuExit::X86Wrmsr(_)) => 6,
            Err(_) => 7,
            Ok(_) => 8,
        };
        self.counts[i] += 1;
    }

    /// One line: `vcpu N exits: total=T per_s=R io=.. ...` plus, on vCPU 0, the process-wide
    /// syscall/page-fault completions of the SYSCALL assist.
    pub fn summary(&self, id: u8) -> String {
        let total: u64 = self.counts.iter().sum();
        let secs = self
            .started
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        let rate = if secs > 0.0 { total as f64 / secs } else { 0.0 };
        let mut line = format!("vcpu {id} exits: total={total} per_s={rate:.0}");
        for (name, n) in NAMES.iter().zip(self.counts) {
            line.push_str(&format!(" {name}={n}"));
        }
        if id == 0 {
            line.push_str(&format!(
                " | syscall assist (all vCPUs): syscalls={} page_faults={}",
                SYSCALLS.load(std::sync::atomic::Ordering::Relaxed),
                PAGE_FAULTS.load(std::sync::atomic::Ordering::Relaxed)
            ));
        }
        line
    }
}
