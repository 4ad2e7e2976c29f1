//! The cost of `tollgate::openai`'s estimate per request (feature `openai`): a chat
//! body of about 1,000 and about 32,000 input tokens, as plain text and as content
//! parts, counted with `o200k_base`; and the same text through tiktoken-rs alone, to
//! show what the walk over the JSON adds to the tokenizer's own cost.
//!
//! The estimate runs before `check_and_reserve`, not on its allocation-free path.
//!
//! Run: `cargo bench --bench estimate`.

#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use serde_json::{json, Value};
use tollgate::openai::{estimate_chat, EstimateOptions, Tokenizer};

/// Varied English prose (the tokenizer's cost depends on the text), about 66 tokens.
const PARAGRAPH: &str = "Rate limits and spend budgets for LLM gateways are enforced on the \
hot path: before a request is forwarded, the worst case is held on every level, and when \
the provider answers, the hold is replaced by the real usage. Overage is charged as debt. ";

/// Text of about `tokens` tokens in `o200k_base`.
fn text_of(tokens: usize) -> String {
    // Repeated, a paragraph's tokens change at the seams: measure them repeated.
    let per = Tokenizer::O200kBase.count(&PARAGRAPH.repeat(100)) / 100;
    PARAGRAPH.repeat(tokens.div_ceil(per) + 1)
}

fn plain(text: &str) -> Value {
    json!({"model": "gpt-4o", "max_tokens": 512, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": text},
    ]})
}

/// The same text in content parts of about 500 tokens each.
fn parts(text: &str) -> Value {
    let chunk = PARAGRAPH.len() * 7;
    let parts: Vec<Value> = text
        .as_bytes()
        .chunks(chunk)
        .map(|c| json!({"type": "text", "text": std::str::from_utf8(c).unwrap()}))
        .collect();
    json!({"model": "gpt-4o", "max_tokens": 512, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": parts},
    ]})
}

fn estimate(c: &mut Criterion) {
    let options = EstimateOptions::for_model("gpt-4o");
    Tokenizer::O200kBase.prepare();
    let mut group = c.benchmark_group("estimate");
    for tokens in [1_000usize, 32_000] {
        let text = text_of(tokens);
        let (plain, parts) = (plain(&text), parts(&text));
        let counted = estimate_chat(&plain, &options).unwrap().input_tokens;
        assert!(counted as usize >= tokens, "{counted} tokens");
        group.bench_function(BenchmarkId::new("chat_plain", tokens), |b| {
            b.iter(|| estimate_chat(black_box(&plain), &options).unwrap())
        });
        group.bench_function(BenchmarkId::new("chat_content_parts", tokens), |b| {
            b.iter(|| estimate_chat(black_box(&parts), &options).unwrap())
        });
        group.bench_function(BenchmarkId::new("tiktoken_count_only", tokens), |b| {
            b.iter(|| Tokenizer::O200kBase.count(black_box(&text)))
        });
    }
    group.finish();
}

criterion_group!(benches, estimate);
criterion_main!(benches);
