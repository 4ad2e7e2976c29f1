//! `tollgate::openai`: input estimates of OpenAI bodies against tiktoken-rs and
//! OpenAI's published framing, on a generated corpus of 250 chat requests (plain,
//! content parts, tools, multilingual, code); the framing on OpenAI's cookbook example;
//! images against the documented tile examples; every bad shape a typed error naming
//! its field; `n` held as n outputs; the policy's per-model tokenizer and values.

use base64::Engine as _;
use serde_json::{json, Value};
use tiktoken_rs::{num_tokens_from_messages, ChatCompletionRequestMessage, CoreBPE};
use tollgate::openai::{
    self, estimate_chat, estimate_completions, estimate_embeddings, estimate_responses, Endpoint,
    EstimateOptions, ShapeProblem, Tokenizer,
};
use tollgate::{Credential, Engine, KeySpec, Policy};

// ---------------------------------------------------------------------------------
// The reference: tiktoken-rs directly, and OpenAI's published framing

/// The encoding tiktoken-rs itself picks for a model.
fn bpe(model: &str) -> &'static CoreBPE {
    tiktoken_rs::bpe_for_model(model).expect("tiktoken knows the model")
}

fn tokens(model: &str, text: &str) -> u64 {
    bpe(model).encode_ordinary(text).len() as u64
}

/// OpenAI's cookbook rule ("How to count tokens with tiktoken"): 3 per message, every
/// string field of it encoded, +1 for a name, 3 to prime the reply. Written here from
/// the rule, not from the library: content parts count their texts, images their
/// documented price (`low`: 85, 2833 on GPT-4o mini), tool calls their name and arguments (+3 each), tool
/// definitions the tokens of their JSON.
fn reference(model: &str, body: &Value) -> u64 {
    let mut total = 3; // reply priming
    for message in body["messages"].as_array().unwrap() {
        total += 3;
        for (key, value) in message.as_object().unwrap() {
            match (key.as_str(), value) {
                ("name", Value::String(name)) => total += 1 + tokens(model, name),
                (_, Value::String(text)) => total += tokens(model, text),
                ("content", Value::Array(parts)) => {
                    for part in parts {
                        match part["type"].as_str().unwrap() {
                            "text" => total += tokens(model, part["text"].as_str().unwrap()),
                            "image_url" => {
                                assert_eq!(part["image_url"]["detail"], "low");
                                // OpenAI's vision pricing: 85 tokens a low-detail image,
                                // 2833 on GPT-4o mini.
                                total += if model.starts_with("gpt-4o-mini") {
                                    2833
                                } else {
                                    85
                                };
                            }
                            other => panic!("corpus has no {other} parts"),
                        }
                    }
                }
                ("tool_calls", Value::Array(calls)) => {
                    for call in calls {
                        let function = &call["function"];
                        total += 3
                            + tokens(model, function["name"].as_str().unwrap())
                            + tokens(model, function["arguments"].as_str().unwrap());
                    }
                }
                _ => {}
            }
        }
    }
    if let Some(tools) = body["tools"].as_array() {
        for tool in tools {
            total += tokens(model, &tool.to_string());
        }
    }
    total
}

// ---------------------------------------------------------------------------------
// The corpus: deterministic, 50 requests of each kind

/// A small deterministic generator (64-bit LCG, Knuth's constants).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
    /// `min` to `min + spread - 1` words.
    fn sentence(&mut self, words: &[&str], min: usize, spread: usize) -> String {
        let len = min + self.below(spread);
        (0..len)
            .map(|_| self.pick(words))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

const ENGLISH: &[&str] = &[
    "the",
    "budget",
    "gateway",
    "limits",
    "every",
    "request",
    "quickly",
    "model",
    "token",
    "streams",
    "answer",
    "provider",
    "reserve",
    "commit",
    "refund",
    "workspace",
    "tenant",
    "latency",
    "throughput",
    "policy",
    "careful",
    "estimate",
    "prompt",
    "hello,",
    "world.",
    "Why?",
    "billing",
    "rate",
    "minute",
    "overshoot",
    "cache",
    "users",
    "explain",
    "summary",
];

const MULTILINGUAL: &[&str] = &[
    "Grüße aus München, schöne Straße",
    "El niño comió paella en la playa",
    "Это предложение написано по-русски",
    "これは日本語の文章です。",
    "这是一个用中文写的句子。",
    "هذه جملة باللغة العربية",
    "यह हिंदी में लिखा गया वाक्य है",
    "Ελληνικά γράμματα και λέξεις",
    "한국어 문장도 있습니다",
    "Café, naïve, façade, coöperate",
    "emoji 🎉🚀✨ and 👩‍💻 zwj",
    "Türkçe karakterler: ğüşöçı",
];

const CODE: &[&str] = &[
    "fn main() {\n    println!(\"Hello, world!\");\n}\n",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "SELECT id, name FROM users WHERE created_at > NOW() - INTERVAL '1 day';",
    "const add = (a, b) => a + b;\nexport default add;\n",
    "{\"key\": [1, 2, 3], \"nested\": {\"ok\": true, \"pi\": 3.14159}}",
    "#include <stdio.h>\nint main(void) { return printf(\"%d\\n\", 42) < 0; }\n",
    "for i in $(seq 1 10); do echo \"line $i\"; done | grep -v 3",
    "impl<T: Clone> Stack<T> {\n    fn push(&mut self, x: T) { self.items.push(x) }\n}\n",
    "    if (x != null && x.length > 0) {\n        return x.map(y => y * 2);\n    }\n",
];

const MODELS: &[&str] = &["gpt-4o", "gpt-4o-mini", "gpt-4", "gpt-3.5-turbo", "gpt-4.1"];

fn plain(r: &mut Lcg) -> Value {
    let mut messages = vec![json!({"role": "system", "content": r.sentence(ENGLISH, 8, 20)})];
    for turn in 0..1 + r.below(5) {
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        let mut message = json!({"role": role, "content": r.sentence(ENGLISH, 5, 60)});
        if r.below(3) == 0 {
            message["name"] = json!(r.pick(&["alice", "bob_2", "example_user", "Zoë"]));
        }
        messages.push(message);
    }
    json!({"messages": messages})
}

fn content_parts(r: &mut Lcg) -> Value {
    let parts: Vec<Value> = (0..2 + r.below(4))
        .map(|_| {
            if r.below(4) == 0 {
                json!({"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}})
            } else {
                json!({"type": "text", "text": r.sentence(ENGLISH, 3, 40)})
            }
        })
        .collect();
    json!({"messages": [
        {"role": "system", "content": [{"type": "text", "text": r.sentence(ENGLISH, 10, 1)}]},
        {"role": "user", "content": parts},
    ]})
}

fn tools(r: &mut Lcg) -> Value {
    let city = r.pick(&["Paris", "Zürich", "東京", "São Paulo"]);
    json!({
        "tools": [
            {"type": "function", "function": {
                "name": "get_weather",
                "description": r.sentence(ENGLISH, 6, 10),
                "parameters": {"type": "object", "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["c", "f"]}},
                    "required": ["city"]}}},
            {"type": "function", "function": {
                "name": "search_docs",
                "description": r.sentence(ENGLISH, 4, 8),
                "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}},
        ],
        "messages": [
            {"role": "user", "content": format!("{} {city}?", r.sentence(ENGLISH, 6, 30))},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": format!("call_{}", r.next()), "type": "function",
                 "function": {"name": "get_weather", "arguments": format!("{{\"city\":\"{city}\",\"unit\":\"c\"}}")}}]},
            {"role": "tool", "tool_call_id": format!("call_{}", r.next()),
             "content": format!("{{\"temperature\": {}, \"sky\": \"clear\"}}", r.below(40))},
        ],
    })
}

fn multilingual(r: &mut Lcg) -> Value {
    let text = (0..2 + r.below(6))
        .map(|_| r.pick(MULTILINGUAL))
        .collect::<Vec<_>>()
        .join(" ");
    json!({"messages": [
        {"role": "system", "content": "Translate into English."},
        {"role": "user", "content": text},
    ]})
}

fn code(r: &mut Lcg) -> Value {
    let text = (0..1 + r.below(4))
        .map(|_| r.pick(CODE))
        .collect::<Vec<_>>()
        .join("\n");
    json!({"messages": [
        {"role": "system", "content": "You review code."},
        {"role": "user", "content": format!("Review this:\n```\n{text}\n```")},
    ]})
}

/// Makes one request of a kind.
type Make = fn(&mut Lcg) -> Value;

/// 250 requests, 50 of each kind, each with its model.
fn corpus() -> Vec<(&'static str, &'static str, Value)> {
    let mut r = Lcg(0x7011_6a7e);
    let kinds: [(&str, Make); 5] = [
        ("plain", plain),
        ("content parts", content_parts),
        ("tools", tools),
        ("multilingual", multilingual),
        ("code", code),
    ];
    let mut requests = Vec::new();
    for i in 0..50 {
        for (kind, make) in kinds {
            let model = MODELS[(i + requests.len()) % MODELS.len()];
            let mut body = make(&mut r);
            body["model"] = json!(model);
            requests.push((kind, model, body));
        }
    }
    requests
}

#[test]
fn the_corpus_is_estimated_within_two_percent_of_tiktoken_and_the_framing() {
    let corpus = corpus();
    assert_eq!(corpus.len(), 250);
    let mut worst: f64 = 0.0;
    for (kind, model, body) in &corpus {
        let estimate = estimate_chat(body, &EstimateOptions::for_model(model))
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        let expected = reference(model, body);
        let got = u64::from(estimate.input_tokens);
        let error = (got as f64 - expected as f64).abs() / expected as f64;
        worst = worst.max(error);
        assert!(
            error <= 0.02,
            "{kind} on {model}: estimate {got}, reference {expected}: {body}"
        );
    }
    println!(
        "worst relative error over {} requests: {worst}",
        corpus.len()
    );
}

/// Plain messages (string content, names) against tiktoken-rs's own implementation of
/// the cookbook's rule, `num_tokens_from_messages`: exactly equal.
#[test]
fn plain_messages_match_tiktoken_rs_num_tokens_from_messages() {
    let mut r = Lcg(42);
    for i in 0..100 {
        let model = MODELS[i % MODELS.len()];
        let body = if i % 3 == 0 {
            multilingual(&mut r)
        } else {
            plain(&mut r)
        };
        let messages: Vec<ChatCompletionRequestMessage> = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatCompletionRequestMessage {
                role: m["role"].as_str().unwrap().to_owned(),
                content: m["content"].as_str().map(str::to_owned),
                name: m["name"].as_str().map(str::to_owned),
                ..Default::default()
            })
            .collect();
        let oracle = num_tokens_from_messages(model, &messages).unwrap();
        let estimate = estimate_chat(&body, &EstimateOptions::for_model(model)).unwrap();
        assert_eq!(estimate.input_tokens as usize, oracle, "{model}: {body}");
    }
}

/// OpenAI's cookbook example: 129 prompt tokens on gpt-4 (cl100k_base) and 124 on
/// gpt-4o (o200k_base), as the API reported.
#[test]
fn the_framing_rule_on_openais_cookbook_example() {
    let body = json!({"messages": [
        {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
        {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
        {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
        {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
    ]});
    let count = |model| {
        estimate_chat(&body, &EstimateOptions::for_model(model))
            .unwrap()
            .input_tokens
    };
    assert_eq!(count("gpt-4-0613"), 129);
    assert_eq!(count("gpt-3.5-turbo-0125"), 129);
    assert_eq!(count("gpt-4o"), 124);
    assert_eq!(count("gpt-4o-mini"), 124);

    // One message: 3 + "user" + "Hello" + 3; a name adds 1 and its own tokens.
    let o200k = EstimateOptions::for_model("gpt-4o");
    let hello = json!({"messages": [{"role": "user", "content": "Hello"}]});
    assert_eq!(estimate_chat(&hello, &o200k).unwrap().input_tokens, 8);
    let named = json!({"messages": [{"role": "user", "name": "bob", "content": "Hello"}]});
    assert_eq!(
        estimate_chat(&named, &o200k).unwrap().input_tokens,
        8 + 1 + 1
    );
    // Each further message: 3 + role + text.
    let two = json!({"messages": [{"role": "user", "content": "Hello"},
                                  {"role": "assistant", "content": "Hello"}]});
    assert_eq!(
        estimate_chat(&two, &o200k).unwrap().input_tokens,
        8 + 3 + 1 + 1
    );
}

#[test]
fn content_parts_tools_and_tool_calls_are_all_counted() {
    let o200k = EstimateOptions::for_model("gpt-4o");
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let as_string = json!({"messages": [{"role": "user", "content": text}]});
    let as_parts = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": text}]}]});
    let string = estimate_chat(&as_string, &o200k).unwrap().input_tokens;
    assert!(string > 400, "{string}");
    // The issue's attack: parts used to count as 4 tokens.
    assert_eq!(
        estimate_chat(&as_parts, &o200k).unwrap().input_tokens,
        string
    );

    let with_tools = json!({"messages": [{"role": "user", "content": "Hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "description": text}}]});
    let without = json!({"messages": [{"role": "user", "content": "Hi"}]});
    let difference = estimate_chat(&with_tools, &o200k).unwrap().input_tokens
        - estimate_chat(&without, &o200k).unwrap().input_tokens;
    assert!(difference > 400, "tools counted {difference}");

    let call = json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": text}}]}]});
    assert!(estimate_chat(&call, &o200k).unwrap().input_tokens > 400);
}

// ---------------------------------------------------------------------------------
// Images

/// A data URL of a PNG `width` × `height` (its header is all the estimate reads).
fn png(width: u32, height: u32) -> String {
    let mut bytes = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
    bytes.extend_from_slice(&width.to_be_bytes());
    bytes.extend_from_slice(&height.to_be_bytes());
    bytes.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn image_body(url: &str, detail: &str) -> Value {
    json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url, "detail": detail}}]}]})
}

/// Tokens of the image alone: the body's estimate less one empty-content message.
fn image_cost(model: &str, url: &str, detail: &str) -> u32 {
    let options = EstimateOptions::for_model(model);
    let framing = estimate_chat(
        &json!({"messages": [{"role": "user", "content": []}]}),
        &options,
    )
    .unwrap()
    .input_tokens;
    estimate_chat(&image_body(url, detail), &options)
        .unwrap()
        .input_tokens
        - framing
}

#[test]
fn images_follow_openais_documented_tile_examples() {
    assert_eq!(openai::data_url_size(&png(1024, 1024)), Some((1024, 1024)));
    // OpenAI's examples: 1024 × 1024 high is 765; 2048 × 4096 high is 1105;
    // 4096 × 8192 low is 85.
    assert_eq!(image_cost("gpt-4o", &png(1024, 1024), "high"), 765);
    assert_eq!(image_cost("gpt-4o", &png(2048, 4096), "high"), 1105);
    assert_eq!(image_cost("gpt-4o", &png(4096, 8192), "low"), 85);
    // `auto` is held as `high`.
    assert_eq!(image_cost("gpt-4o", &png(1024, 1024), "auto"), 765);
    // A size the request does not show: the most any image costs at its detail.
    assert_eq!(
        image_cost("gpt-4o", "https://example.com/a.png", "high"),
        1445
    );
    assert_eq!(image_cost("gpt-4o", "https://example.com/a.png", "low"), 85);
    // GPT-4o mini's rates: 2833 + 5667 per tile.
    assert_eq!(image_cost("gpt-4o-mini", &png(512, 512), "low"), 2833);
    assert_eq!(
        image_cost("gpt-4o-mini", &png(512, 512), "high"),
        2833 + 5667
    );
    // A JPEG's size is read from its frame header.
    let jpeg = {
        let mut b = vec![0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08];
        b.extend_from_slice(&768u16.to_be_bytes()); // height
        b.extend_from_slice(&2048u16.to_be_bytes()); // width
        b.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1, 0xFF, 0xD9]);
        format!(
            "data:image/jpeg;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(b)
        )
    };
    assert_eq!(openai::data_url_size(&jpeg), Some((2048, 768)));
    assert_eq!(image_cost("gpt-4o", &jpeg, "high"), 85 + 8 * 170);
}

#[test]
fn a_policy_value_prices_images_audio_and_files() {
    let policy = policy_with(
        r#"
        image_tokens = 1000
        audio_tokens = 300
        file_tokens = 5000
        "#,
    );
    let options = EstimateOptions::from_policy(&policy, "gpt-4o");
    let framing = 3 + 1 + 3;
    let image = image_body("https://example.com/a.png", "high");
    assert_eq!(
        estimate_chat(&image, &options).unwrap().input_tokens,
        framing + 1000
    );
    let audio = json!({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]});
    assert_eq!(
        estimate_chat(&audio, &options).unwrap().input_tokens,
        framing + 300
    );
    let file = json!({"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "file-1"}}]}]});
    assert_eq!(
        estimate_chat(&file, &options).unwrap().input_tokens,
        framing + 5000
    );

    // Without the policy values, audio and files cannot be estimated: a typed error.
    let defaults = EstimateOptions::for_model("gpt-4o");
    for (body, field) in [
        (&audio, "messages[0].content[0]"),
        (&file, "messages[0].content[0]"),
    ] {
        let err = estimate_chat(body, &defaults).unwrap_err();
        assert!(err.is_cannot_estimate(), "{err}");
        assert_eq!(err.field, field);
    }
}

// ---------------------------------------------------------------------------------
// Bad shapes

#[test]
fn every_bad_shape_is_a_typed_error_naming_its_field() {
    let options = EstimateOptions::for_model("gpt-4o");
    let hello = json!([{"role": "user", "content": "Hello"}]);
    let cases: Vec<(Value, &str, ShapeProblem)> = vec![
        (
            json!({"messages": hello, "max_tokens": -1}),
            "max_tokens",
            ShapeProblem::Negative,
        ),
        (
            json!({"messages": hello, "max_tokens": 1.5}),
            "max_tokens",
            ShapeProblem::NotWhole,
        ),
        (
            json!({"messages": hello, "max_tokens": -2.5}),
            "max_tokens",
            ShapeProblem::NotWhole,
        ),
        (
            json!({"messages": hello, "max_tokens": "100"}),
            "max_tokens",
            ShapeProblem::WrongType {
                expected: "a whole number",
            },
        ),
        (
            json!({"messages": hello, "max_tokens": 0}),
            "max_tokens",
            ShapeProblem::OutOfRange {
                min: 1,
                max: u64::from(u32::MAX),
            },
        ),
        (
            json!({"messages": hello, "max_completion_tokens": 5_000_000_000u64}),
            "max_completion_tokens",
            ShapeProblem::OutOfRange {
                min: 1,
                max: u64::from(u32::MAX),
            },
        ),
        (
            json!({"messages": "Hello"}),
            "messages",
            ShapeProblem::WrongType {
                expected: "an array of messages",
            },
        ),
        (
            json!({"model": "gpt-4o"}),
            "messages",
            ShapeProblem::Missing,
        ),
        (json!({"messages": []}), "messages", ShapeProblem::Empty),
        (
            json!({"messages": hello, "n": 0}),
            "n",
            ShapeProblem::OutOfRange { min: 1, max: 128 },
        ),
        (
            json!({"messages": hello, "n": 129}),
            "n",
            ShapeProblem::OutOfRange { min: 1, max: 128 },
        ),
        (
            json!({"messages": hello, "n": -3}),
            "n",
            ShapeProblem::Negative,
        ),
        (
            json!({"messages": hello, "n": 2.5}),
            "n",
            ShapeProblem::NotWhole,
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}),
            "messages[0].content[0].type",
            ShapeProblem::UnknownType {
                known: "text, image_url, input_audio, file, refusal",
            },
        ),
        (
            json!({"messages": [{"role": "user", "content": 42}]}),
            "messages[0].content",
            ShapeProblem::WrongType {
                expected: "a string or an array of content parts",
            },
        ),
        (
            json!({"messages": [{"content": "Hello"}]}),
            "messages[0].role",
            ShapeProblem::Missing,
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]}),
            "messages[0].content[0].text",
            ShapeProblem::WrongType {
                expected: "a string",
            },
        ),
        (
            json!({"messages": hello, "tools": {"type": "function"}}),
            "tools",
            ShapeProblem::WrongType {
                expected: "an array of tool definitions",
            },
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url",
                "image_url": {"url": "https://x/y.png", "detail": "ultra"}}]}]}),
            "messages[0].content[0].image_url.detail",
            ShapeProblem::UnknownType {
                known: "low, high, auto",
            },
        ),
        (
            json!([1, 2]),
            "body",
            ShapeProblem::WrongType {
                expected: "a JSON object",
            },
        ),
    ];
    for (body, field, problem) in cases {
        let err = estimate_chat(&body, &options).expect_err(&body.to_string());
        assert_eq!(
            (err.field.as_str(), &err.problem),
            (field, &problem),
            "{body}"
        );
        assert!(err.to_string().contains(field), "{err}");
        assert!(!err.is_cannot_estimate());
    }
    // `null` is "not set", as OpenAI reads it.
    let nulls = json!({"messages": hello, "max_tokens": null, "n": null});
    let estimate = estimate_chat(&nulls, &options).unwrap();
    assert_eq!((estimate.max_output_tokens, estimate.outputs), (None, 1));
    // A whole number written as a float is a whole number.
    let float = json!({"messages": hello, "max_tokens": 100.0});
    assert_eq!(
        estimate_chat(&float, &options).unwrap().max_output_tokens,
        Some(100)
    );
    // An error echoes at most 80 characters of the value.
    let long = json!({"messages": [{"role": "user", "content": [{"type": "x".repeat(500)}]}]});
    assert!(estimate_chat(&long, &options).unwrap_err().value.len() < 100);
}

// ---------------------------------------------------------------------------------
// Outputs: n, limits, the hold

const SECRET: &str = "sk-openai-test";

fn policy_with(gpt_4o_extra: &str) -> Policy {
    Policy::from_toml_str(&format!(
        r#"
        [org]
        id = "acme"
        [defaults]
        max_output_tokens = 500
        [[models]]
        name = "gpt-4o"
        input_per_million = "2.50"
        output_per_million = "10.00"
        {gpt_4o_extra}
        [[workspaces]]
        id = "ws"
        name = "chat"
        models = ["gpt-4o"]
        [[keys]]
        id = "key"
        workspace = "ws"
        secret_sha256 = "{}"
        "#,
        KeySpec::digest_of(SECRET)
    ))
    .expect("valid policy")
}

#[test]
fn n_outputs_are_held_n_times_with_or_without_a_limit() {
    let engine = Engine::new(policy_with(""));
    let options = EstimateOptions::from_policy(&engine.policy(), "gpt-4o");
    let body = json!({"model": "gpt-4o", "n": 8, "max_tokens": 100,
                      "messages": [{"role": "user", "content": "Hello"}]});
    let estimate = estimate_chat(&body, &options).unwrap();
    let request = estimate.request(Credential::Secret(SECRET), "gpt-4o");
    assert_eq!(request.outputs, 8);
    let held = engine.check_and_reserve(&request).unwrap();
    assert_eq!(held.reserved_tokens(), (8, 800));
    drop(held);

    // No limit: the policy's default (500) for each of the 8, and the cap that goes
    // upstream is that default.
    let mut body = json!({"model": "gpt-4o", "n": 8,
                          "messages": [{"role": "user", "content": "Hello"}]});
    let estimate = estimate_chat(&body, &options).unwrap();
    let held = engine
        .check_and_reserve(&estimate.request(Credential::Secret(SECRET), "gpt-4o"))
        .unwrap();
    assert_eq!(held.reserved_tokens(), (8, 4000));
    let cap = openai::cap_output(
        &mut body,
        Endpoint::ChatCompletions,
        &estimate,
        held.reserved_tokens().1,
    );
    assert_eq!(cap, Some(500));
    assert_eq!(body["max_completion_tokens"], 500);

    // Both limits given: the larger is held; a client's own limit is left alone.
    let mut both = json!({"max_tokens": 10, "max_completion_tokens": 300,
                          "messages": [{"role": "user", "content": "Hi"}]});
    let estimate = estimate_chat(&both, &options).unwrap();
    assert_eq!(estimate.max_output_tokens, Some(300));
    let before = both.clone();
    assert_eq!(
        openai::cap_output(&mut both, Endpoint::ChatCompletions, &estimate, 300),
        Some(300)
    );
    assert_eq!(both, before);

    // Legacy completions without `max_tokens` are held at OpenAI's default, 16, and
    // that default is sent, so an upstream defaulting higher cannot produce more.
    let mut legacy = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Once", "n": 2});
    let estimate = openai::estimate(Endpoint::Completions, &legacy, &options).unwrap();
    assert_eq!(
        openai::cap_output(&mut legacy, Endpoint::Completions, &estimate, 32),
        Some(16)
    );
    assert_eq!(legacy["max_tokens"], 16);
}

// ---------------------------------------------------------------------------------
// Tokenizer choice

#[test]
fn the_policy_chooses_the_tokenizer_per_model() {
    let text = "这是一个用中文写的句子。Это предложение написано по-русски. ".repeat(20);
    let body = json!({"messages": [{"role": "user", "content": text}]});
    let default = EstimateOptions::from_policy(&policy_with(""), "gpt-4o");
    assert_eq!(default.tokenizer, Tokenizer::O200kBase);
    let overridden =
        EstimateOptions::from_policy(&policy_with(r#"tokenizer = "cl100k_base""#), "gpt-4o");
    assert_eq!(overridden.tokenizer, Tokenizer::Cl100kBase);
    let o200k = estimate_chat(&body, &default).unwrap().input_tokens;
    let cl100k = estimate_chat(&body, &overridden).unwrap().input_tokens;
    assert_eq!(u64::from(o200k), reference("gpt-4o", &body));
    assert_eq!(u64::from(cl100k), reference("gpt-4", &body));
    assert!(cl100k > o200k, "cl100k {cl100k} vs o200k {o200k}");
    // A model the table does not have: its name's defaults.
    assert_eq!(
        EstimateOptions::from_policy(&policy_with(""), "gpt-4-turbo").tokenizer,
        Tokenizer::Cl100kBase
    );
}

// ---------------------------------------------------------------------------------
// The other endpoints

#[test]
fn responses_embeddings_and_completions_are_estimated() {
    let o200k = EstimateOptions::for_model("gpt-4o");
    let t = |text: &str| tokens("gpt-4o", text) as u32;

    // Responses: instructions as a system message, input as a user message.
    let body = json!({"model": "gpt-4o", "instructions": "Be brief.", "input": "Hello there",
                      "max_output_tokens": 64});
    let estimate = estimate_responses(&body, &o200k).unwrap();
    assert_eq!(
        estimate.input_tokens,
        (3 + t("system") + t("Be brief.")) + (3 + t("user") + t("Hello there")) + 3
    );
    assert_eq!(
        (estimate.max_output_tokens, estimate.outputs),
        (Some(64), 1)
    );
    let items = json!({"input": [
        {"role": "user", "content": [{"type": "input_text", "text": "What is 2+2?"},
                                     {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"}]},
        {"type": "function_call", "call_id": "c1", "name": "add", "arguments": "{\"a\":2,\"b\":2}"},
        {"type": "function_call_output", "call_id": "c1", "output": "4"},
    ]});
    assert_eq!(
        estimate_responses(&items, &o200k).unwrap().input_tokens,
        (3 + t("user") + t("What is 2+2?") + 85)
            + (3 + t("add") + t("{\"a\":2,\"b\":2}"))
            + (3 + t("4"))
            + 3
    );
    let stored = json!({"input": "more", "previous_response_id": "resp_1"});
    let err = estimate_responses(&stored, &o200k).unwrap_err();
    assert!(err.is_cannot_estimate());
    assert_eq!(err.field, "previous_response_id");
    let err = estimate_responses(&json!({"input": 3}), &o200k).unwrap_err();
    assert_eq!(err.field, "input");
    let err =
        estimate_responses(&json!({"input": "x", "max_output_tokens": -5}), &o200k).unwrap_err();
    assert_eq!(
        (err.field.as_str(), err.problem),
        ("max_output_tokens", ShapeProblem::Negative)
    );

    // Embeddings: cl100k_base for text-embedding-3-*, token ids one each.
    let cl100k = EstimateOptions::for_model("text-embedding-3-small");
    let body = json!({"input": ["Hello world", "tollgate", [1, 2, 3]]});
    let estimate = estimate_embeddings(&body, &cl100k).unwrap();
    let c = |text: &str| tokens("gpt-4", text) as u32;
    assert_eq!(estimate.input_tokens, c("Hello world") + c("tollgate") + 3);
    assert_eq!(estimate.max_output_tokens, Some(0));
    for (bad, field) in [
        (json!({"input": []}), "input"),
        (json!({"input": ""}), "input"),
        (json!({"input": ["a", 5]}), "input[1]"),
        (json!({"input": [1, -2]}), "input[1]"),
        (json!({"input": {"text": "a"}}), "input"),
        (json!({}), "input"),
    ] {
        let err = estimate_embeddings(&bad, &cl100k).unwrap_err();
        assert_eq!(err.field, field, "{bad}");
    }

    // Legacy completions: OpenAI's default of 16 output tokens, max(n, best_of) outputs.
    let body = json!({"prompt": "Once upon a time", "n": 2, "best_of": 5});
    let estimate = estimate_completions(&body, &o200k).unwrap();
    assert_eq!(estimate.input_tokens, t("Once upon a time"));
    assert_eq!(
        (estimate.max_output_tokens, estimate.outputs),
        (Some(16), 5)
    );
    let err = estimate_completions(&json!({"prompt": "x", "best_of": 21.5}), &o200k).unwrap_err();
    assert_eq!(
        (err.field.as_str(), err.problem),
        ("best_of", ShapeProblem::NotWhole)
    );

    // One entry point for all four.
    for (path, endpoint) in [
        ("/v1/chat/completions", Endpoint::ChatCompletions),
        ("/v1/responses", Endpoint::Responses),
        ("/v1/embeddings", Endpoint::Embeddings),
        ("/v1/completions", Endpoint::Completions),
    ] {
        assert_eq!(Endpoint::from_path(path), Some(endpoint));
    }
    assert_eq!(
        openai::estimate(
            Endpoint::Embeddings,
            &json!({"input": "Hello world"}),
            &cl100k
        )
        .unwrap()
        .input_tokens,
        c("Hello world")
    );
}
