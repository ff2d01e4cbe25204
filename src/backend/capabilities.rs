//! What the QEMU on one connection can do, read once per connection from
//! `query-version` and `query-qmp-schema`: vmsnapfs chooses its
//! mechanisms from these answers, never from a version number. The
//! version only decides whether to warn that this QEMU is outside the
//! range vmsnapfs is tested on.

use std::collections::{BTreeMap, BTreeSet};

use qapi::qmp;

use super::qmp::{Qmp, QmpError};

/// The oldest QEMU the test suite runs on (major, minor).
pub const TESTED_MIN: (u64, u64) = (7, 2);
/// The newest QEMU the test suite runs on (major, minor).
pub const TESTED_MAX: (u64, u64) = (10, 0);

/// The tested range: [`TESTED_MIN`]..=[`TESTED_MAX`], or what
/// `VMSNAPFS_TESTED_QEMU=MAJOR.MINOR-MAJOR.MINOR` says (for tests of the
/// warning itself).
fn tested_range() -> ((u64, u64), (u64, u64)) {
    static RANGE: std::sync::OnceLock<((u64, u64), (u64, u64))> = std::sync::OnceLock::new();
    *RANGE.get_or_init(|| {
        std::env::var("VMSNAPFS_TESTED_QEMU")
            .ok()
            .and_then(|r| parse_range(&r))
            .unwrap_or((TESTED_MIN, TESTED_MAX))
    })
}

/// `7.2-10.0` as ((7, 2), (10, 0)).
fn parse_range(r: &str) -> Option<((u64, u64), (u64, u64))> {
    let v = |s: &str| -> Option<(u64, u64)> {
        let (a, b) = s.trim().split_once('.')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    let (lo, hi) = r.split_once('-')?;
    Some((v(lo)?, v(hi)?))
}

/// The answers of one QEMU, reduced to what vmsnapfs asks about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// (major, minor, micro) from `query-version`.
    pub version: (u64, u64, u64),
    /// QEMU's package string (`(Debian 1:10.0.2+ds-...)`), may be empty.
    pub package: String,
    commands: BTreeSet<String>,
    migrate_caps: BTreeSet<String>,
    migrate_params: BTreeSet<String>,
    migration_transports: BTreeSet<String>,
    short_dirty_rate: bool,
}

impl Capabilities {
    /// Asks QEMU (two commands; the schema is a few hundred KiB). An
    /// answer that does not decode into the schema's types is an error.
    pub fn read(qmp: &mut Qmp) -> Result<Self, QmpError> {
        let version = qmp.version()?;
        let schema = qmp.execute(&qmp::query_qmp_schema {})?;
        Ok(Self::from_answers(&version, &schema))
    }

    /// [`Capabilities::read`] of the QEMU process `pid`, whose schema is
    /// asked only once per QEMU executable: a process of the same
    /// executable file (same device, inode, size and times of
    /// `/proc/PID/exe`) reporting the same version has the same schema,
    /// which is compiled into it. The version is read every time (from
    /// the greeting, which carries what `query-version` answers).
    /// Without a pid, or when the executable cannot be told, it is asked.
    pub fn read_cached(qmp: &mut Qmp, pid: Option<i32>) -> Result<Self, QmpError> {
        type Cache = std::sync::Mutex<BTreeMap<(ExeId, String), Capabilities>>;
        static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
        let exe = pid.and_then(ExeId::of);
        let version = qmp.version()?;
        let key = exe.map(|e| (e, format!("{:?} {}", version.qemu, version.package)));
        let cache = CACHE.get_or_init(Default::default);
        if let Some(hit) = key
            .as_ref()
            .and_then(|k| cache.lock().ok()?.get(k).cloned())
        {
            return Ok(hit);
        }
        let schema = qmp.execute(&qmp::query_qmp_schema {})?;
        let caps = Self::from_answers(&version, &schema);
        if let (Some(k), Ok(mut c)) = (key, cache.lock()) {
            c.insert(k, caps.clone());
        }
        Ok(caps)
    }

    /// Builds the answers from `query-version` and `query-qmp-schema` replies.
    pub fn from_answers(version: &qmp::VersionInfo, schema: &[qmp::SchemaInfo]) -> Self {
        let num = |n: i64| u64::try_from(n).unwrap_or(0);
        let commands: BTreeMap<&str, &qmp::SchemaInfoCommand> = schema
            .iter()
            .filter_map(|e| match e {
                qmp::SchemaInfo::command { base, command } => Some((base.name.as_str(), command)),
                _ => None,
            })
            .collect();
        let objects: BTreeMap<&str, &qmp::SchemaInfoObject> = schema
            .iter()
            .filter_map(|e| match e {
                qmp::SchemaInfo::object { base, object } => Some((base.name.as_str(), object)),
                _ => None,
            })
            .collect();
        let arrays: BTreeMap<&str, &str> = schema
            .iter()
            .filter_map(|e| match e {
                qmp::SchemaInfo::array { base, array } => {
                    Some((base.name.as_str(), array.element_type.as_str()))
                }
                _ => None,
            })
            .collect();
        let enums: BTreeMap<&str, BTreeSet<String>> = schema
            .iter()
            .filter_map(|e| match e {
                qmp::SchemaInfo::enum_ { base, enum_ } => Some((
                    base.name.as_str(),
                    enum_.members.iter().map(|m| m.name.clone()).collect(),
                )),
                _ => None,
            })
            .collect();
        // migrate-set-capabilities {capabilities: [{capability: <enum>}]}
        let migrate_caps = (|| {
            let cmd = commands.get("migrate-set-capabilities")?;
            let list = member_type(objects.get(cmd.arg_type.as_str())?, "capabilities")?;
            let elem = objects.get(arrays.get(list)?)?;
            enums.get(member_type(elem, "capability")?).cloned()
        })()
        .unwrap_or_default();
        // migrate-set-parameters {downtime-limit, direct-io, ...}
        let migrate_params = commands
            .get("migrate-set-parameters")
            .and_then(|c| objects.get(c.arg_type.as_str()))
            .map(|o| o.members.iter().map(|m| m.name.clone()).collect())
            .unwrap_or_default();
        // The transports a migration address may use (`exec`, `file`, ...).
        let migration_transports = enums
            .values()
            .find(|v| v.contains("exec") && v.contains("socket"))
            .cloned()
            .unwrap_or_default();
        // calc-dirty-rate {calc-time, calc-time-unit, ...}
        let short_dirty_rate = commands
            .get("calc-dirty-rate")
            .and_then(|c| objects.get(c.arg_type.as_str()))
            .is_some_and(|o| member_type(o, "calc-time-unit").is_some());
        Capabilities {
            version: (
                num(version.qemu.major),
                num(version.qemu.minor),
                num(version.qemu.micro),
            ),
            package: version.package.trim().to_owned(),
            commands: commands.keys().map(|c| (*c).to_owned()).collect(),
            migrate_caps,
            migrate_params,
            migration_transports,
            short_dirty_rate,
        }
    }

    /// True when QEMU measures the guest's dirty rate over milliseconds
    /// (`calc-dirty-rate` with `calc-time-unit`), not whole seconds only.
    pub fn has_short_dirty_rate(&self) -> bool {
        self.short_dirty_rate
    }

    /// True when QEMU has the QMP command `name`.
    pub fn has_command(&self, name: &str) -> bool {
        self.commands.contains(name)
    }

    /// True when `migrate-set-capabilities` accepts capability `name`
    /// (e.g. `mapped-ram`, `multifd`, `background-snapshot`).
    pub fn has_migrate_capability(&self, name: &str) -> bool {
        self.migrate_caps.contains(name)
    }

    /// True when QEMU migrates to and from a `file:` URI (which may be
    /// read at fixed offsets: needed by `mapped-ram`).
    pub fn has_file_migration(&self) -> bool {
        self.migration_transports.contains("file")
    }

    /// True when memory files can be saved with RAM at fixed offsets and
    /// written and read by several threads at once.
    pub fn has_parallel_memory_files(&self) -> bool {
        self.has_file_migration()
            && self.has_migrate_capability("mapped-ram")
            && self.has_migrate_capability("multifd")
    }

    /// True when `migrate-set-parameters` accepts parameter `name`
    /// (e.g. `direct-io`, `downtime-limit`).
    pub fn has_migrate_parameter(&self, name: &str) -> bool {
        self.migrate_params.contains(name)
    }

    /// True when a running guest's checkpoint can be a live copy of RAM
    /// into a file at fixed offsets: a precopy migration with `mapped-ram`
    /// and `multifd` written with `direct-io` (durable as it is written),
    /// which stops at `pre-switchover` (`pause-before-switchover`,
    /// `migrate-continue`) so that the disks switch at the same instant.
    pub fn has_live_parallel_checkpoints(&self) -> bool {
        self.has_parallel_memory_files()
            && self.has_live_stream_checkpoints()
            && self.has_migrate_parameter("direct-io")
    }

    /// True when a running guest's checkpoint can be a live copy of RAM
    /// into a migration stream: a precopy migration (`downtime-limit`)
    /// that stops at `pre-switchover` (`pause-before-switchover`,
    /// `migrate-continue`) so that the disks switch at the same instant.
    /// Needs no userfaultfd (which background-snapshot does).
    pub fn has_live_stream_checkpoints(&self) -> bool {
        self.has_migrate_capability("pause-before-switchover")
            && self.has_command("migrate-continue")
            && self.has_migrate_parameter("downtime-limit")
    }

    /// `7.2.22`.
    pub fn version_text(&self) -> String {
        let (a, b, c) = self.version;
        format!("{a}.{b}.{c}")
    }

    /// A warning when this QEMU is outside the tested range; vmsnapfs
    /// still uses it, deciding by the capabilities it reports.
    pub fn range_warning(&self) -> Option<String> {
        self.warning_for(tested_range())
    }

    fn warning_for(&self, (lo, hi): ((u64, u64), (u64, u64))) -> Option<String> {
        let v = (self.version.0, self.version.1);
        (v < lo || v > hi).then(|| {
            format!(
                "QEMU {} is outside the tested range {}.{}-{}.{}; vmsnapfs uses what it reports",
                self.version_text(),
                lo.0,
                lo.1,
                hi.0,
                hi.1
            )
        })
    }
}

/// The identity of a process's executable file: device, inode, size,
/// modification and change times of `/proc/PID/exe` (a rebuilt or
/// replaced binary differs in one of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ExeId([i64; 7]);

impl ExeId {
    fn of(pid: i32) -> Option<ExeId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
        Some(ExeId([
            m.dev() as i64,
            m.ino() as i64,
            m.size() as i64,
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        ]))
    }
}

/// The type name of member `name` of an object type of the schema.
fn member_type<'a>(object: &'a qmp::SchemaInfoObject, name: &str) -> Option<&'a str> {
    object
        .members
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.type_.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A schema shaped like QEMU's (type names are masked numbers).
    fn schema(caps: &[&str], transports: &[&str]) -> Vec<qmp::SchemaInfo> {
        schema_with(caps, transports, &[], &[])
    }

    /// [`schema`] with more commands and `migrate-set-parameters` members.
    fn schema_with(
        caps: &[&str],
        transports: &[&str],
        commands: &[&str],
        params: &[&str],
    ) -> Vec<qmp::SchemaInfo> {
        let members = |v: &[&str]| v.iter().map(|t| json!({"name": t})).collect::<Vec<_>>();
        let param_members: Vec<_> = params
            .iter()
            .map(|p| json!({"name": p, "type": "int", "default": null}))
            .collect();
        let mut entries: Vec<serde_json::Value> = commands
            .iter()
            .map(|c| json!({"name": c, "meta-type": "command", "arg-type": "0", "ret-type": "0"}))
            .collect();
        entries.push(
            json!({"name": "migrate-set-parameters", "meta-type": "command",
             "arg-type": "20", "ret-type": "0"}),
        );
        entries.push(json!({"name": "20", "meta-type": "object", "members": param_members}));
        let mut base: Vec<serde_json::Value> = serde_json::from_value(json!([
            {"name": "migrate-set-capabilities", "meta-type": "command",
             "arg-type": "10", "ret-type": "0"},
            {"name": "query-status", "meta-type": "command", "arg-type": "0", "ret-type": "1"},
            {"name": "10", "meta-type": "object",
             "members": [{"name": "capabilities", "type": "[11]"}]},
            {"name": "[11]", "meta-type": "array", "element-type": "11"},
            {"name": "11", "meta-type": "object",
             "members": [{"name": "capability", "type": "12"}, {"name": "state", "type": "bool"}]},
            {"name": "12", "meta-type": "enum", "values": caps, "members": members(caps)},
            {"name": "13", "meta-type": "enum", "values": transports,
             "members": members(transports)},
        ]))
        .unwrap();
        base.extend(entries);
        serde_json::from_value(serde_json::Value::Array(base)).unwrap()
    }

    #[test]
    fn a_live_parallel_checkpoint_needs_every_piece() {
        let caps = [
            "background-snapshot",
            "mapped-ram",
            "multifd",
            "pause-before-switchover",
        ];
        let transports = ["socket", "exec", "file"];
        let params = ["downtime-limit", "direct-io", "max-bandwidth"];
        let full = Capabilities::from_answers(
            &version(10, 0),
            &schema_with(&caps, &transports, &["migrate-continue"], &params),
        );
        assert!(full.has_migrate_parameter("direct-io"));
        assert!(full.has_live_parallel_checkpoints());
        // Each piece missing on its own keeps today's background snapshot.
        let without = |caps: &[&str], cmds: &[&str], params: &[&str]| {
            Capabilities::from_answers(
                &version(10, 0),
                &schema_with(caps, &transports, cmds, params),
            )
            .has_live_parallel_checkpoints()
        };
        assert!(!without(&caps[..3], &["migrate-continue"], &params));
        assert!(!without(&caps, &[], &params));
        assert!(!without(&caps, &["migrate-continue"], &["downtime-limit"]));
        assert!(!without(&caps, &["migrate-continue"], &["direct-io"]));
        assert!(!without(
            &["background-snapshot", "multifd", "pause-before-switchover"],
            &["migrate-continue"],
            &params
        ));
        // QEMU 7.2's answers: pause-before-switchover and migrate-continue
        // exist, mapped-ram, the file transport and direct-io do not.
        let old = Capabilities::from_answers(
            &version(7, 2),
            &schema_with(
                &["background-snapshot", "multifd", "pause-before-switchover"],
                &["socket", "exec", "rdma"],
                &["migrate-continue"],
                &["downtime-limit", "max-bandwidth"],
            ),
        );
        assert!(!old.has_live_parallel_checkpoints());
        // ... but a live copy into a stream.
        assert!(old.has_live_stream_checkpoints());
        assert!(full.has_live_stream_checkpoints());
        let stream_without = |caps: &[&str], cmds: &[&str], params: &[&str]| {
            Capabilities::from_answers(
                &version(7, 2),
                &schema_with(caps, &["socket", "exec"], cmds, params),
            )
            .has_live_stream_checkpoints()
        };
        assert!(stream_without(
            &["pause-before-switchover"],
            &["migrate-continue"],
            &["downtime-limit"]
        ));
        assert!(!stream_without(
            &["background-snapshot"],
            &["migrate-continue"],
            &["downtime-limit"]
        ));
        assert!(!stream_without(
            &["pause-before-switchover"],
            &[],
            &["downtime-limit"]
        ));
        assert!(!stream_without(
            &["pause-before-switchover"],
            &["migrate-continue"],
            &["max-bandwidth"]
        ));
    }

    #[test]
    fn a_dirty_rate_in_milliseconds_needs_calc_time_unit() {
        let with_args = |members: serde_json::Value| -> Capabilities {
            let mut s = schema(&["background-snapshot"], &["socket", "exec"]);
            let extra: Vec<qmp::SchemaInfo> = serde_json::from_value(json!([
                {"name": "calc-dirty-rate", "meta-type": "command", "arg-type": "30",
                 "ret-type": "0"},
                {"name": "30", "meta-type": "object", "members": members},
            ]))
            .unwrap();
            s.extend(extra);
            Capabilities::from_answers(&version(10, 0), &s)
        };
        // 8.2 on: calc-time-unit.
        assert!(with_args(json!([
            {"name": "calc-time", "type": "int"},
            {"name": "calc-time-unit", "type": "31", "default": null},
            {"name": "sample-pages", "type": "int", "default": null},
        ]))
        .has_short_dirty_rate());
        // 7.2: seconds only.
        assert!(!with_args(json!([
            {"name": "calc-time", "type": "int"},
            {"name": "sample-pages", "type": "int", "default": null},
        ]))
        .has_short_dirty_rate());
        // No such command.
        assert!(!Capabilities::from_answers(
            &version(10, 0),
            &schema(&["background-snapshot"], &["socket"])
        )
        .has_short_dirty_rate());
    }

    fn version(major: u64, minor: u64) -> qmp::VersionInfo {
        serde_json::from_value(
            json!({"qemu": {"major": major, "minor": minor, "micro": 2}, "package": " (Debian)"}),
        )
        .unwrap()
    }

    #[test]
    fn reads_migration_capabilities_and_transports() {
        let c = Capabilities::from_answers(
            &version(10, 0),
            &schema(
                &["background-snapshot", "mapped-ram", "multifd"],
                &["socket", "exec", "rdma", "file"],
            ),
        );
        assert!(c.has_command("query-status"));
        assert!(!c.has_command("blockdev-set-active"));
        assert!(c.has_migrate_capability("mapped-ram"));
        assert!(c.has_parallel_memory_files());
        assert_eq!(c.version_text(), "10.0.2");
        assert_eq!(c.package, "(Debian)");
    }

    #[test]
    fn an_older_schema_has_no_parallel_memory_files() {
        let c = Capabilities::from_answers(
            &version(7, 2),
            &schema(&["background-snapshot", "multifd"], &[]),
        );
        assert!(!c.has_migrate_capability("mapped-ram"));
        assert!(!c.has_file_migration());
        assert!(!c.has_parallel_memory_files());
        // mapped-ram without a file transport is not enough either.
        let c = Capabilities::from_answers(
            &version(9, 0),
            &schema(&["mapped-ram", "multifd"], &["socket", "exec"]),
        );
        assert!(!c.has_parallel_memory_files());
    }

    #[test]
    fn warns_outside_the_tested_range_only() {
        let s = schema(&[], &[]);
        for (v, warn) in [
            ((7, 1), true),
            ((7, 2), false),
            ((8, 2), false),
            ((10, 0), false),
            ((10, 1), true),
            ((11, 0), true),
        ] {
            let c = Capabilities::from_answers(&version(v.0, v.1), &s);
            let w = c.warning_for((TESTED_MIN, TESTED_MAX));
            assert_eq!(w.is_some(), warn, "{v:?}");
        }
        assert_eq!(parse_range("7.2-9.2"), Some(((7, 2), (9, 2))));
        assert_eq!(parse_range("7-9"), None);
    }

    #[test]
    fn a_schema_that_does_not_decode_is_an_error_not_a_default() {
        // An enum without its members, a command without its types.
        for garbled in [
            json!([{"name": "12", "meta-type": "enum", "values": ["multifd"]}]),
            json!([{"name": "stop", "meta-type": "command"}]),
            json!({"not": "a list"}),
        ] {
            assert!(serde_json::from_value::<Vec<qmp::SchemaInfo>>(garbled).is_err());
        }
        assert!(serde_json::from_value::<qmp::VersionInfo>(json!("x")).is_err());
    }

    #[test]
    fn an_empty_schema_means_no_capabilities() {
        let c = Capabilities::from_answers(&version(0, 0), &[]);
        assert!(!c.has_migrate_capability("multifd"));
        assert!(!c.has_command("query-status"));
    }
}
