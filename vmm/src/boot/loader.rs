//! Loads what the user asked to boot (ELF vmlinux, bzImage or the built-in guest), its command line
//! and initramfs into guest memory, and writes the boot tables.

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader, KernelLoaderResult};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::multiboot::{self, MultibootError};
use super::params::{write_boot_params, BootParamsInput};
use super::{mptable, regs};
use crate::config::KernelImage;
use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, INITRAMFS_MAX_END, MMIO_GAP_START,
};
use crate::memory::GuestMemory;

/// The built-in test guest, built by build.rs from `guest-tests/guest`.
pub static BUILTIN_GUEST: &[u8] = include_bytes!(env!("TERN_GUEST_ELF"));

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a kernel tern can boot (expected an ELF64 vmlinux, a bzImage or a multiboot image)")]
    NotAKernel { path: PathBuf },
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("cannot boot multiboot kernel {path}: {source}")]
    Multiboot {
        path: PathBuf,
        source: MultibootError,
    },
    #[error("cannot read initramfs {path}: {source}")]
    ReadInitramfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "initramfs of {size} bytes does not fit in guest RAM below {limit:#x} after the kernel"
    )]
    InitramfsTooLarge { size: u64, limit: u64 },
    #[error("cannot read the kernel's program headers: {0}")]
    ReadProgramHeaders(std::io::Error),
    #[error("a kernel segment's zero-filled part {start:#x}+{len:#x} is outside guest RAM")]
    BssOutsideRam { start: u64, len: u64 },
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("cannot write the command line: {0}")]
    WriteCmdline(linux_loader::loader::Error),
    #[error("cannot write boot tables into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// How the boot vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// 64-bit long mode at this RIP, RSI = boot_params (Linux, the built-in guest).
    Long64 { rip: u64 },
    /// Multiboot v1: 32-bit protected mode, paging off, EAX = 0x2BADB002, EBX = info.
    Multiboot32 { eip: u32, info: u32 },
}

/// Where the guest starts.
pub struct LoadedGuest {
    pub entry: EntryState,
}

enum Format {
    Elf,
    BzImage,
}

fn detect(image: &mut (impl Read + Seek)) -> std::io::Result<Option<Format>> {
    let mut head = [0u8; 0x206];
    image.seek(SeekFrom::Start(0))?;
    let n = image.read(&mut head)?;
    image.seek(SeekFrom::Start(0))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Some(Format::Elf));
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(Some(Format::BzImage));
    }
    Ok(None)
}

/// Reads a kernel's first 8 KiB and says whether it is a multiboot image. A multiboot magic with
/// a bad checksum is an error unless the file is plainly a Linux kernel (ELF64 or bzImage), where
/// the magic may appear by chance.
fn probe_multiboot(path: &Path) -> Result<bool, BootError> {
    let open_err = |source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    };
    let mut head = Vec::with_capacity(multiboot::SEARCH_LEN);
    File::open(path)
        .and_then(|f| f.take(multiboot::SEARCH_LEN as u64).read_to_end(&mut head))
        .map_err(open_err)?;
    match multiboot::find_header(&head) {
        Ok(found) => Ok(found.is_some()),
        Err(_) if is_linux_kernel(&head) => Ok(false),
        Err(source) => Err(BootError::Multiboot {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn is_linux_kernel(head: &[u8]) -> bool {
    let elf64 = head.len() > 4 && head[..4] == *b"\x7fELF" && head[4] == 2;
    let bzimage = head.get(0x202..0x206) == Some(b"HdrS".as_slice());
    elf64 || bzimage
}

/// Whether `path` is a multiboot kernel (the command line then defaults to empty, not Linux's).
pub fn is_multiboot(path: &Path) -> bool {
    !path.is_dir() && matches!(probe_multiboot(path), Ok(true))
}

/// Loads a multiboot kernel with `initramfs` as module 0; the command line starts with the
/// kernel's path, as GRUB and QEMU pass it.
fn load_multiboot(
    mem: &GuestMemory,
    path: &Path,
    cmdline: &str,
    initramfs: Option<&Path>,
    mem_size: u64,
    vcpus: u8,
) -> Result<LoadedGuest, BootError> {
    let image = std::fs::read(path).map_err(|source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })?;
    let module = initramfs
        .map(|p| {
            std::fs::read(p)
                .map(|data| (data, p.display().to_string()))
                .map_err(|source| BootError::ReadInitramfs {
                    path: p.to_path_buf(),
                    source,
                })
        })
        .transpose()?;
    let full_cmdline = match cmdline {
        "" => path.display().to_string(),
        c => format!("{} {c}", path.display()),
    };
    // The GDT the entry's segments come from and the MP table, before the image: its
    // segments win if they overlap.
    regs::write_protected_mode_gdt(mem)?;
    mptable::write(mem, vcpus)?;
    let loaded = multiboot::load(
        mem,
        &image,
        &full_cmdline,
        module.as_ref().map(|(d, n)| (d.as_slice(), n.as_str())),
        mem_size,
    )
    .map_err(|source| BootError::Multiboot {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(LoadedGuest {
        entry: EntryState::Multiboot32 {
            eip: loaded.entry,
            info: loaded.info,
        },
    })
}

pub(super) fn load_kernel(
    mem: &GuestMemory,
    kernel: &KernelImage,
) -> Result<KernelLoaderResult, BootError> {
    let highmem = Some(GuestAddress(HIMEM_START));
    match kernel {
        KernelImage::Builtin => {
            let mut image = Cursor::new(BUILTIN_GUEST);
            let loaded = Elf::load(mem, None, &mut image, highmem).map_err(|source| {
                BootError::LoadKernel {
                    path: "<built-in guest>".into(),
                    source,
                }
            })?;
            super::bss::zero_elf_bss(mem, &mut image)?;
            Ok(loaded)
        }
        KernelImage::Path(path) => {
            let open_err = |source| BootError::OpenKernel {
                path: path.clone(),
                source,
            };
            let mut file = File::open(path).map_err(open_err)?;
            if file.metadata().map_err(open_err)?.is_dir() {
                return Err(BootError::NotAKernel { path: path.clone() });
            }
            let load_err = |source| BootError::LoadKernel {
                path: path.clone(),
                source,
            };
            match detect(&mut file).map_err(open_err)? {
                Some(Format::Elf) => {
                    let loaded = Elf::load(mem, None, &mut file, highmem).map_err(load_err)?;
                    super::bss::zero_elf_bss(mem, &mut file)?;
                    Ok(loaded)
                }
                Some(Format::BzImage) => {
                    BzImage::load(mem, None, &mut file, highmem).map_err(load_err)
                }
                None => Err(BootError::NotAKernel { path: path.clone() }),
            }
        }
    }
}

fn load_initramfs(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    mem_size: u64,
) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::ReadInitramfs {
        path: path.to_path_buf(),
        source,
    })?;
    let size = data.len() as u64;
    let limit = INITRAMFS_MAX_END.min(mem_size).min(MMIO_GAP_START);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitramfsTooLarge { size, limit })?;
    mem.write_slice(&data, GuestAddress(addr))?;
    Ok((addr, size))
}

/// Loads kernel, command line and initramfs, writes boot params, MP table and page tables.
pub fn load_guest(
    mem: &GuestMemory,
    kernel: &KernelImage,
    cmdline: &str,
    initramfs: Option<&Path>,
    mem_size: u64,
    vcpus: u8,
) -> Result<LoadedGuest, BootError> {
    if let KernelImage::Path(path) = kernel {
        if !path.is_dir() && probe_multiboot(path)? {
            return load_multiboot(mem, path, cmdline, initramfs, mem_size, vcpus);
        }
    }
    // The command line is checked first: it is the cheapest input to get wrong.
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE)?;
    cl.insert_str(cmdline)?;
    let loaded = load_kernel(mem, kernel)?;
    // bzImage: the 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
    let entry = match loaded.setup_header {
        Some(_) => loaded.kernel_load.0 + 0x200,
        None => loaded.kernel_load.0,
    };
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(BootError::WriteCmdline)?;
    let initramfs = initramfs
        .map(|p| load_initramfs(mem, p, loaded.kernel_end, mem_size))
        .transpose()?;
    write_boot_params(
        mem,
        &BootParamsInput {
            setup_header: loaded.setup_header,
            cmdline_len: cmdline.len() + 1,
            initramfs,
            mem_size,
        },
    )?;
    mptable::write(mem, vcpus)?;
    regs::write_boot_tables(mem)?;
    Ok(LoadedGuest {
        entry: EntryState::Long64 { rip: entry },
    })
}
