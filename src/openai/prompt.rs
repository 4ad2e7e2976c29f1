//! Embeddings (`POST /v1/embeddings`) and legacy completions (`POST /v1/completions`):
//! text, an array of texts, token ids, or arrays of token ids. No chat framing.

use serde_json::Value;

use super::count::Counter;
use super::error::{At, ShapeError, ShapeProblem};
use super::fields::{count, object, optional_str, output_limit};
use super::{Estimate, EstimateOptions};

/// What a prompt or input may be.
const PROMPT: &str =
    "a string, an array of strings, an array of token ids, or an array of token-id arrays";

/// OpenAI's default `max_tokens` for a legacy completion.
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

/// Most completions `n` or `best_of` may ask for.
const MAX_COMPLETIONS: u64 = 128;

/// Estimate an embeddings body: the tokens of every input (token ids count one each);
/// no output.
///
/// ```
/// use serde_json::json;
/// use tollgate::openai::{estimate_embeddings, EstimateOptions};
/// let options = EstimateOptions::for_model("text-embedding-3-small");
/// let estimate = estimate_embeddings(&json!({"input": ["Hello world", [1, 2, 3]]}), &options)?;
/// assert_eq!(estimate.input_tokens, 2 + 3);
/// assert_eq!(estimate.max_output_tokens, Some(0));
/// # Ok::<(), tollgate::openai::ShapeError>(())
/// ```
pub fn estimate_embeddings(
    body: &Value,
    options: &EstimateOptions,
) -> Result<Estimate, ShapeError> {
    object(body)?;
    let mut counter = Counter::new(options);
    match body.get("input") {
        None | Some(Value::Null) => {
            return Err(At::root("input").error(None, ShapeProblem::Missing))
        }
        Some(input) => prompt(&mut counter, input, &At::root("input"))?,
    }
    Ok(Estimate {
        input_tokens: counter.tokens(),
        max_output_tokens: Some(0),
        outputs: 1,
    })
}

/// Estimate a legacy completions body: the prompt's tokens (and `suffix`'s); output
/// `max_tokens` (OpenAI's default 16 when unset) for each of `max(n, best_of)`
/// completions, all of which are billed.
pub fn estimate_completions(
    body: &Value,
    options: &EstimateOptions,
) -> Result<Estimate, ShapeError> {
    object(body)?;
    let mut counter = Counter::new(options);
    match body.get("prompt") {
        // OpenAI's default prompt is `<|endoftext|>`, one token.
        None | Some(Value::Null) => counter.add(1),
        Some(input) => prompt(&mut counter, input, &At::root("prompt"))?,
    }
    if let Some(suffix) = optional_str(body.get("suffix"), &At::root("suffix"))? {
        counter.text(suffix);
    }
    let max = output_limit(body, &["max_tokens"])?.unwrap_or(COMPLETIONS_DEFAULT_MAX_TOKENS);
    let n = count(body, "n", 1, MAX_COMPLETIONS)?.unwrap_or(1);
    let best_of = count(body, "best_of", 1, MAX_COMPLETIONS)?.unwrap_or(1);
    Ok(Estimate {
        input_tokens: counter.tokens(),
        max_output_tokens: Some(max),
        outputs: u32::try_from(n.max(best_of)).unwrap_or(1),
    })
}

/// A prompt or input in any of its shapes; empty ones are refused, as OpenAI does.
fn prompt(counter: &mut Counter<'_>, input: &Value, at: &At<'_>) -> Result<(), ShapeError> {
    let wrong = |value: &Value, at: &At<'_>| {
        at.error(Some(value), ShapeProblem::WrongType { expected: PROMPT })
    };
    match input {
        Value::String(text) if text.is_empty() => {
            return Err(at.error(Some(input), ShapeProblem::Empty))
        }
        Value::String(text) => counter.text(text),
        Value::Array(items) if items.is_empty() => {
            return Err(at.error(Some(input), ShapeProblem::Empty))
        }
        // One prompt as token ids.
        Value::Array(items) if items[0].is_number() => token_ids(counter, items, at)?,
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let item_at = at.index(i);
                match item {
                    Value::String(text) if text.is_empty() => {
                        return Err(item_at.error(Some(item), ShapeProblem::Empty))
                    }
                    Value::String(text) => counter.text(text),
                    Value::Array(ids) if !ids.is_empty() => token_ids(counter, ids, &item_at)?,
                    Value::Array(_) => return Err(item_at.error(Some(item), ShapeProblem::Empty)),
                    other => return Err(wrong(other, &item_at)),
                }
            }
        }
        other => return Err(wrong(other, at)),
    }
    Ok(())
}

/// Token ids: one token each, and each must be a token id (a whole number ≥ 0).
fn token_ids(counter: &mut Counter<'_>, ids: &[Value], at: &At<'_>) -> Result<(), ShapeError> {
    if let Some(i) = ids.iter().position(|id| !id.is_u64()) {
        return Err(at.index(i).error(
            Some(&ids[i]),
            ShapeProblem::WrongType {
                expected: "a token id (a whole number, at least 0)",
            },
        ));
    }
    counter.add(ids.len() as u64);
    Ok(())
}
