//! What a QMP peer says, one line at a time: the greeting, a command's
//! answer or refusal, or an event. The peer may be a hostile process
//! holding the monitor socket, so a line that is not one of these is a
//! protocol error, never a panic and never a default.

use serde_json::Value;

use super::qmp::QmpError;

/// One decoded QMP message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `{"QMP": {...}}`: the greeting (its `QMP` member).
    Greeting(Value),
    /// `{"return": ...}`: a command's answer.
    Return(Value),
    /// `{"error": {"class": ..., "desc": ...}}`: a command's refusal.
    Error {
        /// QEMU's error class.
        class: String,
        /// QEMU's message.
        desc: String,
    },
    /// `{"event": NAME, ...}`: an event, the whole message.
    Event(Value),
}

impl Message {
    /// What kind of message it is, for error texts.
    pub fn kind(&self) -> String {
        match self {
            Message::Greeting(_) => "a greeting".into(),
            Message::Return(_) => "an answer".into(),
            Message::Error { class, .. } => format!("an error ({class})"),
            Message::Event(e) => format!(
                "event {}",
                e.get("event").and_then(Value::as_str).unwrap_or("?")
            ),
        }
    }
}

/// Decodes one line (without or with its newline) of a QMP peer.
pub fn decode(line: &[u8]) -> Result<Message, QmpError> {
    let v: Value =
        serde_json::from_slice(line).map_err(|e| QmpError::Protocol(format!("not JSON: {e}")))?;
    let Value::Object(mut m) = v else {
        return Err(QmpError::Protocol("a message that is not an object".into()));
    };
    if let Some(ret) = m.remove("return") {
        return Ok(Message::Return(ret));
    }
    if let Some(err) = m.get("error") {
        let text = |k: &str| {
            err.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| QmpError::Protocol(format!("an error without a string {k:?}")))
        };
        return Ok(Message::Error {
            class: text("class")?,
            desc: text("desc")?,
        });
    }
    if m.contains_key("event") {
        if !m.get("event").is_some_and(Value::is_string) {
            return Err(QmpError::Protocol("an event without a name".into()));
        }
        return Ok(Message::Event(Value::Object(m)));
    }
    if let Some(greeting) = m.remove("QMP") {
        if !greeting.is_object() {
            return Err(QmpError::Protocol(
                "a greeting that is not an object".into(),
            ));
        }
        return Ok(Message::Greeting(greeting));
    }
    let keys: Vec<&String> = m.keys().take(4).collect();
    Err(QmpError::Protocol(format!(
        "unexpected message with members {keys:?}"
    )))
}

/// The message as a QMP line (without its newline).
pub fn encode(msg: &Message) -> Vec<u8> {
    let v = match msg {
        Message::Greeting(g) => serde_json::json!({ "QMP": g }),
        Message::Return(r) => serde_json::json!({ "return": r }),
        Message::Error { class, desc } => {
            serde_json::json!({ "error": { "class": class, "desc": desc } })
        }
        Message::Event(e) => e.clone(),
    };
    v.to_string().into_bytes()
}

/// The lines a peer's bytes hold, as the session reads them (split at
/// `\n`; nothing after a last newline is no line; no bytes are one empty
/// line).
pub fn lines(data: &[u8]) -> Vec<&[u8]> {
    let mut v: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    if v.len() > 1 && v.last().is_some_and(|l| l.is_empty()) {
        v.pop();
    }
    v
}

/// Entry point of the `qmp_line` fuzz target and of the corpus test:
/// decodes each line of `data`. Panics if decoding panics, or if an
/// accepted message, written back as QMP, decodes to another message
/// (another kind, error text or event name). Returns whether each line
/// was accepted.
pub fn check_lines(data: &[u8]) -> Vec<bool> {
    lines(data)
        .into_iter()
        .map(|line| {
            let Ok(msg) = decode(line) else {
                return false;
            };
            let again = decode(&encode(&msg))
                .unwrap_or_else(|e| panic!("{} written back is refused: {e}", msg.kind()));
            assert_eq!(again.kind(), msg.kind(), "written back as another message");
            if let (Message::Error { desc: a, .. }, Message::Error { desc: b, .. }) = (&msg, &again)
            {
                assert_eq!(a, b, "error text changed");
            }
            true
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_decode_to_what_they_are() {
        let ok: &[(&str, Message)] = &[
            (
                r#"{"QMP": {"version": {}, "capabilities": []}}"#,
                Message::Greeting(serde_json::json!({"version": {}, "capabilities": []})),
            ),
            (r#"{"return": {}}"#, Message::Return(serde_json::json!({}))),
            (
                r#"{"return": [1, 2], "id": "x"}"#,
                Message::Return(serde_json::json!([1, 2])),
            ),
            (
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n",
                Message::Error {
                    class: "GenericError".into(),
                    desc: "nope".into(),
                },
            ),
            (
                r#"{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                Message::Event(serde_json::json!(
                    {"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}
                )),
            ),
        ];
        for (line, want) in ok {
            assert_eq!(&decode(line.as_bytes()).unwrap(), want, "{line}");
        }
        let bad = [
            "",
            "not json",
            "[1]",
            "\"return\"",
            "{}",
            r#"{"error": "nope"}"#,
            r#"{"error": {"class": 1, "desc": "x"}}"#,
            r#"{"error": {"class": "GenericError"}}"#,
            r#"{"event": 7}"#,
            r#"{"QMP": 1}"#,
            r#"{"return": {}"#,
            "{\"return\": \"\u{fffd}\"",
        ];
        for line in bad {
            assert!(
                matches!(decode(line.as_bytes()), Err(QmpError::Protocol(_))),
                "{line:?}"
            );
        }
        assert!(decode(b"{\"return\": \"\xff\"}").is_err(), "not UTF-8");
    }
}
