//! Rate-limit response headers, rendered without allocating: OpenAI's
//! `x-ratelimit-*`, `Retry-After`, and the IETF `RateLimit` / `RateLimit-Policy`
//! fields (draft-ietf-httpapi-ratelimit-headers).

use std::fmt::{self, Write as _};
use std::time::Duration;

use crate::denial::{Denial, Quota};
use crate::reservation::{LimitWindow, RateLimitStatus, Reservation};

/// The IETF quota unit for tokens. The draft registers only `requests`,
/// `content-bytes` and `concurrent-requests`, so a token unit must be an extension.
pub const TOKEN_QUOTA_UNIT: &str = "x-llm-tokens";

/// A rendered header value held on the stack.
#[derive(Clone, Copy)]
pub struct HeaderValue {
    buf: [u8; 192],
    len: usize,
}

impl HeaderValue {
    fn new() -> Self {
        HeaderValue {
            buf: [0; 192],
            len: 0,
        }
    }

    /// The value as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        // Only `write_str` fills the buffer, with whole `&str`s.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl HeaderValue {
    /// Decimal digits without `core::fmt`, which costs more than the rest of a header.
    fn write_u64(&mut self, n: u64) -> fmt::Result {
        self.write_str(itoa::Buffer::new().format(n))
    }
}

impl fmt::Write for HeaderValue {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl fmt::Display for HeaderValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for HeaderValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl AsRef<str> for HeaderValue {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

/// The rate-limit headers of one response, admitted or denied.
///
/// ```
/// # use tollgate::*;
/// # let policy = Policy::from_toml_str(r#"
/// # [org]
/// # id = "o"
/// # [[models]]
/// # name = "m"
/// # input_per_million = "1"
/// # output_per_million = "1"
/// # [[workspaces]]
/// # id = "w"
/// # name = "w"
/// # models = ["m"]
/// # limits = { rpm = 10, tpm = 1000 }
/// # [[keys]]
/// # id = "k"
/// # workspace = "w"
/// # secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
/// # "#).unwrap();
/// # let engine = Engine::new(policy);
/// let reservation = engine
///     .check_and_reserve(&Request::with_key_id("k", "m").input_tokens(100).max_output_tokens(100))
///     .unwrap();
/// for (name, value) in RateLimitHeaders::for_reservation(&reservation).iter() {
///     println!("{name}: {value}");
/// }
/// let headers = RateLimitHeaders::for_reservation(&reservation);
/// assert_eq!(headers.get("x-ratelimit-remaining-requests").unwrap().as_str(), "9");
/// assert_eq!(headers.get("x-ratelimit-remaining-tokens").unwrap().as_str(), "800");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct RateLimitHeaders {
    status: RateLimitStatus,
    retry_after: Option<Duration>,
}

/// The headers a response may carry, in the order they are rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    LimitRequests,
    RemainingRequests,
    ResetRequests,
    LimitTokens,
    RemainingTokens,
    ResetTokens,
    Policy,
    RateLimit,
    RetryAfter,
}

const FIELDS: [Field; 9] = [
    Field::LimitRequests,
    Field::RemainingRequests,
    Field::ResetRequests,
    Field::LimitTokens,
    Field::RemainingTokens,
    Field::ResetTokens,
    Field::Policy,
    Field::RateLimit,
    Field::RetryAfter,
];

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::LimitRequests => "x-ratelimit-limit-requests",
            Field::RemainingRequests => "x-ratelimit-remaining-requests",
            Field::ResetRequests => "x-ratelimit-reset-requests",
            Field::LimitTokens => "x-ratelimit-limit-tokens",
            Field::RemainingTokens => "x-ratelimit-remaining-tokens",
            Field::ResetTokens => "x-ratelimit-reset-tokens",
            Field::Policy => "ratelimit-policy",
            Field::RateLimit => "ratelimit",
            Field::RetryAfter => "retry-after",
        }
    }
}

impl RateLimitHeaders {
    /// Headers for an admitted request: where its tightest limits stand.
    pub fn for_reservation(reservation: &Reservation) -> Self {
        Self::from_status(reservation.rate_limits())
    }

    /// Headers for admitted traffic from a status.
    pub fn from_status(status: RateLimitStatus) -> Self {
        RateLimitHeaders {
            status,
            retry_after: None,
        }
    }

    /// Headers for a denial: the limit that refused and `Retry-After` when waiting helps.
    pub fn for_denial(denial: &Denial) -> Self {
        let reset = denial.reset_after.unwrap_or_default();
        let status = match denial.quota {
            Some(Quota::Requests {
                limit,
                remaining,
                window,
            }) => RateLimitStatus {
                requests: Some(LimitWindow {
                    limit,
                    remaining,
                    reset,
                    window,
                }),
                tokens: None,
            },
            Some(Quota::Tokens {
                limit,
                remaining,
                window,
                ..
            }) => RateLimitStatus {
                requests: None,
                tokens: Some(LimitWindow {
                    limit,
                    remaining,
                    reset,
                    window,
                }),
            },
            _ => RateLimitStatus::default(),
        };
        RateLimitHeaders {
            status,
            retry_after: denial.retry_after,
        }
    }

    /// Each header as `(lower-case name, value)`. Values are rendered as the
    /// iterator is advanced, on the stack.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, HeaderValue)> + '_ {
        FIELDS
            .iter()
            .filter_map(move |&field| Some((field.name(), self.render(field)?)))
    }

    /// The value of one header, by lower-case name.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<HeaderValue> {
        let field = FIELDS.iter().find(|field| field.name() == name)?;
        self.render(*field)
    }

    /// One header's value, or `None` when this response does not carry it.
    fn render(&self, field: Field) -> Option<HeaderValue> {
        let mut value = HeaderValue::new();
        let requests = self.status.requests;
        let tokens = self.status.tokens;
        let written = match field {
            Field::LimitRequests => value.write_u64(requests?.limit),
            Field::RemainingRequests => value.write_u64(requests?.remaining),
            Field::ResetRequests => write_go_duration(&mut value, requests?.reset),
            Field::LimitTokens => value.write_u64(tokens?.limit),
            Field::RemainingTokens => value.write_u64(tokens?.remaining),
            Field::ResetTokens => write_go_duration(&mut value, tokens?.reset),
            Field::Policy | Field::RateLimit => {
                if requests.is_none() && tokens.is_none() {
                    return None;
                }
                self.write_ietf(&mut value, field == Field::Policy)
            }
            Field::RetryAfter => value.write_u64(ceil_secs(self.retry_after?).max(1)),
        };
        written.is_ok().then_some(value)
    }

    fn write_ietf(&self, out: &mut HeaderValue, policy: bool) -> fmt::Result {
        let items = [
            ("requests", None, self.status.requests),
            ("tokens", Some(TOKEN_QUOTA_UNIT), self.status.tokens),
        ];
        let mut first = true;
        for (name, unit, window) in items {
            let Some(w) = window else { continue };
            if !first {
                out.write_str(", ")?;
            }
            first = false;
            out.write_str("\"")?;
            out.write_str(name)?;
            if policy {
                out.write_str("\";q=")?;
                out.write_u64(w.limit)?;
                if let Some(unit) = unit {
                    out.write_str(";qu=\"")?;
                    out.write_str(unit)?;
                    out.write_str("\"")?;
                }
                out.write_str(";w=")?;
                out.write_u64(ceil_secs(w.window))?;
            } else {
                out.write_str("\";r=")?;
                out.write_u64(w.remaining)?;
                out.write_str(";t=")?;
                out.write_u64(ceil_secs(w.reset))?;
            }
        }
        Ok(())
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

/// OpenAI's reset format, Go's duration syntax: `20ms`, `1s`, `6m0s`, `1h2m3.5s`.
/// Rounded up to the millisecond so a client never retries early.
fn write_go_duration(out: &mut HeaderValue, d: Duration) -> fmt::Result {
    // In u64, not the u128 of `as_nanos`: 128-bit division is a slow library call,
    // and it dominated rendering. Saturates past 584 million years.
    let millis = d
        .as_secs()
        .saturating_mul(1_000)
        .saturating_add(u64::from(d.subsec_nanos().div_ceil(1_000_000)));
    if millis < 1_000 {
        out.write_u64(millis)?;
        return out.write_str("ms");
    }
    let (hours, rest) = (millis / 3_600_000, millis % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let (seconds, frac) = (rest / 1_000, rest % 1_000);
    if hours > 0 {
        out.write_u64(hours)?;
        out.write_str("h")?;
    }
    if hours > 0 || minutes > 0 {
        out.write_u64(minutes)?;
        out.write_str("m")?;
    }
    out.write_u64(seconds)?;
    if frac > 0 {
        let mut digits = frac;
        let mut width = 3;
        while digits % 10 == 0 {
            digits /= 10;
            width -= 1;
        }
        let mut buffer = itoa::Buffer::new();
        let text = buffer.format(digits);
        out.write_str(".")?;
        for _ in text.len()..width {
            out.write_str("0")?;
        }
        out.write_str(text)?;
    }
    out.write_str("s")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go(d: Duration) -> String {
        let mut v = HeaderValue::new();
        write_go_duration(&mut v, d).unwrap();
        v.as_str().to_owned()
    }

    #[test]
    fn reset_durations_use_openai_format() {
        assert_eq!(go(Duration::from_micros(19_001)), "20ms");
        assert_eq!(go(Duration::from_secs(1)), "1s");
        assert_eq!(go(Duration::from_secs(360)), "6m0s");
        assert_eq!(go(Duration::from_millis(3_723_500)), "1h2m3.5s");
        assert_eq!(go(Duration::from_millis(1_050)), "1.05s");
        assert_eq!(go(Duration::ZERO), "0ms");
    }

    #[test]
    fn denial_headers_carry_retry_after_rounded_up() {
        let denial = Denial {
            quota: Some(Quota::Requests {
                limit: 5,
                remaining: 0,
                window: Duration::from_secs(60),
            }),
            retry_after: Some(Duration::from_millis(11_200)),
            reset_after: Some(Duration::from_secs(60)),
            ..Denial::new(
                crate::DenialReason::RequestsPerMinute,
                crate::Scope::Workspace,
            )
        };
        let headers = RateLimitHeaders::for_denial(&denial);
        let get = |n| headers.get(n).map(|v| v.as_str().to_owned());
        assert_eq!(get("retry-after").as_deref(), Some("12"));
        assert_eq!(get("x-ratelimit-remaining-requests").as_deref(), Some("0"));
        assert_eq!(
            get("ratelimit-policy").as_deref(),
            Some("\"requests\";q=5;w=60")
        );
        assert_eq!(get("ratelimit").as_deref(), Some("\"requests\";r=0;t=60"));
        assert_eq!(get("x-ratelimit-limit-tokens"), None);
    }

    #[test]
    fn widest_values_fit() {
        let w = LimitWindow {
            limit: u64::MAX,
            remaining: u64::MAX,
            reset: Duration::MAX,
            window: Duration::MAX,
        };
        let headers = RateLimitHeaders::from_status(RateLimitStatus {
            requests: Some(w),
            tokens: Some(w),
        });
        assert_eq!(headers.iter().count(), 8);
    }
}
