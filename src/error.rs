//! Errors as people read them: one line with every cause.

/// An error and its chain of causes, `outer: cause: root cause`, as logs, events and status
/// messages show it.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
