//! Reading the numbers and arrays of a body strictly: a limit that is negative,
//! fractional, a string or out of range is an error naming its field, never a 0.

use serde_json::Value;

use super::error::{At, ShapeError, ShapeProblem};

/// A whole number within `min..=max` at `key` of `body`; `None` when absent or `null`
/// (OpenAI's "not set").
pub(crate) fn count(
    body: &Value,
    key: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, ShapeError> {
    let at = At::root(key);
    let value = match body.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(value) => value,
    };
    let bad = |problem| Err(at.error(Some(value), problem));
    let Value::Number(number) = value else {
        return bad(ShapeProblem::WrongType {
            expected: "a whole number",
        });
    };
    let n = if let Some(n) = number.as_u64() {
        n
    } else if number.as_i64().is_some() {
        return bad(ShapeProblem::Negative);
    } else {
        // A float: 12.0 is a whole number written oddly; 12.5 and -1.0 are not.
        let f = number.as_f64().unwrap_or(f64::NAN);
        if f.fract() != 0.0 || !f.is_finite() {
            return bad(ShapeProblem::NotWhole);
        }
        if f < 0.0 {
            return bad(ShapeProblem::Negative);
        }
        if f > max as f64 {
            return bad(ShapeProblem::OutOfRange { min, max });
        }
        // Whole, non-negative and at most `max` (a u32), so exact.
        f as u64
    };
    if n < min || n > max {
        return bad(ShapeProblem::OutOfRange { min, max });
    }
    Ok(Some(n))
}

/// The largest output limit among `keys` (a body may carry both `max_tokens` and
/// `max_completion_tokens`: the worst case is held), each 1..=u32::MAX.
pub(crate) fn output_limit(body: &Value, keys: &[&str]) -> Result<Option<u32>, ShapeError> {
    let mut limit = None;
    for key in keys {
        if let Some(n) = count(body, key, 1, u64::from(u32::MAX))? {
            // Within u32 by the range just checked.
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            limit = Some(limit.map_or(n, |l: u32| l.max(n)));
        }
    }
    Ok(limit)
}

/// The body as an object.
pub(crate) fn object(body: &Value) -> Result<&serde_json::Map<String, Value>, ShapeError> {
    body.as_object().ok_or_else(|| {
        At::root("body").error(
            Some(body),
            ShapeProblem::WrongType {
                expected: "a JSON object",
            },
        )
    })
}

/// A string that may be absent or `null` (`value`, found at `at`); any other type is
/// an error.
pub(crate) fn optional_str<'v>(
    value: Option<&'v Value>,
    at: &At<'_>,
) -> Result<Option<&'v str>, ShapeError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(at.error(
            Some(other),
            ShapeProblem::WrongType {
                expected: "a string",
            },
        )),
    }
}

/// A string that must be there.
pub(crate) fn required_str<'v>(
    value: Option<&'v Value>,
    at: &At<'_>,
) -> Result<&'v str, ShapeError> {
    optional_str(value, at)?.ok_or_else(|| at.error(None, ShapeProblem::Missing))
}
