//! The timestamps sidecar format: when each part of a saved log was read. A saved log has no
//! wall-clock times of its own (tqdm's elapsed time skips pauses), yet stall detection judges
//! readings over time, so `parse-log --timestamps FILE` and the fixtures replay a log as a
//! sequence of polls.
//!
//! One poll per line: `<byte offset> <seconds since the start>`, meaning "at this time the file
//! was this long". `end` stands for the file's full length. `#` starts a comment; blank lines
//! are ignored. Offsets must not decrease and times must increase. A poll with the same offset
//! as the one before means no new bytes arrived (silence). Example:
//!
//! ```text
//! # offset  seconds
//! 0         0
//! 5120      60
//! 5120      120   # silent minute
//! end       180
//! ```

use std::fmt;

/// One poll of a replayed log.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Poll {
    /// The file length at this poll.
    pub offset: u64,
    pub seconds: f64,
}

/// A line of the sidecar that does not follow the format.
#[derive(Debug, thiserror::Error, PartialEq)]
pub struct TimestampsError {
    pub line: usize,
    pub problem: String,
}

impl fmt::Display for TimestampsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.problem)
    }
}

/// Parses the sidecar for a log of `log_len` bytes; offsets past the end are clamped to it.
pub fn parse_timestamps(text: &str, log_len: u64) -> Result<Vec<Poll>, TimestampsError> {
    let mut polls: Vec<Poll> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let err = |problem: String| TimestampsError { line, problem };
        let mut fields = content.split_whitespace();
        let (Some(offset), Some(seconds), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(err(format!("expected `<offset|end> <seconds>`, got {content:?}")));
        };
        let offset = if offset == "end" {
            log_len
        } else {
            offset.parse::<u64>().map_err(|_| err(format!("{offset:?} is not a byte offset")))?.min(log_len)
        };
        let seconds: f64 = seconds
            .parse()
            .ok()
            .filter(|s: &f64| s.is_finite() && *s >= 0.0)
            .ok_or_else(|| err(format!("{seconds:?} is not a number of seconds")))?;
        if let Some(prev) = polls.last() {
            if offset < prev.offset {
                return Err(err(format!("offset {offset} is before the previous one ({})", prev.offset)));
            }
            if seconds <= prev.seconds {
                return Err(err(format!(
                    "time {seconds} does not come after the previous one ({})",
                    prev.seconds
                )));
            }
        }
        polls.push(Poll { offset, seconds });
    }
    Ok(polls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_offsets_end_comments_and_silence() {
        let polls =
            parse_timestamps("# offset seconds\n0 0\n\n5120 60\n5120 120 # silent\nend 180\n", 9000).unwrap();
        let offsets: Vec<u64> = polls.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, vec![0, 5120, 5120, 9000]);
        assert_eq!(polls[3].seconds, 180.0);
    }

    #[test]
    fn rejects_going_backwards_and_garbage_with_the_line_number() {
        assert_eq!(parse_timestamps("10 0\n5 60\n", 100).unwrap_err().line, 2);
        assert_eq!(parse_timestamps("10 5\n20 5\n", 100).unwrap_err().line, 2);
        let err = parse_timestamps("0 0\nabc 1\n", 100).unwrap_err();
        assert!(err.to_string().starts_with("line 2:"), "{err}");
    }
}
