//! tern's side of the migration seam: `VmInner` as a [`MigratableVm`], and the control flows that
//! start outgoing and incoming migrations.

pub mod convert;
pub mod device_set;
pub mod dirty;
pub mod flows;
pub mod recovery;
pub mod restore;

use std::sync::atomic::Ordering;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use migration::state::{ClockState, VmState};
use migration::{
    DirtyBitmap, MigratableVm, RamRegion, VmConfigRecord, VmResult, VmSideError, PAGE_SIZE,
};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::vm::{register_memory, VmInner};
use convert::*;

const MADV_POPULATE_WRITE: libc::c_int = 23;

fn side<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> VmSideError + '_ {
    move |e| VmSideError(format!("{what}: {e}"))
}

/// The bitmap of writes tern made through vm-memory to this region.
fn host_bitmap(r: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let mapping: &vm_memory::MmapRegion<AtomicBitmap> = r;
    mapping.bitmap()
}

impl VmInner {
    fn irqchip(&self, chip_id: u32) -> VmResult<kvm_irqchip> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.vm_fd
            .get_irqchip(&mut chip)
            .map_err(side("KVM_GET_IRQCHIP"))?;
        Ok(chip)
    }
}

impl VmInner {
    /// Whether some guest pages are still being placed from elsewhere (lazy memory, a lazy
    /// restore whose background pass has not finished): such a page is missing, not zero.
    pub fn placing_lazily(&self) -> bool {
        if self.lazy.is_some() {
            return true;
        }
        devices::bus::lock(&self.restore_lazy)
            .as_ref()
            .is_some_and(|l| !l.background_done())
    }

    /// Pages `first..first + count` of `region` that may hold data; the rest are zero. While
    /// pages are placed lazily, all of them: reading a missing one waits for the fault thread to
    /// place it, so a pass or snapshot sees every page's real contents (and a page placed later
    /// is one it read already).
    fn pages_with_data(
        &self,
        region: &RamRegion,
        first: usize,
        count: usize,
    ) -> VmResult<DirtyBitmap> {
        let in_region = first
            .checked_add(count)
            .is_some_and(|end| end <= region.pages());
        if !in_region {
            return Err(VmSideError(format!(
                "pages {first}+{count} are outside the region at {:#x}",
                region.gpa
            )));
        }
        if self.placing_lazily() {
            return Ok(DirtyBitmap::full(count));
        }
        let r = self
            .mem
            .find_region(GuestAddress(region.gpa))
            .ok_or_else(|| VmSideError(format!("no RAM region at {:#x}", region.gpa)))?;
        if let Some(f) = r.file_offset() {
            use std::os::fd::AsFd;
            let first_in_file = (f.start() as usize) / PAGE_SIZE + first;
            return crate::pagemap::memfd_with_data(f.file().as_fd(), first_in_file, count)
                .map_err(side("reading guest RAM's data extents"));
        }
        match &self.pagemap {
            Some(pm) => pm
                .with_data(r.as_ptr() as usize + first * PAGE_SIZE, count)
                .map_err(side("reading /proc/self/pagemap")),
            // Without a page table to read, every page may hold data.
            None => Ok(DirtyBitmap::full(count)),
        }
    }

    /// Each slot's dirty pages: KVM's log merged with tern's own writes.
    fn fetch_dirty_slots(&self) -> VmResult<Vec<DirtyBitmap>> {
        let mut out = Vec::new();
        for (slot, r) in self.mem.iter().enumerate() {
            let pages = (r.len() as usize) / PAGE_SIZE;
            let kvm = self
                .vm_fd
                .get_dirty_log(slot as u32, r.len() as usize)
                .map_err(side("KVM_GET_DIRTY_LOG"))?;
            let mut map = DirtyBitmap::from_words(kvm, pages);
            // Pages tern itself wrote (devices, the compat module) are not in KVM's log.
            map.merge(&DirtyBitmap::from_words(
                host_bitmap(r).get_and_reset(),
                pages,
            ));
            out.push(map);
        }
        Ok(out)
    }

    /// The vCPU threads' kernel thread ids (0 for a thread not started yet).
    pub fn vcpu_thread_ids(&self) -> Vec<u32> {
        devices::bus::lock(&self.vcpu_tids).clone()
    }
}

impl migration::destination::DestinationVm for VmInner {
    fn status(&self) -> migration::progress::StatusCell {
        self.migration.clone()
    }

    fn vcpu_thread_ids(&self) -> Vec<u32> {
        VmInner::vcpu_thread_ids(self)
    }

    fn park_postcopy(&self, listener: migration::postcopy::Listener) {
        *devices::bus::lock(&self.postcopy_paused) = Some(listener);
    }

    fn take_parked(&self) -> Option<migration::postcopy::Listener> {
        devices::bus::lock(&self.postcopy_paused).take()
    }
}

impl MigratableVm for VmInner {
    fn host_address(&self, gpa: u64) -> Option<u64> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .ok()
            .map(|p| p as u64)
    }

    fn fault_observer(&self) -> Option<std::sync::Arc<dyn migration::FaultObserver>> {
        self.apf
            .clone()
            .map(|a| a as std::sync::Arc<dyn migration::FaultObserver>)
    }

    fn config(&self) -> VmConfigRecord {
        self.record.clone()
    }

    fn ram_regions(&self) -> Vec<RamRegion> {
        self.mem
            .iter()
            .map(|r| RamRegion {
                gpa: r.start_addr().0,
                len: r.len(),
            })
            .collect()
    }

    fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> VmResult<()> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(side("reading guest RAM"))
    }

    fn write_ram(&self, gpa: u64, data: &[u8]) -> VmResult<()> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(side("writing guest RAM"))
    }

    fn prepare_ram(&self, gpa: u64, len: u64) {
        let Some(r) = self.mem.find_region(GuestAddress(gpa)) else {
            return;
        };
        let offset = gpa - r.start_addr().0;
        if offset.checked_add(len).is_none_or(|end| end > r.len()) {
            return;
        }
        // SAFETY: the range lies inside one live guest mapping; populating changes no contents.
        let rc = unsafe {
            libc::madvise(
                r.as_ptr().add(offset as usize).cast(),
                len as usize,
                MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            log::debug!("MADV_POPULATE_WRITE: {}", std::io::Error::last_os_error());
        }
    }

    fn populated_pages(&self, region: &RamRegion) -> VmResult<DirtyBitmap> {
        self.pages_with_data(region, 0, region.pages())
    }

    fn populated_pages_in(
        &self,
        region: &RamRegion,
        first: usize,
        count: usize,
    ) -> VmResult<DirtyBitmap> {
        self.pages_with_data(region, first, count)
    }

    fn rearm_dirty(&self, region: usize, first: usize, count: usize, bits: &[u64]) -> VmResult<()> {
        if dirty::DirtyLogMode::from_u8(self.dirty_mode.load(Ordering::SeqCst))
            == dirty::DirtyLogMode::Get
        {
            return Ok(());
        }
        let count = u32::try_from(count).map_err(side("KVM_CLEAR_DIRTY_LOG"))?;
        dirty::clear(&self.vm_fd, region as u32, first as u64, count, bits)
            .map_err(side("KVM_CLEAR_DIRTY_LOG"))
    }

    fn start_dirty_log(&self) -> VmResult<()> {
        let mode = dirty::enable(&self.vm_fd);
        self.dirty_mode.store(mode as u8, Ordering::SeqCst);
        register_memory(&self.vm_fd, &self.mem, true).map_err(side("starting dirty logging"))?;
        for r in self.mem.iter() {
            host_bitmap(r).reset();
        }
        self.dirty_logging.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn stop_dirty_log(&self) -> VmResult<()> {
        if self.dirty_logging.swap(false, Ordering::SeqCst) {
            register_memory(&self.vm_fd, &self.mem, false)
                .map_err(side("stopping dirty logging"))?;
        }
        Ok(())
    }

    fn fetch_dirty(&self) -> VmResult<Vec<DirtyBitmap>> {
        let t0 = std::time::Instant::now();
        let out = self.fetch_dirty_slots()?;
        log::debug!(
            "dirty log: fetched {} pages in {:.3} ms",
            out.iter().map(|d| d.count()).sum::<usize>(),
            t0.elapsed().as_secs_f64() * 1e3
        );
        Ok(out)
    }

    fn pause(&self) -> VmResult<()> {
        if self.paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        for v in &self.vcpus {
            v.pause().map_err(side("pausing"))?;
        }
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn resume(&self) -> VmResult<()> {
        if !self.paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        for v in &self.vcpus {
            v.resume().map_err(side("resuming"))?;
        }
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn save_state(&self) -> VmResult<VmState> {
        let mut vcpus = Vec::new();
        for v in &self.vcpus {
            let mut s = v.save().map_err(|e| VmSideError(e.to_string()))?;
            if let Some(apf) = &self.apf {
                // tern owns these MSRs: KVM's copy is the disabled one.
                for (index, value) in apf.saved_msrs(s.id).unwrap_or_default() {
                    s.msrs.retain(|(i, _)| *i != index);
                    s.msrs.push((index, value));
                }
                s.msrs = crate::cpu::state::restore_order(std::mem::take(&mut s.msrs));
            }
            vcpus.push(s);
        }
        let clock = self.vm_fd.get_clock().map_err(side("KVM_GET_CLOCK"))?;
        let master = self.irqchip(KVM_IRQCHIP_PIC_MASTER)?;
        let slave = self.irqchip(KVM_IRQCHIP_PIC_SLAVE)?;
        let ioapic = self.irqchip(KVM_IRQCHIP_IOAPIC)?;
        let pit = self.vm_fd.get_pit2().map_err(side("KVM_GET_PIT2"))?;
        // SAFETY: (all three) each union member read matches the chip_id KVM filled in.
        let (pic_master, pic_slave, ioapic) = unsafe {
            (
                pic_to(&master.chip.pic),
                pic_to(&slave.chip.pic),
                ioapic_to(&ioapic.chip.ioapic),
            )
        };
        Ok(VmState {
            vcpus,
            clock: ClockState {
                clock_ns: clock.clock,
                flags: clock.flags,
            },
            pic_master,
            pic_slave,
            ioapic,
            pit: pit_to(&pit),
            devices: self.devices.save()?,
        })
    }

    fn restore_state(&self, state: VmState) -> VmResult<()> {
        // Device records are applied or refused (before anything is restored), never kept.
        self.devices.check(&state.devices)?;
        if state.vcpus.len() != self.vcpus.len() {
            return Err(VmSideError(format!(
                "the stream has {} vCPU states for {} vCPUs",
                state.vcpus.len(),
                self.vcpus.len()
            )));
        }
        let clock = kvm_clock_data {
            clock: state.clock.clock_ns,
            ..Default::default()
        };
        self.vm_fd
            .set_clock(&clock)
            .map_err(side("KVM_SET_CLOCK"))?;
        let mut chip = self.irqchip(KVM_IRQCHIP_PIC_MASTER)?;
        chip.chip.pic = pic_from(&state.pic_master);
        self.vm_fd
            .set_irqchip(&chip)
            .map_err(side("KVM_SET_IRQCHIP"))?;
        let mut chip = self.irqchip(KVM_IRQCHIP_PIC_SLAVE)?;
        chip.chip.pic = pic_from(&state.pic_slave);
        self.vm_fd
            .set_irqchip(&chip)
            .map_err(side("KVM_SET_IRQCHIP"))?;
        let mut chip = self.irqchip(KVM_IRQCHIP_IOAPIC)?;
        chip.chip.ioapic = ioapic_from(&state.ioapic);
        self.vm_fd
            .set_irqchip(&chip)
            .map_err(side("KVM_SET_IRQCHIP"))?;
        self.vm_fd
            .set_pit2(&pit_from(&state.pit))
            .map_err(side("KVM_SET_PIT2"))?;
        for (v, mut s) in self.vcpus.iter().zip(state.vcpus) {
            if self.async_pf == crate::apf::AsyncPfMode::Off {
                // This side does no async PF: a guest that enabled it elsewhere keeps running
                // with synchronous faults (KVM never sees it enabled here).
                s.msrs
                    .retain(|(i, _)| !crate::apf::msr::is_async_pf_msr(*i));
            }
            let Some(apf) = &self.apf else {
                v.restore(s).map_err(|e| VmSideError(e.to_string()))?;
                continue;
            };
            // tern mode: the async-PF MSRs go to tern's controller, not to KVM (whose own async
            // PF must stay off). After the LAPIC is restored: enabling may send a PAGE_READY.
            let (id, apf_msrs): (u8, Vec<(u32, u64)>) = (
                s.id,
                s.msrs
                    .iter()
                    .copied()
                    .filter(|(i, _)| crate::apf::msr::is_async_pf_msr(*i))
                    .collect(),
            );
            s.msrs
                .retain(|(i, _)| !crate::apf::msr::is_async_pf_msr(*i));
            v.restore(s).map_err(|e| VmSideError(e.to_string()))?;
            apf.restore_msrs(id, &apf_msrs)
                .map_err(|e| VmSideError(e.to_string()))?;
        }
        self.devices.restore(&state.devices)
    }

    fn inhibit_discards(&self, on: bool) -> u64 {
        self.balloon
            .as_ref()
            .map_or(0, |b| crate::balloon::inhibit_discards(b, on))
    }

    fn shared_memory_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        crate::memory::shared_fds(&self.mem)
    }
}
