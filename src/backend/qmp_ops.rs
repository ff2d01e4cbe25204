//! The QMP commands vmsnapfs sends, one method each, with the `qapi`
//! crate's generated types for the arguments and the answers: a field
//! QEMU leaves out that the schema requires is an error (`QmpError::
//! Protocol`), never a silent default.

use std::time::Duration;

use qapi::qmp;

use super::qmp::{Qmp, QmpError};

impl Qmp {
    /// Pauses the guest (`stop`).
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute(&qmp::stop {}).map(drop)
    }

    /// Resumes the guest (`cont`).
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute(&qmp::cont {}).map(drop)
    }

    /// Resets the machine (`system_reset`).
    pub fn system_reset(&mut self) -> Result<(), QmpError> {
        self.execute(&qmp::system_reset {}).map(drop)
    }

    /// Asks QEMU to exit (`quit`).
    pub fn quit(&mut self) -> Result<(), QmpError> {
        self.execute(&qmp::quit {}).map(drop)
    }

    /// The run state (`query-status`), waiting at most `timeout`.
    pub fn run_state(&mut self, timeout: Duration) -> Result<qmp::RunState, QmpError> {
        Ok(self
            .execute_typed_within(&qmp::query_status {}, timeout)?
            .status)
    }

    /// The block devices (`query-block`).
    pub fn block_devices(&mut self) -> Result<Vec<qmp::BlockInfo>, QmpError> {
        self.execute(&qmp::query_block {})
    }

    /// Every named block node, flat (`query-named-block-nodes`).
    pub fn named_nodes(&mut self) -> Result<Vec<qmp::BlockDeviceInfo>, QmpError> {
        self.execute(&qmp::query_named_block_nodes { flat: Some(true) })
    }

    /// Closes node `node` (`blockdev-del`).
    pub fn blockdev_del(&mut self, node: &str) -> Result<(), QmpError> {
        self.execute(&qmp::blockdev_del {
            node_name: node.to_owned(),
        })
        .map(drop)
    }

    /// Opens the qcow2 image `filename` as node `node`, its `file` child
    /// a plain file and its backing image the one its header names
    /// (`blockdev-add`).
    pub fn add_qcow2(&mut self, node: &str, filename: &str) -> Result<(), QmpError> {
        let file = qmp::BlockdevOptions::file {
            base: base_options(None),
            file: file_options(filename),
        };
        let qcow2: qmp::BlockdevOptionsQcow2 = qmp::BlockdevOptionsGenericCOWFormat::from(
            qmp::BlockdevOptionsGenericFormat::from(qmp::BlockdevRef::definition(Box::new(file))),
        )
        .into();
        self.execute(&qmp::blockdev_add(qmp::BlockdevOptions::qcow2 {
            base: base_options(Some(node)),
            qcow2,
        }))
        .map(drop)
    }

    /// Points device `device`'s `drive` property at node `node` (`qom-set`).
    pub fn set_drive(&mut self, device: &str, node: &str) -> Result<(), QmpError> {
        self.execute(&qmp::qom_set {
            path: device.to_owned(),
            property: "drive".into(),
            value: serde_json::Value::String(node.to_owned()),
        })
        .map(drop)
    }

    /// The machine type QEMU emulates (`qom-get /machine type`), e.g.
    /// `pc-q35-7.2-machine`.
    pub fn machine_type(&mut self) -> Result<String, QmpError> {
        let v = self.execute(&qmp::qom_get {
            path: "/machine".into(),
            property: "type".into(),
        })?;
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| QmpError::Protocol(format!("qom-get /machine type: not a string: {v}")))
    }

    /// The guest's base RAM in bytes (`query-memory-size-summary`).
    pub fn base_memory(&mut self, timeout: Duration) -> Result<u64, QmpError> {
        Ok(self
            .execute_typed_within(&qmp::query_memory_size_summary {}, timeout)?
            .base_memory)
    }

    /// External snapshots of several nodes in one `transaction`: each
    /// node gets the overlay that vmsnapfs made at `file` (mode
    /// `existing`, format qcow2) as its new top, node name `overlay_node`.
    pub fn snapshot_transaction(
        &mut self,
        snapshots: &[(String, String, String)],
    ) -> Result<(), QmpError> {
        let actions = snapshots
            .iter()
            .map(|(node, file, overlay_node)| {
                qmp::TransactionAction::blockdev_snapshot_sync(qmp::BlockdevSnapshotSyncWrapper {
                    data: qmp::BlockdevSnapshotSync {
                        device: None,
                        node_name: Some(node.clone()),
                        snapshot_file: file.clone(),
                        snapshot_node_name: Some(overlay_node.clone()),
                        format: Some("qcow2".into()),
                        mode: Some(qmp::NewImageMode::existing),
                    },
                })
            })
            .collect();
        self.execute(&qmp::transaction {
            actions,
            properties: None,
        })
        .map(drop)
    }

    /// Internal snapshots `tag` of several nodes in one `transaction`.
    pub fn internal_snapshot_transaction(
        &mut self,
        nodes: &[String],
        tag: &str,
    ) -> Result<(), QmpError> {
        let actions = nodes
            .iter()
            .map(|node| {
                qmp::TransactionAction::blockdev_snapshot_internal_sync(
                    qmp::BlockdevSnapshotInternalWrapper {
                        data: qmp::BlockdevSnapshotInternal {
                            device: node.clone(),
                            name: tag.to_owned(),
                        },
                    },
                )
            })
            .collect();
        self.execute(&qmp::transaction {
            actions,
            properties: None,
        })
        .map(drop)
    }

    /// Starts an outgoing migration to `uri` (`migrate`).
    pub fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute(&qmp::migrate {
            uri: Some(uri.to_owned()),
            channels: None,
            detach: None,
            resume: None,
        })
        .map(drop)
    }

    /// Starts loading an incoming migration from `uri` (`migrate-incoming`).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute(&qmp::migrate_incoming {
            uri: Some(uri.to_owned()),
            channels: None,
            exit_on_error: None,
        })
        .map(drop)
    }

    /// Cancels the migration in progress (`migrate_cancel`).
    pub fn migrate_cancel(&mut self) -> Result<(), QmpError> {
        self.execute(&qmp::migrate_cancel {}).map(drop)
    }

    /// The migration's progress (`query-migrate`).
    pub fn migration(&mut self) -> Result<qmp::MigrationInfo, QmpError> {
        self.execute(&qmp::query_migrate {})
    }

    /// Turns migration capabilities on or off (`migrate-set-capabilities`).
    pub fn set_migrate_capabilities(
        &mut self,
        caps: &[qmp::MigrationCapability],
        on: bool,
    ) -> Result<(), QmpError> {
        let capabilities = caps
            .iter()
            .map(|c| qmp::MigrationCapabilityStatus {
                capability: *c,
                state: on,
            })
            .collect();
        self.execute(&qmp::migrate_set_capabilities { capabilities })
            .map(drop)
    }

    /// The migration bandwidth limit in bytes per second
    /// (`query-migrate-parameters`).
    pub fn max_bandwidth(&mut self) -> Result<Option<u64>, QmpError> {
        Ok(self
            .execute(&qmp::query_migrate_parameters {})?
            .max_bandwidth)
    }

    /// Sets the migration bandwidth limit (`migrate-set-parameters`).
    pub fn set_max_bandwidth(&mut self, bytes_per_sec: u64) -> Result<(), QmpError> {
        let p: qmp::MigrateSetParameters =
            from_json(serde_json::json!({ "max-bandwidth": bytes_per_sec }))?;
        self.execute(&qmp::migrate_set_parameters(p)).map(drop)
    }

    /// The migration parameters vmsnapfs changes for a live checkpoint:
    /// (`downtime-limit` in ms, `direct-io`), as QEMU reports them.
    pub fn downtime_and_direct_io(&mut self) -> Result<(Option<u64>, Option<bool>), QmpError> {
        let p = self.execute(&qmp::query_migrate_parameters {})?;
        Ok((p.downtime_limit, p.direct_io))
    }

    /// Sets `downtime-limit` (ms) and `direct-io` (`migrate-set-parameters`).
    pub fn set_downtime_and_direct_io(
        &mut self,
        downtime_ms: u64,
        direct_io: bool,
    ) -> Result<(), QmpError> {
        let p: qmp::MigrateSetParameters = from_json(serde_json::json!({
            "downtime-limit": downtime_ms,
            "direct-io": direct_io,
        }))?;
        self.execute(&qmp::migrate_set_parameters(p)).map(drop)
    }

    /// Sets `downtime-limit` (ms) alone (`migrate-set-parameters`), for
    /// a QEMU without `direct-io`.
    pub fn set_downtime(&mut self, downtime_ms: u64) -> Result<(), QmpError> {
        let p: qmp::MigrateSetParameters =
            from_json(serde_json::json!({ "downtime-limit": downtime_ms }))?;
        self.execute(&qmp::migrate_set_parameters(p)).map(drop)
    }

    /// Sets `direct-io` (`migrate-set-parameters`).
    pub fn set_direct_io(&mut self, on: bool) -> Result<(), QmpError> {
        let p: qmp::MigrateSetParameters = from_json(serde_json::json!({ "direct-io": on }))?;
        self.execute(&qmp::migrate_set_parameters(p)).map(drop)
    }

    /// Lets a migration waiting in `pre-switchover` go on (`migrate-continue`).
    pub fn migrate_continue(&mut self) -> Result<(), QmpError> {
        self.execute(&qmp::migrate_continue {
            state: qmp::MigrationStatus::pre_switchover,
        })
        .map(drop)
    }

    /// True when migration capability `name` is on (`query-migrate-capabilities`,
    /// read untyped: a QEMU may list capabilities this build does not know).
    pub fn migrate_capability_on(&mut self, name: &str) -> Result<bool, QmpError> {
        let caps = self.execute_raw("query-migrate-capabilities", serde_json::json!({}))?;
        Ok(caps.as_array().is_some_and(|a| {
            a.iter()
                .any(|c| c["capability"] == name && c["state"] == serde_json::Value::Bool(true))
        }))
    }

    /// The jobs QEMU runs (`query-jobs`).
    pub fn jobs(&mut self) -> Result<Vec<qmp::JobInfo>, QmpError> {
        self.execute(&qmp::query_jobs {})
    }

    /// Completes job `id` waiting in `ready` (`job-complete`).
    pub fn job_complete(&mut self, id: &str) -> Result<(), QmpError> {
        self.execute(&qmp::job_complete { id: id.to_owned() })
            .map(drop)
    }

    /// Dismisses concluded job `id` (`job-dismiss`).
    pub fn job_dismiss(&mut self, id: &str) -> Result<(), QmpError> {
        self.execute(&qmp::job_dismiss { id: id.to_owned() })
            .map(drop)
    }

    /// Starts job `job`: a `block-commit` on the chain of `device` (a
    /// node name) of `top` (none: the active layer, which waits in
    /// `ready`) into node `base`; the job stays until dismissed.
    pub fn block_commit(
        &mut self,
        job: &str,
        device: &str,
        top: Option<&str>,
        base: Option<&str>,
    ) -> Result<(), QmpError> {
        let mut args: qmp::block_commit = from_json(serde_json::json!({
            "device": device,
            "job-id": job,
            "auto-dismiss": false,
        }))?;
        args.top_node = top.map(str::to_owned);
        args.base_node = base.map(str::to_owned);
        self.execute(&args).map(drop)
    }

    /// Starts job `job`: a `block-stream` into node `device` of what lies
    /// above node `base` (none: the whole chain below `device`).
    pub fn block_stream(
        &mut self,
        job: &str,
        device: &str,
        base: Option<&str>,
    ) -> Result<(), QmpError> {
        let mut args: qmp::block_stream = from_json(serde_json::json!({
            "device": device,
            "job-id": job,
            "auto-dismiss": false,
        }))?;
        args.base_node = base.map(str::to_owned);
        self.execute(&args).map(drop)
    }

    /// QEMU's version: as its greeting gave it (the same answer), else
    /// from `query-version`.
    pub fn version(&mut self) -> Result<qmp::VersionInfo, QmpError> {
        if let Some(v) = self.greeting_version() {
            return Ok(v.clone());
        }
        self.execute(&qmp::query_version {})
    }
}

/// True when `event` (one QEMU sent) is a `JOB_STATUS_CHANGE` of job `id`.
pub fn is_status_change_of(event: &serde_json::Value, id: &str) -> bool {
    matches!(
        serde_json::from_value::<qmp::Event>(event.clone()),
        Ok(qmp::Event::JOB_STATUS_CHANGE { data, .. }) if data.id == id
    )
}

/// When QEMU sent `event`, if it is a `RESUME`.
pub fn resumed_at(event: &serde_json::Value) -> Option<std::time::SystemTime> {
    sent_at(event, |e| matches!(e, qmp::Event::RESUME { .. }))
}

/// When QEMU sent `event`, if it is a `STOP`.
pub fn stopped_at(event: &serde_json::Value) -> Option<std::time::SystemTime> {
    sent_at(event, |e| matches!(e, qmp::Event::STOP { .. }))
}

/// When QEMU sent `event`, if it is one `wanted` accepts.
fn sent_at(
    event: &serde_json::Value,
    wanted: impl Fn(&qmp::Event) -> bool,
) -> Option<std::time::SystemTime> {
    /// The time of an event (the `qapi` crate keeps its own private).
    #[derive(serde::Deserialize)]
    struct Stamp {
        seconds: u64,
        microseconds: u64,
    }
    #[derive(serde::Deserialize)]
    struct Stamped {
        timestamp: Stamp,
    }
    let e = serde_json::from_value::<qmp::Event>(event.clone()).ok()?;
    if !wanted(&e) {
        return None;
    }
    let t = serde_json::from_value::<Stamped>(event.clone())
        .ok()?
        .timestamp;
    Some(
        std::time::UNIX_EPOCH
            + Duration::from_secs(t.seconds)
            + Duration::from_micros(t.microseconds),
    )
}

/// Arguments of type `T` from the JSON of the fields vmsnapfs sets (the
/// generated types have no defaults; every other field stays unset).
fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, QmpError> {
    serde_json::from_value(v).map_err(|e| QmpError::Protocol(format!("arguments: {e}")))
}

/// Node options with only a node name (and QEMU's defaults).
fn base_options(node: Option<&str>) -> qmp::BlockdevOptionsBase {
    qmp::BlockdevOptionsBase {
        auto_read_only: None,
        cache: None,
        detect_zeroes: None,
        discard: None,
        force_share: None,
        node_name: node.map(str::to_owned),
        read_only: None,
    }
}

/// The `file` driver's options for `filename`, QEMU's defaults otherwise.
fn file_options(filename: &str) -> qmp::BlockdevOptionsFile {
    from_json(serde_json::json!({ "filename": filename }))
        .expect("a file name alone is valid file options")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_qcow2_node_is_spelled_as_qemu_expects() {
        let file = qmp::BlockdevOptions::file {
            base: base_options(None),
            file: file_options("/i/a,b.qcow2"),
        };
        let qcow2: qmp::BlockdevOptionsQcow2 = qmp::BlockdevOptionsGenericCOWFormat::from(
            qmp::BlockdevOptionsGenericFormat::from(qmp::BlockdevRef::definition(Box::new(file))),
        )
        .into();
        let v = serde_json::to_value(qmp::blockdev_add(qmp::BlockdevOptions::qcow2 {
            base: base_options(Some("n1")),
            qcow2,
        }))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"driver": "qcow2", "node-name": "n1",
                "file": {"driver": "file", "filename": "/i/a,b.qcow2"}})
        );
    }

    #[test]
    fn a_commit_names_only_what_it_sets() {
        let mut args: qmp::block_commit =
            from_json(serde_json::json!({"device": "d", "job-id": "j", "auto-dismiss": false}))
                .unwrap();
        args.base_node = Some("b".into());
        assert_eq!(
            serde_json::to_value(args).unwrap(),
            serde_json::json!({"job-id": "j", "device": "d", "base-node": "b", "auto-dismiss": false})
        );
    }

    #[test]
    fn events_are_read_by_their_types() {
        let change = serde_json::json!({"event": "JOB_STATUS_CHANGE",
            "data": {"id": "j1", "status": "concluded"},
            "timestamp": {"seconds": 1, "microseconds": 2}});
        assert!(is_status_change_of(&change, "j1"));
        assert!(!is_status_change_of(&change, "j2"));
        let resume = serde_json::json!({"event": "RESUME",
            "timestamp": {"seconds": 1700000000, "microseconds": 250}});
        assert_eq!(
            resumed_at(&resume),
            Some(std::time::UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_250))
        );
        assert_eq!(resumed_at(&change), None);
        // An event this QEMU knows and the schema does not: never matched.
        let unknown = serde_json::json!({"event": "NEW_THING", "data": {},
            "timestamp": {"seconds": 1, "microseconds": 2}});
        assert!(!is_status_change_of(&unknown, "j1"));
        assert_eq!(resumed_at(&unknown), None);
    }

    #[test]
    fn an_answer_missing_a_required_field_does_not_decode() {
        let r: Result<qmp::StatusInfo, _> =
            serde_json::from_value(serde_json::json!({"running": true}));
        assert!(r.is_err());
        let r: Result<qmp::StatusInfo, _> =
            serde_json::from_value(serde_json::json!({"running": true, "status": "running"}));
        assert!(matches!(r.unwrap().status, qmp::RunState::running));
    }
}
