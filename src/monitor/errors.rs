//! Classified errors: the signatures of the ways training dies (or warns that it will), matched
//! on records after their prefixes are stripped. The class decides the job's `Reason`, so a user
//! sees `OutOfMemory` or `ModelAccessDenied` instead of "exit code 1".
//!
//! Tracebacks need a little state: the exception is the first unindented line after the frames,
//! which can be many records later.

use serde::Serialize;

use crate::api::Reason;

/// What kind of failure a log line shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub enum ErrorClass {
    /// `CUDA out of memory`, `OutOfMemoryError`.
    CudaOutOfMemory,
    /// ai-toolkit skipped a batch after an OOM and goes on (fatal after 3 in a row).
    RecoveredOutOfMemory,
    /// `CUDA error: ...` (illegal memory access, launch failure, device-side assert).
    CudaRuntime,
    /// NCCL errors and watchdog timeouts of collective operations.
    NcclTimeout,
    /// No space left on the machine's disk.
    DiskFull,
    /// A gated Hugging Face model without a valid token.
    GatedModel,
    /// The process was killed (SIGKILL, segfault, bus error) or its launcher reported a dead child.
    ProcessKilled,
    /// A Python exception with a traceback; `message` is the exception line.
    Traceback,
    /// The loss became NaN or infinite.
    NonFiniteLoss,
}

impl ErrorClass {
    /// Whether this error ends the run by itself. NaN loss is a warning first (policy decides),
    /// and ai-toolkit recovers from isolated OOMs.
    pub fn is_fatal(self) -> bool {
        !matches!(self, ErrorClass::RecoveredOutOfMemory | ErrorClass::NonFiniteLoss)
    }

    /// The job reason this error leads to when the run fails with it.
    pub fn reason(self) -> Reason {
        match self {
            ErrorClass::CudaOutOfMemory | ErrorClass::RecoveredOutOfMemory => Reason::OutOfMemory,
            ErrorClass::DiskFull => Reason::DiskFull,
            ErrorClass::GatedModel => Reason::ModelAccessDenied,
            _ => Reason::TrainingFailed,
        }
    }

    /// How much this class explains a failure, for picking the one reason of a failed run: the
    /// specific cause beats the generic traceback that reports it.
    pub fn specificity(self) -> u8 {
        match self {
            ErrorClass::GatedModel | ErrorClass::DiskFull | ErrorClass::CudaOutOfMemory => 5,
            ErrorClass::NcclTimeout | ErrorClass::CudaRuntime => 4,
            ErrorClass::ProcessKilled => 3,
            ErrorClass::Traceback => 2,
            ErrorClass::RecoveredOutOfMemory | ErrorClass::NonFiniteLoss => 1,
        }
    }
}

/// One classified error with the line that showed it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClassifiedError {
    pub class: ErrorClass,
    pub fatal: bool,
    /// The record that matched, shortened to a few hundred characters.
    pub message: String,
}

impl ClassifiedError {
    pub fn new(class: ErrorClass, message: &str) -> Self {
        Self { class, fatal: class.is_fatal(), message: shorten(message.trim()) }
    }
}

const MAX_MESSAGE_CHARS: usize = 300;

fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Signatures in priority order: the first match wins for a record.
const SIGNATURES: &[(ErrorClass, &[&str])] = &[
    (ErrorClass::RecoveredOutOfMemory, &["OOM during training step, skipping batch"]),
    (ErrorClass::CudaOutOfMemory, &["CUDA out of memory", "OutOfMemoryError", "OOM during training step"]),
    (ErrorClass::GatedModel, &["GatedRepoError", "Cannot access gated repo", "401 Client Error"]),
    (
        ErrorClass::DiskFull,
        &[
            "No space left on device",
            "[Errno 28]",
            "kind: StorageFull",
            "PytorchStreamWriter failed writing file",
            "file write failed",
        ],
    ),
    (
        ErrorClass::NcclTimeout,
        &["Watchdog caught collective operation timeout", "NCCL error", "DistBackendError", "NCCL timeout"],
    ),
    (ErrorClass::CudaRuntime, &["CUDA error: "]),
    (
        ErrorClass::ProcessKilled,
        &[
            "ChildFailedError",
            "Signal 9 (SIGKILL) received",
            "is killed by signal",
            "Segmentation fault",
            "Bus error",
            "returned non-zero exit status",
        ],
    ),
    (ErrorClass::NonFiniteLoss, &["NaN found in latents", "Loss is NaN", "loss is nan"]),
];

/// Classifies one record by its signature, without traceback state.
pub fn classify_line(text: &str) -> Option<ErrorClass> {
    let class = SIGNATURES.iter().find(|(_, needles)| needles.iter().any(|needle| text.contains(needle)));
    if let Some((class, _)) = class {
        return Some(*class);
    }
    // `Killed` alone, or `<script>: line N: <pid> Killed <cmd>` from a wrapper shell. A plain
    // substring match would flag every message that mentions "killed".
    let trimmed = text.trim();
    let wrapper_kill =
        trimmed.contains(": line ") && (trimmed.contains(" Killed ") || trimmed.ends_with(" Killed"));
    (trimmed == "Killed" || wrapper_kill).then_some(ErrorClass::ProcessKilled)
}

/// Follows tracebacks across records and classifies every record.
#[derive(Debug, Default)]
pub struct ErrorScanner {
    in_traceback: bool,
}

impl ErrorScanner {
    /// Looks at one record; returns the errors it shows (at most two: its own signature and the
    /// exception that ends a traceback).
    pub fn scan(&mut self, text: &str, out: &mut dyn FnMut(ClassifiedError)) {
        if text.starts_with("Traceback (most recent call last)") {
            self.in_traceback = true;
            return;
        }
        if self.in_traceback && is_exception_line(text) {
            self.in_traceback = false;
            out(ClassifiedError::new(ErrorClass::Traceback, text));
        }
        if let Some(class) = classify_line(text) {
            out(ClassifiedError::new(class, text));
        }
    }
}

/// The first unindented `^[\w.]+(Error|Exception|Interrupt)\b...` line after the frames.
fn is_exception_line(text: &str) -> bool {
    if text.starts_with(char::is_whitespace) {
        return false;
    }
    let name_len = text.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.')).unwrap_or(text.len());
    let name = &text[..name_len];
    let boundary_ok = text[name_len..].chars().next().is_none_or(|c| !c.is_alphanumeric());
    boundary_ok
        && (name.ends_with("Error")
            || name.ends_with("Exception")
            || name.ends_with("Interrupt")
            || name.ends_with("Exit"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_each_signature_family() {
        let cases = [
            (
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.68 GiB.",
                ErrorClass::CudaOutOfMemory,
            ),
            ("RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB", ErrorClass::CudaOutOfMemory),
            ("# OOM during training step, skipping batch 1/3 #", ErrorClass::RecoveredOutOfMemory),
            ("RuntimeError: CUDA error: an illegal memory access was encountered", ErrorClass::CudaRuntime),
            (
                "Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE)",
                ErrorClass::NcclTimeout,
            ),
            ("OSError: [Errno 28] No space left on device", ErrorClass::DiskFull),
            ("huggingface_hub.errors.GatedRepoError: 401 Client Error.", ErrorClass::GatedModel),
            ("Killed", ErrorClass::ProcessKilled),
            ("run.sh: line 3: 4242 Killed python run.py", ErrorClass::ProcessKilled),
            ("NaN found in latents", ErrorClass::NonFiniteLoss),
        ];
        for (line, class) in cases {
            assert_eq!(classify_line(line), Some(class), "{line}");
        }
        assert_eq!(classify_line("FutureWarning: something deprecated"), None);
        assert_eq!(classify_line("nohup: ignoring input"), None);
    }

    #[test]
    fn a_traceback_yields_its_exception_line() {
        let mut scanner = ErrorScanner::default();
        let mut found = Vec::new();
        for line in [
            "Traceback (most recent call last):",
            "  File \"run.py\", line 90, in <module>",
            "    main()",
            "ValueError: bad config",
            "ValueError: again (not in a traceback)",
        ] {
            scanner.scan(line, &mut |e| found.push(e));
        }
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].class, ErrorClass::Traceback);
        assert_eq!(found[0].message, "ValueError: bad config");
        assert!(found[0].fatal);
    }
}
