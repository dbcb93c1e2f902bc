//! Async page faults, the guest side of KVM's paravirtual protocol as Linux 6.x uses it (the
//! 2010 seed's sleeper logic, with today's interrupt-based page-ready), for one CPU (the BSP).
//!
//! Protocol: a 64-byte aligned data area `{ u32 flags; u32 token; u8 pad[56]; u32 enabled }`;
//! MSR_KVM_ASYNC_PF_INT = vector, then MSR_KVM_ASYNC_PF_EN = area | ENABLED | DELIVERY_AS_INT
//! (| DELIVERY_AS_PF_VMEXIT when offered). A CPL3 touch of a page the host does not have yet,
//! with IF = 1, arrives as #PF with `flags` = PAGE_NOT_PRESENT and CR2 = a token; later the
//! host writes the token into `token` and raises `vector` (PAGE_READY), which the guest answers
//! by clearing `token` and writing MSR_KVM_ASYNC_PF_ACK. Token ~0 wakes every waiter.
//!
//! The CPL0/CPL3 split (CPL0 code is emulated here and must stay tiny; see idt.rs):
//! - CPL0 (assembly, below): the #PF hook (`tern_apf_pf`, from `tern_isr_common`) accepts
//!   PAGE_NOT_PRESENT only from CPL3 on the BSP with an upcall armed, clears `flags` and queues
//!   (NOT_PRESENT, CR2); anything else goes on to the fatal `tern_fault`. The page-ready vector
//!   (`tern_apf_ready`) EOIs, takes and clears `token`, ACKs and queues (READY, token). Both
//!   leave the interrupted context where `tern_isr_common` pushed it (on the vector's IST stack)
//!   and, when it was CPL3, `iretq` into the upcall at CPL3 with IF = 0 on the upcall stack,
//!   passing that frame. A READY that interrupts CPL0 (the idle `hlt` of `sys::WAIT`) is only
//!   queued. `sys::APF_RESUME` loads a saved frame (forcing user selectors) and `iretq`s to it.
//! - CPL3: `tern_apf_upcall_entry` saves the FPU/SSE state (the upcall is compiled Rust), then
//!   calls the registered upcall, which copies the frame before anything else can reuse that
//!   IST stack (nothing can: IF = 0, and a #PF there is fatal). It drains the queue with
//!   [`take_events`] and resumes some context with [`resume`] (FPU state, then the frame, IF
//!   as the frame says). Events that arrive while IF = 0 stay pending in the LAPIC (READY) or
//!   are not generated (the host blocks the vCPU instead of a NOT_PRESENT), so none is lost;
//!   an overflowing queue is counted ([`lost`]).

use core::mem::offset_of;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::platform::*;
use super::{cpu, user};

pub const MSR_ASYNC_PF_EN: u32 = 0x4b56_4d02;
pub const MSR_ASYNC_PF_INT: u32 = 0x4b56_4d06;
pub const MSR_ASYNC_PF_ACK: u32 = 0x4b56_4d07;
const EN_ENABLED: u64 = 1 << 0;
const EN_DELIVERY_AS_PF_VMEXIT: u64 = 1 << 2;
const EN_DELIVERY_AS_INT: u64 = 1 << 3;

/// KVM's PV feature leaf and the bits that matter here.
pub const CPUID_KVM_FEATURES: u32 = 0x4000_0001;
pub const FEATURE_ASYNC_PF: u32 = 1 << 4;
pub const FEATURE_ASYNC_PF_VMEXIT: u32 = 1 << 10;
pub const FEATURE_ASYNC_PF_INT: u32 = 1 << 14;

/// `flags` value of a PAGE_NOT_PRESENT #PF (KVM_PV_REASON_PAGE_NOT_PRESENT); also the queue's
/// event kind, with PAGE_READY (2) for page-ready interrupts.
pub const REASON_PAGE_NOT_PRESENT: u32 = 1;
pub const REASON_PAGE_READY: u32 = 2;
/// A page-ready token that wakes every waiter.
pub const TOKEN_WAKE_ALL: u32 = !0;

const QUEUE_CAP: usize = 64;

/// `struct kvm_vcpu_pv_apf_data`.
#[repr(C, align(64))]
struct Area {
    flags: AtomicU32,
    token: AtomicU32,
    _pad: [u8; 56],
    enabled: AtomicU32,
}

static AREA: Area = Area {
    flags: AtomicU32::new(0),
    token: AtomicU32::new(0),
    _pad: [0; 56],
    enabled: AtomicU32::new(0),
};

/// Events the CPL0 handlers queued for the upcall: `kind << 32 | token`. `len` doubles as the
/// `sys::WAIT` flag; only the upcall (IF = 0) empties it.
#[repr(C)]
struct Queue {
    len: AtomicU64,
    lost: AtomicU64,
    events: [AtomicU64; QUEUE_CAP],
}

static QUEUE: Queue = Queue {
    len: AtomicU64::new(0),
    lost: AtomicU64::new(0),
    events: [const { AtomicU64::new(0) }; QUEUE_CAP],
};

/// The upcall's address (`UpcallFn`), 0 when no upcall is armed, and its stack's top.
static UPCALL: AtomicU64 = AtomicU64::new(0);
static UPCALL_STACK_TOP: AtomicU64 = AtomicU64::new(0);

/// FPU/SSE state (`fxsave64` image).
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct Fx(pub [u8; 512]);

/// The interrupted context's FPU state, saved by `tern_apf_upcall_entry`.
static mut UPCALL_FX: Fx = Fx([0; 512]);

/// An interrupted context as `tern_isr_common` lays it out (GPRs, vector, error, iret frame).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// A resumable CPL3 context: FPU/SSE state and registers.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct Context {
    pub fx: Fx,
    pub frame: Frame,
}

impl Context {
    pub const ZERO: Context = Context {
        fx: Fx([0; 512]),
        frame: Frame {
            r15: 0,
            r14: 0,
            r13: 0,
            r12: 0,
            r11: 0,
            r10: 0,
            r9: 0,
            r8: 0,
            rbp: 0,
            rdi: 0,
            rsi: 0,
            rdx: 0,
            rcx: 0,
            rbx: 0,
            rax: 0,
            vector: 0,
            error: 0,
            rip: 0,
            cs: USER_CS as u64,
            rflags: 0x3002,
            rsp: 0,
            ss: USER_DS as u64,
        },
    };
}

/// The upcall: runs at CPL3 with IF = 0 on its own stack, gets the interrupted frame and FPU
/// state (valid until it resumes anything), must end by resuming some context.
pub type UpcallFn = extern "C" fn(frame: *const Frame, fx: *const Fx) -> !;

pub enum Event {
    NotPresent(u32),
    Ready(u32),
}

const F: usize = offset_of!(Context, frame);

core::arch::global_asm!(
    r#"
    .section .text.tern_apf, "ax"
    .code64
# ---- CPL0 --------------------------------------------------------------------------------------
# #PF, frame at rsp (tern_isr_common). PAGE_NOT_PRESENT: from CPL3, on the BSP (its IST area),
# flags == 1 and an upcall armed; anything else is a real fault.
    .global tern_apf_pf
tern_apf_pf:
    testb $3, {o_cs}(%rsp)
    jz tern_fault
    leaq tern_ist_stacks + {bsp_ist}(%rip), %rcx
    cmpq %rcx, %rsp
    jae tern_fault
    leaq {area}(%rip), %rcx
    cmpl ${np}, (%rcx)
    jne tern_fault
    cmpq $0, {upcall}(%rip)
    je tern_fault
    movl $0, (%rcx)
    movq %cr2, %rax
    movl ${np}, %esi
    call tern_apf_push
    jmp tern_apf_enter_upcall

# The page-ready vector: EOI, take and clear the token, ACK (if enabled), queue; upcall if the
# CPU was at CPL3. On an AP (no area of its own) only the EOI.
    .global tern_apf_ready
tern_apf_ready:
    movl ${lapic_eoi}, %ecx
    movl $0, (%rcx)
    leaq tern_ist_stacks + {bsp_ist}(%rip), %rcx
    cmpq %rcx, %rsp
    jae tern_isr_return
    leaq {area}(%rip), %rdi
    movl 4(%rdi), %r8d
    movl $0, 4(%rdi)
    cmpl $0, {o_enabled}(%rdi)
    je 1f
    movl ${msr_ack}, %ecx
    movl $1, %eax
    xorl %edx, %edx
    wrmsr
1:
    movl %r8d, %eax
    movl ${ready}, %esi
    call tern_apf_push
    testb $3, {o_cs}(%rsp)
    jz tern_isr_return
    cmpq $0, {upcall}(%rip)
    je tern_isr_return
# iretq to tern_apf_upcall_entry (CPL3, IF = 0, upcall stack) with rdi = the interrupted frame.
tern_apf_enter_upcall:
    movq %rsp, %rdi
    pushq ${uds}
    pushq {stack_top}(%rip)
    pushq $0x3002
    pushq ${ucs}
    leaq tern_apf_upcall_entry(%rip), %rax
    pushq %rax
    iretq

# tern_apf_push: queue event (esi = kind, eax = token), or count it lost. Clobbers rcx, rdx.
tern_apf_push:
    leaq {queue}(%rip), %rdx
    movq (%rdx), %rcx
    cmpq ${cap}, %rcx
    jae 1f
    leaq 16(%rdx,%rcx,8), %rcx
    movl %eax, (%rcx)
    movl %esi, 4(%rcx)
    incq (%rdx)
    ret
1:
    incq 8(%rdx)
    ret

# sys::APF_RESUME (from tern_syscall): rdi = a Frame in user memory. It becomes the stack the
# common exit pops from; user selectors and sane flags (IOPL 3, IF as given) are forced.
    .global tern_apf_resume
tern_apf_resume:
    movq %rdi, %rsp
    movq ${ucs}, {o_cs}(%rsp)
    movq ${uds}, {o_ss}(%rsp)
    andq $0xed5, {o_rflags}(%rsp)
    orq $0x3002, {o_rflags}(%rsp)
    jmp tern_isr_return

# ---- CPL3 --------------------------------------------------------------------------------------
# rsp = top of the upcall stack (16-byte aligned), rdi = frame, IF = 0.
tern_apf_upcall_entry:
    fxsave64 {fx}(%rip)
    leaq {fx}(%rip), %rsi
    call *{upcall}(%rip)
    ud2

# tern_apf_capture(rdi = Context, rsi = f, rdx = arg): like setjmp, saves the callee-saved
# registers, FPU state and the return point (IF = 0), then calls f(arg) -> ! on this stack.
# Resuming the context returns from tern_apf_capture.
    .global tern_apf_capture
tern_apf_capture:
    fxsave64 (%rdi)
    movq %r15, {c_r15}(%rdi)
    movq %r14, {c_r14}(%rdi)
    movq %r13, {c_r13}(%rdi)
    movq %r12, {c_r12}(%rdi)
    movq %rbp, {c_rbp}(%rdi)
    movq %rbx, {c_rbx}(%rdi)
    movq (%rsp), %rax
    movq %rax, {c_rip}(%rdi)
    leaq 8(%rsp), %rax
    movq %rax, {c_rsp}(%rdi)
    movq $0x3002, {c_rflags}(%rdi)
    movq %rdx, %rdi
    subq $8, %rsp
    call *%rsi
    ud2

# tern_apf_resume_ctx(rdi = Context): restore its FPU state, then sys::APF_RESUME its frame.
    .global tern_apf_resume_ctx
tern_apf_resume_ctx:
    fxrstor64 (%rdi)
    addq ${c_frame}, %rdi
    movl ${sys_resume}, %eax
    int $0x80
    ud2
"#,
    o_cs = const offset_of!(Frame, cs),
    o_ss = const offset_of!(Frame, ss),
    o_rflags = const offset_of!(Frame, rflags),
    o_enabled = const offset_of!(Area, enabled),
    c_frame = const F,
    c_r15 = const F + offset_of!(Frame, r15),
    c_r14 = const F + offset_of!(Frame, r14),
    c_r13 = const F + offset_of!(Frame, r13),
    c_r12 = const F + offset_of!(Frame, r12),
    c_rbp = const F + offset_of!(Frame, rbp),
    c_rbx = const F + offset_of!(Frame, rbx),
    c_rip = const F + offset_of!(Frame, rip),
    c_rsp = const F + offset_of!(Frame, rsp),
    c_rflags = const F + offset_of!(Frame, rflags),
    bsp_ist = const 1usize << IST_AREA_SHIFT,
    np = const REASON_PAGE_NOT_PRESENT,
    ready = const REASON_PAGE_READY,
    msr_ack = const MSR_ASYNC_PF_ACK,
    lapic_eoi = const LAPIC_BASE + LAPIC_EOI,
    cap = const QUEUE_CAP,
    uds = const USER_DS,
    ucs = const USER_CS,
    sys_resume = const sys::APF_RESUME,
    area = sym AREA,
    queue = sym QUEUE,
    upcall = sym UPCALL,
    stack_top = sym UPCALL_STACK_TOP,
    fx = sym UPCALL_FX,
    options(att_syntax)
);

extern "C" {
    fn tern_apf_capture(ctx: *mut Context, f: extern "C" fn(u64) -> !, arg: u64);
    fn tern_apf_resume_ctx(ctx: *mut Context) -> !;
}

/// CPUID 0x40000001 EAX (KVM's PV features), 0 when the leaf is absent. Asked at CPL0.
pub fn features() -> u32 {
    if user::cpuid(0x4000_0000, 0).eax < CPUID_KVM_FEATURES {
        return 0;
    }
    user::cpuid(CPUID_KVM_FEATURES, 0).eax
}

/// Whether `features` (from [`features`]) offers interrupt-based async page faults.
pub fn offered(features: u32) -> bool {
    let need = FEATURE_ASYNC_PF | FEATURE_ASYNC_PF_INT;
    features & need == need
}

/// Enables async page faults on this CPU (the BSP) as Linux does: vector first, then the area.
pub fn enable(features: u32) {
    let mut en = &AREA as *const Area as u64 | EN_ENABLED | EN_DELIVERY_AS_INT;
    if features & FEATURE_ASYNC_PF_VMEXIT != 0 {
        en |= EN_DELIVERY_AS_PF_VMEXIT;
    }
    // SAFETY: KVM's PV MSRs, offered by CPUID (the caller checked `offered`); the area is a
    // 64-byte aligned static in the image (identity mapped), the vector has its IDT gate.
    unsafe {
        user::wrmsr(MSR_ASYNC_PF_INT, APF_VECTOR as u64);
        user::wrmsr(MSR_ASYNC_PF_EN, en);
    }
    AREA.enabled.store(1, Ordering::SeqCst);
}

pub fn disable() {
    // SAFETY: writing 0 turns async page faults off; the host stops using the area.
    unsafe { user::wrmsr(MSR_ASYNC_PF_EN, 0) };
    AREA.enabled.store(0, Ordering::SeqCst);
}

/// Arms `upcall` for async-PF events at CPL3, to run on the stack below `stack_top` (16-byte
/// aligned; used by nothing else). With none armed, a PAGE_NOT_PRESENT is fatal and a
/// page-ready is only queued.
pub fn arm(upcall: UpcallFn, stack_top: u64) {
    assert!(stack_top.is_multiple_of(16), "apf: misaligned upcall stack");
    UPCALL_STACK_TOP.store(stack_top, Ordering::SeqCst);
    UPCALL.store(upcall as usize as u64, Ordering::SeqCst);
}

pub fn disarm() {
    UPCALL.store(0, Ordering::SeqCst);
}

/// Hands every queued event to `f`, oldest first, and empties the queue. Call with IF = 0 (in
/// the upcall or a context that the upcall resumes with IF = 0).
pub fn take_events(mut f: impl FnMut(Event)) {
    let n = (QUEUE.len.load(Ordering::Acquire) as usize).min(QUEUE_CAP);
    for e in &QUEUE.events[..n] {
        let e = e.load(Ordering::Relaxed);
        let token = e as u32;
        f(if (e >> 32) as u32 == REASON_PAGE_NOT_PRESENT {
            Event::NotPresent(token)
        } else {
            Event::Ready(token)
        });
    }
    QUEUE.len.store(0, Ordering::Release);
}

/// Events dropped because the queue was full.
pub fn lost() -> u64 {
    QUEUE.lost.load(Ordering::Relaxed)
}

/// Halts with IF = 1 until an event is queued (returns at once if one is), then IF = 0 again.
pub fn wait_event() {
    user::wait(QUEUE.len.as_ptr());
}

/// Saves the calling context into `*ctx` and runs `f(arg)` on the current stack; returns when
/// something [`resume`]s `*ctx` (with IF = 0).
///
/// # Safety
/// `ctx` must stay valid until resumed; `f` must not return (it cannot) nor unwind.
pub unsafe fn capture(ctx: *mut Context, f: extern "C" fn(u64) -> !, arg: u64) {
    // SAFETY: forwarded; the asm follows the C ABI for its callee-saved registers.
    unsafe { tern_apf_capture(ctx, f, arg) }
}

/// Resumes a context: its FPU state, registers, RIP/RSP and IF (as in its rflags).
///
/// # Safety
/// `ctx` must hold a context captured by [`capture`], saved by an upcall, or built to start a
/// function at CPL3 on a valid stack.
pub unsafe fn resume(ctx: *mut Context) -> ! {
    // SAFETY: forwarded to the caller.
    unsafe { tern_apf_resume_ctx(ctx) }
}

/// Saves the current FPU/SSE state (a valid image to start a new context with).
pub fn fxsave(fx: &mut Fx) {
    // SAFETY: fxsave64 writes 512 bytes to a 16-byte aligned buffer (Fx's layout).
    unsafe {
        core::arch::asm!("fxsave64 [{}]", in(reg) fx.0.as_mut_ptr(), options(nostack, preserves_flags))
    };
}

/// Makes this CPU's next #PF look like a PAGE_NOT_PRESENT (selftests without a host event).
pub fn fake_not_present() {
    AREA.flags.store(REASON_PAGE_NOT_PRESENT, Ordering::SeqCst);
}

/// Raises a page-ready for `token` on this CPU as the host would: token, then the vector (a
/// self-IPI; it is taken at once when IF = 1).
pub fn send_ready(token: u32) {
    AREA.token.store(token, Ordering::SeqCst);
    cpu::lapic_write(LAPIC_ICR_LOW, 0x4_0000 | APF_VECTOR);
}
