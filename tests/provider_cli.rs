//! The `offers` and `fake-vastai` subcommands, run as the built binary.

use std::process::Stdio;
use std::time::Duration;

use gpu_trainer::provider::config::ApiKey;
use gpu_trainer::provider::fake::{self, FakeConfig};
use gpu_trainer::provider::vastai::{ClientOptions, RetryPolicy, VastClient};
use gpu_trainer::provider::{GpuProvider, InstanceState, LaunchRequest, OfferQuery};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use url::Url;

const BIN: &str = env!("CARGO_BIN_EXE_gpu-trainer");

async fn offers(url: &str, key: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("offers").args(args).env("VASTAI_API_BASE_URL", url).env_remove("VASTAI_API_KEY");
    if let Some(key) = key {
        cmd.env("VASTAI_API_KEY", key);
    }
    cmd.stdin(Stdio::null()).output().await.unwrap()
}

#[tokio::test]
async fn offers_prints_json_and_a_table_and_refuses_without_a_key() {
    let fake = fake::spawn(FakeConfig { api_key: Some("k".into()), ..FakeConfig::default() }).await.unwrap();
    let out = offers(&fake.url(), Some("k"), &["--gpu", "RTX 4090", "--max-price", "1", "--json"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert!(!list.is_empty());
    assert!(list.iter().all(|o| o["gpu_name"] == "RTX 4090" && o["price_per_hour"].as_f64().unwrap() <= 1.0));

    let out = offers(&fake.url(), Some("k"), &["--limit", "3"]).await;
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    for column in ["GPU", "VRAM", "$/H", "RELIABILITY", "LOCATION", "OFFER"] {
        assert!(lines[0].contains(column), "{table}");
    }

    let out = offers(&fake.url(), None, &[]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("VASTAI_API_KEY is not set"));
    let out = offers(&fake.url(), Some("offers-wrong-key-31"), &[]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rejected the API key") && !stderr.contains("offers-wrong-key-31"), "{stderr}");
}

/// Starts `gpu-trainer fake-vastai` on a free port and returns the process and its URL.
async fn start_fake_process(args: &[&str]) -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(BIN)
        .arg("fake-vastai")
        .args(["--listen", "127.0.0.1:0", "--loading-after", "0", "--running-after", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    // The first stdout line is the URL, printed once the port is bound.
    let url =
        tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await.unwrap().unwrap().unwrap();
    (child, url)
}

#[tokio::test]
async fn fake_vastai_command_serves_takes_faults_and_keeps_state_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let state_arg = state.to_str().unwrap();
    let fault = r#"{"kind":"error_burst","status":503,"count":1,"endpoint":"current_user"}"#;
    let (mut child, url) =
        start_fake_process(&["--state", state_arg, "--ssh-port", "2200", "--fault", fault]).await;
    let options = ClientOptions {
        retry: RetryPolicy { min_delay: Duration::from_millis(10), ..RetryPolicy::default() },
        min_interval: Duration::ZERO,
        ..ClientOptions::default()
    };
    let client = VastClient::new(Url::parse(&url).unwrap(), &ApiKey::new("any"), options.clone()).unwrap();
    // Retried through the injected 503.
    client.check_credentials().await.unwrap();
    let counters: Value = reqwest::get(format!("{url}/_fake/counters")).await.unwrap().json().await.unwrap();
    assert_eq!(counters["by_endpoint"]["current_user"]["503"], 1, "{counters}");

    let offer = client.search_offers(&OfferQuery::default()).await.unwrap()[0].id;
    let request = LaunchRequest {
        offer_id: offer,
        image: "img".into(),
        disk_gb: 10,
        label: Some("kept".into()),
        ssh: true,
        ..LaunchRequest::default()
    };
    let id = client.create_instance(&request).await.unwrap();
    child.kill().await.unwrap();

    let (_child, url) = start_fake_process(&["--state", state_arg, "--ssh-port", "2200"]).await;
    let client = VastClient::new(Url::parse(&url).unwrap(), &ApiKey::new("any"), options).unwrap();
    let instance = client.get_instance(id).await.unwrap();
    assert_eq!(instance.label.as_deref(), Some("kept"));
    assert_eq!(instance.state, InstanceState::Running);
    assert_eq!(instance.ssh.map(|s| s.port), Some(2200));
}
