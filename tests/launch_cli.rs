//! `gpu-trainer launch` as a user runs it. Local provider: the quickstart finishes and prints the
//! model path; bad parameters are refused naming the parameter; a failing trainer fails the
//! job; an interrupted launch continues without starting the trainer twice. Vast.ai provider
//! (against `fake-vastai` in this process, whose machines are this machine over the test sshd):
//! a dry run rents nothing; a run rents one instance, trains, downloads the model and destroys
//! it; a killed launch resumes on the same instance; `--cancel` destroys it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::operator::{API_KEY, live_instances, start_fake};
use gpu_trainer::provider::fake::{self, FakeConfig, FakeServer};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A job file next to a copy of the quickstart dataset, in a fresh temporary folder.
fn job_in(dir: &Path, params: &str) -> PathBuf {
    let dataset = dir.join("data");
    std::fs::create_dir_all(&dataset).unwrap();
    for entry in std::fs::read_dir(repo().join("examples/quickstart-dataset")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dataset.join(entry.file_name())).unwrap();
    }
    let job = dir.join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "apiVersion: gputrainer.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: t}}\nspec:\n  tool: demo@1\n  params: {params}\n  dataset: {{local: {{path: data}}}}\n"
        ),
    )
    .unwrap();
    job
}

fn launch(job: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpu-trainer"))
        .arg("launch")
        .arg(job)
        .args(["--tools-dir", repo().join("config/tools").to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap()
}

/// A launcher running in the background, its output dropped (killed later, as a closed
/// terminal would).
fn spawn_launch(job: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_gpu-trainer"))
        .arg("launch")
        .arg(job)
        .args(["--tools-dir", repo().join("config/tools").to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn the_quickstart_finishes_and_prints_the_model_path() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpu-trainer"))
        .current_dir(repo())
        .args(["launch", "examples/quickstart.yaml", "--restart"])
        .args(["--state-dir", tempfile::tempdir().unwrap().keep().to_str().unwrap()])
        .output()
        .unwrap();
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let model = all.lines().find_map(|l| l.strip_prefix("model: ")).expect("model path printed");
    assert!(Path::new(model.trim()).is_file(), "{model} exists");
    assert!(all.contains("step 40/40"), "{all}");
}

#[test]
fn unknown_or_out_of_range_parameters_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = launch(&job_in(dir.path(), "{stepz: 3}"), &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("stepz"), "{}", text(&out));
    let out = launch(&job_in(dir.path(), "{steps: 0}"), &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("steps"), "{}", text(&out));
    assert!(
        !dir.path().join(".gpu-trainer/work").exists()
            || std::fs::read_dir(dir.path().join(".gpu-trainer/work")).unwrap().count() == 0,
        "nothing ran"
    );
}

#[test]
fn a_failing_trainer_fails_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let out = launch(&job_in(dir.path(), "{steps: 20, secondsPerStep: 0.05, failAtStep: 5}"), &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Failed"), "{}", text(&out));
}

#[test]
fn an_interrupted_launch_continues_without_starting_the_trainer_twice() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_in(dir.path(), "{steps: 30, secondsPerStep: 0.2}");
    let mut first = spawn_launch(&job);
    // Wait until training runs, then kill the launcher (as a closed terminal would).
    let work = dir.path().join(".gpu-trainer/work");
    let pid_file = || -> Option<PathBuf> {
        std::fs::read_dir(&work)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path().join("train.pid"))
            .find(|p| p.exists())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let pid_path = loop {
        if let Some(p) = pid_file() {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "training never started");
        std::thread::sleep(Duration::from_millis(100));
    };
    first.kill().unwrap();
    first.wait().unwrap();
    let pid_before = std::fs::read_to_string(&pid_path).unwrap();

    let out = launch(&job, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Succeeded"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&pid_path).unwrap(), pid_before, "the trainer was not started again");
}

/// `--provider ssh` against the test sshd: the job is staged, trained and its model downloaded
/// and verified; the host key is pinned in the state file.
#[test]
#[ignore = "needs tests/ environment"]
fn launch_over_ssh_runs_on_the_machine_and_brings_the_model_back() {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("{name} not set; run through tests/run.sh"))
    };
    let dir = tempfile::tempdir().unwrap();
    let job = job_in(dir.path(), "{steps: 12, secondsPerStep: 0.05, saveEvery: 4}");
    let yaml = std::fs::read_to_string(&job).unwrap().replace(
        "  dataset:",
        &format!(
            "  provider: {{ssh: {{host: \"{}\", port: {}, user: \"{}\"}}}}\n  dataset:",
            var("GPU_TRAINER_TEST_SSH_HOST"),
            var("GPU_TRAINER_TEST_SSH_PORT"),
            var("GPU_TRAINER_TEST_SSH_USER")
        ),
    );
    std::fs::write(&job, yaml).unwrap();
    let remote_base = dir.path().join("remote-base");
    let key = var("GPU_TRAINER_TEST_SSH_KEY");
    let out = launch(
        &job,
        &["--provider", "ssh", "--ssh-key", &key, "--remote-base", remote_base.to_str().unwrap()],
    );
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let model =
        all.lines().find_map(|l| l.strip_prefix("model: ")).expect("model path printed").trim().to_string();
    assert!(model.contains(".gpu-trainer/results/"), "the model was downloaded: {model}");
    assert!(Path::new(&model).is_file());
    let state = std::fs::read_to_string(dir.path().join(".gpu-trainer/t.json")).unwrap();
    assert!(state.contains("\"hostKey\": \"SHA256:"), "host key pinned: {state}");
    assert!(remote_base.is_dir(), "the work dir is under --remote-base on the machine");
}

// --- `--provider vastai` against `fake-vastai` in this process ---------------------------------

/// `launch` with `--provider vastai` against `fake`, run off the async runtime that serves it.
async fn launch_vastai(job: &Path, fake: &FakeServer, remote_base: &Path, extra: &[&str]) -> Output {
    let mut command = vastai_command(job, fake, remote_base, extra);
    tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap()
}

fn vastai_command(job: &Path, fake: &FakeServer, remote_base: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gpu-trainer"));
    command
        .arg("launch")
        .arg(job)
        .args(["--provider", "vastai", "--remote-base", remote_base.to_str().unwrap()])
        .args(extra)
        .env("VASTAI_API_KEY", API_KEY)
        .env("VASTAI_API_BASE_URL", fake.url())
        .env_remove("GPU_TRAINER_CRASH_AT");
    if !extra.contains(&"--tools-dir") {
        command.args(["--tools-dir", repo().join("config/tools").to_str().unwrap()]);
    }
    command
}

/// The job's state file as JSON.
fn state(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join(".gpu-trainer/t.json")).expect("state file");
    serde_json::from_str(&text).unwrap()
}

/// The work dir on "the machine" (this machine through the test sshd).
fn remote_work_dir(dir: &Path, remote_base: &Path) -> PathBuf {
    remote_base.join(state(dir)["uid"].as_str().expect("uid in state"))
}

/// Waits until the trainer started on the machine; returns its pid file.
async fn wait_for_training(dir: &Path, remote_base: &Path) -> PathBuf {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if dir.join(".gpu-trainer/t.json").exists() {
            let pid = remote_work_dir(dir, remote_base).join("train.pid");
            if pid.exists() {
                return pid;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "training never started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `pid` runs (a zombie waiting for a parent that does not reap it has stopped).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next()).unwrap_or_default();
    !matches!(state, Some('Z' | 'X'))
}

fn creates(fake: &FakeServer) -> u64 {
    fake.counters().endpoint("create_instance")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_with_vastai_shows_the_offer_and_cost_and_rents_nothing() {
    let fake =
        fake::spawn(FakeConfig { api_key: Some(API_KEY.into()), ..FakeConfig::default() }).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = job_in(dir.path(), "{steps: 5}");
    let out = launch_vastai(&job, &fake, &dir.path().join("remote"), &["--dry-run"]).await;
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let machine = all.lines().find(|l| l.starts_with("machine:")).expect("machine line");
    assert!(machine.contains("/h, reliability 0.9") && machine.contains("(offer 4"), "{all}");
    assert!(all.contains("cost:      at most $"), "{all}");
    assert!(all.contains("activeDeadlineSeconds 4h00m"), "{all}");
    assert!(all.contains("run:       python3 -u demo_trainer.py"), "{all}");
    assert!(all.contains("nothing was rented"), "{all}");
    assert_eq!(creates(&fake), 0, "a dry run rents nothing");
    assert!(fake.instances().is_empty());
    assert!(!all.contains(API_KEY), "the API key is never printed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vastai_errors_name_the_missing_key_and_the_requirements_that_match_nothing() {
    let fake =
        fake::spawn(FakeConfig { api_key: Some(API_KEY.into()), ..FakeConfig::default() }).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = job_in(dir.path(), "{steps: 5}");
    let mut no_key = vastai_command(&job, &fake, &dir.path().join("remote"), &[]);
    no_key.env_remove("VASTAI_API_KEY");
    let out = tokio::task::spawn_blocking(move || no_key.output().unwrap()).await.unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("set VASTAI_API_KEY or pass --api-key-file FILE"), "{}", text(&out));

    let yaml = std::fs::read_to_string(&job).unwrap().replace(
        "  dataset:",
        "  resources: {gpu: {names: [\"RTX 4090\"]}, maxPricePerHour: 0.05}\n  dataset:",
    );
    std::fs::write(&job, yaml).unwrap();
    let out = launch_vastai(&job, &fake, &dir.path().join("remote"), &[]).await;
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("no offer matches spec.resources"), "{all}");
    assert!(all.contains("price above $0.05/h (spec.resources.maxPricePerHour)"), "{all}");
    assert!(all.contains("(spec.resources.gpu.names)"), "{all}");
    assert_eq!(creates(&fake), 0);

    // With the key in a file instead of the environment the search works (and still finds nothing).
    let key_file = dir.path().join("vast.key");
    std::fs::write(&key_file, format!("{API_KEY}\n")).unwrap();
    let mut from_file = vastai_command(
        &job,
        &fake,
        &dir.path().join("remote"),
        &["--api-key-file", key_file.to_str().unwrap()],
    );
    from_file.env_remove("VASTAI_API_KEY");
    let out = tokio::task::spawn_blocking(move || from_file.output().unwrap()).await.unwrap();
    assert!(text(&out).contains("no offer matches spec.resources"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn launch_on_vastai_rents_trains_downloads_and_destroys_the_instance() {
    let fake = start_fake(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let remote_base = dir.path().join("remote");
    let job = job_in(dir.path(), "{steps: 12, secondsPerStep: 0.05, saveEvery: 4}");
    let out = launch_vastai(&job, &fake, &remote_base, &[]).await;
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("t: Succeeded"), "{all}");
    let model =
        all.lines().find_map(|l| l.strip_prefix("model: ")).expect("model path printed").trim().to_string();
    assert!(model.contains(".gpu-trainer/results/"), "downloaded from the machine: {model}");
    assert!(Path::new(&model).is_file());
    assert!(all.contains("destroyed; the job cost $"), "{all}");

    // One rent, with the label, the job's key and the dead-man timer; then destroyed.
    assert_eq!(creates(&fake), 1);
    let create = fake.requests().into_iter().find(|r| r.endpoint == "create_instance").unwrap();
    let body = create.body.unwrap();
    let label = body["label"].as_str().unwrap().to_string();
    assert!(label.starts_with("gputrainer:") && label.len() <= 60, "{label}");
    assert!(body["onstart"].as_str().unwrap().contains("dead-man timer"), "{body}");
    assert!(fake.counters().endpoint("destroy_instance") >= 1);
    assert!(live_instances(&fake, "gputrainer:").await.is_empty(), "the instance is destroyed");

    let state = state(dir.path());
    assert_eq!(state["rented"]["label"], label);
    assert_eq!(state["rented"]["machine"]["state"], "released", "{state}");
    assert!(state["hostKey"].as_str().unwrap().starts_with("SHA256:"), "host key pinned: {state}");
    assert!(state["status"]["cost"]["accrued"].as_f64().unwrap() > 0.0, "{state}");
    let key = std::fs::read_to_string(dir.path().join(".gpu-trainer/t.ssh-key")).unwrap();
    assert!(!all.contains(key.trim()), "the private key is never printed");
    assert!(!all.contains(API_KEY), "the API key is never printed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_killed_vastai_launch_resumes_on_the_same_instance_without_training_twice() {
    let fake = start_fake(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let remote_base = dir.path().join("remote");
    let job = job_in(dir.path(), "{steps: 30, secondsPerStep: 0.25}");
    let mut first = vastai_command(&job, &fake, &remote_base, &[]);
    first.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut first = first.spawn().unwrap();
    let pid_file = wait_for_training(dir.path(), &remote_base).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let pid_before = std::fs::read_to_string(&pid_file).unwrap();
    let live = live_instances(&fake, "gputrainer:").await;
    assert_eq!(live.len(), 1, "the instance stays rented after a kill: {live:?}");

    let out = launch_vastai(&job, &fake, &remote_base, &[]).await;
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("t: Succeeded"), "{all}");
    assert_eq!(creates(&fake), 1, "no second instance was rented");
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), pid_before, "the trainer was not started again");
    assert!(all.contains(&format!("instance {} destroyed", live[0].id)), "{all}");
    assert!(live_instances(&fake, "gputrainer:").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_launch_killed_between_rent_and_recording_finds_its_instance_by_label() {
    let fake = start_fake(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let remote_base = dir.path().join("remote");
    let job = job_in(dir.path(), "{steps: 6, secondsPerStep: 0.05}");
    let mut crashing = vastai_command(&job, &fake, &remote_base, &[]);
    crashing.env("GPU_TRAINER_CRASH_AT", "launch-after-rent");
    let out = tokio::task::spawn_blocking(move || crashing.output().unwrap()).await.unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("GPU_TRAINER_CRASH_AT=launch-after-rent"), "{}", text(&out));
    let pending = state(dir.path());
    assert_eq!(pending["rented"]["machine"]["state"], "rentPending", "the id was never recorded: {pending}");
    assert_eq!(live_instances(&fake, "gputrainer:").await.len(), 1);

    let out = launch_vastai(&job, &fake, &remote_base, &[]).await;
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("adopted instance"), "{all}");
    assert_eq!(creates(&fake), 1, "the instance was found by its label, not rented again");
    assert!(live_instances(&fake, "gputrainer:").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn cancel_stops_the_trainer_and_destroys_the_instance() {
    let fake = start_fake(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let remote_base = dir.path().join("remote");
    let job = job_in(dir.path(), "{steps: 600, secondsPerStep: 0.1}");
    let mut first = vastai_command(&job, &fake, &remote_base, &[]);
    first.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut first = first.spawn().unwrap();
    let pid_file = wait_for_training(dir.path(), &remote_base).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let live = live_instances(&fake, "gputrainer:").await;
    assert_eq!(live.len(), 1);
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert!(alive(pid), "the trainer runs on after the launcher was killed");

    let out = launch_vastai(&job, &fake, &remote_base, &["--cancel"]).await;
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains(&format!("instance {} destroyed", live[0].id)), "{all}");
    assert!(live_instances(&fake, "gputrainer:").await.is_empty(), "destroyed");
    assert!(!alive(pid), "the trainer was stopped");
    assert_eq!(state(dir.path())["status"]["phase"], "Failed");
    assert_eq!(creates(&fake), 1);
}

/// A job whose `HF_TOKEN` comes from `valueFrom.secretKeyRef` (Secret `hf`, key `token`), run
/// with a copy of the demo tool that writes what it was given to `token.seen` in its work dir.
fn secret_env_job(dir: &Path) -> (PathBuf, PathBuf) {
    let tools = dir.join("tools");
    std::fs::create_dir_all(tools.join("demo")).unwrap();
    for entry in std::fs::read_dir(repo().join("config/tools/demo")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tools.join("demo").join(entry.file_name())).unwrap();
    }
    let definition = tools.join("demo/tool.yaml");
    let yaml = std::fs::read_to_string(&definition).unwrap();
    let yaml =
        yaml.replacen("run: >-\n  python3", "run: >-\n  printenv HF_TOKEN > token.seen &&\n  python3", 1);
    std::fs::write(&definition, yaml).unwrap();
    let job = job_in(dir, "{steps: 3, secondsPerStep: 0}");
    let mut text = std::fs::read_to_string(&job).unwrap();
    text.push_str("  env:\n  - name: HF_TOKEN\n    valueFrom: {secretKeyRef: {name: hf, key: token}}\n");
    std::fs::write(&job, text).unwrap();
    (job, tools)
}

#[test]
fn value_from_env_is_read_from_a_secret_file_and_never_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (job, tools) = secret_env_job(dir.path());
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_gpu-trainer"))
            .arg("launch")
            .arg(&job)
            .args(["--tools-dir", tools.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    // Without the Secret the job is refused before anything starts, naming the variable.
    let out = run(&[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("spec.env: HF_TOKEN: Secret hf is not given: pass --secret hf=FILE"),
        "{}",
        text(&out)
    );
    assert!(!dir.path().join(".gpu-trainer/work").exists(), "nothing was staged or started");

    let secret = dir.path().join("hf.env");
    std::fs::write(&secret, "# the Hugging Face token\ntoken=hf_not_a_real_token_123\n").unwrap();
    let out = run(&["--secret", &format!("hf={}", secret.display())]);
    assert!(out.status.success(), "{}", text(&out));
    let uid = state(dir.path())["uid"].as_str().unwrap().to_string();
    let seen =
        std::fs::read_to_string(dir.path().join(".gpu-trainer/work").join(&uid).join("token.seen")).unwrap();
    assert_eq!(seen.trim(), "hf_not_a_real_token_123", "the trainer got the Secret's value");
    let kept = std::fs::read_to_string(dir.path().join(".gpu-trainer/t.json")).unwrap();
    assert!(!kept.contains("hf_not_a_real_token_123"), "the state file never holds a Secret value");
    assert!(!text(&out).contains("hf_not_a_real_token_123"), "nor does the output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolvable_value_from_env_rents_nothing() {
    let fake =
        fake::spawn(FakeConfig { api_key: Some(API_KEY.into()), ..FakeConfig::default() }).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (job, tools) = secret_env_job(dir.path());
    let out =
        launch_vastai(&job, &fake, &dir.path().join("remote"), &["--tools-dir", tools.to_str().unwrap()])
            .await;
    assert!(!out.status.success());
    assert!(text(&out).contains("spec.env: HF_TOKEN"), "{}", text(&out));
    assert_eq!(creates(&fake), 0, "nothing is rented for a job that cannot run");
    assert!(fake.instances().is_empty());
}

/// A stalled run interrupted with Ctrl-C (the launcher killed) and launched again keeps its stall
/// clock: the stall is judged from the last progress the first launcher saw, not from the
/// second launcher's start. The stopped run keeps its latest checkpoint with a model card
/// marked incomplete.
#[test]
fn a_resumed_launch_keeps_the_stall_clock_and_saves_the_latest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_in(dir.path(), "{steps: 1000, secondsPerStep: 0.05, saveEvery: 5, stallAtStep: 10}");
    let yaml = std::fs::read_to_string(&job).unwrap()
        + "  monitoring: {pollIntervalSeconds: 5, noProgressTimeoutSeconds: 60}\n";
    std::fs::write(&job, yaml).unwrap();
    let state_file = dir.path().join(".gpu-trainer/t.json");
    let state = || -> serde_json::Value {
        std::fs::read(&state_file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    };
    let mut first = spawn_launch(&job);
    // The trainer stalls at step 9; the first launcher sees it stuck there for a while.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while state()["status"]["progress"]["step"].as_u64().unwrap_or(0) < 9 {
        assert!(std::time::Instant::now() < deadline, "training never reached step 9");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(25));
    first.kill().unwrap();
    first.wait().unwrap();
    let restarted = chrono::Utc::now();

    let out = launch(&job, &[]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    let status = &state()["status"];
    assert_eq!(status["reason"], "Stalled", "{all}");
    let time = |v: &serde_json::Value| v.as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    let last_progress = time(&status["progress"]["lastUpdateTime"]);
    let stalled = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Stalled").unwrap();
    let flagged = time(&stalled["lastTransitionTime"]);
    assert!(flagged - last_progress >= chrono::Duration::seconds(60), "flagged after the timeout: {status}");
    assert!(
        flagged - restarted < chrono::Duration::seconds(55),
        "the second launcher continued the first one's clock (restarted {restarted}, flagged {flagged})"
    );
    let message = status["message"].as_str().unwrap();
    assert!(message.contains("with a model card marked incomplete"), "{message}");
    let checkpoint = status["artifacts"][0]["uri"].as_str().unwrap().strip_prefix("file://").unwrap();
    let card = Path::new(checkpoint).with_file_name("README.md");
    assert!(std::fs::read_to_string(&card).unwrap().contains("incomplete"), "{}", card.display());
}

/// A webhook `launch` cannot read is refused before anything runs, naming the field and the
/// flag that gives it.
#[test]
fn launch_refuses_a_webhook_it_cannot_read_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_in(dir.path(), "{steps: 3}");
    let base = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, format!("{base}  notify: {{webhookSecretRef: {{name: hook, key: url}}}}\n"))
        .unwrap();
    let out = launch(&job, &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("spec.notify.webhookSecretRef"), "{}", text(&out));
    assert!(text(&out).contains("--secret hook=FILE"), "{}", text(&out));
    assert!(!dir.path().join(".gpu-trainer/work").exists(), "nothing ran");
}
