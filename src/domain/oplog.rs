//! The `.log` of a domain: the last operations and, for each refusal, why.
//! Kept in memory for the tree and appended to a file in the state dir.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// Lines kept in memory (and shown by `.log`).
const KEEP: usize = 1000;

/// A bounded operation log.
pub struct OpLog {
    lines: Mutex<VecDeque<String>>,
    file: PathBuf,
}

impl OpLog {
    /// A log that appends to `file`, starting with that file's last lines.
    pub fn open(file: PathBuf) -> Self {
        let mut lines = VecDeque::new();
        if let Ok(text) = std::fs::read_to_string(&file) {
            for l in text.lines() {
                if lines.len() == KEEP {
                    lines.pop_front();
                }
                lines.push_back(l.to_owned());
            }
        }
        OpLog {
            lines: Mutex::new(lines),
            file,
        }
    }

    /// Adds one line, stamped with the UTC time.
    pub fn line(&self, text: &str) {
        let line = format!("{} {}", utc_stamp(now_secs()), text.replace('\n', " "));
        log::info!("{line}");
        let mut lines = self.lines.lock();
        if lines.len() == KEEP {
            lines.pop_front();
        }
        lines.push_back(line.clone());
        match OpenOptions::new()
            .create(true)
            .append(true)
            .mode(crate::store::atomic::FILE_MODE)
            .open(&self.file)
        {
            Ok(mut f) => {
                let _ = writeln!(f, "{line}");
            }
            Err(e) => log::warn!("cannot append to {}: {e}", self.file.display()),
        }
    }

    /// The kept lines, oldest first, each ending in a newline.
    pub fn text(&self) -> String {
        let lines = self.lines.lock();
        let mut s = String::with_capacity(lines.len() * 80);
        for l in lines.iter() {
            s.push_str(l);
            s.push('\n');
        }
        s
    }
}

/// Seconds since the epoch now.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a time in seconds since the epoch.
pub fn utc_stamp(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc() {
        assert_eq!(utc_stamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_stamp(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc_stamp(951_782_400), "2000-02-29T00:00:00Z");
    }
}
