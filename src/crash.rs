//! Crash points for the crash-safety tests, shared by every front end that runs job steps.

/// Crash points for the crash-safety tests: when `GPU_TRAINER_CRASH_AT` names this point, the
/// process aborts here, as a killed controller would. Unset in normal operation.
pub fn crash_point(name: &str) {
    if std::env::var("GPU_TRAINER_CRASH_AT").is_ok_and(|at| at == name) {
        eprintln!("GPU_TRAINER_CRASH_AT={name}: aborting");
        std::process::abort();
    }
}
