//! `gpu-trainer parse-log` end to end: JSON on stdout for a fixture, clear errors otherwise.

use std::process::Command;

fn gpu_trainer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gpu-trainer"))
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/logs/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn prints_progress_events_errors_and_stall_analysis_as_json() {
    let output = gpu_trainer()
        .args(["parse-log", &fixture("stalled_flat.log"), "--parser", "ai-toolkit", "--timestamps"])
        .arg(fixture("stalled_flat.ts"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["parser"], "ai-toolkit");
    assert_eq!(report["finalProgress"]["step"], 500);
    assert_eq!(report["finalProgress"]["totalSteps"], 3000);
    assert!(report["stall"]["firstFlaggedPoll"].is_u64());
    assert_eq!(report["stall"]["final"]["stalling"], true);
}

#[test]
fn without_timestamps_there_is_no_stall_analysis() {
    let output = gpu_trainer()
        .args(["parse-log", &fixture("oom_crash_aitk.log"), "--parser", "ai-toolkit"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(report.get("stall").is_none());
    assert_eq!(report["errors"][3]["class"], "cudaOutOfMemory");
}

#[test]
fn an_unreadable_file_is_named_in_the_error() {
    let output = gpu_trainer().args(["parse-log", "/nonexistent/train.log"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/train.log"), "{stderr}");
}

#[test]
fn an_unknown_parser_lists_the_valid_ones() {
    let output =
        gpu_trainer().args(["parse-log", &fixture("ascii_bar.log"), "--parser", "axolotl"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("axolotl") && stderr.contains("tqdm, ai-toolkit, kohya, diffusers"), "{stderr}");
}
