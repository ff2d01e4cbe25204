//! The guest agent of a libvirt domain, which libvirt holds: the guest's
//! file systems are frozen and thawed through libvirt's own calls
//! (`virsh domfsfreeze`, `domfsthaw`); whether the agent answers, and
//! whether the guest is frozen already, is asked with `virsh domtime`
//! (an agent command that qemu-ga refuses while frozen). No raw agent
//! command is sent, so libvirt does not mark the domain tainted.

use std::time::Duration;

use super::Virsh;
use crate::backend::guest_agent::{
    AgentError, Count, Freeze, FreezeStatus, FREEZE_TIMEOUT, STATUS_TIMEOUT, THAW_TIMEOUT,
};

/// What a virsh start and connect may add to an agent's deadline.
const VIRSH_START: Duration = Duration::from_secs(3);

/// The agent of one libvirt domain.
pub struct LibvirtAgent {
    virsh: Virsh,
    domain: String,
}

impl LibvirtAgent {
    /// The agent of `domain` on the libvirt connection `uri`.
    pub fn new(uri: &str, domain: &str) -> Self {
        LibvirtAgent {
            virsh: Virsh::new(uri),
            domain: domain.to_owned(),
        }
    }

    fn run(&self, what: &str, timeout: Duration) -> Result<String, AgentError> {
        self.virsh
            .run(&[what, "--domain", &self.domain], timeout + VIRSH_START)
            .map_err(|e| agent_error(what, &e.to_string()))
    }
}

/// What libvirt's message about `what` means: libvirt's words for an
/// agent that is absent, not connected or silent are "not answered";
/// anything else the agent (or libvirt) refused.
pub fn agent_error(what: &str, said: &str) -> AgentError {
    let silent = [
        "not responding",
        "not connected",
        "not configured",
        "not available",
        "timed out",
        "timeout",
        "was killed",
    ];
    if silent.iter().any(|s| said.contains(s)) {
        AgentError::Unanswered {
            what: what.to_owned(),
            said: said.to_owned(),
        }
    } else {
        AgentError::Refused {
            what: what.to_owned(),
            class: "libvirt".to_owned(),
            desc: said.to_owned(),
        }
    }
}

/// The count in virsh's "Froze 2 filesystem(s)" / "Thawed 2 ...", which
/// virsh prints only without `-q`: unknown otherwise.
fn count(out: &str) -> Count {
    Count(out.split_whitespace().find_map(|w| w.parse().ok()))
}

impl Freeze for LibvirtAgent {
    fn status(&mut self) -> Result<FreezeStatus, AgentError> {
        match self.run("domtime", STATUS_TIMEOUT) {
            Ok(_) => Ok(FreezeStatus::Thawed),
            Err(AgentError::Refused { desc, .. }) if desc.contains("frozen") => {
                Ok(FreezeStatus::Frozen)
            }
            Err(e) => Err(e),
        }
    }

    fn freeze(&mut self) -> Result<Count, AgentError> {
        self.run("domfsfreeze", FREEZE_TIMEOUT).map(|o| count(&o))
    }

    fn thaw(&mut self) -> Result<Count, AgentError> {
        self.run("domfsthaw", THAW_TIMEOUT).map(|o| count(&o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirts_words_are_read() {
        let not_connected = agent_error(
            "domfsfreeze",
            "virsh domfsfreeze: Guest agent is not responding: QEMU guest agent is not connected",
        );
        assert!(not_connected.unanswered(), "{not_connected}");
        let no_channel = agent_error(
            "domtime",
            "virsh domtime: argument unsupported: QEMU guest agent is not configured",
        );
        assert!(no_channel.unanswered());
        let frozen = agent_error(
            "domtime",
            "virsh domtime: internal error: unable to execute QEMU agent command \
             'guest-get-time': Command guest-get-time has been disabled: the agent is in \
             frozen state",
        );
        assert!(!frozen.unanswered());
        assert_eq!(count("Froze 2 filesystem(s)\n"), Count(Some(2)));
        assert_eq!(count(""), Count(None));
        assert_eq!(count("").to_string(), "all");
    }
}
