//! Which of OpenAI's encodings counts a model's text, and counting with it.
//!
//! The encodings come from `tiktoken-rs`, which embeds their vocabularies (no network).
//! Building one parses a vocabulary of 100k-200k entries (tens of milliseconds), so
//! each is built once per process, on first use, and shared.

use tiktoken_rs::CoreBPE;

/// One of OpenAI's encodings, by its tiktoken name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tokenizer {
    /// `o200k_base`: GPT-4o, GPT-4.1, GPT-4.5, GPT-5, o1, o3, o4.
    O200kBase,
    /// `cl100k_base`: GPT-4, GPT-3.5 Turbo, `text-embedding-3-*`, `text-embedding-ada-002`.
    Cl100kBase,
    /// `p50k_base`: Codex and `text-davinci-002/003`.
    P50kBase,
    /// `r50k_base` (also `gpt2`): GPT-3 base models.
    R50kBase,
    /// `o200k_harmony`: `gpt-oss` models.
    O200kHarmony,
}

impl Tokenizer {
    /// Every encoding, in the order of [`TOKENIZERS`](crate::TOKENIZERS).
    pub const ALL: [Tokenizer; 5] = [
        Tokenizer::O200kBase,
        Tokenizer::Cl100kBase,
        Tokenizer::P50kBase,
        Tokenizer::R50kBase,
        Tokenizer::O200kHarmony,
    ];

    /// The encoding named `name` as tiktoken names it (`o200k_base`, `cl100k_base`,
    /// `p50k_base`, `r50k_base`, `o200k_harmony`).
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Its tiktoken name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Tokenizer::O200kBase => "o200k_base",
            Tokenizer::Cl100kBase => "cl100k_base",
            Tokenizer::P50kBase => "p50k_base",
            Tokenizer::R50kBase => "r50k_base",
            Tokenizer::O200kHarmony => "o200k_harmony",
        }
    }

    /// The encoding OpenAI uses for `model` (tiktoken's table of names and prefixes,
    /// fine-tunes `ft:BASE:...` by their base); `o200k_base`, the current models',
    /// for a name it does not know.
    #[must_use]
    pub fn for_model(model: &str) -> Self {
        use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer as T};
        match get_tokenizer(model) {
            Some(T::Cl100kBase) => Tokenizer::Cl100kBase,
            Some(T::P50kBase | T::P50kEdit) => Tokenizer::P50kBase,
            Some(T::R50kBase | T::Gpt2) => Tokenizer::R50kBase,
            Some(T::O200kHarmony) => Tokenizer::O200kHarmony,
            Some(T::O200kBase) | None => Tokenizer::O200kBase,
        }
    }

    /// Tokens of `text` as ordinary text: special tokens such as `<|endoftext|>` in
    /// it are counted as the text they are, as OpenAI's API does with user content.
    ///
    /// Exact, except that a run of more than `LONGEST_RUN` bytes without whitespace
    /// is counted in pieces of at most that size: BPE merging is quadratic in the
    /// length of one piece, so a megabyte without a space would take minutes, and
    /// anyone who can send a body could stall the thread counting it. No token spans
    /// a cut, so the count can only rise, by about one token per cut.
    #[must_use]
    pub fn count(self, text: &str) -> usize {
        let encoding = self.encoding();
        let tokens = |part: &str| {
            if part.is_empty() {
                0
            } else {
                encoding.encode_ordinary(part).len()
            }
        };
        let mut total = 0;
        // `text[..counted]` is counted; `run` is where the current run (or the
        // current piece of a long one) starts.
        let (mut counted, mut run) = (0, None);
        for (at, c) in text.char_indices() {
            if c.is_whitespace() {
                run = None;
                continue;
            }
            let start = *run.get_or_insert(at);
            if at + c.len_utf8() - start > LONGEST_RUN {
                total += tokens(&text[counted..start]) + tokens(&text[start..at]);
                counted = at;
                run = Some(at);
            }
        }
        total + tokens(&text[counted..])
    }

    /// Build the encoding now (tens of milliseconds in a release build, much more in
    /// a debug one) rather than on the first request that needs it.
    pub fn prepare(self) {
        let _ = self.encoding();
    }

    /// The shared encoding, built on first use.
    fn encoding(self) -> &'static CoreBPE {
        match self {
            Tokenizer::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Tokenizer::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
            Tokenizer::P50kBase => tiktoken_rs::p50k_base_singleton(),
            Tokenizer::R50kBase => tiktoken_rs::r50k_base_singleton(),
            Tokenizer::O200kHarmony => tiktoken_rs::o200k_harmony_singleton(),
        }
    }
}

/// The longest run of non-whitespace counted in one piece; see [`Tokenizer::count`].
pub const LONGEST_RUN: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_counted_exactly_and_a_long_run_in_pieces_that_only_err_high() {
        let encoding = Tokenizer::O200kBase.encoding();
        let exact = |text: &str| encoding.encode_ordinary(text).len();
        let prose = "Rate limits and budgets, enforced: naïve café — 東京 🚀 x=1;";
        assert_eq!(Tokenizer::O200kBase.count(prose), exact(prose));
        let word = "a".repeat(LONGEST_RUN);
        let at_limit = format!("see {word} here");
        assert_eq!(Tokenizer::O200kBase.count(&at_limit), exact(&at_limit));

        // Ten thousand letters without a space: cut into pieces, never fewer
        // tokens than counted whole, and at most about one more per piece.
        let long = format!("say {} and {}", "ab".repeat(5_000), "x".repeat(700));
        let pieces = 10_000 / LONGEST_RUN + 700 / LONGEST_RUN + 2;
        let (cut, whole) = (Tokenizer::O200kBase.count(&long), exact(&long));
        assert!(cut >= whole, "{cut} < {whole}");
        assert!(cut <= whole + 2 * pieces, "{cut} vs {whole}");
        // Multi-byte characters are cut on their boundaries.
        let wide = "é".repeat(1_000);
        assert!(Tokenizer::O200kBase.count(&wide) >= exact(&wide));
    }

    #[test]
    fn names_match_the_policy_list() {
        let names: Vec<&str> = Tokenizer::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(names, crate::TOKENIZERS);
        for name in crate::TOKENIZERS {
            assert_eq!(Tokenizer::from_name(name).map(Tokenizer::name), Some(*name));
        }
        assert_eq!(Tokenizer::from_name("o200k"), None);
    }

    #[test]
    fn models_pick_their_family() {
        assert_eq!(Tokenizer::for_model("gpt-4o-mini"), Tokenizer::O200kBase);
        assert_eq!(Tokenizer::for_model("gpt-4"), Tokenizer::Cl100kBase);
        assert_eq!(
            Tokenizer::for_model("text-embedding-3-small"),
            Tokenizer::Cl100kBase
        );
        assert_eq!(Tokenizer::for_model("llama-3-70b"), Tokenizer::O200kBase);
    }
}
