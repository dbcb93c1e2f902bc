//! The control API's request handling: a line assembled from pieces as a client sends them
//! (the length cap, UTF-8), then parsed. The code lives in the `tern` binary; it is compiled in
//! here from its source file.

use crate::bytes::Bytes;

#[allow(dead_code)]
#[path = "../../vmm/src/api/request.rs"]
mod request;

use request::{LineReader, Request, MAX_REQUEST};

/// Input: a piece size (the client's writes), then what the client sends.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let piece = usize::from(b.u8()).max(1);
    let sent = b.rest();
    // The parser on the whole input, newline or not.
    check(&String::from_utf8_lossy(sent));
    let mut line = LineReader::default();
    for p in sent.chunks(piece) {
        match line.push(p) {
            Ok(None) => {}
            Ok(Some(l)) => {
                assert!(l.len() <= MAX_REQUEST && !l.contains('\n'));
                check(&l);
                return;
            }
            Err(_) => return,
        }
    }
}

/// Whatever parses is a request that reads back the same from its own wire form.
fn check(line: &str) {
    if let Ok(req) = Request::parse(line) {
        let wire = serde_json::to_string(&req).expect("requests serialise");
        assert_eq!(Request::parse(&wire), Ok(req));
    }
}
