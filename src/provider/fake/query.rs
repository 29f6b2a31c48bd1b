//! The API's filter language, as the fake server evaluates it: `{"field": {"op": value}}` with
//! `eq, neq, gt, gte, lt, lte, in, notin`. The official CLI sends numbers as strings (`{"eq":
//! "1"}`), so values are compared as numbers whenever both sides read as numbers.

use std::cmp::Ordering;

use serde_json::{Map, Value};

/// Top-level keys of a search query that are not filters.
const NOT_FILTERS: &[&str] =
    &["order", "type", "limit", "allocated_storage", "select_cols", "disable_bundling"];

/// Whether `row` passes every filter. Fields the row does not have are ignored, as are unknown
/// operators (the real server ignores unknown fields, and the CLI warns about them).
pub fn matches(row: &Map<String, Value>, filters: &Map<String, Value>) -> bool {
    filters.iter().filter(|(field, _)| !NOT_FILTERS.contains(&field.as_str())).all(|(field, ops)| {
        let Some(ops) = ops.as_object() else { return true };
        let Some(actual) = field_value(row, field) else { return true };
        ops.iter().all(|(op, want)| apply(op, &actual, want))
    })
}

/// The row's value for a filter field. `geolocation` is free text on rows (`Texas, US`) but a
/// country code in filters; `verified` is derived from `verification` when absent.
fn field_value(row: &Map<String, Value>, field: &str) -> Option<Value> {
    match (field, row.get(field)) {
        ("geolocation", Some(Value::String(geo))) => {
            Some(Value::String(geo.rsplit(',').next().unwrap_or(geo).trim().to_string()))
        }
        ("verified", None) => row.get("verification").map(|v| Value::Bool(v.as_str() == Some("verified"))),
        (_, Some(v)) => Some(v.clone()),
        (_, None) => None,
    }
}

fn apply(op: &str, actual: &Value, want: &Value) -> bool {
    match op {
        "eq" => equal(actual, want),
        "neq" => !equal(actual, want),
        "gt" => compare(actual, want) == Some(Ordering::Greater),
        "gte" => matches!(compare(actual, want), Some(Ordering::Greater | Ordering::Equal)),
        "lt" => compare(actual, want) == Some(Ordering::Less),
        "lte" => matches!(compare(actual, want), Some(Ordering::Less | Ordering::Equal)),
        "in" => want.as_array().is_some_and(|list| list.iter().any(|w| equal(actual, w))),
        "notin" => want.as_array().is_none_or(|list| !list.iter().any(|w| equal(actual, w))),
        _ => true,
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn boolean(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    if let (Some(x), Some(y)) = (number(a), number(b)) {
        return (x - y).abs() < 1e-9;
    }
    if let (Value::Bool(_), _) | (_, Value::Bool(_)) = (a, b) {
        return boolean(a).is_some() && boolean(a) == boolean(b);
    }
    match (a, b) {
        (Value::String(x), Value::String(y)) => x.trim().eq_ignore_ascii_case(y.trim()),
        _ => a == b,
    }
}

fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (number(a), number(b)) {
        (Some(x), Some(y)) => x.partial_cmp(&y),
        _ => match (a, b) {
            (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
            _ => None,
        },
    }
}

/// Sorts rows by `[[field, "asc"|"desc"], ...]`, then by id.
pub fn sort(rows: &mut [Map<String, Value>], order: &[(String, bool)]) {
    rows.sort_by(|a, b| {
        for (field, descending) in order {
            let (x, y) = (a.get(field).unwrap_or(&Value::Null), b.get(field).unwrap_or(&Value::Null));
            let ord = compare(x, y).unwrap_or(Ordering::Equal);
            let ord = if *descending { ord.reverse() } else { ord };
            if ord != Ordering::Equal {
                return ord;
            }
        }
        compare(a.get("id").unwrap_or(&Value::Null), b.get("id").unwrap_or(&Value::Null))
            .unwrap_or(Ordering::Equal)
    });
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn cli_style_string_numbers_and_codes() {
        let row = obj(json!({"num_gpus": 1, "gpu_ram": 24564, "gpu_name": "RTX 4090", "reliability": 0.99,
            "geolocation": "Texas, US", "verification": "verified", "rentable": true}));
        let q =
            obj(json!({"num_gpus": {"eq": "1"}, "gpu_ram": {"gte": 20000.0}, "gpu_name": {"eq": "RTX 4090"},
            "reliability": {"gt": "0.98"}, "geolocation": {"in": ["US", "CA"]}, "verified": {"eq": true},
            "rentable": {"eq": true}, "order": [["dph_total", "asc"]], "limit": 5}));
        assert!(matches(&row, &q));
        assert!(!matches(&row, &obj(json!({"num_gpus": {"gte": "2"}}))));
        assert!(!matches(&row, &obj(json!({"geolocation": {"notin": ["US"]}}))));
        assert!(!matches(&row, &obj(json!({"rentable": {"eq": false}}))));
    }

    #[test]
    fn null_label_filter() {
        let unlabelled = obj(json!({"label": null}));
        let labelled = obj(json!({"label": "x"}));
        let q = obj(json!({"label": {"in": [null]}}));
        assert!(matches(&unlabelled, &q));
        assert!(!matches(&labelled, &q));
    }
}
