//! The Helm chart (`charts/gpu-trainer`) and the kustomize base (`config/default`) install the same
//! operator, and both match the binary. No `helm` binary can be installed on the machines this
//! project is built on, so instead of `helm template` these tests read the templates with their
//! `{{ ... }}` actions stripped (templates are kept simple enough for that: one action never spans
//! lines) and check:
//!
//! - every template is well-formed YAML once stripped, and every `.Values.*` it uses exists;
//! - the CRDs in the chart and in the kustomize base are byte-identical to `crds/`;
//! - the chart and the kustomize base grant the same RBAC permissions and pass the same container
//!   arguments and environment variables (the chart may add settings inside `{{ if }}` blocks);
//! - every flag and environment variable is one the binary reads, and the defaults in
//!   `values.yaml` and in the kustomize base are the binary's own defaults;
//! - `values.yaml` validates against `values.schema.json` (and broken values do not);
//! - the PrometheusRule uses metric names the operator really exports.
//!
//! Plain tests: no cluster needed. `tests/rbac_e2e.rs` installs the kustomize base into the real
//! test API server and runs a job with its RBAC.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_yaml::Value;

const PLACEHOLDER: &str = "TEMPLATE";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("charts/gpu-trainer")
}

fn kustomize() -> PathBuf {
    root().join("config/default")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Stripping template actions

/// Which parts of a template to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Branches {
    /// Everything, including the bodies of `{{ if }}`, `{{ with }}` and `{{ range }}` blocks.
    All,
    /// Only what is rendered whatever the values are: block bodies are dropped.
    Unconditional,
}

/// Removes Go template actions so that the rest can be read as YAML. A line holding nothing but
/// actions disappears; an action inside a line becomes [`PLACEHOLDER`]. Block actions (`if`,
/// `with`, `range`, `define` ... `end`) that fill a line open and close blocks; inline ones must
/// close on their line. An action spanning lines is an error: templates are kept simple enough.
fn strip_template(text: &str, branches: Branches) -> Result<String, String> {
    let mut out = String::new();
    let mut depth = 0usize;
    for (index, line) in text.lines().enumerate() {
        let n = index + 1;
        let mut rest = line;
        let mut kept = String::new();
        let mut actions = Vec::new();
        while let Some(start) = rest.find("{{") {
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or_else(|| {
                format!("line {n}: `{{{{` without `}}}}` on the same line (keep each action on one line)")
            })?;
            kept.push_str(&rest[..start]);
            kept.push_str(PLACEHOLDER);
            actions.push(after[..end].trim().trim_matches('-').trim().to_string());
            rest = &after[end + 2..];
        }
        if rest.contains("}}") {
            return Err(format!("line {n}: `}}}}` without `{{{{`"));
        }
        kept.push_str(rest);
        let keep = depth == 0 || branches == Branches::All;
        if actions.is_empty() {
            if keep {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        let opens = |a: &String| {
            matches!(a.split_whitespace().next(), Some("if" | "with" | "range" | "define" | "block"))
        };
        let ends = |a: &String| a.split_whitespace().next() == Some("end");
        if kept.replace(PLACEHOLDER, "").trim().is_empty() {
            for action in &actions {
                if opens(action) {
                    depth += 1;
                } else if ends(action) {
                    depth = depth.checked_sub(1).ok_or_else(|| format!("line {n}: `end` without a block"))?;
                }
            }
            continue;
        }
        let (o, e) =
            (actions.iter().filter(|a| opens(a)).count(), actions.iter().filter(|a| ends(a)).count());
        if o != e {
            return Err(format!("line {n}: a block opened inside a line must end on that line"));
        }
        if keep {
            out.push_str(&kept);
            out.push('\n');
        }
    }
    if depth != 0 {
        return Err(format!("{depth} block(s) not closed with `end`"));
    }
    Ok(out)
}

#[test]
fn stripping_drops_action_lines_and_replaces_inline_actions() {
    let template = "a: {{ .Values.a }}\n{{- if .Values.b }}\nb: 1\n{{- end }}\nc: {{ if .x }}y{{ end }}\n";
    assert_eq!(strip_template(template, Branches::All).unwrap(), "a: TEMPLATE\nb: 1\nc: TEMPLATEyTEMPLATE\n");
    assert_eq!(
        strip_template(template, Branches::Unconditional).unwrap(),
        "a: TEMPLATE\nc: TEMPLATEyTEMPLATE\n"
    );
    assert!(strip_template("a: {{ .Values.a\n}}\n", Branches::All).unwrap_err().contains("line 1"));
    assert!(strip_template("{{ if .x }}\na: 1\n", Branches::All).unwrap_err().contains("not closed"));
    assert!(strip_template("a: {{ if .x }}y\n{{ end }}\n", Branches::All).unwrap_err().contains("line 1"));
}

/// The chart's templates (not `_helpers.tpl`, not NOTES.txt): file name → text.
fn chart_templates() -> BTreeMap<String, String> {
    let dir = chart().join("templates");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("charts/gpu-trainer/templates") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".yaml") {
            out.insert(name, read(&path));
        }
    }
    out
}

fn yaml_documents(text: &str, what: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{what} is not well-formed YAML: {e}\n---\n{text}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Every object the chart can render, with all optional parts included.
fn chart_objects(branches: Branches) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (name, text) in chart_templates() {
        let stripped = strip_template(&text, branches).unwrap_or_else(|e| panic!("templates/{name}: {e}"));
        for doc in yaml_documents(&stripped, &format!("templates/{name} (actions stripped)")) {
            out.push((name.clone(), doc));
        }
    }
    out
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

fn chart_object(kind_: &str, name_suffix: &str) -> Value {
    let found: Vec<Value> = chart_objects(Branches::All)
        .into_iter()
        .map(|(_, v)| v)
        .filter(|v| kind(v) == kind_)
        .filter(|v| v["metadata"]["name"].as_str().unwrap_or_default().ends_with(name_suffix))
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind_} (name ending {name_suffix:?}) in the chart");
    found.into_iter().next().unwrap()
}

#[test]
fn chart_templates_are_well_formed_yaml_with_the_expected_objects() {
    let objects = chart_objects(Branches::All);
    for (file, object) in &objects {
        assert!(object["apiVersion"].is_string(), "templates/{file}: an object without apiVersion");
        assert!(object["metadata"]["name"].is_string(), "templates/{file}: an object without metadata.name");
    }
    let kinds: BTreeSet<&str> = objects.iter().map(|(_, v)| kind(v)).collect();
    let expected = [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "PrometheusRule",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ];
    assert_eq!(kinds, expected.into_iter().collect(), "kinds rendered by the chart");
    // The unconditional render is well-formed too (the optional blocks are independent).
    let always: BTreeSet<String> =
        chart_objects(Branches::Unconditional).iter().map(|(_, v)| kind(v).to_string()).collect();
    assert_eq!(always, ["Deployment", "Service"].map(String::from).into_iter().collect());
}

// ---------------------------------------------------------------------------------------------
// values.yaml

fn values() -> Value {
    serde_yaml::from_str(&read(&chart().join("values.yaml"))).expect("values.yaml is YAML")
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, key| v.as_mapping()?.get(key))
}

/// `.Values.a.b` references in all templates (including `_helpers.tpl` and NOTES.txt).
fn values_references() -> BTreeSet<String> {
    let re = regex::Regex::new(r"\.Values((?:\.[A-Za-z0-9_]+)+)").unwrap();
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(chart().join("templates")).unwrap() {
        let text = read(&entry.unwrap().path());
        for cap in re.captures_iter(&text) {
            out.insert(cap[1].trim_start_matches('.').to_string());
        }
    }
    out
}

#[test]
fn every_value_used_by_a_template_exists_and_every_value_is_used() {
    let values = values();
    let references = values_references();
    for path in &references {
        assert!(lookup(&values, path).is_some(), "templates use .Values.{path}, which values.yaml lacks");
    }
    fn leaves(prefix: &str, v: &Value, out: &mut Vec<String>) {
        match v.as_mapping() {
            Some(map) if !map.is_empty() => {
                for (k, v) in map {
                    let key = k.as_str().unwrap();
                    let path = if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") };
                    leaves(&path, v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut all = Vec::new();
    leaves("", &values, &mut all);
    for leaf in all {
        let used = references.iter().any(|r| leaf == *r || leaf.starts_with(&format!("{r}.")));
        assert!(used, "values.yaml has {leaf}, which no template uses");
    }
}

/// How Helm prints a value with `quote` or in `--flag={{ ... }}` (numbers are float64 in Helm,
/// printed without a trailing `.0`; lists are joined with `join ","`).
fn helm_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => {
            let f = n.as_f64().unwrap();
            if f.fract() == 0.0 { format!("{}", f as i64) } else { f.to_string() }
        }
        Value::Sequence(items) => items.iter().map(helm_string).collect::<Vec<_>>().join(","),
        Value::Null => String::new(),
        other => panic!("no Helm string for {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// values.schema.json: a focused validator for the draft-07 keywords the schema uses. Unknown
// keywords are an error, so the schema cannot rely on something this check ignores.

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

fn validate(schema: &serde_json::Value, v: &serde_json::Value, path: &str, errors: &mut Vec<String>) {
    let Some(schema) = schema.as_object() else {
        errors.push(format!("{path}: schema is not an object"));
        return;
    };
    let at = if path.is_empty() { "(root)" } else { path };
    for (keyword, rule) in schema {
        match keyword.as_str() {
            "$schema" | "title" | "description" | "default" => {}
            "type" => {
                let actual = json_type(v);
                let ok = |t: &str| t == actual || (t == "number" && actual == "integer");
                let allowed: Vec<&str> = match rule {
                    serde_json::Value::String(t) => vec![t.as_str()],
                    serde_json::Value::Array(ts) => ts.iter().filter_map(|t| t.as_str()).collect(),
                    _ => vec![],
                };
                if !allowed.iter().any(|t| ok(t)) {
                    errors.push(format!("{at}: expected {}, got {actual}", allowed.join(" or ")));
                }
            }
            "properties" => {
                if let (Some(props), Some(obj)) = (rule.as_object(), v.as_object()) {
                    for (key, sub) in props {
                        if let Some(value) = obj.get(key) {
                            validate(sub, value, &format!("{path}.{key}"), errors);
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(obj) = v.as_object() {
                    let known = schema.get("properties").and_then(|p| p.as_object());
                    for (key, value) in obj {
                        if known.is_some_and(|k| k.contains_key(key)) {
                            continue;
                        }
                        match rule {
                            serde_json::Value::Bool(false) => {
                                errors.push(format!("{path}.{key}: not a known setting"));
                            }
                            serde_json::Value::Bool(true) => {}
                            sub => validate(sub, value, &format!("{path}.{key}"), errors),
                        }
                    }
                }
            }
            "required" => {
                if let Some(obj) = v.as_object() {
                    for key in rule.as_array().into_iter().flatten().filter_map(|k| k.as_str()) {
                        if !obj.contains_key(key) {
                            errors.push(format!("{path}.{key}: required"));
                        }
                    }
                }
            }
            "items" => {
                for (i, item) in v.as_array().into_iter().flatten().enumerate() {
                    validate(rule, item, &format!("{path}[{i}]"), errors);
                }
            }
            "enum" => {
                if !rule.as_array().is_some_and(|choices| choices.contains(v)) {
                    errors.push(format!("{at}: {v} is not one of {rule}"));
                }
            }
            "minimum" | "maximum" | "exclusiveMinimum" => {
                if let (Some(limit), Some(x)) = (rule.as_f64(), v.as_f64()) {
                    let ok = match keyword.as_str() {
                        "minimum" => x >= limit,
                        "maximum" => x <= limit,
                        _ => x > limit,
                    };
                    if !ok {
                        errors.push(format!("{at}: {x} breaks {keyword} {limit}"));
                    }
                }
            }
            "minLength" => {
                if let (Some(min), Some(s)) = (rule.as_u64(), v.as_str())
                    && (s.chars().count() as u64) < min
                {
                    errors.push(format!("{at}: shorter than {min} characters"));
                }
            }
            "pattern" => {
                let re =
                    regex::Regex::new(rule.as_str().unwrap_or_default()).expect("schema pattern is a regex");
                if let Some(s) = v.as_str()
                    && !re.is_match(s)
                {
                    errors.push(format!("{at}: {s:?} does not match {re}"));
                }
            }
            other => errors.push(format!("{at}: schema keyword {other:?} is not supported by this check")),
        }
    }
}

fn schema() -> serde_json::Value {
    serde_json::from_str(&read(&chart().join("values.schema.json"))).expect("values.schema.json is JSON")
}

fn schema_errors(values: &Value) -> Vec<String> {
    let json: serde_json::Value = serde_json::to_value(values).unwrap();
    let mut errors = Vec::new();
    validate(&schema(), &json, "", &mut errors);
    errors
}

#[test]
fn values_yaml_validates_against_the_schema() {
    let errors = schema_errors(&values());
    assert!(errors.is_empty(), "values.yaml breaks values.schema.json:\n{}", errors.join("\n"));
}

#[test]
fn the_schema_refuses_broken_values_and_names_the_field() {
    let cases: [(&str, Value, &str); 7] = [
        ("installationId", Value::from("xyz"), ".installationId"),
        ("vastai.existingSecret", Value::from(""), ".vastai.existingSecret"),
        ("replicaCount", Value::from(0), ".replicaCount"),
        ("sweep.intervalSeconds", Value::from("60"), ".sweep.intervalSeconds"),
        ("logFormat", Value::from("xml"), ".logFormat"),
        ("jobDefaults.maxPricePerHour", Value::from(0), ".jobDefaults.maxPricePerHour"),
        ("vastai.apiKey", Value::from("inline-key"), ".vastai.apiKey"),
    ];
    for (path, bad, field) in cases {
        let mut values = values();
        let (parent, key) = path.rsplit_once('.').map_or(("", path), |(p, k)| (p, k));
        let target = if parent.is_empty() {
            &mut values
        } else {
            parent.split('.').fold(&mut values, |v, k| v.get_mut(k).unwrap())
        };
        target.as_mapping_mut().unwrap().insert(Value::from(key), bad.clone());
        let errors = schema_errors(&values);
        assert!(
            errors.iter().any(|e| e.starts_with(field)),
            "{path} = {bad:?} should be refused with an error naming {field}; got {errors:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// CRDs

fn yaml_files(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), read(&p)))
        .collect()
}

#[test]
fn chart_and_kustomize_crds_are_identical_to_crds() {
    let generated = yaml_files(&root().join("crds"));
    assert_eq!(generated.len(), 2, "crds/ holds the two CRDs");
    for copy in [chart().join("crds"), kustomize().join("crds")] {
        let files = yaml_files(&copy);
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            generated.keys().collect::<Vec<_>>(),
            "{} must hold the same files as crds/",
            copy.display()
        );
        for (name, text) in &files {
            assert!(
                text == &generated[name],
                "{}/{name} differs from crds/{name}; after `cargo run -- crd --output-dir crds` run \
                 `cp crds/*.yaml charts/gpu-trainer/crds/ && cp crds/*.yaml config/default/crds/`",
                copy.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The kustomize base

/// The objects `kubectl apply -k config/default` creates (resources listed in
/// kustomization.yaml, which must all be local files) and the namespace it sets.
fn kustomize_objects() -> (String, Vec<Value>) {
    let kustomization: Value = serde_yaml::from_str(&read(&kustomize().join("kustomization.yaml"))).unwrap();
    let namespace = kustomization["namespace"].as_str().expect("kustomization sets namespace").to_string();
    let mut out = Vec::new();
    let mut listed = BTreeSet::new();
    for resource in kustomization["resources"].as_sequence().expect("resources") {
        let file = resource.as_str().unwrap();
        assert!(!file.contains(".."), "{file}: kustomize refuses files outside config/default by default");
        listed.insert(file.to_string());
        out.extend(yaml_documents(&read(&kustomize().join(file)), file));
    }
    for crd in yaml_files(&kustomize().join("crds")).keys() {
        assert!(listed.contains(&format!("crds/{crd}")), "kustomization.yaml does not list crds/{crd}");
    }
    (namespace, out)
}

fn kustomize_object(kind_: &str, name: &str) -> Value {
    let (_, objects) = kustomize_objects();
    objects
        .into_iter()
        .find(|v| kind(v) == kind_ && v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("config/default has no {kind_} {name}"))
}

#[test]
fn kustomize_objects_live_in_its_namespace_and_refer_to_each_other() {
    let (namespace, objects) = kustomize_objects();
    let cluster_scoped = ["Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"];
    for object in &objects {
        let ns = object["metadata"]["namespace"].as_str();
        if cluster_scoped.contains(&kind(object)) {
            assert_eq!(ns, None, "{} {:?} is cluster-scoped", kind(object), object["metadata"]["name"]);
        } else {
            assert_eq!(ns, Some(namespace.as_str()), "{} {:?}", kind(object), object["metadata"]["name"]);
        }
    }
    assert!(objects.iter().any(|o| kind(o) == "Namespace" && o["metadata"]["name"] == namespace.as_str()));
    let account = kustomize_object("ServiceAccount", "gpu-trainer");
    let deployment: Deployment =
        serde_yaml::from_value(kustomize_object("Deployment", "gpu-trainer")).unwrap();
    let pod = deployment.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), account["metadata"]["name"].as_str());
    for (binding, role_kind) in [("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")] {
        for object in objects.iter().filter(|o| kind(o) == binding) {
            assert_eq!(object["roleRef"]["kind"], role_kind);
            let role = object["roleRef"]["name"].as_str().unwrap();
            assert!(objects.iter().any(|o| kind(o) == role_kind && o["metadata"]["name"] == role), "{role}");
            let subject = &object["subjects"][0];
            assert_eq!(subject["kind"], "ServiceAccount");
            assert_eq!(subject["name"], account["metadata"]["name"]);
            assert_eq!(subject["namespace"].as_str(), Some(namespace.as_str()));
        }
    }
    let service = kustomize_object("Service", "gpu-trainer-metrics");
    let pod_labels = deployment.spec.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    for (k, v) in service["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(
            pod_labels.get(k.as_str().unwrap()).map(String::as_str),
            v.as_str(),
            "Service selector {k:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// RBAC

/// Permissions as (apiGroup, resource, resourceName or "*", verb), so that how rules are grouped
/// does not matter.
fn permissions(rules: &Value, what: &str) -> BTreeSet<(String, String, String, String)> {
    let rules: Vec<PolicyRule> =
        serde_yaml::from_value(rules.clone()).unwrap_or_else(|e| panic!("{what}: rules: {e}"));
    let mut out = BTreeSet::new();
    for rule in rules {
        let names = rule.resource_names.clone().unwrap_or_else(|| vec!["*".into()]);
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for name in &names {
                    for verb in &rule.verbs {
                        assert_ne!(verb, "*", "{what}: no wildcard verbs");
                        assert_ne!(resource, "*", "{what}: no wildcard resources");
                        out.insert((group.clone(), resource.clone(), name.clone(), verb.clone()));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn chart_and_kustomize_grant_the_same_permissions() {
    for (kind_, chart_suffix, kustomize_name) in
        [("ClusterRole", "", "gpu-trainer"), ("Role", "-leader-election", "gpu-trainer-leader-election")]
    {
        let from_chart = permissions(&chart_object(kind_, chart_suffix)["rules"], &format!("chart {kind_}"));
        let from_kustomize = permissions(
            &kustomize_object(kind_, kustomize_name)["rules"],
            &format!("config/default {kind_} {kustomize_name}"),
        );
        assert_eq!(from_chart, from_kustomize, "{kind_}: the chart and config/default differ");
    }
    // Secrets are read by name only: never listed or watched.
    let cluster = permissions(&kustomize_object("ClusterRole", "gpu-trainer")["rules"], "ClusterRole");
    for verb in ["list", "watch", "update", "patch", "delete"] {
        assert!(!cluster.contains(&("".into(), "secrets".into(), "*".into(), verb.into())), "secrets {verb}");
    }
}

// ---------------------------------------------------------------------------------------------
// The Deployment: arguments and environment

/// Flag names (`--x` of `--x=value`) and env names of the operator container.
fn container_settings(deployment: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args = container["args"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str())
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap().to_string())
        .collect();
    let env = container["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str())
        .map(String::from)
        .collect();
    (args, env)
}

fn chart_deployment(branches: Branches) -> Value {
    chart_objects(branches)
        .into_iter()
        .map(|(_, v)| v)
        .find(|v| kind(v) == "Deployment")
        .expect("chart Deployment")
}

#[test]
fn chart_and_kustomize_pass_the_same_arguments_and_environment() {
    let (chart_args, chart_env) = container_settings(&chart_deployment(Branches::All));
    let (always_args, always_env) = container_settings(&chart_deployment(Branches::Unconditional));
    let (kust_args, kust_env) = container_settings(&kustomize_object("Deployment", "gpu-trainer"));
    for (what, all, always, kust) in [
        ("argument", &chart_args, &always_args, &kust_args),
        ("environment variable", &chart_env, &always_env, &kust_env),
    ] {
        let missing: Vec<_> = always.difference(kust).collect();
        assert!(missing.is_empty(), "the chart always sets {what}s {missing:?}; config/default does not");
        let extra: Vec<_> = kust.difference(all).collect();
        assert!(extra.is_empty(), "config/default sets {what}s {extra:?}; the chart cannot");
    }
    // The chart-only settings are the optional ones (unset means the binary derives a default).
    let optional: BTreeSet<&str> = chart_args.difference(&kust_args).map(String::as_str).collect();
    assert_eq!(
        optional,
        BTreeSet::from([
            "--allow-private-endpoints",
            "--installation-id",
            "--namespace",
            "--sweep-dry-run",
            "--tools-dir"
        ])
    );
    let optional_env: BTreeSet<&str> = chart_env.difference(&kust_env).map(String::as_str).collect();
    assert_eq!(optional_env, BTreeSet::from(["RUST_LOG"]));
}

/// `gpu-trainer run`'s flags: long name → (env var, default value).
fn run_flags() -> BTreeMap<String, (Option<String>, Option<String>)> {
    let command = gpu_trainer::cli::Cli::command();
    let run = command.find_subcommand("run").expect("`gpu-trainer run` exists");
    run.get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
            let default = a.get_default_values().first().map(|d| d.to_string_lossy().into_owned());
            Some((format!("--{long}"), (env, default)))
        })
        .collect()
}

/// All Rust sources, to check that an environment variable is really read by the code.
fn sources() -> String {
    let mut text = String::new();
    for entry in walkdir::WalkDir::new(root().join("src")) {
        let entry = entry.unwrap();
        if entry.path().extension().is_some_and(|x| x == "rs") {
            text.push_str(&read(entry.path()));
        }
    }
    text
}

#[test]
fn every_flag_and_variable_is_read_by_the_binary() {
    let flags = run_flags();
    let flag_envs: BTreeSet<String> = flags.values().filter_map(|(env, _)| env.clone()).collect();
    let sources = sources();
    let deployments = [
        ("chart", chart_deployment(Branches::All)),
        ("config/default", kustomize_object("Deployment", "gpu-trainer")),
    ];
    for (what, deployment) in deployments {
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["args"][0], "run", "{what}: the container runs `gpu-trainer run`");
        let (args, env) = container_settings(&deployment);
        for arg in args {
            assert!(flags.contains_key(&arg), "{what}: `gpu-trainer run` has no flag {arg}");
        }
        for name in env {
            // RUST_LOG is read by tracing-subscriber's EnvFilter::try_from_default_env.
            let read_by_code = flag_envs.contains(&name)
                || sources.contains(&format!("\"{name}\""))
                || (name == "RUST_LOG" && sources.contains("try_from_default_env"));
            assert!(read_by_code, "{what}: environment variable {name} is not read by the binary");
        }
    }
}

/// `- --flag={{ .Values.path }}` lines of the chart's Deployment: flag → values path.
fn chart_flag_values() -> BTreeMap<String, String> {
    let re = regex::Regex::new(r"^\s*- (--[a-z-]+)=\{\{ \.Values\.([A-Za-z0-9_.]+) \}\}\s*$").unwrap();
    read(&chart().join("templates/deployment.yaml"))
        .lines()
        .filter_map(|l| re.captures(l).map(|c| (c[1].to_string(), c[2].to_string())))
        .collect()
}

fn kustomize_args() -> BTreeMap<String, String> {
    let deployment = kustomize_object("Deployment", "gpu-trainer");
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str()?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_in_values_and_kustomize_are_the_binarys_defaults() {
    let flags = run_flags();
    let values = values();
    let mapped = chart_flag_values();
    assert!(mapped.len() >= 8, "expected the chart to pass its settings as --flag={{{{ .Values.x }}}}");
    for (flag, path) in &mapped {
        let value = helm_string(lookup(&values, path).unwrap());
        match &flags[flag].1 {
            Some(default) => {
                assert_eq!(
                    &value, default,
                    "values.yaml {path} (for {flag}) differs from the binary's default"
                )
            }
            // No default in the binary: the chart passes the flag only when the value is set.
            None => assert_eq!(value, "", "values.yaml {path} (for {flag}) should be empty by default"),
        }
    }
    for (flag, value) in kustomize_args() {
        let (_, default) = &flags[&flag];
        if flag == "--leader-elect" {
            // One replica: no election (the binary's default is on, for several replicas).
            assert_eq!(value, "false");
            continue;
        }
        assert_eq!(Some(&value), default.as_ref(), "config/default passes {flag}={value}, not the default");
    }
    assert_eq!(helm_string(&values["replicaCount"]), "1", "one replica by default, as config/default");

    // Provider and S3 settings: the binary's defaults in values.yaml and in config/default.
    use gpu_trainer::provider::config as provider;
    let env_defaults = [
        ("VASTAI_API_BASE_URL", "vastai.endpoint", provider::DEFAULT_BASE_URL.to_string()),
        ("VASTAI_PREFERRED_GPUS", "jobDefaults.preferredGpus", String::new()),
        (
            "VASTAI_MAX_BID_PER_HOUR",
            "jobDefaults.maxPricePerHour",
            provider::DEFAULT_MAX_BID_PER_HOUR.to_string(),
        ),
        ("VASTAI_MIN_VRAM_GB", "jobDefaults.minVramGb", provider::DEFAULT_MIN_VRAM_GB.to_string()),
        ("VASTAI_DEFAULT_DISK_GB", "jobDefaults.diskGb", provider::DEFAULT_DISK_GB.to_string()),
        ("AWS_ENDPOINT_URL_S3", "s3.endpoint", String::new()),
        ("AWS_REGION", "s3.region", String::new()),
        ("GPU_TRAINER_S3_FORCE_PATH_STYLE", "s3.forcePathStyle", "false".into()),
    ];
    let template = read(&chart().join("templates/deployment.yaml"));
    let deployment = kustomize_object("Deployment", "gpu-trainer");
    let kust_env = deployment["spec"]["template"]["spec"]["containers"][0]["env"].as_sequence().unwrap();
    let lines: Vec<&str> = template.lines().collect();
    for (name, path, default) in env_defaults {
        let at = lines.iter().position(|l| l.trim() == format!("- name: {name}"));
        let value_line = at.and_then(|i| lines.get(i + 1)).copied().unwrap_or_default();
        assert!(
            value_line.trim_start().starts_with("value: {{")
                && value_line.contains(&format!(".Values.{path} ")),
            "the chart should set {name} from .Values.{path}; the line is {value_line:?}"
        );
        assert_eq!(helm_string(lookup(&values, path).unwrap()), default, "values.yaml {path} ({name})");
        let entry =
            kust_env.iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("config/default: {name}"));
        assert_eq!(entry["value"].as_str(), Some(default.as_str()), "config/default {name}");
    }
}

#[test]
fn credentials_come_only_from_secrets() {
    let secret_like = regex::Regex::new(r"(?i)(key|secret|token|password)").unwrap();
    let deployments = [
        ("chart", chart_deployment(Branches::All)),
        ("config/default", kustomize_object("Deployment", "gpu-trainer")),
    ];
    for (what, deployment) in deployments {
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        for arg in container["args"].as_sequence().unwrap() {
            let arg = arg.as_str().unwrap();
            assert!(!secret_like.is_match(arg), "{what}: argument {arg} looks like a credential");
        }
        let mut from_secrets = BTreeSet::new();
        for env in container["env"].as_sequence().unwrap() {
            let name = env["name"].as_str().unwrap();
            if secret_like.is_match(name) {
                assert!(env.get("value").is_none(), "{what}: {name} must come from a Secret, not a value");
                assert!(env["valueFrom"]["secretKeyRef"]["name"].is_string(), "{what}: {name} from a Secret");
                from_secrets.insert(name);
            }
        }
        let expected = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "VASTAI_API_KEY"];
        assert_eq!(from_secrets, expected.into_iter().collect(), "{what}: credentials");
    }
}

#[test]
fn the_pod_is_locked_down_and_probed_on_the_metrics_port() {
    let deployment: Deployment =
        serde_yaml::from_value(kustomize_object("Deployment", "gpu-trainer")).unwrap();
    // Required since Kubernetes 1.37's types (k8s-openapi `v1_37`): no longer an Option.
    let spec = deployment.spec;
    assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("Recreate"));
    let pod = spec.template.spec.unwrap();
    let values = values();
    let pod_security = pod.security_context.unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(serde_yaml::to_value(&pod_security).unwrap(), values["podSecurityContext"], "values.yaml");
    let container = &pod.containers[0];
    let security = container.security_context.clone().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(serde_yaml::to_value(&security).unwrap(), values["securityContext"], "values.yaml");
    let resources = container.resources.clone().unwrap();
    assert!(resources.requests.as_ref().is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")));
    assert_eq!(serde_yaml::to_value(&resources).unwrap(), values["resources"], "values.yaml");
    let port =
        container.ports.as_ref().unwrap().iter().find(|p| p.name.as_deref() == Some("metrics")).unwrap();
    assert_eq!(port.container_port, 8080);
    assert!(container.args.as_ref().unwrap().contains(&"--metrics-addr=0.0.0.0:8080".to_string()));
    for (probe, path) in [(&container.liveness_probe, "/healthz"), (&container.readiness_probe, "/readyz")] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(serde_json::to_value(&get.port).unwrap(), "metrics");
    }
    assert!(container.volume_mounts.as_ref().unwrap().iter().any(|m| m.mount_path == "/tmp"));

    // The chart's template has the same shape (its values are checked above).
    let chart = chart_deployment(Branches::All);
    let c = &chart["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(c["volumeMounts"][0]["mountPath"], "/tmp");
}

// ---------------------------------------------------------------------------------------------
// Monitoring

/// Series names the operator exports: counters as `_total`, histograms as `_bucket`, `_sum`
/// and `_count`. A labelled family appears only once it has a child, so each gets one.
fn exported_series() -> BTreeSet<String> {
    use gpu_trainer::metrics::*;
    let m = Metrics::new();
    let controller = ControllerLabels { controller: "x" };
    let outcome = OutcomeLabels { outcome: "x" };
    let phase = PhaseLabels { phase: "x" };
    let provider = ProviderLabels { operation: "x", outcome: "x" };
    m.reconcile_runs.get_or_create(&controller).inc();
    m.reconcile_errors.get_or_create(&ErrorLabels { controller: "x", category: "x" }).inc();
    m.reconcile_duration.get_or_create(&controller).observe(1.0);
    m.instances_by_phase.get_or_create(&phase).set(0);
    m.launches.get_or_create(&outcome).inc();
    m.terminations.get_or_create(&outcome).inc();
    m.orphans.get_or_create(&SweepLabels { action: "x" }).inc();
    m.provider_requests.get_or_create(&provider).inc();
    m.provider_request_duration.get_or_create(&provider).observe(1.0);
    m.jobs_by_phase.get_or_create(&phase).set(0);
    m.job_duration.get_or_create(&phase).observe(1.0);
    m.job_failures.get_or_create(&ReasonLabels { reason: "x" }).inc();
    let text = m.encode();
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let (name, type_) = rest.split_once(' ').unwrap();
        match type_ {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                out.insert(name.to_string());
            }
        }
    }
    out
}

#[test]
fn alerts_use_metrics_and_label_values_the_operator_exports() {
    let exported = exported_series();
    assert!(exported.contains("gputrainer_hourly_spend_dollars"), "{exported:?}");
    let rule = chart_object("PrometheusRule", "");
    let rules = rule["spec"]["groups"][0]["rules"].as_sequence().unwrap();
    let alerts: BTreeSet<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    for wanted in [
        "GpuTrainerTerminationStuck",
        "GpuTrainerOrphansFound",
        "GpuTrainerSpendRateHigh",
        "GpuTrainerJobsStalled",
    ] {
        assert!(alerts.contains(wanted), "alert {wanted} missing");
    }
    let metric = regex::Regex::new(r"gputrainer_[a-z_]+").unwrap();
    let matcher = regex::Regex::new(r#"([a-z_]+)=~?"([^"]+)""#).unwrap();
    let sources = sources();
    for r in rules {
        let expr = r["expr"].as_str().unwrap();
        let names: Vec<&str> = metric.find_iter(expr).map(|m| m.as_str()).collect();
        assert!(!names.is_empty(), "{expr}");
        for name in names {
            assert!(
                exported.contains(name),
                "alert {:?} uses {name}, which the operator does not export",
                r["alert"]
            );
        }
        for cap in matcher.captures_iter(expr) {
            for value in cap[2].split('|') {
                assert!(
                    sources.contains(&format!("{}: \"{value}\"", &cap[1])),
                    "alert {:?}: no metric is labelled {}=\"{value}\" in src/",
                    r["alert"],
                    &cap[1]
                );
            }
        }
    }
    let monitor = chart_object("ServiceMonitor", "");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
}
