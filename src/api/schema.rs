//! Hand-written schema fragments for what `schemars` cannot express in a structural schema:
//! "exactly one of these fields", list-map conditions and free-form parameter maps.

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
/// parameter list by the controller, which the API server cannot know about.
pub(crate) fn free_form_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}
