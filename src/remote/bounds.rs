//! The limits every remote operation runs under, shared by both implementations of
//! `RemoteExec`: what a timeout says the machine did (`TimedOut`), the head-and-tail capture of a
//! command's output (`Capture`) and the capped line reader (`read_line_capped`).
//!
//! The machine is untrusted: it may answer nothing, answer slowly, or answer with gigabytes. Each
//! bound turns that into an error that names what the machine did, and never into a wait or an
//! allocation without a limit.

use std::time::Duration;

use super::RemoteError;

/// The step of an operation at which the machine stopped answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A new channel was requested on a live connection and never confirmed.
    ChannelOpen,
    /// The channel was confirmed but the exec (or subsystem) request got no reply.
    ExecRequest,
    /// The command was started but its input (the script) was never taken.
    SendInput,
    /// The command was started and did not exit in time (it may simply be slow).
    Output,
    /// The SFTP subsystem did not start.
    SftpStart,
    /// A file request (SFTP open, stat, read, close; a local read) got no reply in time.
    FileRequest,
    /// A transfer moved no bytes for the stall limit.
    TransferStalled,
    /// A transfer kept moving but did not finish within its overall limit.
    TransferDeadline,
}

impl Phase {
    fn describe(self) -> &'static str {
        match self {
            Phase::ChannelOpen => "the machine did not answer the request to open a channel",
            Phase::ExecRequest => "the machine opened a channel but never answered the exec request",
            Phase::SendInput => "the machine accepted the command but did not take its input",
            Phase::Output => "the command did not finish",
            Phase::SftpStart => "the machine did not start its SFTP subsystem",
            Phase::FileRequest => "the machine did not answer a file request (open, stat or read)",
            Phase::TransferStalled => "the transfer made no progress",
            Phase::TransferDeadline => "the transfer did not finish",
        }
    }
}

/// What a [`RemoteError::Timeout`] says: the phase the operation was in, and the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimedOut {
    pub phase: Phase,
    pub after: Duration,
}

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let within = if self.phase == Phase::TransferStalled { "for" } else { "within" };
        write!(f, "{} {within} {:?}", self.phase.describe(), self.after)
    }
}

impl RemoteError {
    pub fn timeout(phase: Phase, after: Duration) -> Self {
        RemoteError::Timeout(TimedOut { phase, after })
    }

    /// The phase of a timeout, `None` for any other error.
    pub fn timeout_phase(&self) -> Option<Phase> {
        match self {
            RemoteError::Timeout(t) => Some(t.phase),
            _ => None,
        }
    }
}

/// Default cap on each of stdout and stderr of one command (`RunOptions::output_limit`).
pub const DEFAULT_OUTPUT_LIMIT: usize = 1024 * 1024;

/// Longest line accepted where a protocol reads up to a newline.
pub const LINE_LIMIT: usize = 4096;

/// One output stream of a command, kept within `limit` bytes: the first half and the last half,
/// with a count of what fell in between. Memory stays under twice the limit whatever the machine
/// sends.
#[derive(Debug)]
pub(crate) struct Capture {
    head_limit: usize,
    tail_limit: usize,
    head: Vec<u8>,
    /// The newest bytes; compacted to `tail_limit` whenever it reaches twice that.
    tail: Vec<u8>,
    dropped: u64,
    /// How many bytes have been handed out for streaming (at most `limit`).
    forwarded: usize,
}

impl Capture {
    pub fn new(limit: usize) -> Self {
        let head_limit = limit / 2;
        Self {
            head_limit,
            tail_limit: limit - head_limit,
            head: Vec::new(),
            tail: Vec::new(),
            dropped: 0,
            forwarded: 0,
        }
    }

    fn limit(&self) -> usize {
        self.head_limit + self.tail_limit
    }

    /// Keeps `data` (within the limit) and returns the part of it that may be streamed on: the
    /// stream as a whole forwards no more than the limit.
    pub fn push<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        let forward = data.len().min(self.limit() - self.forwarded);
        self.forwarded += forward;
        let to_head = data.len().min(self.head_limit - self.head.len());
        self.head.extend_from_slice(&data[..to_head]);
        let rest = &data[to_head..];
        if rest.len() >= self.tail_limit {
            self.dropped += (self.tail.len() + rest.len() - self.tail_limit) as u64;
            self.tail.clear();
            self.tail.extend_from_slice(&rest[rest.len() - self.tail_limit..]);
        } else {
            self.tail.extend_from_slice(rest);
            if self.tail.len() >= 2 * self.tail_limit.max(1) {
                let excess = self.tail.len() - self.tail_limit;
                self.dropped += excess as u64;
                self.tail.drain(..excess);
            }
        }
        &data[..forward]
    }

    /// The stream passed [`flood_limit`]: it is abandoned instead of read to its end.
    pub fn flooded(&self) -> bool {
        self.dropped > flood_limit(self.limit())
    }

    /// The kept bytes (head then tail) and how many were dropped between them.
    pub fn finish(mut self) -> (Vec<u8>, u64) {
        if self.tail.len() > self.tail_limit {
            let excess = self.tail.len() - self.tail_limit;
            self.dropped += excess as u64;
            self.tail.drain(..excess);
        }
        self.head.extend_from_slice(&self.tail);
        (self.head, self.dropped)
    }
}

/// Output of one command past which it is a flood: sixteen times what is kept, and at least
/// 64 MiB. No command of ours prints that much, so reading on (until the command's deadline,
/// which an endless stream would reach) only costs time: the command is abandoned at once as the
/// machine's fault.
pub fn flood_limit(output_limit: usize) -> u64 {
    (output_limit as u64).saturating_mul(16).max(64 << 20)
}

/// Why [`read_line_capped`] gave up.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LineError {
    /// More than the limit arrived without a newline.
    TooLong,
}

/// Appends `data` to the line being read; `Some(line)` (without the newline) once a newline has
/// arrived, the bytes after it being ignored. Refuses a line longer than `limit` so a machine that
/// never sends a newline cannot grow it without bound.
pub(crate) fn read_line_capped(
    line: &mut Vec<u8>,
    data: &[u8],
    limit: usize,
) -> Result<Option<Vec<u8>>, LineError> {
    let end = data.iter().position(|&b| b == b'\n');
    let take = end.unwrap_or(data.len());
    if line.len() + take > limit {
        return Err(LineError::TooLong);
    }
    line.extend_from_slice(&data[..take]);
    Ok(end.map(|_| std::mem::take(line)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture_all(limit: usize, chunks: &[&[u8]]) -> (Vec<u8>, u64, Vec<u8>) {
        let mut c = Capture::new(limit);
        let mut forwarded = Vec::new();
        for chunk in chunks {
            forwarded.extend_from_slice(c.push(chunk));
        }
        let (kept, dropped) = c.finish();
        (kept, dropped, forwarded)
    }

    #[test]
    fn output_within_the_limit_is_kept_whole() {
        let (kept, dropped, forwarded) = capture_all(10, &[b"abc", b"defg", b"hij"]);
        assert_eq!(
            (kept.as_slice(), dropped, forwarded.as_slice()),
            (&b"abcdefghij"[..], 0, &b"abcdefghij"[..])
        );
    }

    #[test]
    fn output_past_the_limit_keeps_head_and_tail_and_counts_the_rest() {
        let data: Vec<u8> = (0..100u8).collect();
        // In one piece and in small pieces: the same head, tail and count.
        for chunking in [100, 7, 1] {
            let chunks: Vec<&[u8]> = data.chunks(chunking).collect();
            let (kept, dropped, forwarded) = capture_all(10, &chunks);
            assert_eq!(&kept[..5], &data[..5], "head, chunks of {chunking}");
            assert_eq!(&kept[5..], &data[95..], "tail, chunks of {chunking}");
            assert_eq!(dropped, 90);
            // Streaming forwards no more than the limit either.
            assert_eq!(forwarded, &data[..10]);
        }
    }

    #[test]
    fn a_flood_stays_within_twice_the_limit_in_memory() {
        let mut c = Capture::new(1000);
        let chunk = vec![b'x'; 300];
        for _ in 0..10_000 {
            c.push(&chunk);
            assert!(c.head.len() + c.tail.len() <= 2 * 1000 + 300);
        }
        let (kept, dropped) = c.finish();
        assert_eq!((kept.len(), dropped), (1000, 3_000_000 - 1000));
    }

    #[test]
    fn a_line_ends_at_its_newline_and_is_refused_past_the_limit() {
        let mut line = Vec::new();
        assert_eq!(read_line_capped(&mut line, b"12", 8), Ok(None));
        assert_eq!(read_line_capped(&mut line, b"34\nrest", 8), Ok(Some(b"1234".to_vec())));
        let mut line = Vec::new();
        assert_eq!(read_line_capped(&mut line, b"12345", 8), Ok(None));
        assert_eq!(read_line_capped(&mut line, b"6789", 8), Err(LineError::TooLong));
        // A line of exactly the limit is fine.
        let mut line = Vec::new();
        assert_eq!(read_line_capped(&mut line, b"12345678\n", 8), Ok(Some(b"12345678".to_vec())));
    }

    #[test]
    fn timeouts_name_what_the_machine_did() {
        let e = RemoteError::timeout(Phase::ExecRequest, Duration::from_secs(30));
        assert_eq!(
            e.to_string(),
            "the machine opened a channel but never answered the exec request within 30s"
        );
        assert_eq!(e.timeout_phase(), Some(Phase::ExecRequest));
        assert_eq!(e.machine_fault(), Some(super::super::MachineFault::Unresponsive));
        let e = RemoteError::timeout(Phase::TransferStalled, Duration::from_secs(60));
        assert_eq!(e.to_string(), "the transfer made no progress for 60s");
    }
}
