//! Bytes to records. A trainer's log is not a sequence of lines: tqdm redraws its bar with `\r`
//! and no `\n`, so one physical line can hold thousands of bar states, and chunks read from a
//! growing file end anywhere, including inside a three-byte `█`.
//!
//! A *record* is the text between two `\r` or `\n` bytes, with ANSI escapes removed. Because both
//! delimiters are ASCII, they never occur inside a multi-byte UTF-8 sequence: a record that is
//! complete is also valid UTF-8 (when the trainer wrote valid UTF-8), whatever the chunking.
//! The bytes after the last delimiter stay in a carry-over buffer: they are the live bar state,
//! shown by the monitor but never committed as a record until a delimiter arrives.
//!
//! Records are cut at [`MAX_RECORD_BYTES`] so a log without any delimiter (binary junk, a runaway
//! print) cannot grow memory. The cut positions depend only on the content, never on the
//! chunking, which keeps the results identical for any way of reading the same bytes.

use std::borrow::Cow;
use std::sync::LazyLock;

use memchr::memmem::Finder;

/// Longest record kept; longer runs without `\r` or `\n` are cut into pieces of this size.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// Built once: a searcher per record would cost more than the search on a short record.
static CARET_M: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"^M"));

/// Splits a byte stream fed in arbitrary chunks into records.
#[derive(Debug, Default)]
pub struct LineSplitter {
    carry: Vec<u8>,
    scratch: Vec<u8>,
}

impl LineSplitter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the stream; `on_record` receives each completed record.
    pub fn feed(&mut self, mut chunk: &[u8], on_record: &mut dyn FnMut(&str)) {
        while let Some(pos) = memchr::memchr2(b'\r', b'\n', chunk) {
            let (segment, rest) = (&chunk[..pos], &chunk[pos + 1..]);
            if self.carry.is_empty() {
                // Fast path: the whole record lies inside this chunk, no copy.
                let mut segment = segment;
                while segment.len() > MAX_RECORD_BYTES {
                    emit(&segment[..MAX_RECORD_BYTES], &mut self.scratch, on_record);
                    segment = &segment[MAX_RECORD_BYTES..];
                }
                emit(segment, &mut self.scratch, on_record);
            } else {
                self.push_partial(segment, on_record);
                let carry = std::mem::take(&mut self.carry);
                emit(&carry, &mut self.scratch, on_record);
                self.carry = carry;
                self.carry.clear();
            }
            chunk = rest;
        }
        self.push_partial(chunk, on_record);
    }

    /// Commits the unterminated tail as a record, for the end of a saved log.
    pub fn finish(&mut self, on_record: &mut dyn FnMut(&str)) {
        let carry = std::mem::take(&mut self.carry);
        emit(&carry, &mut self.scratch, on_record);
    }

    /// The unterminated tail (the live bar state), cleaned like a record.
    pub fn live(&self) -> Option<String> {
        let mut scratch = Vec::new();
        let mut live = None;
        emit(&self.carry, &mut scratch, &mut |text| live = Some(text.to_owned()));
        live
    }

    /// Bytes held in memory between calls; bounded by [`MAX_RECORD_BYTES`].
    pub fn buffered_bytes(&self) -> usize {
        self.carry.capacity() + self.scratch.capacity()
    }

    /// Appends bytes that are not yet terminated, cutting at exactly `MAX_RECORD_BYTES` from the
    /// start of the record so the cuts do not depend on how the bytes arrived.
    fn push_partial(&mut self, mut bytes: &[u8], on_record: &mut dyn FnMut(&str)) {
        while !bytes.is_empty() {
            let room = MAX_RECORD_BYTES - self.carry.len();
            let take = room.min(bytes.len());
            self.carry.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.carry.len() == MAX_RECORD_BYTES && !bytes.is_empty() {
                let carry = std::mem::take(&mut self.carry);
                emit(&carry, &mut self.scratch, on_record);
                self.carry = carry;
                self.carry.clear();
            }
        }
    }
}

/// Cleans one raw segment and hands it on unless it is blank (tqdm erases with `\r` + spaces).
fn emit(segment: &[u8], scratch: &mut Vec<u8>, on_record: &mut dyn FnMut(&str)) {
    let cleaned: &[u8] = if memchr::memchr(0x1b, segment).is_some() {
        strip_ansi(segment, scratch);
        scratch
    } else {
        segment
    };
    // tmux and `script` captures can contain a literal `^M` where the terminal saw `\r`.
    if CARET_M.find(cleaned).is_some() {
        let mut start = 0;
        for pos in CARET_M.find_iter(cleaned) {
            emit_text(&cleaned[start..pos], on_record);
            start = pos + 2;
        }
        emit_text(&cleaned[start..], on_record);
        return;
    }
    emit_text(cleaned, on_record);
}

fn emit_text(bytes: &[u8], on_record: &mut dyn FnMut(&str)) {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return;
    }
    // Strict validation first: it is much faster than the lossy decoder, and trainers write UTF-8.
    let text: Cow<'_, str> = match std::str::from_utf8(bytes) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    };
    on_record(&text);
}

/// Removes CSI (`ESC [ params final`) and OSC (`ESC ] ... BEL` or `ESC \`) sequences, and any
/// other two-byte escape.
pub fn strip_ansi(input: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut i = 0;
    while i < input.len() {
        let Some(esc) = memchr::memchr(0x1b, &input[i..]) else {
            out.extend_from_slice(&input[i..]);
            break;
        };
        out.extend_from_slice(&input[i..i + esc]);
        i += esc + 1;
        match input.get(i) {
            Some(b'[') => {
                i += 1;
                // Parameters and intermediates, then one final byte in 0x40..=0x7e.
                while i < input.len() && !(0x40..=0x7e).contains(&input[i]) {
                    i += 1;
                }
                i += 1;
            }
            Some(b']') => {
                i += 1;
                while i < input.len() {
                    if input[i] == 0x07 {
                        i += 1;
                        break;
                    }
                    if input[i] == 0x1b && input.get(i + 1) == Some(&b'\\') {
                        i += 2;
                        break;
                    }
                    i += 1;
                }
            }
            Some(_) => i += 1,
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(chunks: &[&[u8]]) -> (Vec<String>, Option<String>) {
        let mut splitter = LineSplitter::new();
        let mut out = Vec::new();
        for chunk in chunks {
            splitter.feed(chunk, &mut |r| out.push(r.to_owned()));
        }
        (out, splitter.live())
    }

    #[test]
    fn carriage_return_redraws_become_separate_records_and_the_tail_stays_live() {
        let (recs, live) = records(&[b"a 1/10\ra 2/10\r\ndone\nb 3/10"]);
        assert_eq!(recs, vec!["a 1/10", "a 2/10", "done"]);
        assert_eq!(live.as_deref(), Some("b 3/10"));
    }

    #[test]
    fn a_utf8_character_split_across_chunks_is_reassembled() {
        let bytes = "x █▌ y\n".as_bytes();
        let (recs, _) = records(&[&bytes[..3], &bytes[3..5], &bytes[5..]]);
        assert_eq!(recs, vec!["x █▌ y"]);
    }

    #[test]
    fn ansi_colour_cursor_up_and_osc_sequences_are_removed() {
        let (recs, _) = records(&[b"\x1b[32mgreen\x1b[0m \x1b[Aup \x1b]0;title\x07end\n"]);
        assert_eq!(recs, vec!["green up end"]);
    }

    #[test]
    fn blank_erase_segments_and_literal_caret_m_are_handled() {
        let (recs, _) = records(&[b"bar 1\r     \rmsg\nx^My\n"]);
        assert_eq!(recs, vec!["bar 1", "msg", "x", "y"]);
    }

    #[test]
    fn records_longer_than_the_limit_are_cut_at_the_same_place_for_any_chunking() {
        let long = vec![b'a'; MAX_RECORD_BYTES * 2 + 10];
        let mut whole = long.clone();
        whole.push(b'\n');
        let (one, _) = records(&[&whole]);
        let (many, _) = records(&whole.chunks(777).collect::<Vec<_>>());
        assert_eq!(
            one.iter().map(String::len).collect::<Vec<_>>(),
            vec![MAX_RECORD_BYTES, MAX_RECORD_BYTES, 10]
        );
        assert_eq!(one, many);
    }
}
