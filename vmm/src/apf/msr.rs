//! The async-PF MSRs as tern validates them in `tern` mode (mirroring KVM's checks).

/// MSR numbers of KVM's async page fault protocol.
pub const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
pub const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
pub const MSR_KVM_ASYNC_PF_ACK: u32 = 0x4b56_4d07;

/// The MSRs tern owns in tern mode (ACK has no state).
pub fn is_async_pf_msr(index: u32) -> bool {
    matches!(index, MSR_KVM_ASYNC_PF_EN | MSR_KVM_ASYNC_PF_INT)
}

pub const EN_ENABLED: u64 = 1 << 0;
pub const EN_DELIVERY_AS_INT: u64 = 1 << 3;
/// Bits 4 and 5 are reserved: a value with them set names a misaligned area.
const EN_RESERVED: u64 = 0x30;
/// The area is 64-byte aligned: the low 6 bits carry flags.
pub const AREA_MASK: u64 = !0x3f;

/// Why a guest MSR write gets #GP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Bits 4:5 set (the area address is not 64-byte aligned).
    Reserved,
    /// Enabling without interrupt delivery (tern, like KVM today, only delivers PAGE_READY as an
    /// interrupt).
    NoDeliveryAsInt,
    /// Enabling before the vector was written to MSR_KVM_ASYNC_PF_INT.
    NoVector,
    /// The 64-byte area is not in guest RAM.
    AreaNotInRam,
    /// MSR_KVM_ASYNC_PF_INT above 0xff.
    BadVector,
}

/// Checks a write of `data` to MSR_KVM_ASYNC_PF_EN given the current vector.
pub fn check_enable(
    data: u64,
    vector: u64,
    area_in_ram: impl Fn(u64) -> bool,
) -> Result<(), Refused> {
    if data & EN_RESERVED != 0 {
        return Err(Refused::Reserved);
    }
    if data & EN_ENABLED == 0 {
        return Ok(());
    }
    if data & EN_DELIVERY_AS_INT == 0 {
        return Err(Refused::NoDeliveryAsInt);
    }
    if vector == 0 {
        return Err(Refused::NoVector);
    }
    if !area_in_ram(data & AREA_MASK) {
        return Err(Refused::AreaNotInRam);
    }
    Ok(())
}

pub fn check_vector(data: u64) -> Result<(), Refused> {
    if data & !0xff != 0 {
        return Err(Refused::BadVector);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enable_checks_follow_kvm() {
        let ram = |gpa: u64| gpa < 0x100_0000;
        let en = 0x20_0000 | EN_ENABLED | 4 | EN_DELIVERY_AS_INT;
        assert_eq!(check_enable(en, 0xf3, ram), Ok(()));
        assert_eq!(check_enable(en | 0x10, 0xf3, ram), Err(Refused::Reserved));
        assert_eq!(check_enable(en, 0, ram), Err(Refused::NoVector));
        assert_eq!(
            check_enable(en & !EN_DELIVERY_AS_INT, 0xf3, ram),
            Err(Refused::NoDeliveryAsInt)
        );
        assert_eq!(
            check_enable(0x4000_0000 | 0xd, 0xf3, ram),
            Err(Refused::AreaNotInRam)
        );
        assert_eq!(check_enable(0, 0, ram), Ok(()));
        assert_eq!(check_vector(0x1f3), Err(Refused::BadVector));
        assert_eq!(check_vector(0xf3), Ok(()));
    }
}
