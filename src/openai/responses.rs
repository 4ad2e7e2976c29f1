//! The Responses API (`POST /v1/responses`): `instructions`, `input` as text or items,
//! tool definitions, a text format's schema; `max_output_tokens`.

use serde_json::Value;

use super::count::{Counter, REPLY_PRIMING, TOKENS_PER_MESSAGE};
use super::error::{At, ShapeError, ShapeProblem};
use super::fields::{object, optional_str, output_limit, required_str};
use super::{Estimate, EstimateOptions};

/// Estimate a Responses API body.
///
/// Input: `instructions` as a system message and `input` (a string as one user
/// message; items: messages framed as chat messages, function calls and their
/// outputs, other items by every text in them), with the chat framing; tools and a
/// `json_schema` text format by their JSON. A conversation stored upstream
/// (`previous_response_id`, `conversation`, `item_reference`, a stored `prompt`) cannot
/// be sized here and is a [`ShapeProblem::CannotEstimate`]. Output: `max_output_tokens`,
/// one output.
pub fn estimate_responses(body: &Value, options: &EstimateOptions) -> Result<Estimate, ShapeError> {
    object(body)?;
    for key in ["previous_response_id", "conversation", "prompt"] {
        if let Some(value) = body.get(key).filter(|v| !v.is_null()) {
            return Err(At::root(key).error(
                Some(value),
                ShapeProblem::CannotEstimate {
                    why: "input stored upstream cannot be counted before the call",
                },
            ));
        }
    }
    let max_output_tokens = output_limit(body, &["max_output_tokens"])?;
    let mut counter = Counter::new(options);
    if let Some(instructions) = optional_str(body.get("instructions"), &At::root("instructions"))? {
        counter.add(TOKENS_PER_MESSAGE);
        counter.text("system");
        counter.text(instructions);
    }
    let at = At::root("input");
    match body.get("input") {
        Some(Value::String(text)) => {
            counter.add(TOKENS_PER_MESSAGE);
            counter.text("user");
            counter.text(text);
        }
        Some(Value::Array(items)) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                input_item(&mut counter, item, &at.index(i))?;
            }
        }
        Some(Value::Array(_)) => return Err(at.error(body.get("input"), ShapeProblem::Empty)),
        None | Some(Value::Null) => return Err(at.error(None, ShapeProblem::Missing)),
        Some(other) => {
            return Err(at.error(
                Some(other),
                ShapeProblem::WrongType {
                    expected: "a string or an array of input items",
                },
            ))
        }
    }
    counter.add(REPLY_PRIMING);
    counter.tools(body, "tools")?;
    if let Some(schema) = body.get("text").and_then(|t| t.get("format")) {
        if schema.get("type").and_then(Value::as_str) == Some("json_schema") {
            counter.json(schema);
        }
    }
    Ok(Estimate {
        input_tokens: counter.tokens(),
        max_output_tokens,
        outputs: 1,
    })
}

/// One input item.
fn input_item(counter: &mut Counter<'_>, item: &Value, at: &At<'_>) -> Result<(), ShapeError> {
    if !item.is_object() {
        return Err(at.error(
            Some(item),
            ShapeProblem::WrongType {
                expected: "an input item object",
            },
        ));
    }
    let kind = optional_str(item.get("type"), &at.key("type"))?;
    match kind {
        // A message: `type` is optional when `role` is given.
        None | Some("message") => message(counter, item, at),
        Some("function_call" | "custom_tool_call") => counter.tool_call(item, at),
        Some("function_call_output" | "custom_tool_call_output") => {
            counter.add(TOKENS_PER_MESSAGE);
            counter.content(item.get("output"), &at.key("output"), false, content_part)
        }
        Some("item_reference") => Err(at.error(
            Some(item),
            ShapeProblem::CannotEstimate {
                why: "an item stored upstream cannot be counted before the call",
            },
        )),
        // Reasoning, tool results of built-in tools and the like: OpenAI does not
        // publish how they are rendered; every text in them is counted.
        Some(_) => {
            counter.add(TOKENS_PER_MESSAGE);
            counter.strings(item);
            Ok(())
        }
    }
}

/// A message item: framing, role, content as text or parts.
fn message(counter: &mut Counter<'_>, item: &Value, at: &At<'_>) -> Result<(), ShapeError> {
    counter.add(TOKENS_PER_MESSAGE);
    counter.text(required_str(item.get("role"), &at.key("role"))?);
    counter.content(item.get("content"), &at.key("content"), false, content_part)
}

/// One content part of a message or a tool output.
fn content_part(counter: &mut Counter<'_>, part: &Value, at: &At<'_>) -> Result<(), ShapeError> {
    let kind = required_str(part.get("type"), &at.key("type"))?;
    match kind {
        "input_text" | "output_text" | "text" => {
            counter.text(required_str(part.get("text"), &at.key("text"))?);
        }
        "refusal" => counter.text(required_str(part.get("refusal"), &at.key("refusal"))?),
        "input_image" => {
            let url = optional_str(part.get("image_url"), &at.key("image_url"))?;
            counter.image(url, part.get("detail"), at)?;
        }
        "input_file" => counter.file(part, at)?,
        "input_audio" => counter.audio(part, at)?,
        _ => {
            return Err(at.key("type").error(
                part.get("type"),
                ShapeProblem::UnknownType {
                    known: "input_text, output_text, input_image, input_file, input_audio, refusal",
                },
            ))
        }
    }
    Ok(())
}
