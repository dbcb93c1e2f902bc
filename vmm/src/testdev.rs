//! The VMM's side of the pc-testdev (`devices::legacy::TestDevHost`): IRQ lines through
//! KVM_IRQ_LINE, page flushes through mprotect (one that never takes access away).

use std::sync::Arc;

use devices::legacy::TestDevHost;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend as _};

use crate::memory::GuestMemory;

const PAGE: u64 = 4096;

pub struct KvmTestDev {
    vm_fd: Arc<VmFd>,
    mem: GuestMemory,
}

impl KvmTestDev {
    pub fn new(vm_fd: Arc<VmFd>, mem: GuestMemory) -> Self {
        KvmTestDev { vm_fd, mem }
    }
}

impl TestDevHost for KvmTestDev {
    fn set_irq_line(&self, line: u32, high: bool) {
        if let Err(e) = self.vm_fd.set_irq_line(line, high) {
            log::warn!("testdev: KVM_IRQ_LINE {line} = {high}: {e}");
        }
    }

    fn flush_page(&self, gpa: u64) {
        let page = GuestAddress(gpa & !(PAGE - 1));
        let Ok(host) = self.mem.get_host_address(page) else {
            log::debug!("testdev: flush of {gpa:#x}, outside guest RAM");
            return;
        };
        // Changing the page's protection runs the kernel's MMU notifiers, which drop KVM's
        // mapping of it; the guest's next access faults into KVM and maps it again. QEMU takes
        // all access away (PROT_NONE) for the moment, which makes any other thread that copies
        // the page meanwhile (a migration's sender, a device) die of SIGSEGV: here the page
        // only gains PROT_EXEC and loses it again, so no access anyone makes ever faults.
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        for prot in [rw | libc::PROT_EXEC, rw] {
            // SAFETY: `host` is the page-aligned start of a page inside tern's guest RAM mapping,
            // which lives as long as `self.mem`; only its protection changes, never its contents,
            // and it always stays readable and writable.
            let rc = unsafe { libc::mprotect(host.cast(), PAGE as usize, prot) };
            if rc != 0 {
                log::warn!(
                    "testdev: mprotect of {gpa:#x}: {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
        }
    }
}
