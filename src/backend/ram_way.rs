//! How a running guest's checkpoint copies RAM where QEMU offers both a
//! live copy into a mapped-ram file ([`super::precopy`]) and a background
//! snapshot: chosen per checkpoint from the rate at which the guest
//! dirties RAM, measured by QEMU just before (`calc-dirty-rate`, page
//! sampling over [`MEASURE_MS`]).
//!
//! A live copy pauses the guest for its last pass, which grows with the
//! dirty rate (QEMU writes scattered dirty pages far slower than the
//! first pass it judges its bandwidth by); a background snapshot pauses
//! it only for the device state whatever the rate, but writes RAM more
//! slowly. A quiet guest keeps the live copy (its `mkdir` returns sooner),
//! a guest dirtying more than [`LIVE_COPY_MAX_MIB_S`] gets the background
//! snapshot. See docs/performance.md, "A guest that dirties RAM".

use std::time::{Duration, Instant};

use qapi::qmp;

use super::qemu::Conn;

/// How long QEMU samples the guest's pages, in ms.
pub const MEASURE_MS: i64 = 100;
/// Pages sampled per GiB of guest RAM (QEMU's most: 4096; its default
/// of 512 left a 192 MiB guest with too few samples to tell).
pub const SAMPLE_PAGES: i64 = 4096;
/// The highest dirty rate (MiB/s) for which a live copy is chosen.
pub const LIVE_COPY_MAX_MIB_S: i64 = 24;
/// The `downtime-limit` (ms) of a live copy chosen here: QEMU judges
/// the last pass by the first pass's bandwidth (3-7 Gbit/s reported,
/// mostly pages it skips), about three times what it writes scattered
/// dirty pages at, so at 20 ms it stopped the guest with 6-23 MB left
/// (29-35 ms of pause); at 5 ms it makes one more pass and stops with
/// 1-3 MB left (17-25 ms). A copy that no longer converges gives up
/// for the background snapshot.
pub const CHOSEN_DOWNTIME_MS: u64 = 5;
/// How long the measurement may take in all before it is not waited for.
const MEASURE_WAIT: Duration = Duration::from_secs(2);

/// The way chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamWay {
    /// A live copy into a mapped-ram file.
    LiveCopy,
    /// A background snapshot into a stream.
    Background,
}

/// A choice and its reason (for the domain's `.log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The way RAM is written.
    pub way: RamWay,
    /// Why, in words.
    pub why: String,
}

/// Chooses from the measured dirty rate (MiB/s), or the reason it was
/// not measured (then the live copy, whose own give-ups still apply).
pub fn choose(measured: std::result::Result<i64, String>) -> Choice {
    match measured {
        Ok(rate) if rate > LIVE_COPY_MAX_MIB_S => Choice {
            way: RamWay::Background,
            why: format!(
                "background snapshot chosen: the guest dirties {rate} MiB/s of RAM \
                 (calc-dirty-rate over {MEASURE_MS} ms), more than the {LIVE_COPY_MAX_MIB_S} \
                 MiB/s up to which a live copy's last pass keeps the pause short"
            ),
        },
        Ok(rate) => Choice {
            way: RamWay::LiveCopy,
            why: format!(
                "live copy chosen: the guest dirties {rate} MiB/s of RAM (calc-dirty-rate \
                 over {MEASURE_MS} ms), at most {LIVE_COPY_MAX_MIB_S} MiB/s"
            ),
        },
        Err(why) => Choice {
            way: RamWay::LiveCopy,
            why: format!("live copy chosen: the guest's dirty rate was not measured ({why})"),
        },
    }
}

/// The rate at which the running guest dirties RAM, in MiB/s, as QEMU
/// measures it by sampling pages over [`MEASURE_MS`]; `Err(why)` when
/// it cannot say in that time (a QEMU that measures in whole seconds
/// only is not asked).
pub(super) fn measure(conn: &mut Conn) -> std::result::Result<i64, String> {
    crate::failpoint::hit("checkpoint.dirty-rate").map_err(|e| e.message)?;
    if !conn.caps.has_short_dirty_rate() {
        return Err("QEMU measures it in whole seconds only".into());
    }
    conn.qmp
        .execute(&qmp::calc_dirty_rate {
            calc_time: MEASURE_MS,
            calc_time_unit: Some(qmp::TimeUnit::millisecond),
            mode: Some(qmp::DirtyRateMeasureMode::page_sampling),
            sample_pages: Some(SAMPLE_PAGES),
        })
        .map_err(|e| format!("calc-dirty-rate: {e}"))?;
    // QEMU marks the measurement unstarted before it answers: a reading
    // marked measured is this one's.
    let deadline = Instant::now() + MEASURE_WAIT;
    std::thread::sleep(Duration::from_millis(MEASURE_MS as u64));
    loop {
        let info = conn
            .qmp
            .execute(&qmp::query_dirty_rate {
                calc_time_unit: Some(qmp::TimeUnit::millisecond),
            })
            .map_err(|e| format!("query-dirty-rate: {e}"))?;
        if info.status == qmp::DirtyRateStatus::measured {
            return info
                .dirty_rate
                .ok_or_else(|| "QEMU gave no rate".to_owned());
        }
        if Instant::now() > deadline {
            return Err(format!("not measured within {MEASURE_WAIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_guest_keeps_the_live_copy_a_busy_one_gets_the_background_snapshot() {
        let table: &[(std::result::Result<i64, String>, RamWay, &str)] = &[
            (Ok(0), RamWay::LiveCopy, "dirties 0 MiB/s"),
            (Ok(12), RamWay::LiveCopy, "at most 24 MiB/s"),
            (
                Ok(LIVE_COPY_MAX_MIB_S),
                RamWay::LiveCopy,
                "live copy chosen",
            ),
            (
                Ok(LIVE_COPY_MAX_MIB_S + 1),
                RamWay::Background,
                "dirties 25 MiB/s",
            ),
            (Ok(95), RamWay::Background, "background snapshot chosen"),
            (
                Err("QEMU measures it in whole seconds only".into()),
                RamWay::LiveCopy,
                "not measured (QEMU measures it in whole seconds only)",
            ),
        ];
        for (measured, way, says) in table {
            let c = choose(measured.clone());
            assert_eq!(c.way, *way, "{measured:?}: {}", c.why);
            assert!(c.why.contains(says), "{measured:?}: {}", c.why);
        }
    }
}
