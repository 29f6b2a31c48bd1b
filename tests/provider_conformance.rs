//! Conformance: the official `vastai` CLI (PyPI `vastai`, pinned in `tests/env/install.sh`) runs
//! against `fake-vastai` unchanged, prints what it prints against Vast.ai, and our client agrees
//! with it about the same offers and instances.
//!
//! Needs the CLI that `bash tests/env/install.sh` puts in `$GPU_TRAINER_CACHE/vastai-venv`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use gpu_trainer::provider::config::ApiKey;
use gpu_trainer::provider::fake::{self, FakeConfig, FakeServer, Fault};
use gpu_trainer::provider::vastai::{ClientOptions, RetryPolicy, VastClient};
use gpu_trainer::provider::{GpuProvider, InstanceId, InstanceState, LaunchRequest, OfferQuery};
use serde_json::{Value, json};
use url::Url;

const KEY: &str = "conformance-key-93b1";

fn vastai_path() -> PathBuf {
    let cache = std::env::var_os("GPU_TRAINER_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/gpu-trainer")
    });
    let path = cache.join("vastai-venv/bin/vastai");
    assert!(path.exists(), "{} is missing: run `bash tests/env/install.sh`", path.display());
    path
}

struct Cli {
    bin: PathBuf,
    home: tempfile::TempDir,
    url: String,
}

struct Output {
    stdout: String,
    stderr: String,
    code: Option<i32>,
}

impl Cli {
    /// Runs `vastai ARGS` with a fresh HOME, the fake's URL and our key, as the reference's
    /// suggested environment says.
    async fn run_with_key(&self, key: &str, args: &[&str]) -> Output {
        let out = tokio::process::Command::new(&self.bin)
            .args(args)
            .env("HOME", self.home.path())
            .env("VAST_URL", &self.url)
            .env("VAST_API_KEY", key)
            .env("VASTAI_NO_UPDATE_CHECK", "1")
            .env("NO_COLOR", "1")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_CACHE_HOME")
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run vastai");
        let output = Output {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            code: out.status.code(),
        };
        assert!(
            !output.stderr.contains("Traceback") && !output.stdout.contains("Traceback"),
            "vastai {args:?} crashed:\n{}\n{}",
            output.stdout,
            output.stderr
        );
        output
    }

    async fn run(&self, args: &[&str]) -> Output {
        self.run_with_key(KEY, args).await
    }

    async fn json(&self, args: &[&str]) -> Value {
        let out = self.run(args).await;
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("vastai {args:?}: not JSON ({e}):\n{}\n{}", out.stdout, out.stderr))
    }
}

fn client(fake: &FakeServer) -> VastClient {
    let options = ClientOptions {
        retry: RetryPolicy { min_delay: Duration::from_millis(20), ..RetryPolicy::default() },
        min_interval: Duration::ZERO,
        ..ClientOptions::default()
    };
    VastClient::new(Url::parse(&fake.url()).unwrap(), &ApiKey::new(KEY), options).unwrap()
}

fn ids(list: &Value) -> Vec<i64> {
    list.as_array().expect("a JSON list").iter().map(|o| o["id"].as_i64().expect("numeric id")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn official_cli_and_our_client_agree_against_the_fake() {
    let fake = fake::spawn(FakeConfig { api_key: Some(KEY.into()), ssh_port: 2222, ..FakeConfig::default() })
        .await
        .unwrap();
    let cli = Cli { bin: vastai_path(), home: tempfile::tempdir().unwrap(), url: fake.url() };
    let ours = client(&fake);

    // 1. search offers: filters with the CLI's string numbers and GB→MB conversion, order, limit.
    let offers = cli
        .json(&[
            "search",
            "offers",
            "gpu_name=RTX_4090 num_gpus=1 gpu_ram>=20 reliability>0.91",
            "-o",
            "dph+",
            "--limit",
            "5",
            "--raw",
        ])
        .await;
    let list = offers.as_array().expect("list of offers");
    assert!(list.len() >= 2 && list.len() <= 5, "{offers}");
    for o in list {
        assert_eq!(o["gpu_name"], "RTX 4090");
        assert_eq!(o["num_gpus"], 1);
        assert!(o["reliability"].as_f64().unwrap() > 0.91);
        assert!(o["gpu_ram"].as_f64().unwrap() >= 20_000.0);
    }
    let prices: Vec<f64> = list.iter().map(|o| o["dph_total"].as_f64().unwrap()).collect();
    assert!(prices.windows(2).all(|w| w[0] <= w[1]), "{prices:?}");
    let search = fake.requests().into_iter().rfind(|r| r.endpoint == "search_offers").unwrap();
    assert_eq!(search.method, "POST");
    assert_eq!(search.path, "/api/v0/bundles/");
    let q = search.body.unwrap();
    assert_eq!(q["num_gpus"], json!({"eq": "1"}), "the CLI sends numbers as strings");
    assert_eq!(q["gpu_ram"], json!({"gte": 20000.0}));
    assert_eq!(q["order"], json!([["dph_total", "asc"]]));

    let our_offers = ours
        .search_offers(&OfferQuery {
            gpu_names: vec!["RTX 4090".into()],
            num_gpus: Some(1),
            min_vram_gb: Some(20.0),
            min_reliability: Some(0.91),
            verified_only: true,
            limit: Some(5),
            ..OfferQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(our_offers.iter().map(|o| o.id).collect::<Vec<_>>(), ids(&offers), "same offers, same order");
    for (o, raw) in our_offers.iter().zip(list) {
        assert_eq!(o.price_per_hour, raw["dph_total"].as_f64().unwrap());
        assert_eq!(o.machine_id, raw["machine_id"].as_i64().unwrap());
        assert_eq!(Some(o.reliability), raw["reliability"].as_f64());
    }

    // A broader search, ordered by price, agrees too.
    let broad = cli.json(&["search", "offers", "num_gpus=1", "-o", "dph+", "--limit", "10", "--raw"]).await;
    let ours_broad = ours
        .search_offers(&OfferQuery {
            num_gpus: Some(1),
            verified_only: true,
            limit: Some(10),
            ..OfferQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(&broad).len(), 10);
    assert_eq!(ours_broad.iter().map(|o| o.id).collect::<Vec<_>>(), ids(&broad));

    // 2. The table view renders (numbers are numbers, the Content-Type is exact).
    let table = cli.run(&["search", "offers", "--type", "bid"]).await;
    assert!(!table.stdout.contains("invalid return Content-Type"), "{}", table.stdout);
    assert!(table.stdout.contains(&list[0]["id"].to_string()), "{}\n{}", table.stdout, table.stderr);
    assert!(table.stdout.contains("RTX_4090"), "{}", table.stdout);

    // 3. create instance, exactly as the reference's example.
    let offer = list[0]["id"].as_i64().unwrap();
    let created = cli
        .json(&[
            "create",
            "instance",
            &offer.to_string(),
            "--image",
            "vastai/base-image:latest",
            "--disk",
            "20",
            "--label",
            "t1",
            "--ssh",
            "--direct",
            "--env",
            "-e FOO=bar -p 8080:8080",
            "--onstart-cmd",
            "echo hi",
            "--raw",
        ])
        .await;
    assert_eq!(created["success"], true, "{created}");
    let cli_id = created["new_contract"].as_i64().expect("new_contract");
    let create = fake.requests().into_iter().rfind(|r| r.endpoint == "create_instance").unwrap();
    assert_eq!(
        (create.method.as_str(), create.path.as_str()),
        ("PUT", format!("/api/v0/asks/{offer}/").as_str())
    );
    let body = create.body.unwrap();
    assert_eq!(body["runtype"], "ssh_direc ssh_proxy");
    assert_eq!(body["env"], json!({"FOO": "bar", "-p 8080:8080": "1"}));
    assert_eq!(body["client_id"], "me");
    assert_eq!(body["onstart"], "echo hi");

    // Our client rents one too, so each side reads what the other created.
    let other_offer = ours
        .search_offers(&OfferQuery::default())
        .await
        .unwrap()
        .into_iter()
        .find(|o| o.id != offer)
        .unwrap();
    let our_id = ours
        .create_instance(&LaunchRequest {
            offer_id: other_offer.id,
            image: "vastai/base-image:latest".into(),
            disk_gb: 24,
            label: Some("ours".into()),
            ssh: true,
            ssh_public_key: Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIConformance conformance@test".into()),
            ..LaunchRequest::default()
        })
        .await
        .unwrap();

    // 4. show instances --raw: a flat list over all pages, extra_env as an object.
    let rows = cli.json(&["show", "instances", "--raw"]).await;
    assert_eq!(ids(&rows), vec![cli_id, our_id.0]);
    let row = &rows[0];
    assert_eq!(row["label"], "t1");
    assert_eq!(row["extra_env"]["FOO"], "bar");
    assert_eq!(row["actual_status"], "running");
    assert_eq!(row["ssh_port"], 2222);
    let listed = ours.list_instances().await.unwrap();
    assert_eq!(listed.iter().map(|i| i.id.0).collect::<Vec<_>>(), ids(&rows));
    for (mine, raw) in listed.iter().zip(rows.as_array().unwrap()) {
        assert_eq!(mine.label.as_deref(), raw["label"].as_str());
        assert_eq!(mine.actual_status.as_deref(), raw["actual_status"].as_str());
        assert_eq!(mine.gpu_name.as_deref(), raw["gpu_name"].as_str());
        assert_eq!(mine.price_per_hour, raw["dph_total"].as_f64());
        assert_eq!(mine.image.as_deref(), raw["image_uuid"].as_str());
        assert_eq!(mine.state, InstanceState::Running);
        let ssh = mine.ssh.as_ref().unwrap();
        assert_eq!(
            (ssh.host.as_str(), i64::from(ssh.port)),
            ("127.0.0.1", raw["ssh_port"].as_i64().unwrap())
        );
    }
    assert_eq!(listed[0].env.get("FOO").map(String::as_str), Some("bar"));

    // 5. show instance ID --raw: the single object, unwrapped from the plural key.
    let one = cli.json(&["show", "instance", &our_id.to_string(), "--raw"]).await;
    assert_eq!(one["id"], our_id.0);
    assert_eq!(one["label"], "ours");
    let mine = ours.get_instance(InstanceId(cli_id)).await.unwrap();
    let theirs = cli.json(&["show", "instance", &cli_id.to_string(), "--raw"]).await;
    assert_eq!(mine.label.as_deref(), theirs["label"].as_str());
    assert_eq!(mine.machine_id, theirs["machine_id"].as_i64());
    assert_eq!(mine.num_gpus.map(i64::from), theirs["num_gpus"].as_f64().map(|n| n as i64));

    // 6. label instance, both ways.
    let labelled = cli.run(&["label", "instance", &cli_id.to_string(), "my-label"]).await;
    assert_eq!(labelled.stdout.trim(), format!("label for {cli_id} set to my-label."));
    assert_eq!(ours.get_instance(InstanceId(cli_id)).await.unwrap().label.as_deref(), Some("my-label"));
    ours.set_label(our_id, "renamed").await.unwrap();
    assert_eq!(cli.json(&["show", "instance", &our_id.to_string(), "--raw"]).await["label"], "renamed");

    // The CLI's own retry against the fake's 429: --retry N is N attempts in all.
    fake.add_fault(Fault::RateLimit {
        count: 10,
        retry_after_secs: None,
        endpoint: Some("update_instance".into()),
    });
    let limited = cli.run(&["--retry", "4", "label", "instance", &cli_id.to_string(), "x"]).await;
    assert!(limited.stderr.contains("Failed with error 429"), "{}\n{}", limited.stdout, limited.stderr);
    assert_eq!(fake.counters().status("update_instance", 429), 4);
    fake.clear_faults();

    // A rejected key: one attempt, the API's message.
    let rejected = cli.run_with_key("wrong-key", &["--raw", "show", "instance", &cli_id.to_string()]).await;
    assert!(rejected.stderr.contains("\"status_code\": 401"), "{}", rejected.stderr);
    assert!(rejected.stderr.contains("Invalid user key"), "{}", rejected.stderr);

    // 7. destroy instance, both ways; both see it gone.
    let destroyed = cli.run(&["destroy", "instance", &cli_id.to_string(), "-y"]).await;
    assert_eq!(destroyed.stdout.trim(), format!("destroying instance {cli_id}."));
    assert!(ours.get_instance(InstanceId(cli_id)).await.unwrap_err().is_not_found());
    let gone = cli.run(&["show", "instance", &cli_id.to_string(), "--raw"]).await;
    assert_eq!(serde_json::from_str::<Value>(&gone.stdout).unwrap(), json!({"instances": null}));
    let gone = cli.run(&["show", "instance", &cli_id.to_string()]).await;
    assert_eq!(gone.code, Some(1));
    assert!(gone.stderr.contains("not found or no longer exists"), "{}", gone.stderr);
    ours.destroy_instance(our_id).await.unwrap();
    assert_eq!(cli.json(&["show", "instances", "--raw"]).await, json!([]));

    // Every CLI request carried the key as a Bearer header, except the documented anonymous
    // start-up lookup of GPU names and the deliberately wrong key above.
    for r in fake.requests() {
        match r.endpoint.as_str() {
            "gpu_names" => {}
            _ if r.auth == "invalid" => assert_eq!(r.status, 401),
            _ => assert_eq!(r.auth, "bearer", "{r:?}"),
        }
    }
}
