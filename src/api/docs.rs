//! Reference pages for the two resources (`docs/trainingjob.md`, `docs/gpuinstance.md`),
//! generated from the CRDs (the schema the API server enforces, with the doc comments of the
//! types as descriptions), the phase and `Reason` enums and the condition types. Every field is
//! listed with its type, default, validation and meaning. Checked in under `docs/` and kept
//! current by a test; regenerate with `cargo run -- crd --docs-dir docs`. Pure: no I/O.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::Value;

use super::{GpuInstance, GpuInstancePhase, Reason, TrainingJob, TrainingJobPhase};
use super::{instance_condition, job_condition};

/// What a page says besides the schema.
struct PageExtras {
    examples: &'static [(&'static str, &'static str)],
    /// A paragraph after the field tables' explanation.
    checks: &'static str,
    phases: Vec<(String, String)>,
    conditions: &'static [(&'static str, &'static str)],
}

/// `(file name, Markdown)` for each resource, in the order of [`super::crds`].
pub fn reference_pages() -> Vec<(String, String)> {
    vec![
        (
            "trainingjob.md".to_string(),
            page(
                &TrainingJob::crd(),
                PageExtras {
                    examples: &[
                        ("examples/trainingjob-minimal.yaml", "the smallest useful job"),
                        ("examples/trainingjob-full.yaml", "every field set, with a note on each"),
                        ("examples/quickstart.yaml", "`demo@1` for `gpu-trainer launch`, no cluster needed"),
                        ("examples/invalid/", "specs the API server refuses, one rule each"),
                    ],
                    checks: "Besides each field's own checks, the API server (Kubernetes 1.35 and later) \
                             checks rules across fields when a job is created or changed, so `kubectl apply` \
                             refuses the job with a message naming the field: \
                             `spec.softDeadlineSeconds` must be below `spec.activeDeadlineSeconds`, and \
                             `spec.monitoring.pollIntervalSeconds` below \
                             `spec.monitoring.noProgressTimeoutSeconds`. What a job is built from is \
                             immutable: an update that changes `spec.tool`, `spec.params`, `spec.dataset`, \
                             `spec.resources` or `spec.provider` is refused; delete the job and create it \
                             again instead. `spec.suspend`, the deadlines, `spec.budget`, \
                             `spec.ttlSecondsAfterFinished`, `spec.monitoring`, `spec.output`, `spec.env` \
                             and `spec.notify` stay editable. What the API server cannot know is checked by \
                             the controller before anything is rented: the tool exists, `params` match its \
                             parameter list, the tool's required secrets are in `env`, and the dataset source \
                             and provider are ones the controller serves (not `dataset.local`, which is for \
                             `gpu-trainer launch`, nor `provider.ssh`). A job that breaks such a rule goes to \
                             phase `Failed` with reason `InvalidSpec` and a message naming the field; nothing \
                             is rented.",
                    phases: enum_variants::<TrainingJobPhase>(),
                    conditions: job_condition::ALL,
                },
            ),
        ),
        (
            "gpuinstance.md".to_string(),
            page(
                &GpuInstance::crd(),
                PageExtras {
                    examples: &[
                        ("examples/gpuinstance-interactive.yaml", "a GPU box for interactive work"),
                        (
                            "examples/invalid/",
                            "specs the API server refuses (files 17-19 and 23 are GpuInstances)",
                        ),
                    ],
                    checks: "The TrainingJob controller creates one GpuInstance per machine it rents, owned \
                             by the job; a person can create one for an interactive box. Deleting a \
                             GpuInstance releases the machine: the finalizer `gputrainer.dev/terminate` stays \
                             until the provider no longer lists it. Besides each field's own checks, the API \
                             server (Kubernetes 1.35 and later) refuses, naming the field, a \
                             `spec.bootTimeoutSeconds` that is not below `spec.maxLifetimeSeconds`, and any \
                             change to what is rented and how it is reached, all used once when the machine \
                             is rented: `spec.provider`, `spec.requirements`, `spec.image`, `spec.env`, \
                             `spec.onstart`, `spec.sshPublicKey`, `spec.sshKeySecretRef` and \
                             `spec.maxLifetimeSeconds` (the timer on the machine is set at rent time) are \
                             immutable; delete the GpuInstance and create it again instead. \
                             `spec.bootTimeoutSeconds` and `spec.imageSizeGb` stay editable.",
                    phases: enum_variants::<GpuInstancePhase>(),
                    conditions: instance_condition::ALL,
                },
            ),
        ),
    ]
}

fn page(crd: &CustomResourceDefinition, extras: PageExtras) -> String {
    let crd = serde_json::to_value(crd).expect("a CRD serializes");
    let spec = &crd["spec"];
    let version = &spec["versions"][0];
    let root = &version["schema"]["openAPIV3Schema"];
    let kind = text(&spec["names"]["kind"]);
    let mut out = String::new();
    let line = |out: &mut String, s: &str| {
        out.push_str(s);
        out.push('\n');
    };

    line(&mut out, &format!("# {kind}"));
    line(&mut out, "");
    line(
        &mut out,
        "<!-- Generated from the API types in src/api/ by `cargo run -- crd --docs-dir docs`; do not edit. -->",
    );
    line(&mut out, "");
    line(&mut out, &one_line(&root["description"]));
    line(&mut out, "");
    line(&mut out, "| | |");
    line(&mut out, "| --- | --- |");
    line(&mut out, &format!("| API version | `{}/{}` |", text(&spec["group"]), text(&version["name"])));
    line(&mut out, &format!("| kind | `{kind}` |"));
    let short: Vec<String> = list(&spec["names"]["shortNames"]).iter().map(|s| format!("`{s}`")).collect();
    line(
        &mut out,
        &format!("| plural, short name | `{}`, {} |", text(&spec["names"]["plural"]), short.join(", ")),
    );
    line(&mut out, "| scope | namespaced, with the `status` subresource |");
    let categories = list(&spec["names"]["categories"]);
    line(
        &mut out,
        &format!(
            "| categories | {} (`kubectl get {}` lists both kinds) |",
            categories.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", "),
            categories.first().map(String::as_str).unwrap_or_default()
        ),
    );
    line(&mut out, "");
    line(&mut out, "Examples:");
    line(&mut out, "");
    for (path, what) in extras.examples {
        line(&mut out, &format!("- [`{path}`](../{path}): {what}"));
    }
    line(&mut out, "");

    line(&mut out, "## `kubectl get` columns");
    line(&mut out, "");
    line(&mut out, "| column | JSON path | type | meaning |");
    line(&mut out, "| --- | --- | --- | --- |");
    for column in version["additionalPrinterColumns"].as_array().into_iter().flatten() {
        let meaning = match column["description"].as_str() {
            Some(d) => d.to_string(),
            None if text(&column["name"]) == "Age" => "Time since the object was created".to_string(),
            None => String::new(),
        };
        line(
            &mut out,
            &format!(
                "| {} | `{}` | {} | {} |",
                cell(&text(&column["name"]).to_uppercase()),
                text(&column["jsonPath"]),
                text(&column["type"]),
                cell(&meaning)
            ),
        );
    }
    line(&mut out, "");

    line(&mut out, "## Fields");
    line(&mut out, "");
    line(
        &mut out,
        "Every field of `spec` and `status`, as the API server stores it (camelCase). **Default** is \
         what the API server fills in when the field is left out; `-` means the field stays unset, and \
         the description says what unset means. **Validation** is what the API server checks when the \
         object is written; an object that breaks it is refused.",
    );
    line(&mut out, "");
    line(&mut out, extras.checks);
    line(&mut out, "");
    for part in ["spec", "status"] {
        let schema = &root["properties"][part];
        line(&mut out, &format!("### `{part}`"));
        line(&mut out, "");
        line(&mut out, &one_line(&schema["description"]));
        line(&mut out, "");
        line(&mut out, "| field | type | default | validation | description |");
        line(&mut out, "| --- | --- | --- | --- | --- |");
        let mut rows = Vec::new();
        children(part, schema, &mut rows);
        for row in rows {
            line(&mut out, &row);
        }
        line(&mut out, "");
    }

    line(&mut out, "## Phases");
    line(&mut out, "");
    line(&mut out, "`status.phase`, in lifecycle order.");
    line(&mut out, "");
    line(&mut out, "| phase | meaning |");
    line(&mut out, "| --- | --- |");
    for (name, description) in &extras.phases {
        line(&mut out, &format!("| `{name}` | {} |", cell(description)));
    }
    line(&mut out, "");

    line(&mut out, "## Conditions");
    line(&mut out, "");
    line(
        &mut out,
        "`status.conditions[]` are standard Kubernetes conditions (`type`, `status`, `reason`, \
         `message`, `lastTransitionTime`); `lastTransitionTime` moves only when `status` flips. The \
         condition's `reason` is one of the reasons below.",
    );
    line(&mut out, "");
    line(&mut out, "| type | meaning when True |");
    line(&mut out, "| --- | --- |");
    for (name, description) in extras.conditions {
        line(&mut out, &format!("| `{name}` | {} |", cell(&one_line_str(description))));
    }
    line(&mut out, "");

    line(&mut out, "## Reasons");
    line(&mut out, "");
    line(
        &mut out,
        "One closed set, shared by `status.reason`, condition reasons and the `reason` label of \
         `gputrainer_job_failures_total`; most event reasons come from it too (docs/troubleshooting.md \
         lists every event reason). Both resources use the same set; not every reason applies to both.",
    );
    line(&mut out, "");
    line(&mut out, "| reason | meaning |");
    line(&mut out, "| --- | --- |");
    for (name, description) in enum_variants::<Reason>() {
        line(&mut out, &format!("| `{name}` | {} |", cell(&description)));
    }
    out
}

/// Rows for the properties of `schema` (and of its array items), depth first, alphabetically.
fn children(path: &str, schema: &Value, rows: &mut Vec<String>) {
    if let Some(props) = schema["properties"].as_object() {
        let required = list(&schema["required"]);
        let mut names: Vec<&String> = props.keys().collect();
        names.sort();
        for name in names {
            let prop = &props[name];
            let here = format!("{path}.{name}");
            let mut row = row(&here, name, prop, required.contains(name));
            // CEL rules sit on the parent object and name the field they refuse by `fieldPath`.
            let rules = cel_rules_for(schema, name);
            if !rules.is_empty() {
                row = add_to_validation(&row, &rules.join("; "));
            }
            rows.push(row);
            children(&here, prop, rows);
        }
    }
    if schema["type"] == "array" {
        children(&format!("{path}[]"), &schema["items"], rows);
    }
}

/// What the CEL rules (`x-kubernetes-validations`) of `parent` say about its property `name`:
/// "immutable" for a transition rule, the rule's message otherwise.
fn cel_rules_for(parent: &Value, name: &str) -> Vec<String> {
    parent["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["fieldPath"].as_str() == Some(&format!(".{name}")))
        .map(|r| {
            if r["rule"].as_str().is_some_and(|rule| rule.contains("oldSelf")) {
                "immutable".to_string()
            } else {
                text(&r["message"])
            }
        })
        .collect()
}

/// `row` with `more` appended to its validation cell (the fourth).
fn add_to_validation(row: &str, more: &str) -> String {
    let mut cells: Vec<String> = row.split(" | ").map(str::to_string).collect();
    cells[3] = if cells[3] == "-" { cell(more) } else { format!("{}; {}", cells[3], cell(more)) };
    cells.join(" | ")
}

fn row(path: &str, name: &str, schema: &Value, required: bool) -> String {
    let default = match schema.get("default") {
        Some(value) => format!("`{}`", cell(&value.to_string())),
        None => "-".to_string(),
    };
    format!(
        "| `{}` | {} | {} | {} | {} |",
        cell(path),
        type_name(schema),
        default,
        cell(&validation(name, schema, required)),
        cell(&one_line(&schema["description"]))
    )
}

fn type_name(schema: &Value) -> String {
    if schema["x-kubernetes-preserve-unknown-fields"] == true && schema.get("properties").is_none() {
        return "object (free-form)".to_string();
    }
    match schema["type"].as_str() {
        Some("string") if schema["format"] == "date-time" => "string (date-time)".to_string(),
        Some("array") => format!("array of {}", type_name(&schema["items"])),
        Some(other) => other.to_string(),
        None => "any".to_string(),
    }
}

fn validation(name: &str, schema: &Value, required: bool) -> String {
    let mut rules = Vec::new();
    if required {
        rules.push("required".to_string());
    }
    if let Some(values) = schema["enum"].as_array() {
        rules.push(match name {
            "phase" => "one of the [phases](#phases)".to_string(),
            "reason" => "one of the [reasons](#reasons)".to_string(),
            _ => format!(
                "one of {}",
                values.iter().map(|v| format!("`{}`", text(v))).collect::<Vec<_>>().join(", ")
            ),
        });
    }
    if let Some(range) = range(&schema["minimum"], &schema["maximum"]) {
        rules.push(range);
    }
    if let Some(length) = length(&schema["minLength"], &schema["maxLength"], "characters") {
        rules.push(length);
    }
    if let Some(items) = length(&schema["minItems"], &schema["maxItems"], "items") {
        rules.push(items);
    }
    if let Some(keys) = length(&schema["minProperties"], &schema["maxProperties"], "keys") {
        rules.push(keys);
    }
    if let Some(pattern) = schema["pattern"].as_str() {
        rules.push(format!("matches `{pattern}`"));
    }
    let item = &schema["items"];
    if schema["type"] == "array" && item["type"] == "string" {
        let mut each = Vec::new();
        each.extend(length(&item["minLength"], &item["maxLength"], "characters"));
        each.extend(item["pattern"].as_str().map(|p| format!("matches `{p}`")));
        if !each.is_empty() {
            rules.push(format!("each item: {}", each.join(", ")));
        }
    }
    for (key, words) in [("oneOf", "exactly one of"), ("anyOf", "at least one of")] {
        let fields: Vec<String> = schema[key]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|branch| list(&branch["required"]))
            .map(|f| format!("`{f}`"))
            .collect();
        if !fields.is_empty() {
            rules.push(format!("{words} {}", fields.join(", ")));
        }
    }
    if schema["x-kubernetes-list-type"] == "map" {
        let keys: Vec<String> =
            list(&schema["x-kubernetes-list-map-keys"]).iter().map(|k| format!("`{k}`")).collect();
        rules.push(format!("one entry per {}", keys.join(", ")));
    }
    if rules.is_empty() { "-".to_string() } else { rules.join("; ") }
}

fn range(min: &Value, max: &Value) -> Option<String> {
    match (min.as_f64(), max.as_f64()) {
        (Some(lo), Some(hi)) => Some(format!("{} to {}", number(lo), number(hi))),
        (Some(lo), None) => Some(format!("at least {}", number(lo))),
        (None, Some(hi)) => Some(format!("at most {}", number(hi))),
        (None, None) => None,
    }
}

fn length(min: &Value, max: &Value, unit: &str) -> Option<String> {
    match (min.as_u64(), max.as_u64()) {
        (Some(lo), Some(hi)) => Some(format!("{lo} to {hi} {unit}")),
        (Some(lo), None) => Some(format!("at least {lo} {unit}")),
        (None, Some(hi)) => Some(format!("at most {hi} {unit}")),
        (None, None) => None,
    }
}

/// `60.0` as `60`, `0.01` as `0.01`.
fn number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 { format!("{}", n as i64) } else { n.to_string() }
}

/// Variant names and doc comments of a unit enum, from its JSON schema.
fn enum_variants<T: schemars::JsonSchema>() -> Vec<(String, String)> {
    let schema = serde_json::to_value(schemars::schema_for!(T)).expect("a schema serializes");
    let mut out = Vec::new();
    for branch in schema["oneOf"].as_array().into_iter().flatten() {
        let name = branch.get("const").or_else(|| branch["enum"].get(0)).map(text).unwrap_or_default();
        out.push((name, one_line(&branch["description"])));
    }
    if out.is_empty() {
        // Without per-variant docs schemars writes a plain `enum` list.
        for value in schema["enum"].as_array().into_iter().flatten() {
            out.push((text(value), String::new()));
        }
    }
    out
}

fn text(value: &Value) -> String {
    value.as_str().map(str::to_string).unwrap_or_else(|| value.to_string())
}

fn list(value: &Value) -> Vec<String> {
    value.as_array().into_iter().flatten().map(text).collect()
}

fn one_line(value: &Value) -> String {
    one_line_str(value.as_str().unwrap_or_default())
}

/// A description on one line: line breaks of the doc comment become spaces.
fn one_line_str(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Text safe inside a Markdown table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in `docs/` pages must match the code; regenerate with
    /// `cargo run -- crd --docs-dir docs`.
    #[test]
    fn checked_in_reference_pages_are_up_to_date() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        for (file_name, markdown) in reference_pages() {
            let path = dir.join(&file_name);
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == markdown,
                "{} is out of date; run `cargo run -- crd --docs-dir docs`",
                path.display()
            );
        }
    }

    /// Every field of the schema has a row, every row has a description, and the enums kept
    /// their doc comments.
    #[test]
    fn pages_list_every_field_with_a_description() {
        let pages = reference_pages();
        let job = &pages[0].1;
        for field in [
            "`spec.activeDeadlineSeconds` | integer | `14400` | 60 to 2592000 |",
            "`spec.dataset` | object | - | required; exactly one of `s3`, `url`, `local`; immutable |",
            "`spec.params` | object (free-form) | `{}` | at most 64 keys; immutable |",
            "`spec.suspend` | boolean | `false` | - |",
            "`spec.softDeadlineSeconds` | integer | - | 60 to 2592000; spec.softDeadlineSeconds must be below \
             spec.activeDeadlineSeconds",
            "`spec.resources.gpu.names` | array of string | - | at most 32 items; each item: 1 to 64 characters |",
            "`spec.monitoring.stallDetection.minSamples` | integer | `4` | 3 to 100 |",
            "`status.conditions[].type` | string | - | required |",
            "`status.reason` | string | - | one of the [reasons](#reasons) |",
        ] {
            assert!(job.contains(field), "trainingjob.md lacks {field}");
        }
        assert!(job.contains("| `Stalled` | Training made no progress"), "reason descriptions");
        assert!(job.contains("| `Provisioning` | Renting a machine"), "phase descriptions");
        assert!(job.contains("| `SoftDeadlineExceeded` |"), "condition types");
        let instance = &pages[1].1;
        assert!(
            instance.contains("`spec.maxLifetimeSeconds` | integer | `16200` | 300 to 2678400; immutable |")
        );
        assert!(
            instance.contains(
                "`spec.bootTimeoutSeconds` | integer | - | 60 to 7200; spec.bootTimeoutSeconds must"
            )
        );
        assert!(
            instance.contains("| `TerminationStuck` | Releasing the machine has taken more than 10 minutes")
        );
        for (name, page) in &pages {
            for row in page.lines().filter(|l| l.starts_with("| `spec.") || l.starts_with("| `status.")) {
                assert!(!row.ends_with("|  |"), "{name}: a field without a description: {row}");
                assert_eq!(row.matches(" | ").count(), 4, "{name}: a broken table row: {row}");
            }
        }
    }

    #[test]
    fn every_schema_property_has_a_row() {
        fn count(schema: &Value) -> usize {
            let own =
                schema["properties"].as_object().map(|p| p.values().map(|v| 1 + count(v)).sum()).unwrap_or(0);
            own + if schema["type"] == "array" { count(&schema["items"]) } else { 0 }
        }
        for (crd, (name, page)) in super::super::crds().iter().zip(reference_pages()) {
            let crd = serde_json::to_value(crd).unwrap();
            let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
            let fields = count(&root["spec"]) + count(&root["status"]);
            let rows =
                page.lines().filter(|l| l.starts_with("| `spec.") || l.starts_with("| `status.")).count();
            assert_eq!(rows, fields, "{name}");
        }
    }
}
