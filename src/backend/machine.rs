//! The machine type of a QEMU command line. Saved state loads only into
//! the machine type it was saved on; `q35` is an alias each QEMU version
//! maps to its newest machine (`pc-q35-7.2`, `pc-q35-10.0`), so a memory
//! file saved before an upgrade of QEMU needs the exact type named.

/// The machine type QEMU reports for `qom-get /machine type`
/// (`pc-q35-7.2-machine`) as `-machine` takes it (`pc-q35-7.2`).
pub fn from_qom_type(qom: &str) -> Option<String> {
    let m = qom.strip_suffix("-machine").unwrap_or(qom);
    let ok = !m.is_empty()
        && m.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    ok.then(|| m.to_owned())
}

/// `argv` with the machine type of its `-machine`/`-M` option set to
/// `machine` (the other machine properties kept). A command line without
/// one gets `-machine <machine>` (QEMU's default machine is not recorded).
pub fn pin(argv: &[String], machine: &str) -> Vec<String> {
    let mut out = argv.to_vec();
    let mut found = false;
    let mut i = 1;
    while i < out.len() {
        let a = out[i].as_str();
        let (opt, inline) = match a.split_once('=') {
            Some((o, v)) if o == "--machine" => (o, Some(v.to_owned())),
            _ => (a, None),
        };
        if matches!(opt, "-machine" | "--machine" | "-M") {
            let (value_at, value) = match inline {
                Some(v) => (None, v),
                None => match out.get(i + 1) {
                    Some(v) => (Some(i + 1), v.clone()),
                    None => break,
                },
            };
            let pinned = pin_value(&value, machine);
            match value_at {
                Some(j) => out[j] = pinned,
                None => out[i] = format!("--machine={pinned}"),
            }
            found = true;
            i += if value_at.is_some() { 2 } else { 1 };
            continue;
        }
        i += 1;
    }
    if !found && !out.is_empty() {
        out.insert(1, machine.to_owned());
        out.insert(1, "-machine".into());
    }
    out
}

/// One `-machine` value with its type replaced: `q35,accel=kvm` or
/// `type=q35,accel=kvm`.
fn pin_value(value: &str, machine: &str) -> String {
    let mut parts: Vec<String> = value.split(',').map(str::to_owned).collect();
    if let Some(p) = parts.iter_mut().find(|p| p.starts_with("type=")) {
        *p = format!("type={machine}");
    } else if parts.first().is_some_and(|p| !p.contains('=')) {
        parts[0] = machine.to_owned();
    } else {
        parts.insert(0, machine.to_owned());
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn reads_the_qom_type() {
        assert_eq!(
            from_qom_type("pc-q35-7.2-machine").as_deref(),
            Some("pc-q35-7.2")
        );
        assert_eq!(from_qom_type("x; rm -rf /"), None);
        assert_eq!(from_qom_type("-machine"), None);
    }

    #[test]
    fn pins_every_spelling() {
        for (before, after) in [
            (
                "qemu -machine q35 -m 128",
                "qemu -machine pc-q35-7.2 -m 128",
            ),
            ("qemu -M q35,accel=kvm", "qemu -M pc-q35-7.2,accel=kvm"),
            (
                "qemu -machine type=q35,smm=off",
                "qemu -machine type=pc-q35-7.2,smm=off",
            ),
            (
                "qemu -machine accel=kvm",
                "qemu -machine pc-q35-7.2,accel=kvm",
            ),
            ("qemu --machine=q35", "qemu --machine=pc-q35-7.2"),
            ("qemu -m 128", "qemu -machine pc-q35-7.2 -m 128"),
        ] {
            assert_eq!(pin(&argv(before), "pc-q35-7.2"), argv(after), "{before}");
        }
    }
}
