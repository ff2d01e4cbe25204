//! libvirt-compatible XML: domain definitions and `<domainsnapshot>`.
//!
//! - [`domain`] reads a domain definition (a subset of libvirt's `<domain>`
//!   XML) into a [`DomainDef`](crate::model::DomainDef) and hides its
//!   secrets for display.
//! - [`snapshot`] writes a [`Snapshot`](crate::model::Snapshot) as a
//!   `<domainsnapshot>` document and reads both those documents and the
//!   creation specs users write for `virsh snapshot-create`.
//!
//! Every document is untrusted input (it comes from a write to a control
//! file or from files on shared storage), so every parse goes through one
//! bounded reader with the same safety rules:
//!
//! - at most [`MAX_INPUT_BYTES`] of input and [`MAX_DEPTH`] levels of
//!   nested elements;
//! - any `<!DOCTYPE` is refused, so no entity is ever declared or expanded;
//! - only the five predefined entities (`&lt;` `&gt;` `&amp;` `&apos;`
//!   `&quot;`) and numeric character references are unescaped; any other
//!   reference is an error, and so is a character XML 1.0 forbids;
//! - no input makes a parser panic (the `fuzz/` targets check this).
//!
//! Unknown elements and attributes are ignored, as libvirt does, so a full
//! libvirt document can be read.

pub mod domain;
mod limits;
pub mod secrets;
pub mod snapshot;
mod tree;

pub use domain::{parse_domain_def, parse_domain_def_with, redact_secrets};
pub use limits::{MAX_DEPTH, MAX_INPUT_BYTES};
pub use snapshot::{
    parse_snapshot_xml, snapshot_from_spec, write_snapshot_xml, DiskSpec, MemorySpec, SnapshotSpec,
};

use crate::model::{NameError, MAX_NAME_BYTES};

/// Why an XML document was refused.
///
/// The `Display` text is meant for a person: it names the element,
/// attribute or position at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum XmlError {
    /// The input is not well-formed XML.
    #[error("malformed XML at line {line}, column {column}: {message}")]
    Malformed {
        /// 1-based line of the fault.
        line: usize,
        /// 1-based column (in characters) of the fault.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// The input is longer than [`MAX_INPUT_BYTES`].
    #[error("XML document is {size} bytes, the limit is {limit}")]
    TooLarge {
        /// Size of the input in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// Elements are nested deeper than [`MAX_DEPTH`].
    #[error("XML elements nested deeper than {limit} levels at line {line}, column {column}")]
    TooDeep {
        /// The depth limit.
        limit: usize,
        /// 1-based line of the element that went too deep.
        line: usize,
        /// 1-based column of that element.
        column: usize,
    },
    /// The document has a `<!DOCTYPE`; DTDs and entity declarations are refused.
    #[error(
        "<!DOCTYPE> at line {line}, column {column} is refused: \
         DTDs and entity declarations are not accepted"
    )]
    Doctype {
        /// 1-based line of the DOCTYPE.
        line: usize,
        /// 1-based column of the DOCTYPE.
        column: usize,
    },
    /// An entity reference other than the five predefined ones.
    #[error(
        "unknown entity reference '&{name};' at line {line}, column {column}: only \
         &lt; &gt; &amp; &apos; &quot; and numeric character references are allowed"
    )]
    UnknownEntity {
        /// The entity's name, between `&` and `;`.
        name: String,
        /// 1-based line of the reference (or of its element, for attributes).
        line: usize,
        /// 1-based column of the reference (or of its element).
        column: usize,
    },
    /// The root element is not the expected one.
    #[error("expected <{expected}> as the root element, found <{found}>")]
    WrongRoot {
        /// The root element this document type needs.
        expected: &'static str,
        /// The root element found.
        found: String,
    },
    /// A required element is absent.
    #[error("<{parent}> lacks the required <{element}> element")]
    MissingElement {
        /// The element that should contain it.
        parent: String,
        /// The missing element.
        element: &'static str,
    },
    /// A required attribute is absent.
    #[error("<{element}> lacks the required '{attribute}' attribute")]
    MissingAttribute {
        /// The element that should carry it.
        element: String,
        /// The missing attribute.
        attribute: &'static str,
    },
    /// An element that may appear once appears more often.
    #[error("<{element}> appears more than once in <{parent}>")]
    DuplicateElement {
        /// The containing element.
        parent: String,
        /// The repeated element.
        element: &'static str,
    },
    /// Two items that must differ share a key, e.g. two disks with one target.
    #[error("{what} {value:?} appears more than once")]
    Duplicate {
        /// What kind of item, e.g. `disk target`.
        what: &'static str,
        /// The shared key.
        value: String,
    },
    /// An element's text or an attribute has a value that is not allowed.
    #[error("bad value {value:?} for {what}: {reason}")]
    BadValue {
        /// Where the value was found, e.g. `<state>` or `<memory snapshot>`.
        what: &'static str,
        /// The value (shortened when long).
        value: String,
        /// Why it is refused, e.g. the allowed values.
        reason: String,
    },
    /// A name (of a domain, snapshot or disk) breaks the naming rules.
    #[error("invalid {what} {name:?}: {}", name_rule(.source))]
    InvalidName {
        /// What the name is for, e.g. `snapshot name`.
        what: &'static str,
        /// The name (shortened when long).
        name: String,
        /// The rule it breaks.
        source: NameError,
    },
}

/// The rule a name breaks, without the "invalid snapshot name" prefix.
fn name_rule(err: &NameError) -> String {
    match err {
        NameError::Invalid(why) => (*why).to_string(),
        NameError::TooLong(n) => format!("{n} bytes, the limit is {MAX_NAME_BYTES}"),
    }
}

/// Longest value quoted in an error message, in characters.
const MAX_QUOTED_CHARS: usize = 80;

/// A value as quoted in an error: cut after [`MAX_QUOTED_CHARS`] characters.
fn shorten(value: &str) -> String {
    match value.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((cut, _)) => format!("{}...", &value[..cut]),
        None => value.to_string(),
    }
}

impl XmlError {
    /// A [`XmlError::BadValue`] with the value shortened for display.
    pub(crate) fn bad_value(what: &'static str, value: &str, reason: impl Into<String>) -> Self {
        XmlError::BadValue {
            what,
            value: shorten(value),
            reason: reason.into(),
        }
    }

    /// A [`XmlError::BadValue`] for an enumeration: lists the allowed values.
    pub(crate) fn bad_choice(what: &'static str, value: &str, allowed: &[&str]) -> Self {
        Self::bad_value(
            what,
            value,
            format!("expected one of: {}", allowed.join(", ")),
        )
    }

    /// A [`XmlError::InvalidName`] with the name shortened for display.
    pub(crate) fn invalid_name(what: &'static str, name: &str, source: NameError) -> Self {
        XmlError::InvalidName {
            what,
            name: shorten(name),
            source,
        }
    }
}

/// True for the characters XML 1.0 allows in a document.
pub(crate) fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}')
        || c >= '\u{10000}'
}

/// True for the four characters XML calls white space.
pub(crate) fn is_xml_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// Trims XML white space from both ends.
pub(crate) fn trim_xml(s: &str) -> &str {
    s.trim_matches(is_xml_space)
}

/// Appends `s` escaped for element content or (with `attr`) for an attribute
/// value in single or double quotes.
///
/// Characters XML 1.0 cannot carry at all become U+FFFD; carriage returns,
/// and in attributes also tabs and newlines, become character references so
/// that a parser gives them back unchanged.
fn push_escaped(out: &mut String, s: &str, attr: bool) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' if attr => out.push_str("&apos;"),
            '"' if attr => out.push_str("&quot;"),
            '\r' => out.push_str("&#xD;"),
            '\n' if attr => out.push_str("&#xA;"),
            '\t' if attr => out.push_str("&#x9;"),
            c if !is_xml_char(c) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

/// Appends `s` escaped as element content.
pub(crate) fn push_text(out: &mut String, s: &str) {
    push_escaped(out, s, false);
}

/// Appends `s` escaped as an attribute value (for either quote style).
pub(crate) fn push_attr_value(out: &mut String, s: &str) {
    push_escaped(out, s, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_text_and_attributes() {
        let mut t = String::new();
        push_text(&mut t, "a&b<c>d'e\"f\r\n\tg\u{1}h");
        assert_eq!(t, "a&amp;b&lt;c&gt;d'e\"f&#xD;\n\tg\u{FFFD}h");
        let mut a = String::new();
        push_attr_value(&mut a, "a&'\"\n\t\r<");
        assert_eq!(a, "a&amp;&apos;&quot;&#xA;&#x9;&#xD;&lt;");
    }

    #[test]
    fn shortens_long_values() {
        let long = "é".repeat(200);
        let err = XmlError::bad_value("<state>", &long, "nope");
        let XmlError::BadValue { value, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(value.chars().count(), MAX_QUOTED_CHARS + 3);
        assert!(err.to_string().contains("nope"));
    }

    #[test]
    fn messages_are_readable() {
        let err = XmlError::bad_choice("<state>", "sleeping", &["running", "paused"]);
        assert_eq!(
            err.to_string(),
            "bad value \"sleeping\" for <state>: expected one of: running, paused"
        );
        let err = XmlError::MissingElement {
            parent: "domain".into(),
            element: "name",
        };
        assert_eq!(
            err.to_string(),
            "<domain> lacks the required <name> element"
        );
    }
}
