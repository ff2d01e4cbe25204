//! The safety rule of every revert, in one pure function: from the
//! domain's state, where the snapshot's data is and what the request
//! says, whether the revert may run (`EPERM` without `force`,
//! `EOPNOTSUPP` without a command line) and what it does to QEMU.
//! The three ways a revert runs (revert.rs, branch.rs, relocate.rs) all
//! ask it; docs/user-guide.md ("Revert") is the table it implements.

use crate::model::DomainState;

/// Where the data of the snapshot a revert goes to is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevertPlace {
    /// Internal snapshot in the disks' active layers: reverted in place
    /// (`snapshot-load` in the running QEMU, or `qemu-img snapshot -a`).
    Active,
    /// Internal snapshot in images that are no longer all active layers:
    /// QEMU is stopped, the images reverted in place (relocate.rs).
    Backing,
    /// External snapshot: a branch of new overlays (branch.rs); with RAM,
    /// a new QEMU process loads the memory file.
    External,
}

/// Everything the rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevertCase {
    /// The domain's state now.
    pub live: DomainState,
    /// The state the revert leaves it in.
    pub target: DomainState,
    /// The snapshot holds RAM (a checkpoint).
    pub memory: bool,
    /// Where the snapshot's data is.
    pub place: RevertPlace,
    /// The request says `force`.
    pub force: bool,
    /// The request says `discard`.
    pub discard: bool,
    /// A command line to start QEMU is known.
    pub can_start: bool,
}

/// What an allowed revert does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevertPlan {
    /// The running QEMU process is quit.
    pub stops_qemu: bool,
    /// A QEMU process is started (from the domain's command line).
    pub starts_qemu: bool,
    /// The running QEMU's images must be active (QEMU 7.2 keeps them
    /// inactive after saving a paused guest's RAM): every revert of a
    /// running domain except to `shutoff` or to an external checkpoint.
    pub needs_active_images: bool,
    /// The state left behind is kept as a `left-*` snapshot (every
    /// revert, unless `discard`; `force` never changes it).
    pub keeps_left: bool,
}

/// Why a revert is refused before anything changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// EPERM: a running or paused domain would be stopped.
    WouldStop,
    /// EPERM: a running or paused domain would lose its live state to a
    /// snapshot without RAM (QEMU restarted, or the guest reset).
    NoSavedState,
    /// EOPNOTSUPP: the revert must start QEMU and no command line is known.
    NoCommandLine,
}

/// What a revert does, allowed or not.
pub fn plan(case: &RevertCase) -> RevertPlan {
    let up = case.live != DomainState::Shutoff;
    let to_up = case.target != DomainState::Shutoff;
    let (stops_qemu, starts_qemu) = match case.place {
        // snapshot-load in the same process only for a checkpoint of a
        // running domain that stays up.
        RevertPlace::Active => {
            let in_place = up && case.memory && to_up;
            (up && !in_place, to_up && !in_place)
        }
        // QEMU reverts only root images: always stopped, started as asked.
        RevertPlace::Backing => (up, to_up),
        // Without RAM a running domain switches devices in place; a
        // checkpoint is loaded by a new process.
        RevertPlace::External => (up && (!to_up || case.memory), to_up && (!up || case.memory)),
    };
    RevertPlan {
        stops_qemu,
        starts_qemu,
        needs_active_images: up && to_up && !(case.place == RevertPlace::External && case.memory),
        keeps_left: !case.discard,
    }
}

/// The rule: the plan of an allowed revert, or why it is refused.
pub fn decide(case: &RevertCase) -> Result<RevertPlan, Refusal> {
    let up = case.live != DomainState::Shutoff;
    let to_up = case.target != DomainState::Shutoff;
    if up && !to_up && !case.force {
        return Err(Refusal::WouldStop);
    }
    if up && to_up && !case.memory && !case.force {
        return Err(Refusal::NoSavedState);
    }
    let plan = plan(case);
    if plan.starts_qemu && !case.can_start {
        return Err(Refusal::NoCommandLine);
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use DomainState::{Paused, Running, Shutoff};
    use RevertPlace::{Active, Backing, External};

    /// One row: place, memory, live, target -> (force needed, stops,
    /// starts, needs active images). The user guide's tables.
    type Row = (
        RevertPlace,
        bool,
        DomainState,
        DomainState,
        bool,
        bool,
        bool,
        bool,
    );

    /// The case of these fields.
    fn case_of(
        place: RevertPlace,
        memory: bool,
        live: DomainState,
        target: DomainState,
        force: bool,
        discard: bool,
        can_start: bool,
    ) -> RevertCase {
        RevertCase {
            live,
            target,
            memory,
            place,
            force,
            discard,
            can_start,
        }
    }

    fn rows() -> Vec<Row> {
        let mut rows = Vec::new();
        for place in [Active, Backing, External] {
            for memory in [false, true] {
                for live in [Running, Paused, Shutoff] {
                    for target in [Running, Paused, Shutoff] {
                        let up = live != Shutoff;
                        let to_up = target != Shutoff;
                        // Force: stopping a running domain, or replacing
                        // its live state by disks alone.
                        let force = up && (!to_up || !memory);
                        let (stops, starts) = match (place, up, to_up, memory) {
                            (Active, true, true, true) => (false, false),
                            (Active, true, true, false) => (true, true),
                            (Active, true, false, _) => (true, false),
                            (Active, false, to_up, _) => (false, to_up),
                            (Backing, up, to_up, _) => (up, to_up),
                            (External, true, true, false) => (false, false),
                            (External, true, true, true) => (true, true),
                            (External, true, false, _) => (true, false),
                            (External, false, to_up, _) => (false, to_up),
                        };
                        let active = up && to_up && !(place == External && memory);
                        rows.push((place, memory, live, target, force, stops, starts, active));
                    }
                }
            }
        }
        rows
    }

    #[test]
    fn every_combination() {
        let rows = rows();
        assert_eq!(rows.len(), 3 * 2 * 3 * 3);
        for (place, memory, live, target, needs_force, stops, starts, active) in rows {
            for force in [false, true] {
                for discard in [false, true] {
                    for can_start in [false, true] {
                        let case = case_of(place, memory, live, target, force, discard, can_start);
                        let got = decide(&case);
                        let want = if needs_force && !force {
                            Err(if target == Shutoff {
                                Refusal::WouldStop
                            } else {
                                Refusal::NoSavedState
                            })
                        } else if starts && !can_start {
                            Err(Refusal::NoCommandLine)
                        } else {
                            Ok(RevertPlan {
                                stops_qemu: stops,
                                starts_qemu: starts,
                                needs_active_images: active,
                                keeps_left: !discard,
                            })
                        };
                        assert_eq!(got, want, "{case:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn force_and_discard_do_not_change_the_plan() {
        for (place, memory, live, target, ..) in rows() {
            let case = |force, discard| case_of(place, memory, live, target, force, discard, true);
            let base = plan(&case(false, false));
            for (f, d) in [(true, false), (false, true), (true, true)] {
                let p = plan(&case(f, d));
                assert_eq!(
                    (p.stops_qemu, p.starts_qemu, p.needs_active_images),
                    (base.stops_qemu, base.starts_qemu, base.needs_active_images)
                );
                assert_eq!(p.keeps_left, !d);
            }
        }
    }

    #[test]
    fn documented_examples() {
        let case = |place, memory, live, target, force| {
            case_of(place, memory, live, target, force, false, true)
        };
        // A checkpoint needs no force from a running domain, of any kind.
        for place in [Active, Backing, External] {
            assert!(decide(&case(place, true, Running, Running, false)).is_ok());
            assert_eq!(
                decide(&case(place, true, Running, Shutoff, false)),
                Err(Refusal::WouldStop)
            );
            assert_eq!(
                decide(&case(place, false, Paused, Running, false)),
                Err(Refusal::NoSavedState)
            );
            assert!(decide(&case(place, false, Shutoff, Running, false)).is_ok());
        }
        // A stopped domain to shutoff never starts QEMU: no command line needed.
        let c = RevertCase {
            can_start: false,
            ..case(External, true, Shutoff, Shutoff, false)
        };
        assert!(decide(&c).is_ok());
    }
}
