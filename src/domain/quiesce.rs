//! Application-consistent snapshots: the guest's file systems frozen
//! through its guest agent (qemu-ga) right before the disks switch and
//! thawed right after (libvirt's `--quiesce`).
//!
//! [`decide`] is the rule (a pure function, table-tested): whether a
//! create quiesces, skips it (with a `.log` note or silently) or is
//! refused. [`Freezer`] is the freeze and thaw, run by the backend around
//! the disks' transaction ([`crate::backend::SwitchHook`]). A `Thaw`
//! intent is written before the freeze and removed once the guest is
//! thawed; a thaw that fails is retried from the domain's thread every
//! [`RETRY_EVERY`] while the record stays, and start-up recovery thaws a
//! freeze a crashed daemon left.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use super::Domain;
use crate::backend::guest_agent::{Agent, AgentError, Count, Freeze, FreezeStatus};
use crate::error::{Error, ErrorKind, Result};
use crate::model::{AgentChannel, DomainState, QuiesceMode};
use crate::store::{Intent, IntentRecord};

/// How often a failed thaw is tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(10);
/// Thaw attempts right after the switch before the domain's thread takes over.
const THAW_ATTEMPTS: usize = 3;

/// What a create does about quiescing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No freeze; the note, if any, goes to `.log` (a crash-consistent
    /// snapshot where `auto` would have quiesced).
    Skip(Option<String>),
    /// Freeze through this agent channel (if it answers): a socket, or
    /// libvirt's agent.
    Freeze(AgentChannel),
}

/// The rule: `mode` (from the `.create` spec when `asked`, else the
/// domain's default), for a snapshot with RAM (`memory`) or disks only,
/// of a domain in state `live` whose definition has `agent`.
///
/// Quiescing applies to disk-only snapshots of a running guest, as
/// libvirt's `--quiesce`: a checkpoint saves RAM (a guest reverted to a
/// frozen instant would wake up frozen), a stopped guest has nothing in
/// flight, a paused guest's agent cannot answer. Asked for explicitly
/// where it does not apply, it is refused (EINVAL); as a default it is
/// skipped, except that `yes` refuses a paused guest (ENOTCONN: its agent
/// cannot answer). Where it applies, `yes` without a reachable agent
/// channel is EOPNOTSUPP, `auto` goes on crash-consistent with a note.
pub fn decide(
    mode: QuiesceMode,
    asked: bool,
    memory: bool,
    live: DomainState,
    agent: Option<&AgentChannel>,
) -> Result<Plan> {
    if mode == QuiesceMode::No {
        return Ok(Plan::Skip(None));
    }
    let explicit_yes = asked && mode == QuiesceMode::Yes;
    if live == DomainState::Shutoff || live == DomainState::Unreachable {
        if explicit_yes {
            return Err(Error::invalid(
                "quiesce needs a running guest (its agent freezes the file systems); the \
                 domain is not running",
            ));
        }
        return Ok(Plan::Skip(None));
    }
    if memory {
        if explicit_yes {
            return Err(Error::invalid(
                "quiesce applies to disk-only snapshots (as libvirt's --quiesce): a snapshot \
                 with the guest's RAM would wake up frozen when reverted to; use \
                 <memory snapshot='no'/>",
            ));
        }
        return Ok(Plan::Skip(None));
    }
    if live == DomainState::Paused {
        let why = "the guest is paused, so its agent cannot freeze its file systems";
        return match mode {
            QuiesceMode::Yes => Err(Error::new(
                ErrorKind::NotConnected,
                format!("quiesce: {why}; nothing was changed"),
            )),
            _ => Ok(Plan::Skip(Some(format!(
                "not quiesced, crash-consistent: {why}"
            )))),
        };
    }
    let why = match agent {
        Some(ch @ (AgentChannel::Socket(_) | AgentChannel::Libvirt { .. })) => {
            return Ok(Plan::Freeze(ch.clone()))
        }
        Some(AgentChannel::Unreachable(why)) => why.clone(),
        None => "the definition has no guest agent channel (<channel> with target \
                 org.qemu.guest_agent.0)"
            .to_owned(),
    };
    match mode {
        QuiesceMode::Yes => Err(Error::new(
            ErrorKind::Unsupported,
            format!("quiesce: {why}; nothing was changed"),
        )),
        _ => Ok(Plan::Skip(Some(format!(
            "not quiesced, crash-consistent: {why}"
        )))),
    }
}

/// A session with the agent of `channel`.
pub fn connect(channel: &AgentChannel) -> std::result::Result<Box<dyn Freeze>, AgentError> {
    match channel {
        AgentChannel::Socket(path) => Ok(Box::new(Agent::connect(path)?)),
        AgentChannel::Libvirt { uri, domain } => Ok(Box::new(
            crate::libvirt::agent::LibvirtAgent::new(uri, domain),
        )),
        AgentChannel::Unreachable(why) => Err(AgentError::Unanswered {
            what: "a connection".into(),
            said: why.clone(),
        }),
    }
}

/// What the `Thaw` intent records as the agent: the socket, or a
/// description of libvirt's agent (recovery uses the definition's
/// channel; the record is its fallback for a socket).
fn recorded(channel: &AgentChannel) -> PathBuf {
    match channel {
        AgentChannel::Socket(p) => p.clone(),
        other => PathBuf::from(other.describe()),
    }
}

/// When the agent of a [`Plan::Freeze`] does not answer (or refuses the
/// freeze): `yes` fails (ENOTCONN when it did not answer, EIO when it
/// refused), `auto` goes on crash-consistent with this note.
pub fn without_agent(mode: QuiesceMode, channel: &AgentChannel, e: &AgentError) -> Result<String> {
    let why = format!("{e} ({})", channel.describe());
    if mode == QuiesceMode::Yes {
        let kind = if e.unanswered() {
            ErrorKind::NotConnected
        } else {
            ErrorKind::Io
        };
        return Err(Error::new(
            kind,
            format!("quiesce: {why}; nothing was changed"),
        ));
    }
    Ok(format!("not quiesced, crash-consistent: {why}"))
}

/// A freeze whose thaw failed, retried from the domain's thread.
pub(super) struct PendingThaw {
    record: IntentRecord,
    next: Instant,
    failures: u32,
    /// When the freeze began (`None`: before a restart).
    since: Option<Instant>,
}

/// The freeze and thaw of one create, run by the backend around the
/// disks' switch. Holds the domain's agent for its lifetime; thaws on
/// drop if the backend never called `after_switch`.
pub(super) struct Freezer<'a> {
    dom: &'a Domain,
    what: String,
    id: String,
    channel: AgentChannel,
    mode: QuiesceMode,
    _agent_use: MutexGuard<'a, ()>,
    inner: Mutex<FreezerState>,
}

#[derive(Default)]
struct FreezerState {
    agent: Option<Box<dyn Freeze>>,
    record: Option<IntentRecord>,
    /// When the freeze was sent, and how many file systems it froze.
    frozen: Option<(Instant, Option<Count>)>,
}

impl Domain {
    /// Decides whether the create `what` of snapshot `id` quiesces (see
    /// [`decide`]) and, when it should, checks that the agent answers
    /// (`guest-sync-delimited`, `guest-fsfreeze-status`) before anything
    /// is made. `asked`: the `.create` spec's `quiesce`.
    pub(super) fn prepare_quiesce(
        &self,
        what: &str,
        id: &str,
        asked: Option<bool>,
        memory: bool,
        live: DomainState,
    ) -> Result<Option<Freezer<'_>>> {
        let (mode, explicit) = match asked {
            Some(true) => (QuiesceMode::Yes, true),
            Some(false) => (QuiesceMode::No, true),
            None => (self.def.quiesce_default(), false),
        };
        let channel = match decide(mode, explicit, memory, live, self.def.agent.as_ref())? {
            Plan::Skip(None) => return Ok(None),
            Plan::Skip(Some(note)) => {
                self.log.line(&format!("{what}: {note}"));
                return Ok(None);
            }
            Plan::Freeze(channel) => channel,
        };
        // A freeze left by an earlier failure is thawed first.
        self.retry_thaws(true);
        let guard = self.agent_use.lock();
        let probed = connect(&channel).and_then(|mut a| a.status().map(|s| (a, s)));
        let agent = match probed {
            Ok((agent, FreezeStatus::Thawed)) => agent,
            Ok((_, FreezeStatus::Frozen)) => {
                self.log.line(&format!(
                    "{what}: the guest's file systems are frozen already (by another client \
                     of its agent): the snapshot is consistent; vmsnapfs leaves them frozen"
                ));
                return Ok(None);
            }
            Err(e) => {
                let note = without_agent(mode, &channel, &e)?;
                self.log.line(&format!("{what}: {note}"));
                return Ok(None);
            }
        };
        Ok(Some(Freezer {
            dom: self,
            what: what.to_owned(),
            id: id.to_owned(),
            channel,
            mode,
            _agent_use: guard,
            inner: Mutex::new(FreezerState {
                agent: Some(agent),
                ..Default::default()
            }),
        }))
    }

    /// Thaws the freezes whose thaw failed (and those a crashed daemon
    /// left, see [`Domain::take_thaw_records`]): each is tried when due
    /// (`now`: all at once), while the guest runs; a domain found shut
    /// off has nothing frozen any more. Never waits for the agent an
    /// operation holds.
    pub(super) fn retry_thaws(&self, now: bool) {
        let mut pending = self.thaw_pending.lock();
        if pending.is_empty() {
            return;
        }
        let Some(_agent_use) = self.agent_use.try_lock() else {
            return;
        };
        let state = self.state();
        let mut left = Vec::new();
        for mut p in pending.drain(..) {
            if !now && Instant::now() < p.next {
                left.push(p);
                continue;
            }
            let Intent::Thaw { id, agent } = &p.record.intent else {
                continue;
            };
            let channel = match &self.def.agent {
                Some(ch @ (AgentChannel::Socket(_) | AgentChannel::Libvirt { .. })) => ch.clone(),
                _ => AgentChannel::Socket(agent.clone()),
            };
            let done = match state {
                DomainState::Shutoff => {
                    Ok("the domain is shut off, nothing stays frozen".to_owned())
                }
                DomainState::Running => connect(&channel)
                    .and_then(|mut a| a.thaw())
                    .map(|n| format!("thawed {n} file system(s)"))
                    .map_err(|e| e.to_string()),
                _ => Err(format!("the domain is {}", state.as_str())),
            };
            match done {
                Ok(how) => {
                    let when = match p.since {
                        Some(t) => format!("{:.1} s after it began", t.elapsed().as_secs_f64()),
                        None => "after the daemon restarted".to_owned(),
                    };
                    self.log.line(&format!(
                        "the freeze of the guest's file systems for {id}: {how}, {when}"
                    ));
                    if let Err(e) = self.journal.complete(p.record) {
                        self.log.line(&format!("cannot clear the thaw record: {e}"));
                    }
                }
                Err(why) => {
                    p.failures += 1;
                    if p.failures == 1 || p.failures % 30 == 0 {
                        self.log.line(&format!(
                            "the guest's file systems may still be frozen (for {id}): the thaw \
                             failed ({why}); tried again every {} s",
                            RETRY_EVERY.as_secs()
                        ));
                    }
                    p.next = Instant::now() + RETRY_EVERY;
                    left.push(p);
                }
            }
        }
        *pending = left;
    }

    /// Start-up: takes the `Thaw` records a crashed daemon left out of
    /// `records` and thaws them at once (before the other intents are
    /// replayed); those that fail are retried from the domain's thread.
    pub(super) fn take_thaw_records(&self, records: &mut Vec<IntentRecord>) {
        let (thaws, rest): (Vec<_>, Vec<_>) = std::mem::take(records)
            .into_iter()
            .partition(|r| matches!(r.intent, Intent::Thaw { .. }));
        *records = rest;
        if thaws.is_empty() {
            return;
        }
        let now = Instant::now();
        {
            let mut pending = self.thaw_pending.lock();
            for record in thaws {
                self.log.line(&format!(
                    "recovery: interrupted {}: thawing",
                    record.intent.describe()
                ));
                pending.push(PendingThaw {
                    record,
                    next: now,
                    failures: 0,
                    since: None,
                });
            }
        }
        self.retry_thaws(true);
    }

    fn thaw_later(&self, record: IntentRecord, since: Instant) {
        self.thaw_pending.lock().push(PendingThaw {
            record,
            next: Instant::now() + RETRY_EVERY,
            failures: 1,
            since: Some(since),
        });
    }
}

impl Freezer<'_> {
    /// Thaws now if frozen: a few attempts (a new session after a failed
    /// one), then the domain's thread retries. Logs the frozen window.
    fn thaw(&self, st: &mut FreezerState) {
        let Some((since, froze)) = st.frozen.take() else {
            return;
        };
        let mut last = None;
        for attempt in 0..THAW_ATTEMPTS {
            let agent = match st.agent.take() {
                Some(a) if attempt == 0 => Ok(a),
                _ => connect(&self.channel),
            };
            match agent.and_then(|mut a| a.thaw().map(|n| (a, n))) {
                Ok((a, n)) => {
                    st.agent = Some(a);
                    let window = since.elapsed();
                    if let Some(froze) = froze {
                        self.dom.log.line(&format!(
                            "{}: quiesced: the guest's file systems were frozen for {:.3} s \
                             ({froze} frozen, {n} thawed, {})",
                            self.what,
                            window.as_secs_f64(),
                            self.channel.describe()
                        ));
                    }
                    if let Some(r) = st.record.take() {
                        if let Err(e) = self.dom.journal.complete(r) {
                            self.dom
                                .log
                                .line(&format!("{}: cannot clear the thaw record: {e}", self.what));
                        }
                    }
                    return;
                }
                Err(e) => {
                    self.dom.log.line(&format!(
                        "{}: thaw attempt {} failed: {e}",
                        self.what,
                        attempt + 1
                    ));
                    last = Some(e);
                }
            }
        }
        let why = last.map(|e| e.to_string()).unwrap_or_default();
        match st.record.take() {
            Some(r) => {
                self.dom.log.line(&format!(
                    "{}: the guest's file systems may still be frozen ({why}); the thaw is \
                     tried again every {} s",
                    self.what,
                    RETRY_EVERY.as_secs()
                ));
                self.dom.thaw_later(r, since);
            }
            None => self
                .dom
                .log
                .line(&format!("{}: thaw failed: {why}", self.what)),
        }
    }
}

impl crate::backend::SwitchHook for Freezer<'_> {
    fn before_switch(&self) -> Result<()> {
        let mut st = self.inner.lock();
        let record = self.dom.journal.begin(Intent::Thaw {
            id: self.id.clone(),
            agent: recorded(&self.channel),
        })?;
        st.record = Some(record);
        let t = Instant::now();
        let froze = match st.agent.as_mut() {
            Some(a) => a.freeze(),
            None => connect(&self.channel).and_then(|mut a| a.freeze()),
        };
        match froze {
            Ok(n) => {
                st.frozen = Some((t, Some(n)));
                if let Err(e) = crate::failpoint::hit("create.frozen") {
                    self.thaw(&mut st);
                    return Err(e);
                }
                Ok(())
            }
            Err(e) => {
                // A freeze that timed out may still happen in the guest:
                // thaw in any case.
                st.frozen = Some((t, None));
                self.thaw(&mut st);
                let note = without_agent(self.mode, &self.channel, &e)?;
                self.dom.log.line(&format!("{}: {note}", self.what));
                Ok(())
            }
        }
    }

    fn after_switch(&self) {
        let mut st = self.inner.lock();
        self.thaw(&mut st);
    }
}

impl Drop for Freezer<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        self.thaw(&mut st);
        if let Some(r) = st.record.take() {
            // Never frozen (the switch never came): nothing to thaw.
            let _ = self.dom.journal.complete(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DomainState::*;
    use QuiesceMode::*;

    fn socket() -> AgentChannel {
        AgentChannel::Socket("/run/vm/qga.sock".into())
    }

    /// (mode, asked, memory, live, agent) -> the plan or the errno.
    #[test]
    fn the_decision_table() {
        let unusable = AgentChannel::Unreachable("the channel names no socket".into());
        let libvirt = AgentChannel::Libvirt {
            uri: "qemu:///system".into(),
            domain: "vm1".into(),
        };
        type Row = (
            QuiesceMode,
            bool,
            bool,
            DomainState,
            Option<AgentChannel>,
            &'static str,
        );
        let rows: Vec<Row> = vec![
            // never
            (No, true, false, Running, Some(socket()), "skip"),
            (No, false, false, Running, Some(socket()), "skip"),
            // disk-only of a running guest with an agent: freeze
            (Yes, true, false, Running, Some(socket()), "freeze"),
            (Yes, false, false, Running, Some(socket()), "freeze"),
            (Auto, false, false, Running, Some(socket()), "freeze"),
            // libvirt's agent, through libvirt: the same rule
            (Yes, true, false, Running, Some(libvirt.clone()), "freeze"),
            (Auto, false, false, Running, Some(libvirt.clone()), "freeze"),
            (Auto, false, true, Running, Some(libvirt.clone()), "skip"),
            (Yes, true, false, Paused, Some(libvirt.clone()), "ENOTCONN"),
            // without a reachable agent channel
            (Yes, true, false, Running, None, "EOPNOTSUPP"),
            (
                Yes,
                false,
                false,
                Running,
                Some(unusable.clone()),
                "EOPNOTSUPP",
            ),
            (Auto, false, false, Running, None, "note"),
            (Auto, false, false, Running, Some(unusable.clone()), "note"),
            // a checkpoint: libvirt's rule
            (Yes, true, true, Running, Some(socket()), "EINVAL"),
            (Yes, false, true, Running, Some(socket()), "skip"),
            (Auto, false, true, Running, Some(socket()), "skip"),
            (Yes, true, true, Paused, Some(socket()), "EINVAL"),
            // stopped: nothing in flight
            (Yes, true, false, Shutoff, Some(socket()), "EINVAL"),
            (Yes, false, false, Shutoff, Some(socket()), "skip"),
            (Auto, false, false, Shutoff, Some(socket()), "skip"),
            // paused: the agent cannot answer
            (Yes, true, false, Paused, Some(socket()), "ENOTCONN"),
            (Yes, false, false, Paused, Some(socket()), "ENOTCONN"),
            (Auto, false, false, Paused, Some(socket()), "note"),
        ];
        for (mode, asked, memory, live, agent, want) in rows {
            let got = decide(mode, asked, memory, live, agent.as_ref());
            let shown = match &got {
                Ok(Plan::Skip(None)) => "skip",
                Ok(Plan::Skip(Some(_))) => "note",
                Ok(Plan::Freeze(ch)) => {
                    assert_eq!(Some(ch), agent.as_ref(), "the definition's channel");
                    "freeze"
                }
                Err(e) => e.kind.errno_name(),
            };
            assert_eq!(
                shown, want,
                "{mode:?} asked={asked} memory={memory} {live:?} {agent:?}: {got:?}"
            );
        }
    }

    #[test]
    fn an_agent_that_does_not_answer() {
        let s = &socket();
        let silent = AgentError::Timeout {
            what: "guest-sync-delimited".into(),
            after: Duration::from_secs(3),
        };
        let refused = AgentError::Refused {
            what: "guest-fsfreeze-freeze".into(),
            class: "GenericError".into(),
            desc: "disabled".into(),
        };
        assert_eq!(
            without_agent(Yes, s, &silent).unwrap_err().kind,
            ErrorKind::NotConnected
        );
        assert_eq!(
            without_agent(Yes, s, &refused).unwrap_err().kind,
            ErrorKind::Io
        );
        let note = without_agent(Auto, s, &silent).unwrap();
        assert!(
            note.contains("crash-consistent") && note.contains("qga.sock"),
            "{note}"
        );
        assert!(without_agent(Auto, s, &refused).is_ok());
    }
}
