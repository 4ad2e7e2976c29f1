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

/// Most headers one response carries.
const MAX_HEADERS: usize = 9;

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

    /// Each header as `(lower-case name, value)`.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, HeaderValue)> {
        let mut out: [Option<(&'static str, HeaderValue)>; MAX_HEADERS] = [None; MAX_HEADERS];
        let mut n = 0;
        let mut push = |name: &'static str, render: &dyn Fn(&mut HeaderValue) -> fmt::Result| {
            let mut value = HeaderValue::new();
            if render(&mut value).is_ok() {
                out[n] = Some((name, value));
                n += 1;
            }
        };
        if let Some(w) = self.status.requests {
            push("x-ratelimit-limit-requests", &|v| write!(v, "{}", w.limit));
            push("x-ratelimit-remaining-requests", &|v| {
                write!(v, "{}", w.remaining)
            });
            push("x-ratelimit-reset-requests", &|v| {
                write_go_duration(v, w.reset)
            });
        }
        if let Some(w) = self.status.tokens {
            push("x-ratelimit-limit-tokens", &|v| write!(v, "{}", w.limit));
            push("x-ratelimit-remaining-tokens", &|v| {
                write!(v, "{}", w.remaining)
            });
            push("x-ratelimit-reset-tokens", &|v| {
                write_go_duration(v, w.reset)
            });
        }
        if self.status.requests.is_some() || self.status.tokens.is_some() {
            push("ratelimit-policy", &|v| self.write_ietf(v, true));
            push("ratelimit", &|v| self.write_ietf(v, false));
        }
        if let Some(retry) = self.retry_after {
            push("retry-after", &|v| write!(v, "{}", ceil_secs(retry).max(1)));
        }
        out.into_iter().flatten()
    }

    /// The value of one header, by lower-case name.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<HeaderValue> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
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
            if policy {
                write!(out, "\"{name}\";q={}", w.limit)?;
                if let Some(unit) = unit {
                    write!(out, ";qu=\"{unit}\"")?;
                }
                write!(out, ";w={}", ceil_secs(w.window))?;
            } else {
                write!(out, "\"{name}\";r={};t={}", w.remaining, ceil_secs(w.reset))?;
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
    let millis = d.as_nanos().div_ceil(1_000_000);
    if millis < 1_000 {
        return write!(out, "{millis}ms");
    }
    let (hours, rest) = (millis / 3_600_000, millis % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let (seconds, frac) = (rest / 1_000, rest % 1_000);
    if hours > 0 {
        write!(out, "{hours}h")?;
    }
    if hours > 0 || minutes > 0 {
        write!(out, "{minutes}m")?;
    }
    write!(out, "{seconds}")?;
    if frac > 0 {
        let mut digits = frac;
        let mut width = 3;
        while digits % 10 == 0 {
            digits /= 10;
            width -= 1;
        }
        write!(out, ".{digits:0width$}")?;
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
