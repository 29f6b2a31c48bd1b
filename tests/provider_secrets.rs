//! The API key never appears in log lines, `Debug` output or error messages, including on the
//! failure paths (rejected key, retries, timeouts, contracts left behind).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpu_trainer::provider::config::{ApiKey, ProviderConfig};
use gpu_trainer::provider::fake::{self, FakeConfig, Fault};
use gpu_trainer::provider::vastai::{ClientOptions, RetryPolicy, VastClient};
use gpu_trainer::provider::{GpuProvider, LaunchRequest, OfferQuery};
use url::Url;

const SECRET: &str = "s3cr3t-vast-key-0d9f7e";
const WRONG: &str = "wr0ng-vast-key-77aa21";

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every error's Display, Debug and source chain.
fn describe(err: &dyn std::error::Error) -> String {
    let mut text = format!("{err} | {err:?}");
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(&format!(" | {s} | {s:?}"));
        source = s.source();
    }
    text
}

// A current-thread runtime, so the thread-local subscriber sees the client, the fake and hyper.
#[tokio::test]
async fn the_api_key_appears_in_no_log_debug_output_or_error() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let fake =
        fake::spawn(FakeConfig { api_key: Some(SECRET.into()), ..FakeConfig::default() }).await.unwrap();
    let options = ClientOptions {
        timeout: Duration::from_millis(500),
        retry: RetryPolicy {
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            ..RetryPolicy::default()
        },
        min_interval: Duration::ZERO,
        ..ClientOptions::default()
    };
    let url = Url::parse(&fake.url()).unwrap();
    let client = VastClient::new(url.clone(), &ApiKey::new(SECRET), options.clone()).unwrap();
    let wrong = VastClient::new(url, &ApiKey::new(WRONG), options).unwrap();
    let mut seen = vec![format!("{client:?}"), format!("{wrong:?}")];

    let config =
        ProviderConfig::from_lookup(|k| (k == "VASTAI_API_KEY").then(|| SECRET.to_string())).unwrap();
    seen.push(format!("{config:?}"));

    // Failure paths, each producing errors and warnings.
    seen.push(describe(&wrong.check_credentials().await.unwrap_err()));
    seen.push(describe(&wrong.list_instances().await.unwrap_err()));
    fake.add_fault(Fault::ErrorBurst { status: 503, count: 100, endpoint: None });
    seen.push(describe(&client.list_instances().await.unwrap_err()));
    fake.clear_faults();
    fake.add_fault(Fault::RateLimit { count: 100, retry_after_secs: None, endpoint: None });
    seen.push(describe(&client.search_offers(&OfferQuery::default()).await.unwrap_err()));
    fake.clear_faults();
    fake.add_fault(Fault::Slow { delay_ms: 2_000, count: 100, endpoint: Some("list_instances".into()) });
    seen.push(describe(&client.list_instances().await.unwrap_err()));
    fake.clear_faults();

    let offer = client.search_offers(&OfferQuery::default()).await.unwrap()[0].id;
    let request = LaunchRequest {
        offer_id: offer,
        image: "img".into(),
        disk_gb: 10,
        env: [("HF_TOKEN".to_string(), "hf-token-value-4411".to_string())].into_iter().collect(),
        label: Some("secrets".into()),
        ssh: true,
        ..LaunchRequest::default()
    };
    // Environment values may be secrets too: Debug shows only their names.
    let debug = format!("{request:?}");
    assert!(debug.contains("HF_TOKEN") && !debug.contains("hf-token-value-4411"), "{debug}");
    fake.add_fault(Fault::CreateLeavesContract { count: 1, status: 500, report_contract: true });
    let err = client.create_instance(&request).await.unwrap_err();
    seen.push(describe(&err));
    client.destroy_instance(err.left_contract().unwrap()).await.unwrap();

    // The fake's own request log keeps how a request authenticated, never the key.
    seen.push(serde_json::to_string(&fake.requests()).unwrap());
    fake.shutdown().await.unwrap();

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("Retrying Vast.ai call"), "the capture works:\n{logs}");
    assert!(
        logs.contains("Created Vast.ai instance") || logs.contains("Destroyed Vast.ai instance"),
        "{logs}"
    );
    seen.push(logs);
    for text in &seen {
        assert!(!text.contains(SECRET), "the key leaked into: {text}");
        assert!(!text.contains(WRONG), "the wrong key leaked into: {text}");
    }
}
