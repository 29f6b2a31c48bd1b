//! Hand-written schema fragments for what `schemars` cannot express in a structural schema:
//! "exactly one of these fields", list-map conditions, free-form parameter maps, and the CEL
//! rules (`x-kubernetes-validations`) the API server checks across fields and between an object
//! and its previous version.

use kube::core::{Reason, Rule};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

/// Adds `oneOf: [{required: [a]}, {required: [b]}, ...]` to an object schema, the structural
/// way to say "exactly one of these fields is set" that API servers since 1.16 enforce.
pub(crate) fn exactly_one_of(schema: &mut Schema, fields: &[&str]) {
    let branches: Vec<serde_json::Value> =
        fields.iter().map(|f| serde_json::json!({ "required": [f] })).collect();
    schema.insert("oneOf".into(), serde_json::Value::Array(branches));
}

/// Adds `anyOf: [{required: [a]}, ...]`: at least one of these fields is set.
pub(crate) fn at_least_one_of(schema: &mut Schema, fields: &[&str]) {
    let branches: Vec<serde_json::Value> =
        fields.iter().map(|f| serde_json::json!({ "required": [f] })).collect();
    schema.insert("anyOf".into(), serde_json::Value::Array(branches));
}

/// `conditions[]` as a list-map keyed by `type`, so server-side apply merges conditions by type.
pub(crate) fn conditions(generator: &mut SchemaGenerator) -> Schema {
    let item = k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition::json_schema(generator);
    json_schema!({
        "type": "array",
        "description": "Standard conditions; see the resource documentation for the types and reasons.",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": item,
    })
}

/// A free-form map of tool parameters. Keys and value types are checked against the tool's
/// parameter list by the controller, which the API server cannot know about. Defaulting to `{}`
/// makes an omitted map and an empty one the same stored object, so the immutability rule does
/// not tell them apart. At most 64 keys keeps that rule's estimated cost within the API server's
/// budget.
pub(crate) fn tool_params(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "maxProperties": 64,
        "default": {},
    })
}

/// Adds a CEL rule checked when the object is written: `rule` must hold, or the write is refused
/// with `message` at `field` (a property of the object the rule sits on). `message` names the
/// field by its full path (`spec.softDeadlineSeconds`), so it reads on its own in `kubectl`
/// output and events.
pub(crate) fn cel_rule(schema: &mut Schema, rule: &str, field: &str, message: &str) {
    add_rule(
        schema,
        Rule::new(rule).message(message).field_path(format!(".{field}")).reason(Reason::FieldValueInvalid),
    );
}

/// Adds a transition rule: property `field` keeps the value it was created with, so an update
/// that changes, adds or removes it is refused, naming `path` (its full path, e.g. `spec.tool`).
/// Transition rules (`oldSelf`) run on updates only. The rule sits on the parent object rather
/// than on the field, because a rule on an optional field does not run when the field is added
/// or removed.
pub(crate) fn immutable(schema: &mut Schema, field: &str, path: &str, kind: &str) {
    let rule = format!(
        "has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})"
    );
    let message = format!("{path} is immutable: delete the {kind} and create it again to change it");
    add_rule(
        schema,
        Rule::new(rule)
            .message(message.as_str())
            .field_path(format!(".{field}"))
            .reason(Reason::FieldValueForbidden),
    );
}

fn add_rule(schema: &mut Schema, rule: Rule) {
    kube::core::validate(schema, rule).expect("a CEL rule serializes");
}
