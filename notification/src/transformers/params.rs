//! Transformer parameters as Ceilometer accepts them: numbers and booleans also as strings,
//! serde errors as load errors.

use serde::{Deserialize, Deserializer};
use serde_yaml_ng::Value;

/// Numbers written as strings are accepted (`max: "100"`), `null` is "not set".
pub fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    use serde::de::Error;
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .map(Some)
            .map_err(|_| D::Error::custom(format!("expected a number, found {s:?}"))),
        Some(other) => Err(D::Error::custom(format!(
            "expected a number, found {other:?}"
        ))),
    }
}

/// Integers written as strings are accepted (`size: "2"`), `null` is "not set".
pub fn lenient_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::de::Error;
    match lenient_f64(d)? {
        None => Ok(None),
        Some(f) if f.fract() == 0.0 && f.is_finite() => Ok(Some(f as i64)),
        Some(f) => Err(D::Error::custom(format!("expected an integer, found {f}"))),
    }
}

/// Booleans as YAML booleans or the strings `true`/`false` (any case), `null` is false.
pub fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    use serde::de::Error;
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
        Some(other) => Err(D::Error::custom(format!(
            "expected true or false, found {other:?}"
        ))),
    }
}

/// Deserialises transformer parameters, turning serde's message into a load error string.
pub fn params<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, String> {
    serde_yaml_ng::from_value(v).map_err(|e| format!("parameters: {e}"))
}
