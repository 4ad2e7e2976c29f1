//! The running count of one request's input tokens, and the pieces every request
//! shape is made of: text, images, audio, files, JSON definitions.

use serde_json::Value;

use super::error::{At, ShapeError, ShapeProblem};
use super::fields::{optional_str, required_str};
use super::image::{data_url_size, image_tokens, ImageDetail};
use super::EstimateOptions;

/// OpenAI's published chat framing ("How to count tokens with tiktoken"): every
/// message costs 3 tokens besides its text, a `name` 1 more, and the reply is primed
/// with 3.
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Tokens a message's `name` costs besides its text.
pub const TOKENS_PER_NAME: u64 = 1;
/// Tokens that prime the reply, once per request.
pub const REPLY_PRIMING: u64 = 3;
/// Tokens a tool call in an assistant message costs besides its name and arguments
/// (the same framing as a message: OpenAI publishes none for calls).
pub const TOKENS_PER_TOOL_CALL: u64 = 3;

/// Input tokens counted so far, with the model's options.
pub(crate) struct Counter<'o> {
    pub(crate) options: &'o EstimateOptions,
    pub(crate) total: u64,
}

impl<'o> Counter<'o> {
    pub(crate) fn new(options: &'o EstimateOptions) -> Self {
        Counter { options, total: 0 }
    }

    pub(crate) fn add(&mut self, tokens: u64) {
        self.total = self.total.saturating_add(tokens);
    }

    /// Text, with the model's encoding.
    pub(crate) fn text(&mut self, text: &str) {
        self.add(self.options.tokenizer.count(text) as u64);
    }

    /// A definition sent as JSON (a tool, a response schema): the tokens of its compact
    /// JSON text. OpenAI renders definitions more tersely than JSON, so this is above
    /// what it bills.
    pub(crate) fn json(&mut self, value: &Value) {
        self.text(&value.to_string());
    }

    /// Every string inside `value` (an item whose rendering is not published).
    pub(crate) fn strings(&mut self, value: &Value) {
        match value {
            Value::String(s) => self.text(s),
            Value::Array(items) => items.iter().for_each(|v| self.strings(v)),
            Value::Object(fields) => fields.values().for_each(|v| self.strings(v)),
            _ => {}
        }
    }

    /// One image at `url` (`None`: a file id) with its `detail` (at `at.detail`): the
    /// policy's `image_tokens`, else the tile rule with the size read from a data URL,
    /// else the worst case for its detail.
    pub(crate) fn image(
        &mut self,
        url: Option<&str>,
        detail: Option<&Value>,
        at: &At<'_>,
    ) -> Result<(), ShapeError> {
        let detail_at = at.key("detail");
        let detail = match optional_str(detail, &detail_at)? {
            None | Some("auto") => ImageDetail::Auto,
            Some("low") => ImageDetail::Low,
            Some("high") => ImageDetail::High,
            Some(_) => {
                return Err(detail_at.error(
                    detail,
                    ShapeProblem::UnknownType {
                        known: "low, high, auto",
                    },
                ))
            }
        };
        let tokens = match self.options.image_tokens {
            Some(fixed) => u64::from(fixed),
            None => image_tokens(
                url.and_then(data_url_size),
                detail,
                self.options.image_rates,
            ),
        };
        self.add(tokens);
        Ok(())
    }

    /// One audio input: the policy's `audio_tokens`, or it cannot be estimated.
    pub(crate) fn audio(&mut self, part: &Value, at: &At<'_>) -> Result<(), ShapeError> {
        let tokens = self.options.audio_tokens.ok_or_else(|| {
            at.error(
                Some(part),
                ShapeProblem::CannotEstimate {
                    why: "audio input has no token estimate; set `audio_tokens` on the model in the policy",
                },
            )
        })?;
        self.add(u64::from(tokens));
        Ok(())
    }

    /// One attached file: the policy's `file_tokens`, or it cannot be estimated.
    pub(crate) fn file(&mut self, part: &Value, at: &At<'_>) -> Result<(), ShapeError> {
        let tokens = self.options.file_tokens.ok_or_else(|| {
            at.error(
                Some(part),
                ShapeProblem::CannotEstimate {
                    why: "a file has no token estimate; set `file_tokens` on the model in the policy",
                },
            )
        })?;
        self.add(u64::from(tokens));
        Ok(())
    }

    /// Content that is a string or an array of parts (at `at`), each part counted by
    /// `part`; absent or `null` only where `optional`.
    pub(crate) fn content(
        &mut self,
        value: Option<&Value>,
        at: &At<'_>,
        optional: bool,
        part: fn(&mut Counter<'_>, &Value, &At<'_>) -> Result<(), ShapeError>,
    ) -> Result<(), ShapeError> {
        match value {
            None | Some(Value::Null) if optional => Ok(()),
            Some(Value::String(text)) => {
                self.text(text);
                Ok(())
            }
            Some(Value::Array(parts)) => {
                for (p, item) in parts.iter().enumerate() {
                    part(self, item, &at.index(p))?;
                }
                Ok(())
            }
            other => Err(at.error(
                other,
                ShapeProblem::WrongType {
                    expected: "a string or an array of content parts",
                },
            )),
        }
    }

    /// A tool call's name and arguments (or a custom tool's input), plus its framing.
    pub(crate) fn tool_call(&mut self, call: &Value, at: &At<'_>) -> Result<(), ShapeError> {
        self.add(TOKENS_PER_TOOL_CALL);
        self.text(required_str(call.get("name"), &at.key("name"))?);
        for key in ["arguments", "input"] {
            if let Some(text) = optional_str(call.get(key), &at.key(key))? {
                self.text(text);
            }
        }
        Ok(())
    }

    /// Tool (function) definitions at `key` of the body: each the tokens of its JSON.
    pub(crate) fn tools(&mut self, body: &Value, key: &str) -> Result<(), ShapeError> {
        match body.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(Value::Array(tools)) => {
                tools.iter().for_each(|tool| self.json(tool));
                Ok(())
            }
            Some(other) => Err(At::root(key).error(
                Some(other),
                ShapeProblem::WrongType {
                    expected: "an array of tool definitions",
                },
            )),
        }
    }

    /// The total as a `u32`, saturated: a body too big to count is held as the most
    /// there is, which every token limit refuses.
    pub(crate) fn tokens(&self) -> u32 {
        u32::try_from(self.total).unwrap_or(u32::MAX)
    }
}
