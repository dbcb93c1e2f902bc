use super::*;

const RAM: [(u64, u64); 1] = [(0, 64 << 20)];

fn header(flags: u32) -> Vec<u8> {
    let sum = 0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags));
    [HEADER_MAGIC, flags, sum]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// An ELF32 i386 image: one PT_LOAD of `code` at `paddr` with `bss` more bytes, the multiboot
/// header right after the program header (as kvm-unit-tests' `.init` section puts it early).
fn elf32(paddr: u32, code: &[u8], bss: u32) -> Vec<u8> {
    let mut img = vec![0u8; 0x100];
    img[..4].copy_from_slice(b"\x7fELF");
    img[4] = 1; // ELFCLASS32
    img[5] = 1; // little endian
    img[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    img[18..20].copy_from_slice(&EM_386.to_le_bytes());
    img[24..28].copy_from_slice(&paddr.to_le_bytes()); // e_entry
    img[28..32].copy_from_slice(&52u32.to_le_bytes()); // e_phoff
    img[42..44].copy_from_slice(&32u16.to_le_bytes());
    img[44..46].copy_from_slice(&1u16.to_le_bytes());
    let ph = [
        PT_LOAD,
        0x100,
        paddr,
        paddr,
        code.len() as u32,
        code.len() as u32 + bss,
    ];
    for (i, w) in ph.iter().enumerate() {
        img[52 + 4 * i..56 + 4 * i].copy_from_slice(&w.to_le_bytes());
    }
    img[0x80..0x8c].copy_from_slice(&header(0));
    img.extend_from_slice(code);
    img
}

#[test]
fn loads_an_elf32_image_by_its_program_headers() {
    let img = elf32(0x40_0000, &[0x90; 16], 0x1000);
    let parsed = parse(&img, &RAM).expect("valid image");
    assert_eq!(parsed.entry, 0x40_0000);
    assert_eq!(
        parsed.segments,
        vec![Segment {
            addr: 0x40_0000,
            file: 0x100..0x110,
            mem_size: 0x1010
        }]
    );
    assert_eq!(parsed.end, 0x40_1010);
}

#[test]
fn no_magic_is_no_header() {
    let mut img = elf32(0x40_0000, &[0x90; 16], 0);
    img[0x80..0x84].fill(0);
    assert_eq!(find_header(&img), Ok(None));
    assert_eq!(parse(&img, &RAM), Err(MultibootError::NoHeader));
}

#[test]
fn magic_beyond_8_kib_does_not_count() {
    let mut img = vec![0u8; SEARCH_LEN];
    img.extend_from_slice(&header(0));
    assert_eq!(find_header(&img), Ok(None));
}

#[test]
fn bad_checksum_is_refused() {
    let mut img = elf32(0x40_0000, &[0x90; 16], 0);
    img[0x88] ^= 1;
    assert_eq!(
        parse(&img, &RAM),
        Err(MultibootError::BadChecksum { offset: 0x80 })
    );
}

#[test]
fn header_cut_by_the_end_of_the_file_is_refused() {
    let img = header(0)[..8].to_vec();
    assert_eq!(
        find_header(&img),
        Err(MultibootError::BadChecksum { offset: 0 })
    );
}

#[test]
fn unknown_required_flags_are_refused() {
    let mut img = elf32(0x40_0000, &[0x90; 16], 0);
    img[0x80..0x8c].copy_from_slice(&header(1 << 5));
    assert_eq!(
        parse(&img, &RAM),
        Err(MultibootError::UnsupportedFlags { flags: 1 << 5 })
    );
}

#[test]
fn truncated_segment_is_refused() {
    let mut img = elf32(0x40_0000, &[0x90; 16], 0);
    img.truncate(0x108);
    assert!(matches!(
        parse(&img, &RAM),
        Err(MultibootError::Truncated {
            what: "ELF segment",
            end: 0x110,
            ..
        })
    ));
}

#[test]
fn truncated_program_header_table_is_refused() {
    let mut img = elf32(0x40_0000, &[0x90; 16], 0);
    img[44..46].copy_from_slice(&200u16.to_le_bytes());
    assert!(matches!(
        parse(&img, &RAM),
        Err(MultibootError::Truncated {
            what: "ELF program headers",
            ..
        })
    ));
}

#[test]
fn truncated_elf_header_is_refused() {
    let mut img = header(0);
    img.splice(0..0, *b"\x7fELF");
    assert!(matches!(
        parse(&img, &RAM),
        Err(MultibootError::Truncated {
            what: "ELF header",
            ..
        })
    ));
}

#[test]
fn segment_outside_ram_is_refused() {
    let img = elf32(0x3ff_f000, &[0x90; 16], 0x2000);
    assert_eq!(
        parse(&img, &RAM),
        Err(MultibootError::OutsideRam {
            what: "segment",
            start: 0x3ff_f000,
            end: 0x400_1010
        })
    );
    // In the MMIO hole between two RAM ranges.
    let ram = [(0, 3 << 30), (4 << 30, 1 << 30)];
    let img = elf32(0xfee0_0000, &[0x90; 16], 0);
    assert!(matches!(
        parse(&img, &ram),
        Err(MultibootError::OutsideRam { .. })
    ));
}

#[test]
fn segment_wrapping_the_address_space_is_refused() {
    let img = elf32(0xffff_f000, &[0x90; 16], u32::MAX - 16);
    assert!(matches!(
        parse(&img, &[(0, u64::MAX)]),
        Err(MultibootError::OutsideRam { .. })
    ));
}

#[test]
fn file_size_above_memory_size_is_refused() {
    let mut img = elf32(0x40_0000, &[0x90; 16], 0);
    img[52 + 20..52 + 24].copy_from_slice(&8u32.to_le_bytes());
    assert_eq!(
        parse(&img, &RAM),
        Err(MultibootError::BadImage(
            "a segment's file size exceeds its memory size"
        ))
    );
}

#[test]
fn elf64_without_address_fields_is_refused() {
    let mut img = elf32(0x40_0000, &[0x90; 16], 0);
    img[4] = 2;
    assert!(matches!(
        parse(&img, &RAM),
        Err(MultibootError::BadImage(_))
    ));
}

#[test]
fn address_fields_load_a_flat_binary() {
    // Header at file offset 0 describing: load the whole file at 1 MiB, BSS to 1 MiB + 0x2000,
    // enter at 1 MiB + 0x20.
    let mut img = header(FLAG_ADDRESS_FIELDS);
    for w in [0x10_0000u32, 0x10_0000, 0, 0x10_2000, 0x10_0020] {
        img.extend_from_slice(&w.to_le_bytes());
    }
    img.resize(0x40, 0x90);
    let parsed = parse(&img, &RAM).expect("valid image");
    assert_eq!(parsed.entry, 0x10_0020);
    assert_eq!(
        parsed.segments,
        vec![Segment {
            addr: 0x10_0000,
            file: 0..0x40,
            mem_size: 0x2000
        }]
    );
}

#[test]
fn address_fields_past_the_file_are_truncated() {
    let mut img = header(FLAG_ADDRESS_FIELDS);
    for w in [0x10_0000u32, 0x10_0000, 0x10_1000, 0, 0x10_0000] {
        img.extend_from_slice(&w.to_le_bytes());
    }
    assert!(matches!(
        parse(&img, &RAM),
        Err(MultibootError::Truncated { .. })
    ));
    // Address fields cut off by the end of the file.
    let img = header(FLAG_ADDRESS_FIELDS);
    assert!(matches!(
        parse(&img, &RAM),
        Err(MultibootError::Truncated { .. })
    ));
}

#[test]
fn entry_outside_the_segments_is_refused() {
    let mut img = elf32(0x40_0000, &[0x90; 16], 0);
    img[24..28].copy_from_slice(&0x50_0000u32.to_le_bytes());
    assert!(matches!(
        parse(&img, &RAM),
        Err(MultibootError::BadImage(_))
    ));
}

#[test]
fn info_block_has_memory_cmdline_mmap_and_module() {
    let map = [
        (0, 0x9fc00, 1),
        (0x9fc00, 0x60400, 2),
        (0x10_0000, 0x7f0_0000, 1),
    ];
    let module = b"NR_CPUS=2\n";
    let input = InfoInput {
        cmdline: "x86/msr.flat arg",
        module: Some((module, "env")),
        mem_lower_kib: 639,
        mem_upper_kib: 0x7f0_0000 / 1024,
        memory_map: &map,
    };
    let base = 0x20_0000u64;
    let info = build_info(base, &input).expect("fits");
    let word = |at: usize| u32::from_le_bytes(info.bytes[at..at + 4].try_into().unwrap());
    assert_eq!(word(0), 1 | 4 | 8 | 64 | 512);
    assert_eq!((word(4), word(8)), (639, 0x7f0_0000 / 1024));
    let cmdline = (word(16) as u64 - base) as usize;
    assert_eq!(&info.bytes[cmdline..cmdline + 17], b"x86/msr.flat arg\0");
    assert_eq!((word(44), word(48) as u64), (72, base + 0x100));
    // Second mmap entry: size 20, base, length, type.
    let e = 0x100 + 24;
    assert_eq!(word(e), 20);
    assert_eq!(word(e + 20), 2);
    assert_eq!(word(20), 1);
    let m = (word(24) as u64 - base) as usize;
    let (start, end) = (word(m) as u64, word(m + 4) as u64);
    assert_eq!(Some(start), info.module_at);
    assert_eq!(start % 4096, 0);
    assert_eq!(end - start, module.len() as u64);
    assert_eq!(info.len, end - base);
}

#[test]
fn info_above_4_gib_is_refused() {
    let input = InfoInput {
        cmdline: "",
        module: None,
        mem_lower_kib: 639,
        mem_upper_kib: 0,
        memory_map: &[],
    };
    assert!(build_info(1 << 32, &input).is_err());
}
