use super::*;
use crate::PAGE_SIZE;

fn sample() -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    w.header(MigrationId([9; ID_LEN])).unwrap();
    w.record(Section::Config, &vec![1u32, 2, 3]).unwrap();
    let mut batch = RamBatch::default();
    batch.push_zero(0x1000);
    batch.push_full(0x2000, &[7u8; PAGE_SIZE]);
    w.section(Section::Ram, &batch.take()).unwrap();
    w.section(Section::End, &[]).unwrap();
    w.get_mut().clone()
}

#[test]
fn every_section_kind_decodes() {
    for v in 0..=255u8 {
        if let Some(s) = Section::from_u8(v) {
            assert_eq!(s as u8, v);
        }
    }
    for s in [
        Section::Advise,
        Section::Discard,
        Section::Run,
        Section::PageRequest,
        Section::Complete,
    ] {
        assert_eq!(Section::from_u8(s as u8), Some(s));
    }
}

#[test]
fn round_trip() {
    let bytes = sample();
    let mut r = StreamReader::new(&bytes[..]);
    assert_eq!(r.header().unwrap(), MigrationId([9; ID_LEN]));
    let cfg: Vec<u32> = r
        .read_section()
        .unwrap()
        .expect(Section::Config)
        .unwrap()
        .decode()
        .unwrap();
    assert_eq!(cfg, vec![1, 2, 3]);
    let ram = r.read_section().unwrap().expect(Section::Ram).unwrap();
    let pages: Vec<_> = parse_ram(&ram.payload).collect::<Result<_, _>>().unwrap();
    assert_eq!(pages[0], PageRecord::Zero(0x1000));
    assert!(matches!(pages[1], PageRecord::Full(0x2000, p) if p[0] == 7));
    assert_eq!(r.read_section().unwrap().kind, Section::End);
}

#[test]
fn flipped_byte_is_a_checksum_error_naming_the_section() {
    let mut bytes = sample();
    let n = bytes.len();
    bytes[n / 2] ^= 0x40; // inside the RAM page data
    let mut r = StreamReader::new(&bytes[..]);
    r.header().unwrap();
    r.read_section().unwrap();
    let err = r.read_section().err().unwrap();
    assert!(matches!(err, StreamError::Checksum("RAM")), "{err}");
}

#[test]
fn truncation_names_the_section() {
    let bytes = sample();
    let cut = &bytes[..bytes.len() - 20];
    let mut r = StreamReader::new(cut);
    r.header().unwrap();
    r.read_section().unwrap();
    let err = r.read_section().err().unwrap();
    assert_eq!(err.to_string(), "stream truncated in RAM section");
    let mut r = StreamReader::new(&bytes[..5]);
    assert!(matches!(r.header(), Err(StreamError::Truncated(_))));
    let mut r = StreamReader::new(&b"NOTTERN!\x01\0\0\0\0\0\0\0"[..]);
    assert!(matches!(r.header(), Err(StreamError::BadMagic)));
    // A version-1 stream (no id) is refused by its version.
    let mut r = StreamReader::new(&b"TERNMIG\0\x01\0\0\0\0\0\0\0"[..]);
    assert!(matches!(r.header(), Err(StreamError::Version(1))));
    // A header cut inside the id.
    let mut r = StreamReader::new(&bytes[..HEADER_LEN - 1]);
    assert!(matches!(r.header(), Err(StreamError::Truncated(_))));
}

#[test]
fn each_kind_has_its_own_size_limit() {
    // A 2 MiB device-state header is refused from the header alone (no payload follows).
    let mut bytes = vec![Section::Devices as u8];
    bytes.extend_from_slice(&(2u32 << 20).to_le_bytes());
    let err = StreamReader::new(&bytes[..]).read_section().err().unwrap();
    assert!(
        matches!(err, StreamError::TooLarge { section: "device state", limit, .. } if limit == MAX_STATE_RECORD),
        "{err}"
    );
    let mut bytes = vec![Section::Clock as u8];
    bytes.extend_from_slice(&(MAX_SMALL_RECORD as u32 + 1).to_le_bytes());
    let err = StreamReader::new(&bytes[..]).read_section().err().unwrap();
    assert!(matches!(err, StreamError::TooLarge { .. }), "{err}");
    // The writer keeps to the same limits.
    let mut w = StreamWriter::new(Vec::new());
    assert!(w
        .section(Section::Config, &vec![b' '; MAX_STATE_RECORD + 1])
        .is_err());
}

#[test]
fn unaligned_page_addresses_are_refused() {
    let mut batch = RamBatch::default();
    batch.push_zero(0x1000);
    batch.push_full(0x2001, &[0u8; PAGE_SIZE]);
    let payload = batch.take();
    let pages: Vec<_> = parse_ram(&payload).collect();
    assert_eq!(pages.len(), 2);
    assert!(pages[0].is_ok());
    let err = pages[1].as_ref().err().unwrap().to_string();
    assert!(err.contains("0x2001 is not page-aligned"), "{err}");
}
