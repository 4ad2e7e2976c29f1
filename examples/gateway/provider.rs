//! Model providers: the built-in mock (the only mock tollgate ships: deterministic
//! answers and token counts, so the gateway runs with no account and no network, and
//! tests know what to expect), and later a real OpenAI-compatible upstream.

use std::time::Duration;

/// What the provider reports for one chat completion.
pub struct Completion {
    pub text: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// Answers every chat completion with as many words as the reply is long.
pub struct MockProvider {
    /// Pause before answering, like a real model's latency.
    pub delay: Duration,
}

/// Replies are at most this many tokens, fewer when `max_tokens` is lower.
pub const REPLY_TOKENS: u32 = 40;

impl MockProvider {
    pub async fn complete(&self, prompt_tokens: u32, max_tokens: Option<u32>) -> Completion {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let completion_tokens = max_tokens.unwrap_or(REPLY_TOKENS).min(REPLY_TOKENS);
        let words: Vec<&str> = (0..completion_tokens).map(|_| "mock").collect();
        Completion {
            text: words.join(" "),
            prompt_tokens,
            completion_tokens,
        }
    }
}

/// Where completions come from.
pub enum Provider {
    Mock(MockProvider),
}
