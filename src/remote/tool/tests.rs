//! Tool loading, parameter validation, rendering of the shipped tools, and the
//! template-injection suite (hostile values are run with the local implementation and must
//! never execute).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use super::*;
use crate::remote::local::LocalExec;

fn shipped() -> ToolRegistry {
    ToolRegistry::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tools")).unwrap()
}

fn job(base: &str) -> JobContext {
    JobContext {
        name: "my-job".into(),
        uid: "uid-1".into(),
        layout: RemoteLayout::new(base, "uid-1").unwrap(),
    }
}

fn params(v: serde_json::Value) -> BTreeMap<String, Json> {
    serde_json::from_value(v).unwrap()
}

#[test]
fn shipped_tools_load_with_the_documented_defaults() {
    let reg = shipped();
    let refs: Vec<String> = reg.tools().iter().map(Tool::reference).collect();
    assert_eq!(refs, ["demo@1", "flux-lora@1"]);
    let flux = reg.get("flux-lora@1").unwrap();
    let p = flux.resolve_params(&BTreeMap::new()).unwrap();
    assert_eq!(p["steps"], json!(4000));
    assert_eq!(p["learningRate"], json!(1e-4));
    assert_eq!((p["rank"].clone(), p["alpha"].clone()), (json!(32), json!(32)));
    assert_eq!(p["dropout"], json!(0.05));
    assert_eq!(p["saveEvery"], json!(250));
    assert_eq!(flux.spec.parser, Parser::AiToolkit);
    assert!(matches!(reg.get("flux-lora@2"), Err(ToolError::UnknownTool { .. })));
    assert!(matches!(reg.get("flux-lora"), Err(ToolError::BadReference(_))));
}

#[test]
fn flux_config_renders_to_the_ai_toolkit_layout() {
    let reg = shipped();
    let flux = reg.get("flux-lora@1").unwrap();
    let r = flux
        .render(
            &params(json!({"triggerWord": "sks dog", "steps": 2000, "name": "dog_v1"})),
            &job("/workspace/gputrainer"),
        )
        .unwrap();
    let config = r.files.iter().find(|f| f.path == "config.yaml").unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_slice(&config.content).unwrap();
    let process = &doc["config"]["process"][0];
    assert_eq!(doc["config"]["name"], "dog_v1");
    assert_eq!(process["trigger_word"], "sks dog");
    assert_eq!(process["training_folder"], "/workspace/gputrainer/uid-1/output");
    assert_eq!(process["datasets"][0]["folder_path"], "/workspace/gputrainer/uid-1/dataset");
    assert_eq!(process["train"]["steps"], 2000);
    assert_eq!(process["train"]["lr"].as_f64(), Some(1e-4));
    assert_eq!(process["network"]["linear"], 32);
    assert_eq!(process["network"]["linear_alpha"], 32);
    assert_eq!(process["network"]["dropout"].as_f64(), Some(0.05));
    assert_eq!(process["save"]["save_every"], 250);
    assert_eq!(process["model"]["quantize"], true);
    assert_eq!(process["datasets"][0]["resolution"], serde_yaml::to_value([512, 768, 1024]).unwrap());
    assert_eq!(r.run, "cd /workspace/ai-toolkit && python3 run.py /workspace/gputrainer/uid-1/config.yaml");
    assert_eq!(r.outputs.final_model, "output/dog_v1/dog_v1.safetensors");
    assert_eq!(r.outputs.checkpoints.as_deref(), Some("output/dog_v1/dog_v1_*.safetensors"));
    // The token is a secret: required, and never part of what is rendered.
    assert!(matches!(flux.check_secrets(["OTHER"]), Err(ToolError::MissingSecret { .. })));
    flux.check_secrets(["HF_TOKEN"]).unwrap();
    // Without a trigger word the key is left out rather than set to null.
    let r = flux.render(&BTreeMap::new(), &job("/w")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_slice(&r.files[0].content).unwrap();
    assert!(doc["config"]["process"][0].get("trigger_word").is_none());
}

#[test]
fn parameters_are_checked_by_name_type_and_range() {
    let reg = shipped();
    let demo = reg.get("demo@1").unwrap();
    let err = |v| demo.resolve_params(&params(v)).unwrap_err().to_string();
    let e = err(json!({"stepz": 3}));
    assert!(e.contains("unknown parameter \"stepz\"") && e.contains("steps"), "{e}");
    let e = err(json!({"steps": "ten"}));
    assert!(e.contains("\"steps\"") && e.contains("expected a number"), "{e}");
    let e = err(json!({"steps": 0}));
    assert!(e.contains("\"steps\"") && e.contains("below the minimum 1"), "{e}");
    let e = err(json!({"steps": 2.5}));
    assert!(e.contains("expected an integer"), "{e}");
    let e = err(json!({"secondsPerStep": -1}));
    assert!(e.contains("\"secondsPerStep\""), "{e}");
    let e = err(json!({"modelName": "../etc"}));
    assert!(e.contains("\"modelName\"") && e.contains("does not match"), "{e}");
    let flux = reg.get("flux-lora@1").unwrap();
    let e = flux.resolve_params(&params(json!({"optimizer": "sgd"}))).unwrap_err().to_string();
    assert!(e.contains("\"optimizer\"") && e.contains("not one of"), "{e}");
    let e = flux.resolve_params(&params(json!({"quantize": "yes"}))).unwrap_err().to_string();
    assert!(e.contains("\"quantize\"") && e.contains("true or false"), "{e}");
    let ok = demo.resolve_params(&params(json!({"steps": 5, "secondsPerStep": 0}))).unwrap();
    assert_eq!(ok["steps"], json!(5));
    assert_eq!(ok["stallAtStep"], json!(0));
}

/// A throwaway tool whose every kind of template puts one string parameter somewhere dangerous.
fn hostile_tool(dir: &Path) -> Tool {
    std::fs::write(dir.join("conf.yaml.j2"), "value: {{ params.v }}\nlist: [{{ params.v }}]\n").unwrap();
    std::fs::write(
        dir.join("tool.yaml"),
        r#"
name: hostile
version: "1"
image: busybox
parser: tqdm
parameters:
  - name: v
    type: string
    required: true
files:
  - path: conf.yaml
    template: conf.yaml.j2
bootstrap:
  - echo {{ params.v }} > bootstrap.txt
run: printf '%s' {{ params.v }} > run.txt; printf '%s' "x"{{ params.v }}"y" > glued.txt
healthCheck: printf '%s' {{ params.v }} > health.txt
outputs:
  finalModel: out.bin
cleanup:
  - printf '%s' {{ params.v }} > cleanup.txt
"#,
    )
    .unwrap();
    Tool::load(dir).unwrap()
}

fn hostile_values(canary: &str) -> Vec<String> {
    vec![
        format!("x; touch {canary}"),
        format!("$(touch {canary})"),
        format!("`touch {canary}`"),
        format!("'; touch {canary}; '"),
        format!("\"; touch {canary}; \""),
        format!("a\ntouch {canary}"),
        format!("a\r\ntouch {canary}\n"),
        format!("\\'$(touch {canary})\\'"),
        format!("x && touch {canary} #"),
        format!("x | touch {canary}"),
        format!("> {canary}"),
        format!("{{{{ 7*7 }}}}{{% raw %}}$(touch {canary})"),
        "$HOME ~ * ?".to_string(),
        format!("value: injected\nother: $(touch {canary})"),
        String::new(),
        "-rf".to_string(),
    ]
}

#[tokio::test]
async fn hostile_parameter_values_never_execute() {
    let tool_dir = tempfile::tempdir().unwrap();
    let tool = hostile_tool(tool_dir.path());
    let machine = tempfile::tempdir().unwrap();
    let exec = LocalExec::new(machine.path()).unwrap();
    let canary = machine.path().join("CANARY");
    let canary_s = canary.display().to_string();
    for (i, value) in hostile_values(&canary_s).into_iter().enumerate() {
        let ctx = JobContext {
            name: "j".into(),
            uid: format!("job{i}"),
            layout: RemoteLayout::new(&machine.path().display().to_string(), &format!("job{i}")).unwrap(),
        };
        let r = tool.render(&params(json!({ "v": value })), &ctx).unwrap();
        r.install_files(&exec, &ctx.layout).await.unwrap();
        r.bootstrap(&exec, &ctx.layout, &[], Duration::from_secs(30)).await.unwrap();
        r.step(&exec, &ctx.layout, &r.run, &[], "run", Duration::from_secs(30)).await.unwrap();
        for c in &r.cleanup {
            r.step(&exec, &ctx.layout, c, &[], "cleanup", Duration::from_secs(30)).await.unwrap();
        }
        assert!(!canary.exists(), "value {value:?} executed");
        let read = |name: &str| std::fs::read_to_string(Path::new(&ctx.layout.join(name))).unwrap();
        assert_eq!(read("run.txt"), value, "run command changed the value");
        assert_eq!(read("glued.txt"), format!("x{value}y"));
        assert_eq!(read("cleanup.txt"), value);
        assert_eq!(read("health.txt"), value);
        assert_eq!(read("bootstrap.txt"), format!("{value}\n"));
        let doc: serde_yaml::Value = serde_yaml::from_str(&read("conf.yaml")).unwrap();
        assert_eq!(doc["value"].as_str(), Some(value.as_str()), "YAML changed the value");
        assert_eq!(doc.as_mapping().unwrap().len(), 2, "YAML gained keys");
    }
    // A NUL byte cannot be quoted: rendering fails instead of producing a command.
    let ctx = job(&machine.path().display().to_string());
    assert!(tool.render(&params(json!({ "v": "a\u{0}b" })), &ctx).is_err());
}

#[tokio::test]
async fn hostile_values_in_the_shipped_tools_never_execute() {
    let reg = shipped();
    let machine = tempfile::tempdir().unwrap();
    let exec = LocalExec::new(machine.path()).unwrap();
    let canary = machine.path().join("CANARY");
    let base = machine.path().display().to_string();
    let demo = reg.get("demo@1").unwrap();
    let flux = reg.get("flux-lora@1").unwrap();
    for (i, value) in hostile_values(&canary.display().to_string()).into_iter().enumerate() {
        // demo: the free-text note reaches the trainer's command line and its log verbatim.
        let ctx = JobContext {
            name: "j".into(),
            uid: format!("d{i}"),
            layout: RemoteLayout::new(&base, &format!("d{i}")).unwrap(),
        };
        let r = demo
            .render(&params(json!({"note": value, "steps": 2, "secondsPerStep": 0, "saveEvery": 1})), &ctx)
            .unwrap();
        r.install_files(&exec, &ctx.layout).await.unwrap();
        let out = r.step(&exec, &ctx.layout, &r.run, &[], "run", Duration::from_secs(60)).await.unwrap();
        assert!(!canary.exists(), "demo note {value:?} executed");
        if !value.is_empty() {
            assert!(out.stdout_lossy().contains(&format!("Note: {value}")), "{}", out.stdout_lossy());
        }
        assert!(Path::new(&ctx.layout.join("output/demo.safetensors")).exists());
        // flux: hostile text in YAML stays one scalar; hostile names are refused.
        let r = flux.render(&params(json!({"triggerWord": value, "samplePrompt": value})), &ctx).unwrap();
        let doc: serde_yaml::Value = serde_yaml::from_slice(&r.files[0].content).unwrap();
        assert_eq!(doc["config"]["process"][0]["trigger_word"].as_str(), Some(value.as_str()));
        assert_eq!(doc["config"]["process"][0]["sample"]["prompts"][0].as_str(), Some(value.as_str()));
        assert!(flux.render(&params(json!({"name": value})), &ctx).is_err());
        assert!(flux.render(&params(json!({"aiToolkitRef": value})), &ctx).is_err());
    }
}

#[tokio::test]
async fn demo_runs_in_the_background_and_resumes_from_its_checkpoint() {
    let reg = shipped();
    let demo = reg.get("demo@1").unwrap();
    let machine = tempfile::tempdir().unwrap();
    let exec = LocalExec::new(machine.path()).unwrap();
    let ctx = job(&machine.path().display().to_string());
    let r = demo
        .render(&params(json!({"steps": 6, "secondsPerStep": 0.01, "saveEvery": 2, "failAtStep": 5})), &ctx)
        .unwrap();
    r.install_files(&exec, &ctx.layout).await.unwrap();
    r.bootstrap(&exec, &ctx.layout, &[], Duration::from_secs(60)).await.unwrap();
    use crate::remote::launch::{self, LaunchOutcome, TrainingState};
    let started = launch::launch(&exec, &ctx.layout, &r.launch_spec(false, vec![])).await.unwrap();
    assert!(matches!(started, LaunchOutcome::Started { .. }));
    let mut state = TrainingState::NotStarted;
    for _ in 0..600 {
        state = launch::state(&exec, &ctx.layout).await.unwrap();
        if matches!(state, TrainingState::Exited { .. }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, TrainingState::Exited { exit_code: 1 });
    let log = std::fs::read_to_string(ctx.layout.log()).unwrap();
    assert!(log.contains("demo:  67%|██████▋   | 4/6 ["), "{log}");
    assert!(log.contains("RuntimeError: demo failure at step 5"), "{log}");
    assert!(Path::new(&ctx.layout.join("output/demo_000000004.safetensors")).exists());

    // Resume without the failure: continues from step 4 and writes the final model.
    let r = demo.render(&params(json!({"steps": 6, "secondsPerStep": 0.01, "saveEvery": 2})), &ctx).unwrap();
    launch::reset(&exec, &ctx.layout).await.unwrap();
    launch::launch(&exec, &ctx.layout, &r.launch_spec(true, vec![])).await.unwrap();
    for _ in 0..600 {
        state = launch::state(&exec, &ctx.layout).await.unwrap();
        if matches!(state, TrainingState::Exited { .. }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, TrainingState::Exited { exit_code: 0 });
    let log = std::fs::read_to_string(ctx.layout.log()).unwrap();
    assert!(log.contains("Resuming from step 4"), "{log}");
    assert!(Path::new(&ctx.layout.join(&r.outputs.final_model)).exists());
}
