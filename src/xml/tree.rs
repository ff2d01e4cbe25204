//! The one reader of untrusted XML: a bounded parse into a small element tree.
//!
//! All safety rules of the [`xml`](super) module are enforced here, so the
//! document readers above only walk a tree.

use std::ops::Range;

use quick_xml::escape::EscapeError;
use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::{Reader, XmlVersion};

use super::limits::{MAX_DEPTH, MAX_INPUT_BYTES};
use super::{is_xml_char, is_xml_space, XmlError};

/// One element of a parsed document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Element {
    /// The tag name as written (with any prefix).
    pub(crate) name: String,
    /// Attributes in document order, values unescaped and normalized.
    pub(crate) attrs: Vec<(String, String)>,
    /// Child elements in document order.
    pub(crate) children: Vec<Element>,
    /// The element's own character data (text, CDATA, references),
    /// concatenated, without that of its children.
    pub(crate) text: String,
    /// Byte range of the whole element in the input, from `<` to the final `>`.
    pub(crate) span: Range<usize>,
}

impl Element {
    /// The value of attribute `key`, if present.
    pub(crate) fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of attribute `key`, which must be present.
    pub(crate) fn required_attr(&self, key: &'static str) -> Result<&str, XmlError> {
        self.attr(key).ok_or_else(|| XmlError::MissingAttribute {
            element: self.name.clone(),
            attribute: key,
        })
    }

    /// The child elements named `name`.
    pub(crate) fn children_named<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The child element named `name`, which may appear at most once.
    pub(crate) fn child(&self, name: &'static str) -> Result<Option<&Element>, XmlError> {
        let mut found = self.children_named(name);
        let first = found.next();
        if found.next().is_some() {
            return Err(XmlError::DuplicateElement {
                parent: self.name.clone(),
                element: name,
            });
        }
        Ok(first)
    }

    /// The child element named `name`, which must appear exactly once.
    pub(crate) fn required_child(&self, name: &'static str) -> Result<&Element, XmlError> {
        self.child(name)?.ok_or_else(|| XmlError::MissingElement {
            parent: self.name.clone(),
            element: name,
        })
    }

    /// Fails unless this (root) element is named `expected`.
    pub(crate) fn expect_root(&self, expected: &'static str) -> Result<(), XmlError> {
        if self.name == expected {
            Ok(())
        } else {
            Err(XmlError::WrongRoot {
                expected,
                found: super::shorten(&self.name),
            })
        }
    }
}

/// Parses a whole document with the shared limits; returns its root element.
pub(crate) fn parse(xml: &str) -> Result<Element, XmlError> {
    parse_with_depth(xml, MAX_DEPTH)
}

/// Parses a whole document, allowing `max_depth` levels of elements.
pub(crate) fn parse_with_depth(xml: &str, max_depth: usize) -> Result<Element, XmlError> {
    if xml.len() > MAX_INPUT_BYTES {
        return Err(XmlError::TooLarge {
            size: xml.len(),
            limit: MAX_INPUT_BYTES,
        });
    }
    if let Some((at, c)) = xml.char_indices().find(|&(_, c)| !is_xml_char(c)) {
        return Err(malformed(
            xml,
            at,
            format!("character U+{:04X} is not allowed in XML", u32::from(c)),
        ));
    }
    // quick-xml skips a byte order mark and counts positions after it.
    let base = if xml.starts_with('\u{FEFF}') {
        '\u{FEFF}'.len_utf8()
    } else {
        0
    };
    let mut reader = Reader::from_str(xml.get(base..).unwrap_or_default());
    let config = reader.config_mut();
    config.allow_dangling_amp = false;
    config.allow_unmatched_ends = false;
    config.check_comments = true;
    config.check_end_names = true;
    config.expand_empty_elements = false;
    config.trim_text(false);

    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let start = base + offset(reader.buffer_position());
        let event = match reader.read_event() {
            Ok(event) => event,
            Err(err) => {
                let at = base + offset(reader.error_position());
                return Err(from_quick_xml(xml, at, err));
            }
        };
        let end = base + offset(reader.buffer_position());
        match event {
            Event::Start(tag) => {
                let element = open(xml, &tag, start..end, &stack, root.is_some(), max_depth)?;
                stack.push(element);
            }
            Event::Empty(tag) => {
                let element = open(xml, &tag, start..end, &stack, root.is_some(), max_depth)?;
                attach(&mut stack, &mut root, element);
            }
            Event::End(_) => {
                // quick-xml already checked that the names match.
                let Some(mut element) = stack.pop() else {
                    return Err(malformed(xml, start, "close tag without an open element"));
                };
                element.span.end = end;
                attach(&mut stack, &mut root, element);
            }
            Event::Text(text) => {
                let content = text.xml10_content();
                match stack.last_mut() {
                    Some(top) => top.text.push_str(&content),
                    None if content.chars().all(is_xml_space) => {}
                    None => return Err(malformed(xml, start, "text outside the root element")),
                }
            }
            Event::CData(cdata) => match stack.last_mut() {
                Some(top) => top.text.push_str(&cdata.xml10_content()),
                None => return Err(malformed(xml, start, "CDATA outside the root element")),
            },
            Event::GeneralRef(reference) => {
                let c = resolve_reference(xml, start, &reference)?;
                match stack.last_mut() {
                    Some(top) => top.text.push(c),
                    None => {
                        return Err(malformed(xml, start, "reference outside the root element"))
                    }
                }
            }
            Event::Comment(_) | Event::PI(_) => {}
            Event::Decl(_) => {
                if start != base {
                    return Err(malformed(
                        xml,
                        start,
                        "the XML declaration must be at the very start",
                    ));
                }
            }
            Event::DocType(_) => {
                let (line, column) = line_column(xml, start);
                return Err(XmlError::Doctype { line, column });
            }
            Event::Eof => {
                if let Some(open) = stack.last() {
                    let message = format!(
                        "unexpected end of document: <{}> is not closed",
                        super::shorten(&open.name)
                    );
                    return Err(malformed(xml, xml.len(), message));
                }
                return root.ok_or_else(|| malformed(xml, xml.len(), "no root element"));
            }
        }
    }
}

/// Makes the element for a start or empty tag, checking depth and attributes.
fn open(
    xml: &str,
    tag: &BytesStart<'_>,
    span: Range<usize>,
    stack: &[Element],
    have_root: bool,
    max_depth: usize,
) -> Result<Element, XmlError> {
    if stack.is_empty() && have_root {
        return Err(malformed(xml, span.start, "a second root element"));
    }
    if stack.len() >= max_depth {
        let (line, column) = line_column(xml, span.start);
        return Err(XmlError::TooDeep {
            limit: max_depth,
            line,
            column,
        });
    }
    let name = tag.name().as_ref().to_string();
    let mut attrs = Vec::new();
    for attr in tag.attributes() {
        let attr = attr.map_err(|err| {
            let message = format!("in <{}>: {err}", super::shorten(&name));
            malformed(xml, span.start, message)
        })?;
        let value = attr
            .normalized_value_with(XmlVersion::Implicit1_0, 1, predefined_entity)
            .map_err(|err| from_quick_xml(xml, span.start, err))?;
        if let Some(c) = value.chars().find(|&c| !is_xml_char(c)) {
            let message = format!(
                "character reference to U+{:04X} in an attribute of <{}>: not allowed in XML",
                u32::from(c),
                super::shorten(&name)
            );
            return Err(malformed(xml, span.start, message));
        }
        attrs.push((attr.key.as_ref().to_string(), value.into_owned()));
    }
    Ok(Element {
        name,
        attrs,
        children: Vec::new(),
        text: String::new(),
        span,
    })
}

/// Hangs a finished element under the open one, or makes it the root.
fn attach(stack: &mut [Element], root: &mut Option<Element>, element: Element) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(element),
        None => *root = Some(element),
    }
}

/// The five entities XML predefines; nothing else is ever expanded.
fn predefined_entity(name: &str) -> Option<&'static str> {
    match name {
        "lt" => Some("<"),
        "gt" => Some(">"),
        "amp" => Some("&"),
        "apos" => Some("'"),
        "quot" => Some("\""),
        _ => None,
    }
}

/// Resolves `&name;` or `&#n;` in character data.
fn resolve_reference(xml: &str, at: usize, reference: &BytesRef<'_>) -> Result<char, XmlError> {
    let name: &str = reference;
    if reference.is_char_ref() {
        let c = reference
            .resolve_char_ref()
            .map_err(|err| malformed(xml, at, format!("bad character reference: {err}")))?;
        return match c {
            Some(c) if is_xml_char(c) => Ok(c),
            Some(c) => Err(malformed(
                xml,
                at,
                format!(
                    "character reference to U+{:04X}: not allowed in XML",
                    u32::from(c)
                ),
            )),
            None => Err(malformed(
                xml,
                at,
                format!("bad character reference '&{};'", super::shorten(name)),
            )),
        };
    }
    match predefined_entity(name).and_then(|s| s.chars().next()) {
        Some(c) => Ok(c),
        None => {
            let (line, column) = line_column(xml, at);
            Err(XmlError::UnknownEntity {
                name: super::shorten(name),
                line,
                column,
            })
        }
    }
}

/// Converts a quick-xml error at byte `at`.
fn from_quick_xml(xml: &str, at: usize, err: quick_xml::Error) -> XmlError {
    match err {
        quick_xml::Error::Escape(EscapeError::UnrecognizedEntity(_, name)) => {
            let (line, column) = line_column(xml, at);
            XmlError::UnknownEntity {
                name: super::shorten(&name),
                line,
                column,
            }
        }
        other => malformed(xml, at, other.to_string()),
    }
}

/// A [`XmlError::Malformed`] at byte `at` of `xml`.
pub(crate) fn malformed(xml: &str, at: usize, message: impl Into<String>) -> XmlError {
    let (line, column) = line_column(xml, at);
    XmlError::Malformed {
        line,
        column,
        message: message.into(),
    }
}

/// A reader position as an index (saturating; callers clamp).
fn offset(position: u64) -> usize {
    usize::try_from(position).unwrap_or(usize::MAX)
}

/// 1-based line and column (in characters) of byte `at` of `xml`.
pub(crate) fn line_column(xml: &str, at: usize) -> (usize, usize) {
    let bytes = xml.as_bytes();
    let before = bytes.get(..at).unwrap_or(bytes);
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before
        .get(line_start..)
        .unwrap_or_default()
        .iter()
        .filter(|&&b| b & 0xC0 != 0x80)
        .count()
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(xml: &str) -> XmlError {
        match parse(xml) {
            Ok(root) => panic!("{xml:?} parsed: {root:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn builds_a_tree() {
        let xml = "<?xml version='1.0'?>\n<!-- c --><a x='1&amp;&#x41;' y=\"&lt;\">t&amp;u<b/>\
                   <![CDATA[<c>]]><?pi x?><c z='q'>in</c>&#233;\r\nend</a>\n";
        let root = parse(xml).expect("parses");
        assert_eq!(root.name, "a");
        assert_eq!(root.attr("x"), Some("1&A"));
        assert_eq!(root.attr("y"), Some("<"));
        assert_eq!(root.attr("nope"), None);
        assert_eq!(root.text, "t&u<c>é\nend");
        assert_eq!(root.children.len(), 2);
        assert_eq!(&xml[root.children[0].span.clone()], "<b/>");
        assert_eq!(&xml[root.children[1].span.clone()], "<c z='q'>in</c>");
        assert_eq!(root.children[1].text, "in");
        assert!(xml[root.span.clone()].starts_with("<a x="));
        assert!(xml[root.span.clone()].ends_with("end</a>"));
    }

    #[test]
    fn spans_count_a_byte_order_mark() {
        let xml = "\u{FEFF}<a><b>x</b></a>";
        let root = parse(xml).expect("parses");
        assert_eq!(&xml[root.children[0].span.clone()], "<b>x</b>");
    }

    #[test]
    fn attribute_whitespace_is_normalized_but_references_kept() {
        let root = parse("<a v='x\ty\nz&#xA;&#x9;&#xD;'/>").expect("parses");
        assert_eq!(root.attr("v"), Some("x y z\n\t\r"));
    }

    #[test]
    fn child_helpers() {
        let root = parse("<a><b/><b/><c k='v'/></a>").expect("parses");
        assert!(matches!(
            root.child("b"),
            Err(XmlError::DuplicateElement { .. })
        ));
        assert!(matches!(
            root.required_child("d"),
            Err(XmlError::MissingElement { .. })
        ));
        let c = root.required_child("c").expect("c");
        assert_eq!(c.required_attr("k"), Ok("v"));
        assert!(matches!(
            c.required_attr("z"),
            Err(XmlError::MissingAttribute { .. })
        ));
        assert_eq!(root.children_named("b").count(), 2);
    }

    #[test]
    fn refuses_hostile_and_broken_input() {
        let laughs = "<?xml version='1.0'?>\n<!DOCTYPE lolz [<!ENTITY lol 'lol'>\
                      <!ENTITY lol2 '&lol;&lol;&lol;&lol;'>]>\n<lolz>&lol2;</lolz>";
        assert_eq!(err(laughs), XmlError::Doctype { line: 2, column: 1 });
        let deep = "<a>".repeat(10_000) + &"</a>".repeat(10_000);
        assert!(matches!(err(&deep), XmlError::TooDeep { limit: 64, .. }));
        let ok = "<a>".repeat(64) + &"</a>".repeat(64);
        assert!(parse(&ok).is_ok());
        assert!(matches!(
            err(&("<a>".repeat(65) + &"</a>".repeat(65))),
            XmlError::TooDeep { .. }
        ));
        let big = format!("<a>{}</a>", "x".repeat(2 * 1024 * 1024));
        assert!(matches!(err(&big), XmlError::TooLarge { .. }));
        assert!(matches!(
            err("<a>&foo;</a>"),
            XmlError::UnknownEntity { .. }
        ));
        assert!(matches!(
            err("<a b='&foo;'/>"),
            XmlError::UnknownEntity { .. }
        ));
        for bad in [
            "",
            "   ",
            "<a>",
            "<a><b></a>",
            "</a>",
            "<a></a><b/>",
            "<a/>text",
            "text<a/>",
            "<a>&#0;</a>",
            "<a>&#1;</a>",
            "<a b='&#1;'/>",
            "<a>&#xD800;</a>",
            "<a>&#xZZ;</a>",
            "<a>& b</a>",
            "<a b='1' b='2'/>",
            "<a b=x/>",
            "<a>\u{1}</a>",
            "<a>\0</a>",
            "<a><!-- x -- y --></a>",
            "<a/><?xml version='1.0'?>",
            "<a b='",
            "<a",
            "<!-- only a comment -->",
            "&amp;<a/>",
            "<![CDATA[x]]><a/>",
        ] {
            let e = err(bad);
            assert!(!e.to_string().is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn positions_are_lines_and_columns() {
        let e = err("<a>\n  <b>\n  </c>\n</a>");
        let XmlError::Malformed { line, .. } = e else {
            panic!("{e:?}")
        };
        assert_eq!(line, 3);
        assert_eq!(line_column("ab\ncé\nx", 6), (2, 3));
        assert_eq!(line_column("ab", 99), (1, 3));
    }
}
