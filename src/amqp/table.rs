//! JSON → AMQP field tables: queue, exchange and binding `arguments` from the
//! config, and message `headers` from a row's `jsonb`. One mapping for both,
//! so a value means the same wherever it is written:
//!
//! | JSON | AMQP |
//! | --- | --- |
//! | string | long string (`S`) |
//! | integer | signed 64-bit (`l`) |
//! | other number | double (`d`) |
//! | `true` / `false` | boolean (`t`) |
//! | `null` | void (`V`) |
//! | array | field array (`A`) |
//! | object | nested field table (`F`) |
//!
//! The conversion refuses what the broker could not take (a key over 255
//! bytes, an integer outside the signed 64-bit range, a table whose encoding
//! exceeds [`MAX_TABLE_BYTES`]) with a reason, instead of letting the client
//! library panic or the broker close the connection.

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Value};

use super::AMQP_MAX_SHORT_STRING;

/// The largest encoded table accepted. A message's properties travel in one
/// frame, and RabbitMQ's default `frame_max` is 128 KiB.
pub const MAX_TABLE_BYTES: usize = 64 * 1024;

/// Converts a JSON object into a field table, or says what is wrong with it.
///
/// # Errors
/// A reason naming the offending key.
pub fn from_json(object: &Map<String, Value>) -> Result<FieldTable, String> {
    let (table, size) = table(object, "")?;
    if size > MAX_TABLE_BYTES {
        return Err(format!(
            "encodes to {size} bytes; at most {MAX_TABLE_BYTES} fit in a message's properties"
        ));
    }
    Ok(table)
}

/// Parses JSON text (a row's `headers::text`) that must hold an object.
///
/// # Errors
/// A reason: not JSON, not an object, or a value [`from_json`] refuses.
pub fn from_json_text(text: &str) -> Result<FieldTable, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => from_json(&object),
        Ok(other) => Err(format!("must be a JSON object, not {}", json_kind(&other))),
        Err(e) => Err(format!("is not JSON the relay can read: {e}")),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The table and its encoded size in bytes (4-byte length prefix included).
fn table(object: &Map<String, Value>, path: &str) -> Result<(FieldTable, usize), String> {
    let mut out = FieldTable::default();
    let mut size = 4;
    for (key, value) in object {
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        let name = ShortString::try_new(key.as_str()).map_err(|_| {
            format!(
                "key '{here}' is {} bytes long; AMQP allows at most {AMQP_MAX_SHORT_STRING}",
                key.len()
            )
        })?;
        let (value, value_size) = convert(value, &here)?;
        size += 1 + key.len() + value_size;
        out.insert(name, value);
    }
    Ok((out, size))
}

/// One value and its encoded size (type tag included).
fn convert(value: &Value, path: &str) -> Result<(AMQPValue, usize), String> {
    Ok(match value {
        Value::Null => (AMQPValue::Void, 1),
        Value::Bool(b) => (AMQPValue::Boolean(*b), 2),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                (AMQPValue::LongLongInt(i), 9)
            } else if n.is_u64() {
                return Err(format!(
                    "'{path}' = {n} is outside the signed 64-bit integer range AMQP tables carry"
                ));
            } else {
                let f = n
                    .as_f64()
                    .ok_or_else(|| format!("'{path}' = {n} is not a finite number"))?;
                (AMQPValue::Double(f), 9)
            }
        }
        Value::String(s) => (
            AMQPValue::LongString(LongString::from(s.as_bytes())),
            5 + s.len(),
        ),
        Value::Array(items) => {
            let mut size = 5;
            let mut array = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let (v, n) = convert(item, &format!("{path}[{i}]"))?;
                size += n;
                array.push(v);
            }
            (AMQPValue::FieldArray(FieldArray::from(array)), size)
        }
        Value::Object(object) => {
            let (t, n) = table(object, path)?;
            (AMQPValue::FieldTable(t), 1 + n)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn every_json_kind_maps_to_one_amqp_type() {
        let t = from_json(&object(json!({
            "s": "text", "i": -7, "f": 1.5, "b": true, "n": null,
            "a": [1, "x"], "o": {"deep": 2}
        })))
        .unwrap();
        let m = t.inner();
        assert_eq!(m["s"], AMQPValue::LongString("text".into()));
        assert_eq!(m["i"], AMQPValue::LongLongInt(-7));
        assert_eq!(m["f"], AMQPValue::Double(1.5));
        assert_eq!(m["b"], AMQPValue::Boolean(true));
        assert_eq!(m["n"], AMQPValue::Void);
        assert_eq!(
            m["a"],
            AMQPValue::FieldArray(
                vec![AMQPValue::LongLongInt(1), AMQPValue::LongString("x".into())].into()
            )
        );
        let AMQPValue::FieldTable(inner) = &m["o"] else {
            panic!("nested object is not a table: {:?}", m["o"]);
        };
        assert_eq!(inner.inner()["deep"], AMQPValue::LongLongInt(2));
    }

    #[test]
    fn what_the_broker_cannot_take_is_refused_with_the_key() {
        let long_key = "k".repeat(256);
        let err = from_json(&object(json!({ "o": { long_key: 1 } }))).unwrap_err();
        assert!(
            err.contains("key 'o.kkk") && err.contains("256 bytes"),
            "{err}"
        );
        let err = from_json(&object(json!({"big": u64::MAX}))).unwrap_err();
        assert!(err.contains("'big'") && err.contains("64-bit"), "{err}");
        let err = from_json(&object(json!({"zeros": vec![0; 10_000]}))).unwrap_err();
        assert!(err.contains("encodes to 90015 bytes"), "{err}");
        assert!(from_json(&object(json!({"ok": vec![0; 7_000]}))).is_ok());
    }

    #[test]
    fn text_must_hold_an_object() {
        assert!(from_json_text(r#"{"a": 1}"#).is_ok());
        assert_eq!(
            from_json_text("[1]").unwrap_err(),
            "must be a JSON object, not an array"
        );
        assert!(from_json_text("{").unwrap_err().starts_with("is not JSON"));
    }
}
