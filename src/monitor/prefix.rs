//! Known line prefixes that launchers and logging frameworks put in front of a trainer's text:
//! torchrun `[rank0]:`, Ray `(RayTrainWorker pid=N) `, Python logging
//! `MM/DD/YYYY HH:MM:SS - LEVEL - name - ` (diffusers and accelerate) and rich's
//! `YYYY-MM-DD HH:MM:SS LEVEL    message    file.py:123` (kohya). Signatures and messages are
//! matched on what is left.

/// What rich's layout says about a record, for joining messages rich wrapped at 80 columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RichLayout {
    /// Not a rich line.
    None,
    /// The first line of a message (timestamp or its blank replacement, then a level).
    Header { padded: bool },
    /// A continuation of the previous message: only the message column is filled.
    Continuation { padded: bool },
}

/// A record with its prefixes removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stripped<'a> {
    pub text: &'a str,
    /// The Python logging logger name (`__main__`, `accelerate.accelerator`), when present.
    pub logger: Option<&'a str>,
    pub rich: RichLayout,
}

const LEVELS: &[&str] = &["INFO", "WARNING", "ERROR", "DEBUG", "CRITICAL"];
/// Width of rich's time column plus the space after it (`2025-03-01 10:22:07 `).
const RICH_TIME_WIDTH: usize = 20;

pub fn strip_prefixes(text: &str) -> Stripped<'_> {
    let mut text = text;
    // Launchers nest: Ray around torchrun is possible, so strip repeatedly.
    loop {
        if let Some(rest) = strip_rank(text) {
            text = rest;
        } else if let Some(rest) = strip_ray(text) {
            text = rest;
        } else {
            break;
        }
    }
    if let Some((logger, rest)) = strip_python_logging(text) {
        return Stripped { text: rest, logger: Some(logger), rich: RichLayout::None };
    }
    if let Some(stripped) = strip_rich(text) {
        return stripped;
    }
    Stripped { text, logger: None, rich: RichLayout::None }
}

/// `[rank0]: ` or `[rank12]:`.
fn strip_rank(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("[rank")?;
    let close = rest.find("]:")?;
    rest[..close].bytes().all(|b| b.is_ascii_digit()).then(|| rest[close + 2..].trim_start_matches(' '))
}

/// `(RayTrainWorker pid=123) ` and similar Ray actor prefixes.
fn strip_ray(text: &str) -> Option<&str> {
    let rest = text.strip_prefix('(')?;
    let close = rest.find(") ")?;
    rest[..close].contains(" pid=").then(|| &rest[close + 2..])
}

/// `08/02/2026 11:04:12 - INFO - __main__ - message`.
fn strip_python_logging(text: &str) -> Option<(&str, &str)> {
    let b = text.as_bytes();
    if b.len() < 22
        || b[2] != b'/'
        || b[5] != b'/'
        || b[10] != b' '
        || b[13] != b':'
        || !b[0].is_ascii_digit()
    {
        return None;
    }
    let rest = text.get(19..)?.strip_prefix(" - ")?;
    let (level, rest) = rest.split_once(" - ")?;
    if !LEVELS.contains(&level) {
        return None;
    }
    let (logger, message) = rest.split_once(" - ")?;
    Some((logger, message))
}

/// rich's `RichHandler` layout: time column (blank when repeated), level column, message,
/// right-aligned `file.py:123`. Continuation lines have only the message column.
fn strip_rich(text: &str) -> Option<Stripped<'_>> {
    let b = text.as_bytes();
    let header_time = b.len() > RICH_TIME_WIDTH
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b' '
        && b[13] == b':'
        && b[0].is_ascii_digit();
    let blank_time = b.len() > RICH_TIME_WIDTH && b[..RICH_TIME_WIDTH].iter().all(|c| *c == b' ');
    if !header_time && !blank_time {
        return None;
    }
    let after_time = &text[RICH_TIME_WIDTH..];
    let level = LEVELS.iter().find(|level| after_time.starts_with(*level));
    match level {
        Some(level) => {
            let message = after_time[level.len()..].trim_start();
            let (message, padded) = strip_rich_path(message);
            Some(Stripped { text: message, logger: None, rich: RichLayout::Header { padded } })
        }
        None if blank_time => {
            let message = after_time.trim_start();
            let padded = message.ends_with(' ');
            Some(Stripped {
                text: message.trim_end(),
                logger: None,
                rich: RichLayout::Continuation { padded },
            })
        }
        None => None,
    }
}

/// Removes a trailing `  file.py:123`; `padded` says whether the message column was padded with
/// spaces before it, which means rich broke the message between words rather than inside one.
fn strip_rich_path(message: &str) -> (&str, bool) {
    let trimmed = message.trim_end();
    if let Some(space) = trimmed.rfind(' ') {
        let candidate = &trimmed[space + 1..];
        if let Some((file, line)) = candidate.rsplit_once(':')
            && file.ends_with(".py")
            && !line.is_empty()
            && line.bytes().all(|b| b.is_ascii_digit())
        {
            let before = &trimmed[..space];
            let padded = before.ends_with(' ');
            return (before.trim_end(), padded);
        }
    }
    (trimmed, message.ends_with(' '))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_rank_ray_and_python_logging() {
        assert_eq!(strip_prefixes("[rank0]: torch.OutOfMemoryError: x").text, "torch.OutOfMemoryError: x");
        assert_eq!(strip_prefixes("(RayTrainWorker pid=77) [rank1]:hello").text, "hello");
        let s = strip_prefixes("08/02/2026 11:04:12 - INFO - __main__ - Saved state to out/checkpoint-500");
        assert_eq!((s.text, s.logger), ("Saved state to out/checkpoint-500", Some("__main__")));
    }

    #[test]
    fn strips_rich_header_and_marks_continuations() {
        let s = strip_prefixes(
            "2025-03-01 10:22:07 INFO     model saved.                     train_network.py:1741",
        );
        assert_eq!(s.text, "model saved.");
        assert_eq!(s.rich, RichLayout::Header { padded: true });
        let s = strip_prefixes("                    INFO     saving checkpoint: /a/b train_network.py:10");
        assert_eq!((s.text, s.rich), ("saving checkpoint: /a/b", RichLayout::Header { padded: false }));
        let s = strip_prefixes("                             -step00000500.safetensors");
        assert_eq!(
            (s.text, s.rich),
            ("-step00000500.safetensors", RichLayout::Continuation { padded: false })
        );
    }

    #[test]
    fn leaves_other_lines_alone() {
        let s = strip_prefixes("  File \"run.py\", line 3");
        assert_eq!((s.text, s.rich), ("  File \"run.py\", line 3", RichLayout::None));
    }
}
