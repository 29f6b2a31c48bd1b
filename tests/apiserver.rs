//! The API against a real kube-apiserver: CRDs install, examples round-trip with status
//! patches, invalid specs are refused naming the field, and kubectl shows printer columns and
//! field descriptions.

mod common;

use std::path::{Path, PathBuf};

use gpu_trainer::api::{
    CostStatus, GpuInstance, GpuInstancePhase, GpuInstanceStatus, JobInstanceStatus, OfferStatus,
    ProgressStatus, Reason, TrainingJob, TrainingJobPhase, TrainingJobStatus,
};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test]
#[ignore = "needs tests/ environment"]
async fn examples_round_trip_with_status_patches() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "examples").await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let instances: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);

    for file in ["trainingjob-minimal.yaml", "trainingjob-full.yaml"] {
        let job: TrainingJob = serde_yaml::from_str(&read(&examples_dir().join(file))).unwrap();
        let name = job.metadata.name.clone().unwrap();
        let created =
            jobs.create(&PostParams::default(), &job).await.unwrap_or_else(|e| panic!("{file}: {e}"));
        // Defaults from the schema are applied by the API server.
        assert_eq!(created.spec.monitoring.poll_interval_seconds, job.spec.monitoring.poll_interval_seconds);
        assert_eq!(created.spec.active_deadline_seconds, job.spec.active_deadline_seconds);

        let mut progress = ProgressStatus::default();
        progress.set_step(1200, Some(4000));
        let status = TrainingJobStatus {
            phase: TrainingJobPhase::Training,
            reason: Some(Reason::Training),
            attempts: 1,
            instance: Some(JobInstanceStatus {
                name: format!("{name}-1"),
                provider_id: Some("4242".into()),
                gpu: Some("RTX 4090".into()),
                price_per_hour: Some(0.42),
            }),
            progress: Some(progress),
            cost: Some(CostStatus { price_per_hour: Some(0.42), accrued: 0.17, estimated_total: Some(0.6) }),
            ..Default::default()
        };
        let patch = serde_json::json!({
            "apiVersion": "gputrainer.dev/v1alpha1", "kind": "TrainingJob", "status": status
        });
        jobs.patch_status(&name, &PatchParams::apply("gpu-trainer-tests").force(), &Patch::Apply(&patch))
            .await
            .unwrap_or_else(|e| panic!("{file} status patch: {e}"));
        let read_back = jobs.get(&name).await.unwrap();
        assert_eq!(read_back.spec, created.spec, "{file}: status patch must not touch the spec");
        assert_eq!(read_back.status.as_ref(), Some(&status), "{file}: status round-trips");
    }

    let instance: GpuInstance =
        serde_yaml::from_str(&read(&examples_dir().join("gpuinstance-interactive.yaml"))).unwrap();
    let created = instances.create(&PostParams::default(), &instance).await.unwrap();
    assert_eq!(created.spec, instance.spec);
    let status = GpuInstanceStatus {
        phase: GpuInstancePhase::Running,
        provider_id: Some("4242".into()),
        label: Some("gputrainer:0123abcd:uid".into()),
        offer: Some(OfferStatus {
            id: 1,
            machine_id: 2,
            gpu_name: "RTX 4090".into(),
            num_gpus: 1,
            vram_gb: 24.0,
            price_per_hour: 0.42,
            reliability: 0.99,
            geolocation: Some("Sweden, SE".into()),
        }),
        ..Default::default()
    };
    let patch =
        serde_json::json!({"apiVersion": "gputrainer.dev/v1alpha1", "kind": "GpuInstance", "status": status});
    instances
        .patch_status("dev-box", &PatchParams::apply("gpu-trainer-tests").force(), &Patch::Apply(&patch))
        .await
        .unwrap();
    assert_eq!(instances.get("dev-box").await.unwrap().status, Some(status));

    // Printer columns, by full name and by short name.
    let table = common::kubectl(&["get", "trainingjobs", "-n", &ns]);
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "PHASE", "PROGRESS", "GPU", "$/H", "COST", "AGE"] {
        assert!(header.split_whitespace().any(|c| c == column), "column {column} missing in:\n{table}");
    }
    let row = table.lines().find(|l| l.starts_with("portrait-lora-full")).expect("job listed");
    for cell in ["Training", "30%", "RTX", "0.42", "0.17"] {
        assert!(row.contains(cell), "cell {cell} missing in row: {row}");
    }
    // AGE ticks between the two calls; compare everything else.
    let without_age = |t: &str| -> Vec<String> {
        t.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .map(|c| c[..c.len() - 1].join(" "))
            .collect()
    };
    assert_eq!(
        without_age(&common::kubectl(&["get", "tj", "-n", &ns])),
        without_age(&table),
        "short name tj lists the same"
    );

    let table = common::kubectl(&["get", "gpui", "-n", &ns]);
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "PHASE", "GPU", "$/H", "PROVIDER-ID", "AGE"] {
        assert!(header.split_whitespace().any(|c| c == column), "column {column} missing in:\n{table}");
    }
    let row = table.lines().find(|l| l.starts_with("dev-box")).expect("instance listed");
    for cell in ["Running", "RTX", "0.42", "4242"] {
        assert!(row.contains(cell), "cell {cell} missing in row: {row}");
    }

    common::delete_namespace(&client, &ns).await;
}

/// Each file in `examples/invalid/` starts with `# expect: <field path>: <what is wrong>`; the
/// API server must refuse it with a message that names that field.
#[tokio::test]
#[ignore = "needs tests/ environment"]
async fn invalid_examples_are_refused_naming_the_field() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "invalid").await;

    let mut files: Vec<_> = std::fs::read_dir(examples_dir().join("invalid"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "examples/invalid/ holds at least ten specs");

    let mut report = Vec::new();
    for path in &files {
        let text = read(path);
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} must start with '# expect: <field>: <error>'", path.display()));
        let field = expect.split(": ").next().unwrap();
        let object: DynamicObject = serde_yaml::from_str(&text).unwrap();
        let kind = object.types.as_ref().unwrap().kind.clone();
        let gvk = GroupVersionKind::gvk("gputrainer.dev", "v1alpha1", &kind);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ApiResource::from_gvk(&gvk));
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => panic!("{} was accepted; expected an error naming {field}", path.display()),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{}: {}", path.display(), status.message);
                assert!(
                    status.message.contains(field),
                    "{}: the error must name {field}, got: {}",
                    path.display(),
                    status.message
                );
                report.push(format!(
                    "{:<45} {}",
                    path.file_name().unwrap().to_string_lossy(),
                    status.message
                ));
            }
            Err(other) => panic!("{}: unexpected error {other}", path.display()),
        }
    }
    println!("{}", report.join("\n"));
    common::delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs tests/ environment"]
async fn kubectl_explain_shows_the_field_descriptions() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    // The API server publishes CRD schemas to OpenAPI asynchronously; poll until explain sees them.
    let text = common::wait_until(std::time::Duration::from_secs(60), "kubectl explain", || async {
        let out = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(common::kubeconfig_path())
            .args(["explain", "trainingjob.spec.resources"])
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await;
    for expected in [
        "maxPricePerHour",
        "VASTAI_MAX_BID_PER_HOUR",
        "minReliability",
        "verifiedOnly",
        "The machine to rent",
    ] {
        assert!(text.contains(expected), "explain output lacks {expected}:\n{text}");
    }
    let text = common::kubectl(&["explain", "gpuinstance.spec.maxLifetimeSeconds"]);
    assert!(
        text.contains("even if the operator is gone"),
        "explain gpuinstance lacks the lifetime description:\n{text}"
    );
}
