//! Names the machine reports: checkpoint and artifact names, and the files inside a checkpoint or
//! output folder. The machine decides them, and they become S3 keys, Hugging Face paths, paths on
//! the next machine (a restored checkpoint), shell words and entries of `status.checkpoints`. So
//! every one of them passes [`check_relative_path`] (each component [`check_name`]) before it is
//! used, and what fails is refused, never escaped or repaired.
//!
//! A name (one path component) is accepted when it
//! - is not empty and at most [`MAX_NAME_BYTES`] bytes long;
//! - consists of ASCII letters, digits, `.`, `_` and `-` only: no `/`, no control character, no
//!   space, quote, `$`, backslash, glob or URL-reserved character, nothing outside ASCII (which
//!   also refuses bytes that were not UTF-8: they arrive as U+FFFD). These are the characters
//!   every supported trainer writes (`my_lora_000000250.safetensors`, `checkpoint-500`,
//!   `optimizer.bin`), and each of them is literal in a shell word, an S3 key, a URL path and a
//!   path on any filesystem;
//! - starts with a letter, a digit or `_`: not `.` (no `.`, `..` or hidden file such as
//!   `.gitattributes`, which means something to a Hugging Face repository) and not `-` (which a
//!   command would read as an option).
//!
//! A relative path (a checkpoint below the output folder, e.g. ai-toolkit's
//! `my_lora/my_lora_000000250.safetensors`, or a file inside a checkpoint folder) is at most
//! [`MAX_PATH_COMPONENTS`] names joined by single `/`, at most [`MAX_PATH_BYTES`] bytes in all.
//!
//! Listings from the machine end each record with NUL (`find -printf '…\0'`), because a file
//! name may hold a newline and would otherwise forge a record of its own; [`records`] splits them.

use std::collections::BTreeSet;
use std::fmt;

/// Longest accepted name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Most components of an accepted relative path.
pub const MAX_PATH_COMPONENTS: usize = 8;
/// Longest accepted relative path, in bytes (S3 keys end at 1024 bytes, the job's prefix included).
pub const MAX_PATH_BYTES: usize = 512;

/// Why a name is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("is empty")]
    Empty,
    #[error("is {0} bytes long (at most {MAX_NAME_BYTES} are accepted)")]
    TooLong(usize),
    #[error("starts with {0:?} (a name starts with a letter, a digit or `_`)")]
    BadStart(char),
    #[error("contains {0:?} (only ASCII letters, digits, `.`, `_` and `-` are accepted)")]
    BadChar(char),
    #[error("has an empty component (a leading, trailing or doubled `/`)")]
    EmptyComponent,
    #[error("has {0} components (at most {MAX_PATH_COMPONENTS} are accepted)")]
    TooDeep(usize),
    #[error("is {0} bytes long (at most {MAX_PATH_BYTES} are accepted for a path)")]
    PathTooLong(usize),
}

/// Checks one path component the machine reported. Pure.
pub fn check_name(name: &str) -> Result<(), NameError> {
    let first = name.chars().next().ok_or(NameError::Empty)?;
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong(name.len()));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(NameError::BadChar(bad));
    }
    if !(first.is_ascii_alphanumeric() || first == '_') {
        return Err(NameError::BadStart(first));
    }
    Ok(())
}

/// Checks a `/`-separated path relative to a folder on the machine (or to a key prefix). Pure.
pub fn check_relative_path(path: &str) -> Result<(), NameError> {
    if path.is_empty() {
        return Err(NameError::Empty);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(NameError::PathTooLong(path.len()));
    }
    let mut components = 0;
    for component in path.split('/') {
        components += 1;
        if components > MAX_PATH_COMPONENTS {
            return Err(NameError::TooDeep(path.split('/').count()));
        }
        if component.is_empty() {
            return Err(NameError::EmptyComponent);
        }
        check_name(component)?;
    }
    Ok(())
}

/// A refused name as it may appear in a message: escaped (no control character reaches an event
/// or a log line) and cut to 80 characters.
pub fn quoted(raw: &str) -> String {
    const MAX: usize = 80;
    let mut out = String::from("\"");
    for (i, c) in raw.chars().enumerate() {
        if i == MAX {
            out.push('…');
            break;
        }
        out.extend(c.escape_debug());
    }
    out.push('"');
    out
}

/// Names refused from one report of the machine: the first few, for messages, and how many in all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RefusedNames {
    /// `(quoted name, why)`, at most [`RefusedNames::EXAMPLES`].
    pub examples: Vec<(String, NameError)>,
    /// All refused names, examples included.
    pub count: usize,
}

impl RefusedNames {
    /// Examples kept for messages.
    pub const EXAMPLES: usize = 5;

    pub fn add(&mut self, raw: &str, why: NameError) {
        self.count += 1;
        if self.examples.len() < Self::EXAMPLES {
            self.examples.push((quoted(raw), why));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds the refusals of another report.
    pub fn extend(&mut self, other: &RefusedNames) {
        for example in &other.examples {
            if self.examples.len() < Self::EXAMPLES {
                self.examples.push(example.clone());
            }
        }
        self.count += other.count;
    }
}

impl fmt::Display for RefusedNames {
    /// `2 names were refused and skipped: "a\nb" contains '\n' (…); "..": starts with '.' (…)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let noun = if self.count == 1 { "name was" } else { "names were" };
        write!(f, "{} {noun} refused and skipped: ", self.count)?;
        for (i, (name, why)) in self.examples.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{name} {why}")?;
        }
        if self.count > self.examples.len() {
            write!(f, "; and {} more", self.count - self.examples.len())?;
        }
        Ok(())
    }
}

/// Remembers which refused names were already reported, so a name is reported once and not at
/// every poll. Bounded: after [`ReportedNames::CAPACITY`] names nothing new is reported (the
/// machine has been named by then).
#[derive(Clone, Debug, Default)]
pub struct ReportedNames {
    seen: BTreeSet<String>,
}

impl ReportedNames {
    pub const CAPACITY: usize = 1000;

    /// The part of `refused` not reported yet (`None` when there is nothing new), and remembers it.
    pub fn fresh(&mut self, refused: &RefusedNames) -> Option<RefusedNames> {
        let new: Vec<(String, NameError)> =
            refused.examples.iter().filter(|(name, _)| !self.seen.contains(name)).cloned().collect();
        if new.is_empty() || self.seen.len() >= Self::CAPACITY {
            return None;
        }
        for (name, _) in &new {
            self.seen.insert(name.clone());
        }
        Some(RefusedNames { examples: new, count: refused.count })
    }
}

/// The records of a listing the machine printed: NUL-terminated. Output without any NUL is read
/// line by line (a hand-written listing, or one from a tool without `\0`): whichever form the
/// machine sends, it can only forge what it could have printed anyway.
pub fn records(text: &str) -> impl Iterator<Item = &str> {
    let separator = if text.contains('\0') { '\0' } else { '\n' };
    text.split(separator).filter(|r| !r.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_trainers_write_are_accepted() {
        for name in [
            "my_lora_000000250.safetensors",
            "mylora-step00000500.safetensors",
            "checkpoint-500",
            "pytorch_lora_weights.safetensors",
            "random_states_0.pkl",
            "_private",
            "1732345678__000000250_0.jpg",
            &"a".repeat(MAX_NAME_BYTES),
        ] {
            assert_eq!(check_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn names_that_could_escape_or_inject_are_refused() {
        let cases: &[(&str, NameError)] = &[
            ("", NameError::Empty),
            (".", NameError::BadStart('.')),
            ("..", NameError::BadStart('.')),
            (".gitattributes", NameError::BadStart('.')),
            ("-rf", NameError::BadStart('-')),
            ("a/b", NameError::BadChar('/')),
            ("a\nf 5 b", NameError::BadChar('\n')),
            ("a\tb", NameError::BadChar('\t')),
            ("a\rb", NameError::BadChar('\r')),
            ("x\u{1b}[2J", NameError::BadChar('\u{1b}')),
            ("a\0b", NameError::BadChar('\0')),
            ("a b", NameError::BadChar(' ')),
            ("$(reboot)", NameError::BadChar('$')),
            ("`id`", NameError::BadChar('`')),
            ("a'b", NameError::BadChar('\'')),
            ("a\"b", NameError::BadChar('"')),
            ("a\\b", NameError::BadChar('\\')),
            ("a*", NameError::BadChar('*')),
            ("a?x=1", NameError::BadChar('?')),
            ("a#b", NameError::BadChar('#')),
            ("a%2F", NameError::BadChar('%')),
            ("caf\u{e9}", NameError::BadChar('\u{e9}')),
            ("evil\u{202e}gpj.exe", NameError::BadChar('\u{202e}')),
            ("bad\u{fffd}utf8", NameError::BadChar('\u{fffd}')),
        ];
        for (name, why) in cases {
            assert_eq!(check_name(name).as_ref(), Err(why), "{name:?}");
        }
        assert_eq!(check_name(&"a".repeat(MAX_NAME_BYTES + 1)), Err(NameError::TooLong(MAX_NAME_BYTES + 1)));
    }

    #[test]
    fn relative_paths_are_checked_component_by_component() {
        assert_eq!(check_relative_path("my_lora/my_lora_000000250.safetensors"), Ok(()));
        assert_eq!(check_relative_path("checkpoint-5/sub/b.bin"), Ok(()));
        assert_eq!(check_relative_path(""), Err(NameError::Empty));
        assert_eq!(check_relative_path("/etc/passwd"), Err(NameError::EmptyComponent));
        assert_eq!(check_relative_path("a//b"), Err(NameError::EmptyComponent));
        assert_eq!(check_relative_path("a/"), Err(NameError::EmptyComponent));
        assert_eq!(check_relative_path("a/../../b"), Err(NameError::BadStart('.')));
        assert_eq!(check_relative_path("a/./b"), Err(NameError::BadStart('.')));
        let deep = ["d"; MAX_PATH_COMPONENTS + 1].join("/");
        assert_eq!(check_relative_path(&deep), Err(NameError::TooDeep(MAX_PATH_COMPONENTS + 1)));
        assert_eq!(check_relative_path(&["d"; MAX_PATH_COMPONENTS].join("/")), Ok(()));
        let long = vec!["a".repeat(100); 6].join("/");
        assert_eq!(check_relative_path(&long), Err(NameError::PathTooLong(long.len())));
    }

    #[test]
    fn refused_names_are_escaped_counted_and_reported_once() {
        let mut refused = RefusedNames::default();
        for i in 0..7 {
            refused.add(&format!("bad\n{i}"), NameError::BadChar('\n'));
        }
        let text = refused.to_string();
        assert!(text.starts_with("7 names were refused and skipped: \"bad\\n0\" contains '\\n'"), "{text}");
        assert!(text.ends_with("; and 2 more"), "{text}");
        assert!(!text.contains('\n'));
        assert_eq!(quoted(&"x".repeat(200)).chars().count(), 83);

        let mut reported = ReportedNames::default();
        assert_eq!(reported.fresh(&refused).map(|r| r.examples.len()), Some(5));
        assert_eq!(reported.fresh(&refused), None, "the same names on the next poll: no new report");
        let mut more = refused.clone();
        more.examples[4] = (quoted("new\u{7}"), NameError::BadChar('\u{7}'));
        assert_eq!(reported.fresh(&more).map(|r| r.examples.len()), Some(1));
    }

    #[test]
    fn reporting_memory_is_bounded() {
        let mut reported = ReportedNames::default();
        for i in 0..ReportedNames::CAPACITY + 10 {
            let mut refused = RefusedNames::default();
            refused.add(&format!("bad {i}"), NameError::BadChar(' '));
            let fresh = reported.fresh(&refused);
            assert_eq!(fresh.is_some(), i < ReportedNames::CAPACITY, "{i}");
        }
        assert_eq!(reported.seen.len(), ReportedNames::CAPACITY);
    }

    #[test]
    fn records_end_with_nul_so_a_newline_cannot_forge_one() {
        let listing = "f 5 a\nf 9 b_000000100.safetensors\0d 4096 c\0";
        assert_eq!(records(listing).collect::<Vec<_>>(), ["f 5 a\nf 9 b_000000100.safetensors", "d 4096 c"]);
        assert_eq!(records("f 1 a\nf 2 b\n").collect::<Vec<_>>(), ["f 1 a", "f 2 b"]);
    }

    proptest! {
        /// Whatever the machine sends: an accepted path stays below the folder it is joined to,
        /// is one shell word, and holds nothing but the safe characters.
        #[test]
        fn accepted_paths_stay_inside_and_need_no_quoting(path in "\\PC{0,40}|[a-z./_\\-]{0,40}") {
            if check_relative_path(&path).is_ok() {
                let joined = std::path::Path::new("/base").join(&path);
                prop_assert!(joined.starts_with("/base"));
                prop_assert!(std::path::Path::new(&path)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))));
                prop_assert_eq!(shlex::try_quote(&path).unwrap(), path.as_str());
                prop_assert!(path.len() <= MAX_PATH_BYTES);
                prop_assert!(path.split('/').all(|c| !c.is_empty() && c != "." && c != ".."
                    && c.len() <= MAX_NAME_BYTES && !c.chars().any(char::is_control)));
            }
        }
    }
}
