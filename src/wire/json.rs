//! JSON objects on the wire: `params` and `result` travel as
//! `google.protobuf.Struct` and are stored as JSON.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

/// A JSON value as a protobuf `Value`.
pub(crate) fn json_to_value(json: &serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(json_to_struct_map(map)),
    };
    Value { kind: Some(kind) }
}

fn json_to_struct_map(map: &serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

/// A JSON object as a `Struct`; anything but an object becomes an empty one.
pub(crate) fn json_to_struct(json: &serde_json::Value) -> Struct {
    match json {
        serde_json::Value::Object(map) => json_to_struct_map(map),
        _ => Struct::default(),
    }
}

/// Why a `Struct` cannot be stored as JSON.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct JsonError(pub(crate) String);

/// A `Struct` as a JSON object. Rejects what JSON (and Postgres `jsonb`)
/// cannot hold: NaN and infinite numbers, and NUL characters.
pub(crate) fn struct_to_json(s: &Struct) -> Result<serde_json::Value, JsonError> {
    let mut map = serde_json::Map::with_capacity(s.fields.len());
    for (key, value) in &s.fields {
        if key.contains('\0') {
            return Err(JsonError("keys must not contain NUL characters".into()));
        }
        map.insert(key.clone(), value_to_json(value)?);
    }
    Ok(serde_json::Value::Object(map))
}

fn value_to_json(value: &Value) -> Result<serde_json::Value, JsonError> {
    Ok(match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            // Whole numbers stay integers, so `{"count": 3}` reads back as 3.
            if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
                serde_json::Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n)
                    .map(serde_json::Value::Number)
                    .ok_or_else(|| JsonError("numbers must be finite".into()))?
            }
        }
        Some(Kind::StringValue(s)) => {
            if s.contains('\0') {
                return Err(JsonError("strings must not contain NUL characters".into()));
            }
            serde_json::Value::String(s.clone())
        }
        Some(Kind::ListValue(list)) => serde_json::Value::Array(
            list.values
                .iter()
                .map(value_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Some(Kind::StructValue(s)) => struct_to_json(s)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_through_struct() {
        let json = serde_json::json!({
            "mode": "deep", "count": 3, "ratio": 0.5, "ok": true, "none": null,
            "ids": ["a", "b"], "nested": {"x": -7}
        });
        assert_eq!(struct_to_json(&json_to_struct(&json)).unwrap(), json);
    }

    #[test]
    fn non_finite_numbers_and_nul_are_rejected() {
        let mut s = Struct::default();
        s.fields.insert(
            "x".into(),
            Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        );
        assert!(struct_to_json(&s).is_err());
        let mut s = Struct::default();
        s.fields.insert(
            "x".into(),
            Value {
                kind: Some(Kind::StringValue("a\0b".into())),
            },
        );
        assert!(struct_to_json(&s).is_err());
    }
}
