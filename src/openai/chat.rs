//! Chat completions (`POST /v1/chat/completions`): messages with OpenAI's framing,
//! content parts, names, tool calls and results, tool definitions, `n` outputs.

use serde_json::Value;

use super::count::{Counter, REPLY_PRIMING, TOKENS_PER_MESSAGE, TOKENS_PER_NAME};
use super::error::{At, ShapeError, ShapeProblem};
use super::fields::{count, object, optional_str, output_limit, required_str};
use super::{Estimate, EstimateOptions};

/// Most outputs a chat request may ask for (OpenAI's range for `n` is 1..=128).
pub const MAX_N: u64 = 128;

/// Estimate a chat completion body.
///
/// Input: per message 3 tokens + its role + its text (every text part, a refusal, the
/// tool-call id of a tool result) + its name (+1) + its tool calls (name, arguments,
/// +3 each); images by the tile rule; 3 to prime the reply; tool and function
/// definitions and a `json_schema` response format by the tokens of their JSON.
/// Output: the larger of `max_tokens` and `max_completion_tokens` per output, `n`
/// outputs.
///
/// ```
/// use serde_json::json;
/// use tollgate::openai::{estimate_chat, EstimateOptions};
///
/// let body = json!({
///     "model": "gpt-4o",
///     "n": 2,
///     "max_completion_tokens": 100,
///     "messages": [{"role": "user", "content": "Hello"}],
/// });
/// let estimate = estimate_chat(&body, &EstimateOptions::for_model("gpt-4o"))?;
/// // 3 framing + "user" (1) + "Hello" (1) + 3 priming
/// assert_eq!(estimate.input_tokens, 8);
/// assert_eq!((estimate.max_output_tokens, estimate.outputs), (Some(100), 2));
/// # Ok::<(), tollgate::openai::ShapeError>(())
/// ```
pub fn estimate_chat(body: &Value, options: &EstimateOptions) -> Result<Estimate, ShapeError> {
    object(body)?;
    let at = At::root("messages");
    let messages = match body.get("messages") {
        Some(Value::Array(messages)) if messages.is_empty() => {
            return Err(at.error(body.get("messages"), ShapeProblem::Empty))
        }
        Some(Value::Array(messages)) => messages,
        other => {
            return Err(at.error(
                other,
                match other {
                    None => ShapeProblem::Missing,
                    Some(_) => ShapeProblem::WrongType {
                        expected: "an array of messages",
                    },
                },
            ))
        }
    };
    let max_output_tokens = output_limit(body, &["max_tokens", "max_completion_tokens"])?;
    let outputs = count(body, "n", 1, MAX_N)?.unwrap_or(1);

    let mut counter = Counter::new(options);
    for (i, message) in messages.iter().enumerate() {
        chat_message(&mut counter, message, &at.index(i))?;
    }
    counter.add(REPLY_PRIMING);
    counter.tools(body, "tools")?;
    counter.tools(body, "functions")?;
    response_format(&mut counter, body)?;
    Ok(Estimate {
        input_tokens: counter.tokens(),
        max_output_tokens,
        outputs: u32::try_from(outputs).unwrap_or(1),
    })
}

/// One message: framing, role, content, name, tool calls.
fn chat_message(counter: &mut Counter<'_>, message: &Value, at: &At<'_>) -> Result<(), ShapeError> {
    if !message.is_object() {
        return Err(at.error(
            Some(message),
            ShapeProblem::WrongType {
                expected: "a message object",
            },
        ));
    }
    counter.add(TOKENS_PER_MESSAGE);
    counter.text(required_str(message.get("role"), &at.key("role"))?);
    counter.content(
        message.get("content"),
        &at.key("content"),
        true,
        content_part,
    )?;
    if let Some(name) = optional_str(message.get("name"), &at.key("name"))? {
        counter.add(TOKENS_PER_NAME);
        counter.text(name);
    }
    for key in ["refusal", "tool_call_id"] {
        if let Some(text) = optional_str(message.get(key), &at.key(key))? {
            counter.text(text);
        }
    }
    let calls_at = at.key("tool_calls");
    match message.get("tool_calls") {
        None | Some(Value::Null) => {}
        Some(Value::Array(calls)) => {
            for (c, call) in calls.iter().enumerate() {
                let call_at = calls_at.index(c);
                // A function call has `function`; a custom tool's call has `custom`.
                let inner = call.get("function").or_else(|| call.get("custom"));
                match inner {
                    Some(inner) if inner.is_object() => counter.tool_call(inner, &call_at)?,
                    other => {
                        return Err(call_at.key("function").error(
                            other,
                            ShapeProblem::WrongType {
                                expected: "an object with `name` and `arguments`",
                            },
                        ))
                    }
                }
            }
        }
        Some(other) => {
            return Err(calls_at.error(
                Some(other),
                ShapeProblem::WrongType {
                    expected: "an array of tool calls",
                },
            ))
        }
    }
    // The legacy single `function_call` of an assistant message.
    if let Some(call) = message.get("function_call").filter(|c| !c.is_null()) {
        counter.tool_call(call, &at.key("function_call"))?;
    }
    if let Some(audio) = message.get("audio").filter(|a| !a.is_null()) {
        // A reference to an earlier audio answer: sized only by the policy.
        counter.audio(audio, &at.key("audio"))?;
    }
    Ok(())
}

/// One part of a message's content array.
fn content_part(counter: &mut Counter<'_>, part: &Value, at: &At<'_>) -> Result<(), ShapeError> {
    let kind = required_str(part.get("type"), &at.key("type"))?;
    match kind {
        "text" => counter.text(required_str(part.get("text"), &at.key("text"))?),
        "refusal" => counter.text(required_str(part.get("refusal"), &at.key("refusal"))?),
        "image_url" => {
            let image_at = at.key("image_url");
            let image = part.get("image_url");
            let (url, detail) = match image {
                Some(Value::String(url)) => (url.as_str(), None),
                Some(image @ Value::Object(_)) => (
                    required_str(image.get("url"), &image_at.key("url"))?,
                    image.get("detail"),
                ),
                other => {
                    return Err(image_at.error(
                        other,
                        ShapeProblem::WrongType {
                            expected: "an object with `url`",
                        },
                    ))
                }
            };
            counter.image(Some(url), detail, &image_at)?;
        }
        "input_audio" => counter.audio(part, at)?,
        "file" => counter.file(part, at)?,
        _ => {
            return Err(at.key("type").error(
                part.get("type"),
                ShapeProblem::UnknownType {
                    known: "text, image_url, input_audio, file, refusal",
                },
            ))
        }
    }
    Ok(())
}

/// A `json_schema` response format is given to the model: its schema's JSON counts.
fn response_format(counter: &mut Counter<'_>, body: &Value) -> Result<(), ShapeError> {
    match body.get("response_format") {
        None | Some(Value::Null) => Ok(()),
        Some(format) if format.is_object() => {
            if let Some(schema) = format.get("json_schema") {
                counter.json(schema);
            }
            Ok(())
        }
        Some(other) => Err(At::root("response_format").error(
            Some(other),
            ShapeProblem::WrongType {
                expected: "an object",
            },
        )),
    }
}
