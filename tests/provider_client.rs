//! The Vast.ai client against `fake-vastai` over real HTTP: every operation, every fault the fake
//! can inject, with request counts asserted (no retry storms, no request without auth).

use std::time::Duration;

use gpu_trainer::provider::config::ApiKey;
use gpu_trainer::provider::fake::{self, FakeConfig, FakeServer, Fault, ForcedState};
use gpu_trainer::provider::vastai::{ClientOptions, RetryPolicy, VastClient};
use gpu_trainer::provider::{Error, GpuProvider, InstanceId, InstanceState, LaunchRequest, OfferQuery};
use url::Url;

const KEY: &str = "test-key-5f1c2a";

fn options() -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            max_attempts: 4,
            min_delay: Duration::from_millis(20),
            factor: 1.5,
            max_delay: Duration::from_millis(200),
        },
        min_interval: Duration::ZERO,
    }
}

fn client_for(fake: &FakeServer, key: &str, options: ClientOptions) -> VastClient {
    VastClient::new(Url::parse(&fake.url()).unwrap(), &ApiKey::new(key), options).unwrap()
}

async fn start(config: FakeConfig) -> (FakeServer, VastClient) {
    let fake = fake::spawn(FakeConfig { api_key: Some(KEY.into()), ssh_port: 2222, ..config }).await.unwrap();
    let client = client_for(&fake, KEY, options());
    (fake, client)
}

/// Every request the fake saw carried the right key in a Bearer header.
fn assert_all_authenticated(fake: &FakeServer) {
    for r in fake.requests() {
        assert_eq!(r.auth, "bearer", "request without valid auth: {r:?}");
    }
}

fn launch(offer_id: i64, label: &str) -> LaunchRequest {
    LaunchRequest {
        offer_id,
        image: "vastai/base-image:latest".into(),
        disk_gb: 32,
        env: [("HF_HOME".to_string(), "/workspace/hf".to_string())].into_iter().collect(),
        onstart: Some("echo started".into()),
        label: Some(label.into()),
        ssh: true,
        ssh_public_key: Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITest test@example".into()),
        bid_price_per_hour: None,
    }
}

/// Offer ids of the catalogue that can be rented, cheapest first.
async fn offer_ids(client: &VastClient, n: usize) -> Vec<i64> {
    let offers = client.search_offers(&OfferQuery::default()).await.unwrap();
    assert!(offers.len() >= n, "catalogue too small");
    offers.into_iter().take(n).map(|o| o.id).collect()
}

#[tokio::test]
async fn every_operation_round_trips_with_one_request_each() {
    let (fake, client) = start(FakeConfig::default()).await;
    client.check_credentials().await.unwrap();

    let query = OfferQuery {
        gpu_names: vec!["RTX_4090".into()],
        num_gpus: Some(1),
        min_vram_gb: Some(20.0),
        min_reliability: Some(0.9),
        verified_only: true,
        ..OfferQuery::default()
    };
    let offers = client.search_offers(&query).await.unwrap();
    assert!(!offers.is_empty());
    assert!(
        offers.iter().all(|o| o.gpu_name == "RTX 4090" && o.num_gpus == 1 && o.verified && o.vram_gb >= 20.0)
    );
    assert!(offers.windows(2).all(|w| w[0].price_per_hour <= w[1].price_per_hour), "cheapest first");

    let id = client.create_instance(&launch(offers[0].id, "gputrainer:abc:1")).await.unwrap();
    let instance = client.get_instance(id).await.unwrap();
    assert_eq!(instance.id, id);
    assert_eq!(instance.state, InstanceState::Running);
    assert_eq!(instance.label.as_deref(), Some("gputrainer:abc:1"));
    assert_eq!(instance.gpu_name.as_deref(), Some("RTX 4090"));
    let ssh = instance.ssh.expect("ssh endpoint");
    assert_eq!((ssh.host.as_str(), ssh.port), ("127.0.0.1", 2222));
    assert_eq!(instance.env.get("HF_HOME").map(String::as_str), Some("/workspace/hf"));
    assert_eq!(
        fake.ssh_keys(id.0),
        vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITest test@example".to_string()]
    );

    // The create body is shaped as the official CLI's.
    let create = fake.requests().into_iter().find(|r| r.endpoint == "create_instance").unwrap();
    let body = create.body.unwrap();
    assert_eq!(body["runtype"], "ssh_direc ssh_proxy");
    assert_eq!(body["client_id"], "me");
    assert_eq!(body["disk"], 32.0);

    let all = client.list_instances().await.unwrap();
    assert_eq!(all.iter().map(|i| i.id).collect::<Vec<_>>(), vec![id]);
    assert_eq!(client.list_instances_by_label("gputrainer:abc:1").await.unwrap().len(), 1);
    assert!(client.list_instances_by_label("gputrainer:abc:2").await.unwrap().is_empty());

    client.set_label(id, "renamed").await.unwrap();
    assert_eq!(client.get_instance(id).await.unwrap().label.as_deref(), Some("renamed"));

    client.destroy_instance(id).await.unwrap();
    assert!(client.get_instance(id).await.unwrap_err().is_not_found());
    // Destroying what is gone is success.
    client.destroy_instance(id).await.unwrap();
    assert!(client.set_label(id, "x").await.unwrap_err().is_not_found());

    let counters = fake.counters();
    for (endpoint, want) in [
        ("current_user", 1),
        ("search_offers", 1),
        ("create_instance", 1),
        ("attach_ssh", 1),
        ("show_instance", 3),
        ("list_instances", 3),
        ("update_instance", 2),
        ("destroy_instance", 2),
    ] {
        assert_eq!(counters.endpoint(endpoint), want, "{endpoint}: {counters:?}");
    }
    assert_all_authenticated(&fake);
}

#[tokio::test]
async fn instances_move_through_created_loading_running() {
    let (fake, client) = start(FakeConfig {
        loading_after: Duration::from_millis(300),
        running_after: Duration::from_millis(600),
        ..FakeConfig::default()
    })
    .await;
    let offer = offer_ids(&client, 1).await[0];
    let id =
        client.create_instance(&LaunchRequest { ssh_public_key: None, ..launch(offer, "l") }).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..200 {
        let state = client.get_instance(id).await.unwrap().state;
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        if state == InstanceState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let order = [InstanceState::Creating, InstanceState::Loading, InstanceState::Running];
    let positions: Vec<usize> = seen.iter().map(|s| order.iter().position(|o| o == s).unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "states out of order: {seen:?}");
    assert_eq!(seen.last(), Some(&InstanceState::Running), "{seen:?}");
    assert_all_authenticated(&fake);
}

#[tokio::test]
async fn listing_follows_every_page() {
    let (fake, client) = start(FakeConfig { page_size: 3, ..FakeConfig::default() }).await;
    let mut created = Vec::new();
    for (n, offer) in offer_ids(&client, 7).await.into_iter().enumerate() {
        let label = if n % 2 == 0 { "even" } else { "odd" };
        let request = LaunchRequest { ssh_public_key: None, ..launch(offer, label) };
        created.push(client.create_instance(&request).await.unwrap());
    }
    fake.clear_requests();
    let listed: Vec<InstanceId> = client.list_instances().await.unwrap().into_iter().map(|i| i.id).collect();
    assert_eq!(listed, created);
    assert_eq!(fake.counters().endpoint("list_instances"), 3, "7 instances in pages of 3");
    let even = client.list_instances_by_label("even").await.unwrap();
    assert_eq!(even.len(), 4);
    assert_all_authenticated(&fake);
}

#[tokio::test]
async fn overload_statuses_are_retried_a_bounded_number_of_times() {
    let (fake, client) = start(FakeConfig::default()).await;
    let offer = offer_ids(&client, 1).await[0];
    let id = client.create_instance(&launch(offer, "x")).await.unwrap();
    for status in [502, 503, 504] {
        fake.clear_requests();
        fake.add_fault(Fault::ErrorBurst { status, count: 2, endpoint: Some("show_instance".into()) });
        client.get_instance(id).await.unwrap();
        let c = fake.counters();
        assert_eq!(c.endpoint("show_instance"), 3, "{status}: {c:?}");
        assert_eq!(c.status("show_instance", status), 2);
        assert_eq!(c.total, 3, "no other calls");
    }
    // A burst longer than the retry budget: exactly max_attempts requests, then a retryable error.
    fake.clear_requests();
    fake.add_fault(Fault::ErrorBurst { status: 503, count: 100, endpoint: None });
    let err = client.list_instances().await.unwrap_err();
    assert!(matches!(err, Error::Transient { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(fake.counters().endpoint("list_instances"), 4);
    fake.clear_faults();
    // 500 is not an overload signal: answered once, not retried.
    fake.clear_requests();
    fake.add_fault(Fault::ErrorBurst { status: 500, count: 5, endpoint: None });
    let err = client.get_instance(id).await.unwrap_err();
    assert!(matches!(err, Error::Transient { .. }), "{err:?}");
    assert_eq!(fake.counters().endpoint("show_instance"), 1);
    assert_all_authenticated(&fake);
}

#[tokio::test]
async fn rate_limits_are_retried_and_retry_after_is_honoured() {
    let (fake, client) = start(FakeConfig::default()).await;
    fake.add_fault(Fault::RateLimit {
        count: 2,
        retry_after_secs: None,
        endpoint: Some("list_instances".into()),
    });
    client.list_instances().await.unwrap();
    assert_eq!(fake.counters().endpoint("list_instances"), 3);

    fake.clear_requests();
    fake.add_fault(Fault::RateLimit { count: 1, retry_after_secs: Some(1), endpoint: None });
    let started = std::time::Instant::now();
    client.list_instances().await.unwrap();
    // A lower bound: the client waited at least as long as the server asked.
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(fake.counters().endpoint("list_instances"), 2);

    // Longer than a minute: handed back to the caller at once, with the wait.
    fake.clear_requests();
    fake.add_fault(Fault::RateLimit { count: 1, retry_after_secs: Some(120), endpoint: None });
    let err = client.list_instances().await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(120)), "{err:?}");
    assert!(matches!(err, Error::RateLimited { .. }));
    assert_eq!(fake.counters().endpoint("list_instances"), 1);
    assert_all_authenticated(&fake);
}

#[tokio::test]
async fn per_endpoint_rate_limit_answers_429_and_retries_stay_bounded() {
    let (fake, client) =
        start(FakeConfig { rate_limit_interval: Duration::from_secs(5), ..FakeConfig::default() }).await;
    client.list_instances().await.unwrap();
    // Within the server's interval every attempt is refused: each call makes exactly its
    // max_attempts requests and reports RateLimited.
    for _ in 0..2 {
        let err = client.list_instances().await.unwrap_err();
        assert!(matches!(err, Error::RateLimited { retry_after: None, .. }), "{err:?}");
    }
    let c = fake.counters();
    assert_eq!(c.endpoint("list_instances"), 1 + 2 * 4, "{c:?}");
    assert_eq!(c.status("list_instances", 429), 8);
    // The limit is per endpoint.
    client.search_offers(&OfferQuery::default()).await.unwrap();
    assert_eq!(fake.counters().status("search_offers", 200), 1);
    assert_all_authenticated(&fake);
}

#[tokio::test]
async fn client_spacing_keeps_under_the_rate_limit() {
    let (fake, _) =
        start(FakeConfig { rate_limit_interval: Duration::from_millis(100), ..FakeConfig::default() }).await;
    let spaced = client_for(&fake, KEY, ClientOptions { min_interval: Duration::from_secs(1), ..options() });
    for _ in 0..3 {
        spaced.list_instances().await.unwrap();
    }
    let c = fake.counters();
    assert_eq!(c.status("list_instances", 429), 0, "{c:?}");
    assert_eq!(c.endpoint("list_instances"), 3);
    assert_all_authenticated(&fake);
}

#[tokio::test]
async fn slow_answers_time_out_and_are_retried_except_for_create() {
    let (fake, _) = start(FakeConfig::default()).await;
    let client = client_for(&fake, KEY, ClientOptions { timeout: Duration::from_secs(2), ..options() });
    let offer = offer_ids(&client, 1).await[0];
    let id = client.create_instance(&launch(offer, "slow")).await.unwrap();

    fake.clear_requests();
    fake.add_fault(Fault::Slow { delay_ms: 20_000, count: 1, endpoint: Some("show_instance".into()) });
    client.get_instance(id).await.unwrap();
    assert_eq!(fake.counters().endpoint("show_instance"), 2);

    // A create that times out may have rented: no second create; the caller finds it by label.
    let second = offer_ids(&client, 2).await[1];
    fake.clear_requests();
    fake.add_fault(Fault::Slow { delay_ms: 20_000, count: 1, endpoint: Some("create_instance".into()) });
    let err = client.create_instance(&launch(second, "timed-out")).await.unwrap_err();
    assert!(matches!(err, Error::Transient { .. }), "{err:?}");
    assert_eq!(fake.counters().endpoint("create_instance"), 1);
    // The fake rented before it stalled, as a slow Vast.ai would have.
    let found = client.list_instances_by_label("timed-out").await.unwrap();
    assert_eq!(found.len(), 1, "the contract is found by label");
    client.destroy_instance(found[0].id).await.unwrap();
    assert_all_authenticated(&fake);
}

#[tokio::test]
async fn create_that_fails_yet_leaves_a_contract() {
    let (fake, client) = start(FakeConfig::default()).await;
    let offers = offer_ids(&client, 2).await;

    // The error carries the contract: the caller can destroy it.
    fake.add_fault(Fault::CreateLeavesContract { count: 1, status: 500, report_contract: true });
    let err = client.create_instance(&launch(offers[0], "left-1")).await.unwrap_err();
    let left = err.left_contract().expect("contract id in the error");
    assert_eq!(err.category(), "ContractLeftBehind");
    assert_eq!(fake.instances().len(), 1);
    client.destroy_instance(left).await.unwrap();
    assert!(fake.instances().is_empty());

    // The error does not carry it: not retried, and found by label.
    fake.clear_requests();
    fake.add_fault(Fault::CreateLeavesContract { count: 1, status: 503, report_contract: false });
    let err = client.create_instance(&launch(offers[1], "left-2")).await.unwrap_err();
    assert!(err.left_contract().is_none());
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(fake.counters().endpoint("create_instance"), 1, "a create is not retried after a 5xx");
    let found = client.list_instances_by_label("left-2").await.unwrap();
    assert_eq!(found.len(), 1);
    client.destroy_instance(found[0].id).await.unwrap();

    // A failed attach after a successful rent is also a contract left behind.
    fake.add_fault(Fault::ErrorBurst { status: 400, count: 1, endpoint: Some("attach_ssh".into()) });
    let err = client.create_instance(&launch(offers[0], "left-3")).await.unwrap_err();
    let left = err.left_contract().expect("contract id");
    client.destroy_instance(left).await.unwrap();
    assert!(fake.instances().is_empty());
    assert_all_authenticated(&fake);
}

#[tokio::test]
async fn create_is_retried_only_when_it_certainly_did_not_happen() {
    let (fake, client) = start(FakeConfig::default()).await;
    let offers = offer_ids(&client, 2).await;
    fake.clear_requests();
    fake.add_fault(Fault::RateLimit {
        count: 1,
        retry_after_secs: None,
        endpoint: Some("create_instance".into()),
    });
    client.create_instance(&launch(offers[0], "a")).await.unwrap();
    assert_eq!(fake.counters().endpoint("create_instance"), 2);

    fake.clear_requests();
    fake.add_fault(Fault::ErrorBurst { status: 502, count: 1, endpoint: Some("create_instance".into()) });
    let err = client.create_instance(&launch(offers[1], "b")).await.unwrap_err();
    assert!(matches!(err, Error::Transient { .. }), "{err:?}");
    assert_eq!(fake.counters().endpoint("create_instance"), 1);
    assert_eq!(fake.instances().len(), 1);
    assert_all_authenticated(&fake);
}

#[tokio::test]
async fn taken_or_unknown_offers_are_unavailable() {
    let (fake, client) = start(FakeConfig::default()).await;
    let offer = offer_ids(&client, 1).await[0];
    client.create_instance(&launch(offer, "first")).await.unwrap();
    let err = client.create_instance(&launch(offer, "second")).await.unwrap_err();
    assert!(matches!(err, Error::OfferUnavailable { offer_id, .. } if offer_id == offer), "{err:?}");
    let err = client.create_instance(&launch(1, "third")).await.unwrap_err();
    assert_eq!(err.category(), "OfferUnavailable");
    // A rented offer is no longer in the search.
    let offers = client.search_offers(&OfferQuery::default()).await.unwrap();
    assert!(offers.iter().all(|o| o.id != offer));
    let bad =
        client.create_instance(&LaunchRequest { image: String::new(), ..launch(offers[0].id, "x") }).await;
    assert!(matches!(bad, Err(Error::InvalidRequest { .. })), "{bad:?}");
    assert_all_authenticated(&fake);
}

#[tokio::test]
async fn instances_that_die_go_offline_or_are_outbid() {
    let (fake, client) = start(FakeConfig::default()).await;
    let mut ids = Vec::new();
    for offer in offer_ids(&client, 3).await {
        ids.push(client.create_instance(&launch(offer, "d")).await.unwrap());
    }
    fake.set_instance_state(ids[0].0, ForcedState::Exited);
    fake.set_instance_state(ids[1].0, ForcedState::Offline);
    // The admin endpoint does the same at run time.
    let admin = reqwest::Client::new();
    let response = admin
        .post(format!("{}/_fake/faults", fake.url()))
        .json(&serde_json::json!({"kind": "instance_becomes", "id": ids[2].0, "state": "outbid"}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());

    assert_eq!(client.get_instance(ids[0]).await.unwrap().state, InstanceState::Exited);
    assert_eq!(client.get_instance(ids[1]).await.unwrap().state, InstanceState::Offline);
    let outbid = client.get_instance(ids[2]).await.unwrap();
    assert_eq!(outbid.state, InstanceState::Interrupted);
    assert_eq!(
        (outbid.actual_status.as_deref(), outbid.intended_status.as_deref(), outbid.cur_state.as_deref()),
        (Some("stopped"), Some("stopped"), Some("stopped"))
    );
    assert!(outbid.state.is_lost());

    // Every instance goes offline some time after it started running.
    fake.set_instance_state(ids[0].0, ForcedState::Running);
    assert_eq!(client.get_instance(ids[0]).await.unwrap().state, InstanceState::Running);
    fake.add_fault(Fault::InstancesBecome { state: ForcedState::Offline, after_running_secs: 0.0 });
    assert_eq!(client.get_instance(ids[0]).await.unwrap().state, InstanceState::Offline);

    // The request log and counters are readable over HTTP too.
    let counters: serde_json::Value =
        admin.get(format!("{}/_fake/counters", fake.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(counters["arrived"]["show_instance"], 5);
    let log: serde_json::Value =
        admin.get(format!("{}/_fake/requests", fake.url())).send().await.unwrap().json().await.unwrap();
    assert!(log.as_array().is_some_and(|l| l.iter().all(|r| r["auth"] == "bearer")));
    assert_all_authenticated(&fake);
}

#[tokio::test]
async fn a_rejected_key_is_a_clear_error_and_not_retried() {
    let (fake, _) = start(FakeConfig::default()).await;
    let wrong = client_for(&fake, "wrong-key-77", options());
    let err = wrong.check_credentials().await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains("VASTAI_API_KEY"), "{err}");
    assert!(!err.to_string().contains("wrong-key-77"));
    assert!(!err.is_retryable());
    let err = wrong.list_instances().await.unwrap_err();
    assert_eq!(err.category(), "Unauthorized");
    let c = fake.counters();
    assert_eq!(c.total, 2, "401 is not retried: {c:?}");
    assert!(fake.requests().iter().all(|r| r.auth == "invalid"));
}

#[tokio::test]
async fn state_survives_a_restart_of_the_fake() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let config = || FakeConfig { state_file: Some(state.clone()), ..FakeConfig::default() };
    let (fake, client) = start(config()).await;
    let offer = offer_ids(&client, 1).await[0];
    let id = client.create_instance(&launch(offer, "persist")).await.unwrap();
    fake.shutdown().await.unwrap();

    let (fake, client) = start(config()).await;
    let instance = client.get_instance(id).await.unwrap();
    assert_eq!(instance.label.as_deref(), Some("persist"));
    let offers = client.search_offers(&OfferQuery::default()).await.unwrap();
    assert!(offers.iter().all(|o| o.id != offer), "the offer is still rented");
    let next = client.create_instance(&launch(offers[0].id, "persist-2")).await.unwrap();
    assert!(next > id, "ids are not reused");
    assert_eq!(client.list_instances().await.unwrap().len(), 2);
    assert_all_authenticated(&fake);
}

#[tokio::test]
async fn catalogue_file_replaces_the_generated_offers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offers.json");
    std::fs::write(
        &path,
        r#"[{"id": 11, "machine_id": 101, "gpu_name": "H100 SXM", "num_gpus": 8, "dph_base": 20.0},
            {"id": 12, "machine_id": 102, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_base": 0.3}]"#,
    )
    .unwrap();
    let (fake, client) = start(FakeConfig { catalogue: Some(path), ..FakeConfig::default() }).await;
    let offers = client.search_offers(&OfferQuery::default()).await.unwrap();
    assert_eq!(offers.iter().map(|o| o.id).collect::<Vec<_>>(), vec![12, 11]);
    assert_eq!(offers[1].num_gpus, 8);
    assert_all_authenticated(&fake);
}

#[tokio::test]
async fn connect_checks_the_key_at_start_up() {
    use gpu_trainer::provider::config::ProviderConfig;
    let fake = fake::spawn(FakeConfig { api_key: Some(KEY.into()), ..FakeConfig::default() }).await.unwrap();
    let config = |key: &'static str| {
        let url = fake.url();
        ProviderConfig::from_lookup(move |name| match name {
            "VASTAI_API_KEY" => Some(key.to_string()),
            "VASTAI_API_BASE_URL" => Some(url.clone()),
            _ => None,
        })
        .unwrap()
    };
    VastClient::connect(&config(KEY)).await.unwrap();
    let err = VastClient::connect(&config("not-the-key")).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains("rejected the API key"), "{err}");
    assert_eq!(fake.counters().endpoint("current_user"), 2, "one request each, no retries");
}

#[tokio::test]
async fn selection_over_a_live_search_prefers_models_and_skips_excluded_machines() {
    use gpu_trainer::provider::select::{Criteria, select_offer};
    let (fake, client) = start(FakeConfig::default()).await;
    let criteria = Criteria {
        gpu_names: vec!["4090".into(), "A100".into()],
        num_gpus: 1,
        min_vram_gb: 24.0,
        max_price_per_hour: 4.5,
        min_reliability: 0.9,
        verified_only: true,
        min_disk_gb: 64.0,
        ..Criteria::default()
    };
    let offers = client.search_offers(&criteria.offer_query()).await.unwrap();
    let first = select_offer(&offers, &criteria).unwrap();
    assert_eq!(first.offer.gpu_name, "RTX 4090", "{}", first.explanation);
    let cheapest_4090 =
        offers.iter().filter(|o| o.gpu_name == "RTX 4090").map(|o| o.price_per_hour).fold(f64::MAX, f64::min);
    assert_eq!(first.offer.price_per_hour, cheapest_4090);

    // The host failed us: the next choice is another machine.
    let excluded = Criteria { excluded_machine_ids: vec![first.offer.machine_id], ..criteria.clone() };
    let second = select_offer(&offers, &excluded).unwrap();
    assert_ne!(second.offer.machine_id, first.offer.machine_id);
    assert_eq!(second.rejected.total(), first.rejected.total() + 1, "{}", second.explanation);
    assert_all_authenticated(&fake);
}

#[tokio::test]
async fn attached_keys_reach_the_authorized_keys_file_of_the_ssh_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("authorized_keys");
    let (fake, client) =
        start(FakeConfig { authorized_keys_file: Some(keys.clone()), ..FakeConfig::default() }).await;
    let offer = offer_ids(&client, 1).await[0];
    let id = client.create_instance(&launch(offer, "keys")).await.unwrap();
    client.attach_ssh_key(id, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAISecond second@example\n").await.unwrap();
    let text = std::fs::read_to_string(&keys).unwrap();
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        vec![
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITest test@example",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAISecond second@example"
        ]
    );
    let err = client.attach_ssh_key(id, "not a key").await.unwrap_err();
    assert!(matches!(err, Error::InvalidRequest { .. }), "{err:?}");
    let err = client.attach_ssh_key(InstanceId(1), "ssh-ed25519 AAAA x").await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert_all_authenticated(&fake);
}

/// A TCP echo server standing in for sshd.
async fn echo_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    port
}

/// Writes `ping` and says what came back within `wait`: `Some(bytes)` (empty when the
/// connection was closed) or `None` (silence).
async fn ping(stream: &mut tokio::net::TcpStream, wait: Duration) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.write_all(b"ping").await;
    let mut buf = [0u8; 16];
    match tokio::time::timeout(wait, stream.read(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        Ok(Err(_)) => Some(Vec::new()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn each_instance_has_its_own_ssh_endpoint_that_dies_with_it() {
    let upstream = echo_server().await;
    let config = FakeConfig { ssh_port: upstream, ssh_per_instance: true, ..FakeConfig::default() };
    let fake = fake::spawn(FakeConfig { api_key: Some(KEY.into()), ..config }).await.unwrap();
    let client = client_for(&fake, KEY, options());
    let mut ids = Vec::new();
    for offer in offer_ids(&client, 3).await {
        ids.push(client.create_instance(&launch(offer, "ssh")).await.unwrap());
    }
    let mut ports = Vec::new();
    for id in &ids {
        let ssh = client.get_instance(*id).await.unwrap().ssh.expect("a running instance has SSH");
        assert_eq!(ssh.host, "127.0.0.1");
        ports.push(ssh.port);
    }
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3, "one port per instance");
    assert!(!ports.contains(&upstream));
    let port_of = |n: usize| {
        let ssh = fake.instances().into_iter().find(|r| r["id"] == serde_json::json!(ids[n].0)).unwrap();
        ssh["ssh_port"].as_u64().unwrap() as u16
    };
    let connect = |port: u16| tokio::net::TcpStream::connect(("127.0.0.1", port));
    let long = Duration::from_secs(2);

    // Exited: the open connection is closed and new ones are refused.
    let mut open = connect(port_of(0)).await.unwrap();
    assert_eq!(ping(&mut open, long).await.as_deref(), Some(&b"ping"[..]));
    fake.set_instance_state(ids[0].0, ForcedState::Exited);
    // The endpoint looks at the instance's state every 100 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ping(&mut open, long).await.as_deref(), Some(&b""[..]), "closed when the instance died");
    let mut again = connect(port_of(0)).await.unwrap();
    assert_eq!(ping(&mut again, long).await.as_deref(), Some(&b""[..]), "refused while dead");
    // Back to running: reachable again.
    fake.set_instance_state(ids[0].0, ForcedState::Running);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut back = connect(port_of(0)).await.unwrap();
    assert_eq!(ping(&mut back, long).await.as_deref(), Some(&b"ping"[..]));

    // Offline: silence on the open connection until the instance is destroyed, then closed.
    let port = port_of(1);
    let mut open = connect(port).await.unwrap();
    assert_eq!(ping(&mut open, long).await.as_deref(), Some(&b"ping"[..]));
    fake.set_instance_state(ids[1].0, ForcedState::Offline);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ping(&mut open, Duration::from_millis(500)).await, None, "an offline host answers nothing");
    client.destroy_instance(ids[1]).await.unwrap();
    assert_eq!(ping(&mut open, long).await.as_deref(), Some(&b""[..]), "closed once destroyed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(connect(port).await.is_err(), "a destroyed instance's port is closed");

    // Without the option every instance reports the shared endpoint.
    let plain =
        fake::spawn(FakeConfig { api_key: Some(KEY.into()), ssh_port: upstream, ..FakeConfig::default() })
            .await
            .unwrap();
    let plain_client = client_for(&plain, KEY, options());
    let offer = offer_ids(&plain_client, 1).await[0];
    let id = plain_client.create_instance(&launch(offer, "plain")).await.unwrap();
    assert_eq!(plain_client.get_instance(id).await.unwrap().ssh.map(|s| s.port), Some(upstream));
}
