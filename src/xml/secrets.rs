//! What counts as a secret in a domain definition, and how a QEMU
//! command line argument is shown without its secrets.

/// Parts of a key or attribute name that say its value is a secret.
const SECRET_PARTS: &[&str] = &[
    "passw",
    "passphrase",
    "secret",
    "cookie",
    "token",
    "credential",
];

/// Whole key names whose value is a secret (`-object secret,data=...`).
const SECRET_KEYS: &[&str] = &["data", "key", "psk", "passwd", "iv"];

/// What replaces a secret.
const REDACTED: &str = "***";

/// True when an attribute, option key (its last dotted part) or
/// environment variable named `name` holds a secret.
pub fn is_secret_key(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let last = name.rsplit('.').next().unwrap_or(&name);
    SECRET_KEYS.contains(&last) || SECRET_PARTS.iter().any(|p| last.contains(p))
}

/// True for an element whose text is a secret (`<cookie>`, `<secret>`).
pub fn is_secret_element(local_name: &str) -> bool {
    matches!(local_name, "cookie" | "secret")
}

/// One QEMU command line argument with its secrets replaced by `***`:
/// in a JSON argument the value of every secret key (at any depth), in a
/// `key=value,...` argument (commas doubled inside values) the value of
/// every secret key, and anywhere the password of a URL
/// (`scheme://user:password@host`, iSCSI's `user%password@`).
pub fn redact_arg(arg: &str) -> String {
    if arg.trim_start().starts_with('{') {
        return match serde_json::from_str::<serde_json::Value>(arg) {
            Ok(mut v) => {
                redact_json(&mut v);
                v.to_string()
            }
            // QEMU would refuse it too; nothing of it is shown.
            Err(_) => REDACTED.to_owned(),
        };
    }
    if !arg.contains('=') {
        return redact_url(arg);
    }
    split_options(arg)
        .into_iter()
        .map(|item| match item.split_once('=') {
            Some((k, _)) if is_secret_key(k) => format!("{k}={REDACTED}"),
            Some((k, v)) => format!("{k}={}", redact_url(v)),
            None => redact_url(item),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Splits `key=value,...` at the commas that are not doubled.
fn split_options(arg: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let bytes = arg.as_bytes();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        if bytes[i] == b',' {
            if bytes.get(i + 1) == Some(&b',') {
                i += 2;
                continue;
            }
            out.push(&arg[start..i]);
            start = i + 1;
        }
        i += 1;
    }
    out.push(&arg[start..]);
    out
}

fn redact_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                if is_secret_key(k) && !val.is_object() && !val.is_array() {
                    *val = REDACTED.into();
                } else {
                    redact_json(val);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_json),
        serde_json::Value::String(s) => *s = redact_url(s),
        _ => {}
    }
}

/// `scheme://user:password@host...` with the password hidden.
fn redact_url(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return s.to_owned();
    };
    let auth_start = scheme_end + 3;
    let rest = &s[auth_start..];
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..auth_end].rfind('@') else {
        return s.to_owned();
    };
    let userinfo = &rest[..at];
    let Some(sep) = userinfo.find([':', '%']) else {
        return s.to_owned();
    };
    format!(
        "{}{}{REDACTED}{}",
        &s[..auth_start],
        &userinfo[..=sep],
        &rest[at..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hides_secret_options() {
        let cases = [
            (
                "secret,id=sec0,data=letmein,format=raw",
                "secret,id=sec0,data=***,format=raw",
            ),
            (
                "file=/i/a,,b.qcow2,file.password-secret=sec0,if=virtio",
                "file=/i/a,,b.qcow2,file.password-secret=***,if=virtio",
            ),
            (
                ":1,password=on,tls-creds=t0",
                ":1,password=***,tls-creds=t0",
            ),
            (
                "driver=http,url=https://bob:hunter2@example.com/x.img",
                "driver=http,url=https://bob:***@example.com/x.img",
            ),
            (
                "file=iscsi://alice%pw@10.0.0.1/iqn.x/0",
                "file=iscsi://alice%***@10.0.0.1/iqn.x/0",
            ),
            ("driver=http,cookie=SESSION=abc", "driver=http,cookie=***"),
            ("-m", "-m"),
            ("q35,accel=kvm", "q35,accel=kvm"),
        ];
        for (arg, want) in cases {
            assert_eq!(redact_arg(arg), want, "{arg}");
        }
    }

    #[test]
    fn hides_secrets_in_json_arguments() {
        let arg = r#"{"qom-type":"secret","id":"s","data":"letmein","nested":{"password":"x","url":"http://u:p@h/"}}"#;
        let out = redact_arg(arg);
        assert!(
            !out.contains("letmein") && !out.contains("\"x\"") && !out.contains(":p@"),
            "{out}"
        );
        assert!(out.contains("\"id\":\"s\""), "{out}");
        assert_eq!(redact_arg("{not json"), "***");
    }

    #[test]
    fn names_that_hold_secrets() {
        for k in [
            "passwd",
            "password",
            "file.password-secret",
            "key-secret",
            "cookie",
            "DB_TOKEN",
            "data",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in ["id", "format", "file", "keymap", "if", "node-name"] {
            assert!(!is_secret_key(k), "{k}");
        }
    }
}
