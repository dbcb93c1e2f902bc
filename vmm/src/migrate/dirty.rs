//! How tern asks KVM for dirty pages (docs/machine-kvm.md, "Dirty logging").
//!
//! `Get`: the classic `KVM_GET_DIRTY_LOG`, which write-protects every dirty page of the slot again
//! under KVM's mmu_lock in one call. `Clear` (default where KVM has it): with
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` the get only copies the bitmap, and the migration re-arms
//! pages with `KVM_CLEAR_DIRTY_LOG` a small chunk at a time, just before it reads them; with
//! `KVM_DIRTY_LOG_INITIALLY_SET` starting the log write-protects nothing either (every bit starts
//! set, and the first pass clears its chunks as it goes).

use std::os::fd::AsRawFd;
use std::sync::OnceLock;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET,
};
use kvm_ioctls::VmFd;

/// KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.
const MANUAL_PROTECT: u64 = 1;
/// _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log): kvm-ioctls has no wrapper for it.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xc018_aec0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// `KVM_GET_DIRTY_LOG` re-protects the whole slot.
    Get = 0,
    /// Manual protect: chunks are cleared before they are sent.
    Clear = 1,
    /// Manual protect, bitmap initially all set (starting the log protects nothing).
    ClearInitiallySet = 2,
}

impl DirtyLogMode {
    pub fn from_u8(v: u8) -> DirtyLogMode {
        match v {
            1 => DirtyLogMode::Clear,
            2 => DirtyLogMode::ClearInitiallySet,
            _ => DirtyLogMode::Get,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DirtyLogMode::Get => "get",
            DirtyLogMode::Clear => "clear",
            DirtyLogMode::ClearInitiallySet => "clear-initially-set",
        }
    }
}

/// What `TERN_DIRTY_LOG` asks for (`get`, `clear`, `clear-initially-set`; unset: the best KVM
/// has). Read once per process.
fn wanted() -> Option<DirtyLogMode> {
    static WANTED: OnceLock<Option<DirtyLogMode>> = OnceLock::new();
    *WANTED.get_or_init(|| match std::env::var("TERN_DIRTY_LOG").as_deref() {
        Ok("get") => Some(DirtyLogMode::Get),
        Ok("clear") => Some(DirtyLogMode::Clear),
        Ok("clear-initially-set") => Some(DirtyLogMode::ClearInitiallySet),
        Ok(other) if !other.is_empty() => {
            log::warn!("TERN_DIRTY_LOG={other} is not get|clear|clear-initially-set; ignored");
            None
        }
        _ => None,
    })
}

/// Picks the mode for this VM and enables it in KVM; must run before the slots get
/// `KVM_MEM_LOG_DIRTY_PAGES` (the initially-set bitmap is made then).
pub fn enable(vm_fd: &VmFd) -> DirtyLogMode {
    let offered = vm_fd.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
    let best = if offered & KVM_DIRTY_LOG_INITIALLY_SET as i32 != 0 {
        DirtyLogMode::ClearInitiallySet
    } else if offered & MANUAL_PROTECT as i32 != 0 {
        DirtyLogMode::Clear
    } else {
        DirtyLogMode::Get
    };
    let mode = match wanted() {
        Some(DirtyLogMode::Get) => DirtyLogMode::Get,
        Some(DirtyLogMode::Clear) if best != DirtyLogMode::Get => DirtyLogMode::Clear,
        _ => best,
    };
    let flags = match mode {
        DirtyLogMode::Get => 0,
        DirtyLogMode::Clear => MANUAL_PROTECT,
        DirtyLogMode::ClearInitiallySet => MANUAL_PROTECT | KVM_DIRTY_LOG_INITIALLY_SET as u64,
    };
    // Set every time (also to 0): a VM migrated before keeps the flags it had.
    if offered > 0 {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = flags;
        if let Err(e) = vm_fd.enable_cap(&cap) {
            log::warn!("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2): {e}; using KVM_GET_DIRTY_LOG");
            return DirtyLogMode::Get;
        }
    }
    log::info!("dirty log: {}", mode.name());
    mode
}

/// Re-arms the pages set in `bits` (bit i = page `first_page + i` of `slot`): KVM write-protects
/// them and clears their dirty bits, so a write from now on is logged again.
pub fn clear(
    vm_fd: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bits: &[u64],
) -> std::io::Result<()> {
    if bits.len() < (num_pages as usize).div_ceil(64) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "dirty bitmap shorter than the pages it clears",
        ));
    }
    let mut arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bits.as_ptr() as *mut libc::c_void;
    // SAFETY: `arg` points at `bits`, which holds at least num_pages bits and outlives the call;
    // KVM only reads the bitmap.
    let rc = unsafe { libc::ioctl(vm_fd.as_raw_fd(), KVM_CLEAR_DIRTY_LOG as _, &arg) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
