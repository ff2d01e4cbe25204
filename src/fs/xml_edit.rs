//! An XML document written to `.create` or `snapshot.xml`: collected
//! write by write, with the end of its root element found by a scanner
//! that reads each byte once, so the document is parsed and applied once,
//! as soon as it is whole (errors come back from that write(2)), or at
//! close when it never became whole.

use crate::domain::Caller;

/// Where a written XML document goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XmlTarget {
    /// `<snapshot id>/snapshot.xml`: a new description.
    Description(String),
    /// `.create`: a new snapshot.
    Create,
}

/// Where the scanner is in the markup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Text,
    /// Right after `<`.
    Open,
    /// Inside a start or end tag; `slash`: the last byte was `/`.
    Tag {
        closing: bool,
        slash: bool,
    },
    /// Inside a quoted attribute value of a start tag.
    Quote(u8),
    /// Right after `<!`.
    Bang,
    /// After `<!-`.
    BangDash,
    /// `<!-- ... -->`; `dashes`: how many `-` just came.
    Comment {
        dashes: u8,
    },
    /// `<![CDATA[ ... ]]>`; `brackets`: how many `]` just came.
    CData {
        brackets: u8,
    },
    /// `<!DOCTYPE ...>` and other declarations.
    Decl,
    /// `<? ... ?>`; `q`: the last byte was `?`.
    Pi {
        q: bool,
    },
}

/// Finds where the root element ends, one byte at a time.
#[derive(Clone, Debug)]
struct Scanner {
    state: State,
    depth: usize,
    rooted: bool,
    whole: bool,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            state: State::Text,
            depth: 0,
            rooted: false,
            whole: false,
        }
    }
}

impl Scanner {
    /// Reads more bytes; true once the root element has ended.
    fn feed(&mut self, data: &[u8]) -> bool {
        for &b in data {
            if self.whole {
                break;
            }
            self.state = match self.state {
                State::Text => match b {
                    b'<' => State::Open,
                    _ => State::Text,
                },
                State::Open => match b {
                    b'!' => State::Bang,
                    b'?' => State::Pi { q: false },
                    b'/' => State::Tag {
                        closing: true,
                        slash: false,
                    },
                    _ => State::Tag {
                        closing: false,
                        slash: false,
                    },
                },
                State::Tag { closing, slash } => match b {
                    b'"' | b'\'' if !closing => State::Quote(b),
                    b'>' => {
                        if closing {
                            self.depth = self.depth.saturating_sub(1);
                        } else if !slash {
                            self.depth += 1;
                        }
                        self.rooted = true;
                        self.whole = self.depth == 0;
                        State::Text
                    }
                    b'/' => State::Tag {
                        closing,
                        slash: true,
                    },
                    _ => State::Tag {
                        closing,
                        slash: false,
                    },
                },
                State::Quote(q) if b == q => State::Tag {
                    closing: false,
                    slash: false,
                },
                State::Quote(q) => State::Quote(q),
                State::Bang => match b {
                    b'-' => State::BangDash,
                    b'[' => State::CData { brackets: 0 },
                    b'>' => State::Text,
                    _ => State::Decl,
                },
                State::BangDash => State::Comment { dashes: 0 },
                State::Comment { dashes } => match b {
                    b'-' => State::Comment {
                        dashes: (dashes + 1).min(2),
                    },
                    b'>' if dashes >= 2 => State::Text,
                    _ => State::Comment { dashes: 0 },
                },
                State::CData { brackets } => match b {
                    b']' => State::CData {
                        brackets: (brackets + 1).min(2),
                    },
                    b'>' if brackets >= 2 => State::Text,
                    _ => State::CData { brackets: 0 },
                },
                State::Decl => match b {
                    b'>' => State::Text,
                    _ => State::Decl,
                },
                State::Pi { q } => match b {
                    b'>' if q => State::Text,
                    b'?' => State::Pi { q: true },
                    _ => State::Pi { q: false },
                },
            };
        }
        self.whole
    }
}

/// What a write to an XML document leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Keep collecting.
    Written,
    /// The document is whole: apply these bytes (once).
    Apply(Vec<u8>),
    /// Refused with this errno.
    Refused(i32),
}

/// A document being written through one open file.
pub struct XmlEdit {
    /// The domain it goes to.
    pub domain: String,
    /// What it does there.
    pub target: XmlTarget,
    /// Who opened the file.
    pub caller: Caller,
    buf: Vec<u8>,
    scan: Scanner,
    /// False once a write did not append: then only a close applies it.
    sequential: bool,
    applied: bool,
}

impl XmlEdit {
    /// A new, empty document.
    pub fn new(domain: String, target: XmlTarget, caller: Caller) -> Self {
        XmlEdit {
            domain,
            target,
            caller,
            buf: Vec::new(),
            scan: Scanner::default(),
            sequential: true,
            applied: false,
        }
    }

    /// Takes `data` at `offset`; at most `limit` bytes in all (`EFBIG`).
    pub fn write(&mut self, offset: u64, data: &[u8], limit: usize) -> Step {
        if self.applied {
            // White space after the document (a trailing newline) is fine.
            return if data.iter().all(u8::is_ascii_whitespace) {
                Step::Written
            } else {
                Step::Refused(libc::EINVAL)
            };
        }
        let Ok(start) = usize::try_from(offset) else {
            return Step::Refused(libc::EFBIG);
        };
        let end = start.saturating_add(data.len());
        if end > limit {
            return Step::Refused(libc::EFBIG);
        }
        if start != self.buf.len() {
            self.sequential = false;
        }
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.buf[start..end].copy_from_slice(data);
        if self.sequential && self.scan.feed(data) {
            self.applied = true;
            return Step::Apply(std::mem::take(&mut self.buf));
        }
        Step::Written
    }

    /// At close: the document if it was never applied (it is refused
    /// then, if it is not whole, with the parser's reason).
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        if self.applied || self.buf.is_empty() {
            return None;
        }
        self.applied = true;
        Some(std::mem::take(&mut self.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit() -> XmlEdit {
        XmlEdit::new("vm1".into(), XmlTarget::Create, Caller::ROOT)
    }

    #[test]
    fn whole_once_the_root_ends() {
        let doc = b"<?xml version='1.0'?><!-- a <b> --><domainsnapshot a='x>y'>\
            <name>n</name><memory snapshot='no'/><![CDATA[<x>]]></domainsnapshot>\n";
        // Byte by byte: applied at the last '>' and only then.
        let mut e = edit();
        let mut applied = None;
        for (i, b) in doc.iter().enumerate() {
            match e.write(i as u64, &[*b], 1 << 20) {
                Step::Written => {}
                Step::Apply(x) => {
                    assert!(applied.is_none());
                    applied = Some((i, x));
                }
                Step::Refused(e) => panic!("refused {e} at {i}"),
            }
        }
        let (at, bytes) = applied.expect("applied");
        assert_eq!(at, doc.len() - 2);
        assert_eq!(bytes, doc[..doc.len() - 1]);
        assert_eq!(e.finish(), None);
        // A self-closed root is whole too.
        let mut e = edit();
        assert!(matches!(
            e.write(0, b"<domainsnapshot/>", 100),
            Step::Apply(_)
        ));
        assert_eq!(e.write(17, b"<x/>", 100), Step::Refused(libc::EINVAL));
    }

    #[test]
    fn partial_rewritten_and_oversized_documents() {
        let mut e = edit();
        assert_eq!(e.write(0, b"<domainsnapshot><na", 100), Step::Written);
        assert_eq!(e.finish(), Some(b"<domainsnapshot><na".to_vec()));
        // A write that does not append: applied at close only.
        let mut e = edit();
        assert_eq!(e.write(5, b"<a/>", 100), Step::Written);
        assert_eq!(e.finish().map(|b| b.len()), Some(9));
        assert_eq!(
            edit().write(0, &[b' '; 101], 100),
            Step::Refused(libc::EFBIG)
        );
    }
}
