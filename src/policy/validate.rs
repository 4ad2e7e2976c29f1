//! Checks a [`PolicyDocument`] and compiles it into the typed rules, reporting every
//! problem found with its path and value.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::time::Duration;

use rust_decimal::Decimal;

use crate::bucket::RateRule;
use crate::clock::Timestamp;
use crate::money::{picos_from_decimal, price_per_token_picos, MoneyProblem};
use crate::period::{BudgetPeriod, Span};
use crate::policy::document::{
    BudgetSpec, EndUserLimitsSpec, LimitsSpec, ModelSpec, PolicyDocument,
    DEFAULT_END_USER_IDLE_SECS, DEFAULT_MAX_TRACKED_END_USERS, MAX_END_USER_IDLE_SECS,
    MAX_TRACKED_END_USERS, MIN_END_USER_IDLE_SECS, TOKENIZERS,
};
use crate::policy::issue::{Issues, Problem};
use crate::policy::members::Members;
use crate::policy::rules::{
    BudgetRule, EndUserRules, KeyPolicy, LevelRules, ModelPolicy, OrgPolicy, TokenRule,
    WorkspacePolicy,
};

/// Workspace names: at most this many characters.
pub(crate) const MAX_NAME_LEN: usize = 30;
/// Ids: at most this many characters.
pub(crate) const MAX_ID_LEN: usize = 64;
/// Model names: at most this many characters.
pub(crate) const MAX_MODEL_LEN: usize = 128;
/// Regions (free text such as `eu-west`): at most this many characters.
pub(crate) const MAX_REGION_LEN: usize = 64;
/// The most of a refused text quoted back in its issue: a 100 KB value is not echoed.
const QUOTED_LEN: usize = 80;
/// Rate limits are kept to one unit per 100 ns of their window, so rounding the
/// refill interval up to whole nanoseconds costs at most 1 % of the sustained rate.
const NANOS_PER_UNIT_MIN: u64 = 100;
/// Output-token defaults and caps: at most this (a request's own value is a `u32`).
const MAX_TOKENS: i64 = u32::MAX as i64;

const NAME_CHARS: &str = "letters, digits, '-' and '_'";
const ID_CHARS: &str = "letters, digits, '-', '_', '.' and ':'";
const REGION_CHARS: &str = "letters, digits, spaces, '-', '_', '.' and '/'";
const MODEL_CHARS: &str = "printable characters without spaces";

/// The compiled parts of a valid policy.
pub(crate) struct Compiled {
    pub(crate) org: OrgPolicy,
    pub(crate) models: Vec<ModelPolicy>,
    pub(crate) workspaces: Vec<WorkspacePolicy>,
    pub(crate) keys: Vec<KeyPolicy>,
}

pub(crate) fn compile(doc: &PolicyDocument) -> Result<Compiled, Issues> {
    let mut issues = Issues::default();

    check_id(&mut issues, "org.id", &doc.org.id);
    let max_workspaces = cap(&mut issues, "org.max_workspaces", doc.org.max_workspaces);
    let max_keys = cap(
        &mut issues,
        "org.max_keys_per_workspace",
        doc.org.max_keys_per_workspace,
    );
    let default_max_output = positive_tokens(
        &mut issues,
        "defaults.max_output_tokens",
        doc.defaults.max_output_tokens,
    )
    .unwrap_or(1);

    // The price table, indexed by model name.
    let mut model_index: HashMap<&str, u32> = HashMap::new();
    let mut models = Vec::with_capacity(doc.models.len());
    for (i, model) in doc.models.iter().enumerate() {
        let path = format!("models[{i}]");
        check_text(
            &mut issues,
            &format!("{path}.name"),
            &model.name,
            MAX_MODEL_LEN,
            MODEL_CHARS,
            |c| c.is_ascii_graphic(),
        );
        unique(
            &mut issues,
            &mut model_index,
            &model.name,
            i,
            &path,
            "name",
            "models",
        );
        models.push(ModelPolicy {
            name: model.name.as_str().into(),
            input_price: price(
                &mut issues,
                &format!("{path}.input_per_million"),
                model.input_per_million,
            ),
            output_price: price(
                &mut issues,
                &format!("{path}.output_per_million"),
                model.output_per_million,
            ),
            default_max_output: optional_tokens(
                &mut issues,
                &format!("{path}.default_max_output_tokens"),
                model.default_max_output_tokens,
            ),
        });
        check_estimates(&mut issues, &path, model);
    }

    let org_span = span_of(doc.org.budget.as_ref(), Span::Period(BudgetPeriod::Month));
    let org_rules = LevelRules {
        budget: budget(&mut issues, "org.budget", doc.org.budget.as_ref()),
        ..LevelRules::unlimited(org_span)
    };
    let wallet = doc.org.wallet.map(|balance| LevelRules {
        budget: Some(BudgetRule {
            limit: money(&mut issues, "org.wallet", balance),
            thresholds: Box::new([]),
        }),
        ..LevelRules::unlimited(Span::Forever)
    });

    if let Some(cap) = max_workspaces {
        if doc.workspaces.len() > cap as usize {
            issues.push(
                "workspaces",
                format!("{} workspaces", doc.workspaces.len()),
                Problem::CapExceeded {
                    count: doc.workspaces.len(),
                    cap,
                },
            );
        }
    }

    let mut workspace_index: HashMap<&str, u32> = HashMap::new();
    let mut workspace_names: HashMap<&str, u32> = HashMap::new();
    let mut members = Members::default();
    let mut workspaces = Vec::with_capacity(doc.workspaces.len());
    for (i, ws) in doc.workspaces.iter().enumerate() {
        let path = format!("workspaces[{i}]");
        check_id(&mut issues, &format!("{path}.id"), &ws.id);
        unique(
            &mut issues,
            &mut workspace_index,
            &ws.id,
            i,
            &path,
            "id",
            "workspaces",
        );
        check_text(
            &mut issues,
            &format!("{path}.name"),
            &ws.name,
            MAX_NAME_LEN,
            NAME_CHARS,
            |c| c.is_ascii_alphanumeric() || c == '-' || c == '_',
        );
        unique(
            &mut issues,
            &mut workspace_names,
            &ws.name,
            i,
            &path,
            "name",
            "workspaces",
        );
        // Optional, so empty is fine; otherwise short, and printable without markup.
        if !ws.region.is_empty() {
            check_text(
                &mut issues,
                &format!("{path}.region"),
                &ws.region,
                MAX_REGION_LEN,
                REGION_CHARS,
                |c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | ' ' | '/'),
            );
        }

        members.check(&mut issues, &path, ws);

        let is_default = doc.org.default_workspace.as_deref() == Some(ws.id.as_str());
        let mut granted = vec![is_default; models.len()].into_boxed_slice();
        for (g, model) in ws.models.iter().enumerate() {
            match model_index.get(model.as_str()) {
                Some(&m) => granted[m as usize] = true,
                None => issues.push(
                    format!("{path}.models[{g}]"),
                    format!("{model:?}"),
                    Problem::UnknownModel,
                ),
            }
        }

        let span = span_of(ws.budget.as_ref(), org_span);
        let mut model_rules = vec![LevelRules::unlimited(span); models.len()].into_boxed_slice();
        let mut limited_models: HashMap<&str, u32> = HashMap::new();
        for (l, limit) in ws.model_limits.iter().enumerate() {
            let lpath = format!("{path}.model_limits[{l}]");
            unique(
                &mut issues,
                &mut limited_models,
                &limit.model,
                l,
                &lpath,
                "model",
                &format!("{path}.model_limits"),
            );
            let rules = LevelRules {
                rpm: rate(&mut issues, &format!("{lpath}.rpm"), limit.rpm, MINUTE),
                tpm: rate(&mut issues, &format!("{lpath}.tpm"), limit.tpm, MINUTE).map(|rate| {
                    TokenRule {
                        rate,
                        counts: limit.tpm_counts,
                    }
                }),
                ..LevelRules::unlimited(span)
            };
            match model_index.get(limit.model.as_str()) {
                Some(&m) => model_rules[m as usize] = rules,
                None => issues.push(
                    format!("{lpath}.model"),
                    format!("{:?}", limit.model),
                    Problem::UnknownModel,
                ),
            }
        }

        workspaces.push(WorkspacePolicy {
            id: ws.id.as_str().into(),
            name: ws.name.as_str().into(),
            environment: ws.environment,
            region: ws.region.as_str().into(),
            status: ws.status,
            granted,
            rules: level(&mut issues, &path, &ws.limits, ws.budget.as_ref(), span),
            model_rules,
            plain_key_rules: LevelRules::unlimited(span),
            default_max_output: optional_tokens(
                &mut issues,
                &format!("{path}.default_max_output_tokens"),
                ws.default_max_output_tokens,
            ),
            on_store_error: ws.on_store_error,
            end_users: ws
                .end_user_limits
                .as_ref()
                .map(|spec| Box::new(end_user_rules(&mut issues, &path, spec, span))),
        });
    }

    if let Some(default) = &doc.org.default_workspace {
        if !workspace_index.contains_key(default.as_str()) {
            issues.push(
                "org.default_workspace",
                format!("{default:?}"),
                Problem::UnknownWorkspace,
            );
        }
    }

    let mut key_index: HashMap<&str, u32> = HashMap::new();
    let mut digest_index: HashMap<[u8; 32], u32> = HashMap::new();
    let mut keys_per_workspace = vec![0usize; workspaces.len()];
    let mut keys = Vec::with_capacity(doc.keys.len());
    for (i, key) in doc.keys.iter().enumerate() {
        let path = format!("keys[{i}]");
        check_id(&mut issues, &format!("{path}.id"), &key.id);
        unique(&mut issues, &mut key_index, &key.id, i, &path, "id", "keys");
        let workspace = match workspace_index.get(key.workspace.as_str()) {
            Some(&w) => {
                keys_per_workspace[w as usize] += 1;
                Some(w)
            }
            None => {
                issues.push(
                    format!("{path}.workspace"),
                    format!("{:?}", key.workspace),
                    Problem::UnknownWorkspace,
                );
                None
            }
        };
        // Current and rotated-out digests share one namespace with members' digests: a
        // secret opens one key or one member.
        let mut register = |issues: &mut Issues, field: &str, digest: [u8; 32]| {
            if let Some(first) = members.digest_path(&digest) {
                issues.push(
                    format!("{path}.{field}"),
                    "<digest>",
                    Problem::Duplicate {
                        first: first.to_owned(),
                    },
                );
            } else if let Some(&first) = digest_index.get(&digest) {
                issues.push(
                    format!("{path}.{field}"),
                    "<digest>",
                    Problem::Duplicate {
                        first: format!("keys[{first}].secret_sha256"),
                    },
                );
            } else {
                digest_index.insert(digest, i as u32);
            }
        };
        let digest = match parse_digest(&key.secret_sha256) {
            Some(digest) => {
                register(&mut issues, "secret_sha256", digest);
                digest
            }
            None => {
                // The digest is not secret, but a mistyped plaintext secret might be: never echo it.
                issues.push(
                    format!("{path}.secret_sha256"),
                    format!("<{} characters>", key.secret_sha256.chars().count()),
                    Problem::BadDigest,
                );
                [0; 32]
            }
        };
        let previous = match (&key.previous_secret_sha256, key.previous_secret_expires_at) {
            (None, None) => None,
            (Some(hex_digest), Some(until)) => match parse_digest(hex_digest) {
                Some(digest) => {
                    register(&mut issues, "previous_secret_sha256", digest);
                    Some((digest, Timestamp::from_datetime(until)))
                }
                None => {
                    issues.push(
                        format!("{path}.previous_secret_sha256"),
                        format!("<{} characters>", hex_digest.chars().count()),
                        Problem::BadDigest,
                    );
                    None
                }
            },
            (Some(_), None) => {
                issues.push(
                    format!("{path}.previous_secret_sha256"),
                    "<digest>",
                    Problem::MissingCompanion {
                        companion: "previous_secret_expires_at",
                    },
                );
                None
            }
            (None, Some(until)) => {
                issues.push(
                    format!("{path}.previous_secret_expires_at"),
                    until.to_rfc3339(),
                    Problem::MissingCompanion {
                        companion: "previous_secret_sha256",
                    },
                );
                None
            }
        };
        let ws_span = workspace.map_or(org_span, |w| workspaces[w as usize].rules.span);
        let span = span_of(key.budget.as_ref(), ws_span);
        let rules = level(&mut issues, &path, &key.limits, key.budget.as_ref(), span);
        keys.push(KeyPolicy {
            id: key.id.as_str().into(),
            workspace: workspace.unwrap_or(0),
            digest,
            previous,
            status: key.status,
            expires_at: key.expires_at.map(Timestamp::from_datetime),
            rules: (rules != LevelRules::unlimited(ws_span)).then(|| Box::new(rules)),
            default_max_output: optional_tokens(
                &mut issues,
                &format!("{path}.default_max_output_tokens"),
                key.default_max_output_tokens,
            ),
        });
    }
    if let Some(cap) = max_keys {
        for (w, &count) in keys_per_workspace.iter().enumerate() {
            if count > cap as usize {
                issues.push(
                    format!("workspaces[{w}]"),
                    format!("{:?} has {count} keys", doc.workspaces[w].id),
                    Problem::CapExceeded { count, cap },
                );
            }
        }
    }

    if !issues.0.is_empty() {
        return Err(issues);
    }
    Ok(Compiled {
        org: OrgPolicy {
            id: doc.org.id.as_str().into(),
            rules: org_rules,
            wallet,
            default_max_output,
            max_workspaces: max_workspaces.unwrap_or(0),
            max_keys_per_workspace: max_keys.unwrap_or(0),
        },
        models,
        workspaces,
        keys,
    })
}

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

fn level(
    issues: &mut Issues,
    path: &str,
    limits: &LimitsSpec,
    budget_spec: Option<&BudgetSpec>,
    span: Span,
) -> LevelRules {
    LevelRules {
        rpm: rate(issues, &format!("{path}.limits.rpm"), limits.rpm, MINUTE),
        rpd: rate(issues, &format!("{path}.limits.rpd"), limits.rpd, DAY),
        tpm: rate(issues, &format!("{path}.limits.tpm"), limits.tpm, MINUTE).map(|rate| {
            TokenRule {
                rate,
                counts: limits.tpm_counts,
            }
        }),
        max_concurrent: limits.max_concurrent.and_then(|max| {
            let field = format!("{path}.limits.max_concurrent");
            if max <= 0 {
                issues.push(field, max, Problem::NotPositive);
                return None;
            }
            u32::try_from(max)
                .map_err(|_| {
                    issues.push(
                        field,
                        max,
                        Problem::TooLarge {
                            max: u32::MAX.to_string(),
                        },
                    )
                })
                .ok()
        }),
        budget: budget(issues, &format!("{path}.budget"), budget_spec),
        span,
    }
}

/// A workspace's `end_user_limits`, its issues reported under
/// `<path>.end_user_limits`. Budgets without a period of their own count over the
/// workspace's.
fn end_user_rules(
    issues: &mut Issues,
    path: &str,
    spec: &EndUserLimitsSpec,
    workspace_span: Span,
) -> EndUserRules {
    let path = format!("{path}.end_user_limits");
    let span = span_of(spec.budget.as_ref(), workspace_span);
    let rules = level(issues, &path, &spec.limits, spec.budget.as_ref(), span);
    let mut bounded = |field: &str, value: Option<i64>, default: i64, min: i64, max: i64| {
        let value = value.unwrap_or(default);
        let field = format!("{path}.{field}");
        if value < min {
            let problem = if min == 1 {
                Problem::NotPositive
            } else {
                Problem::TooSmall {
                    min: min.to_string(),
                }
            };
            issues.push(field, value, problem);
            default
        } else if value > max {
            issues.push(
                field,
                value,
                Problem::TooLarge {
                    max: max.to_string(),
                },
            );
            default
        } else {
            value
        }
    };
    // At least one end user per shard of the in-memory table (see `end_users`).
    let max_tracked = bounded(
        "max_tracked",
        spec.max_tracked,
        DEFAULT_MAX_TRACKED_END_USERS,
        crate::end_users::SHARDS as i64,
        MAX_TRACKED_END_USERS,
    );
    let idle_secs = bounded(
        "idle_secs",
        spec.idle_secs,
        DEFAULT_END_USER_IDLE_SECS,
        MIN_END_USER_IDLE_SECS,
        MAX_END_USER_IDLE_SECS,
    );
    EndUserRules {
        rules,
        // Both within their bounds, checked above.
        max_tracked: max_tracked as u32,
        idle_nanos: idle_secs as u64 * 1_000_000_000,
    }
}

fn span_of(budget: Option<&BudgetSpec>, inherited: Span) -> Span {
    budget.map_or(inherited, |b| Span::Period(b.period))
}

fn rate(issues: &mut Issues, path: &str, limit: Option<i64>, window: Duration) -> Option<RateRule> {
    let limit = limit?;
    let max = window.as_nanos() as u64 / NANOS_PER_UNIT_MIN;
    if limit <= 0 {
        issues.push(path, limit, Problem::NotPositive);
        return None;
    }
    if limit as u64 > max {
        issues.push(
            path,
            limit,
            Problem::TooLarge {
                max: max.to_string(),
            },
        );
        return None;
    }
    NonZeroU64::new(limit as u64).map(|limit| RateRule::new(limit, window))
}

fn budget(issues: &mut Issues, path: &str, spec: Option<&BudgetSpec>) -> Option<BudgetRule> {
    let spec = spec?;
    let limit = money(issues, &format!("{path}.limit"), spec.limit);
    if let BudgetPeriod::Custom { seconds: 0 } = spec.period {
        issues.push(
            format!("{path}.period.custom.seconds"),
            0,
            Problem::NotPositive,
        );
    }
    let mut thresholds = Vec::with_capacity(spec.alert_thresholds.len());
    for (t, &pct) in spec.alert_thresholds.iter().enumerate() {
        match u8::try_from(pct) {
            Ok(pct) if pct <= 100 => thresholds.push(pct),
            _ => issues.push(
                format!("{path}.alert_thresholds[{t}]"),
                pct,
                Problem::ThresholdOutOfRange,
            ),
        }
    }
    thresholds.sort_unstable();
    thresholds.dedup();
    Some(BudgetRule {
        limit,
        thresholds: thresholds.into_boxed_slice(),
    })
}

fn money(issues: &mut Issues, path: &str, amount: Decimal) -> i64 {
    picos_from_decimal(amount).unwrap_or_else(|problem| {
        issues.push(path, amount, money_problem(problem));
        0
    })
}

fn price(issues: &mut Issues, path: &str, per_million: Decimal) -> u64 {
    price_per_token_picos(per_million).unwrap_or_else(|problem| {
        issues.push(path, per_million, money_problem(problem));
        0
    })
}

fn money_problem(problem: MoneyProblem) -> Problem {
    match problem {
        MoneyProblem::Negative => Problem::Negative,
        MoneyProblem::TooPrecise { max_decimals } => Problem::TooPrecise { max_decimals },
        MoneyProblem::TooLarge { max } => Problem::TooLarge {
            max: max.to_string(),
        },
    }
}

fn cap(issues: &mut Issues, path: &str, value: i64) -> Option<u32> {
    match u32::try_from(value) {
        Ok(0) => {
            issues.push(path, value, Problem::NotPositive);
            None
        }
        Ok(cap) => Some(cap),
        Err(_) if value < 0 => {
            issues.push(path, value, Problem::NotPositive);
            None
        }
        Err(_) => {
            issues.push(
                path,
                value,
                Problem::TooLarge {
                    max: u32::MAX.to_string(),
                },
            );
            None
        }
    }
}

fn positive_tokens(issues: &mut Issues, path: &str, value: i64) -> Option<u32> {
    if value <= 0 {
        issues.push(path, value, Problem::NotPositive);
        None
    } else if value > MAX_TOKENS {
        issues.push(
            path,
            value,
            Problem::TooLarge {
                max: MAX_TOKENS.to_string(),
            },
        );
        None
    } else {
        Some(value as u32)
    }
}

fn optional_tokens(issues: &mut Issues, path: &str, value: Option<i64>) -> Option<u32> {
    value.and_then(|v| positive_tokens(issues, path, v))
}

/// A model's input-estimate settings (used by the `openai` feature, checked always so
/// a policy is valid or not whatever the build).
fn check_estimates(issues: &mut Issues, path: &str, model: &ModelSpec) {
    if let Some(name) = &model.tokenizer {
        if !TOKENIZERS.contains(&name.as_str()) {
            issues.push(
                format!("{path}.tokenizer"),
                format!("{name:?}"),
                Problem::UnknownTokenizer {
                    known: "o200k_base, cl100k_base, p50k_base, r50k_base, o200k_harmony",
                },
            );
        }
    }
    for (field, value) in [
        ("image_tokens", model.image_tokens),
        ("audio_tokens", model.audio_tokens),
        ("file_tokens", model.file_tokens),
    ] {
        optional_tokens(issues, &format!("{path}.{field}"), value);
    }
}

fn check_id(issues: &mut Issues, path: &str, id: &str) {
    check_text(issues, path, id, MAX_ID_LEN, ID_CHARS, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')
    });
}

pub(super) fn check_text(
    issues: &mut Issues,
    path: &str,
    text: &str,
    max: usize,
    allowed: &'static str,
    ok: impl Fn(char) -> bool,
) {
    if text.is_empty() {
        issues.push(path, format!("{text:?}"), Problem::Empty);
    } else if text.chars().count() > max {
        issues.push(path, quoted(text), Problem::TooLong { max });
    } else if !text.chars().all(ok) {
        issues.push(path, quoted(text), Problem::BadCharacters { allowed });
    }
}

/// `text` quoted for an issue, cut after [`QUOTED_LEN`] characters.
pub(super) fn quoted(text: &str) -> String {
    match text.char_indices().nth(QUOTED_LEN) {
        Some((end, _)) => format!("{:?}… ({} characters)", &text[..end], text.chars().count()),
        None => format!("{text:?}"),
    }
}

/// Record `value` as seen at `index`, or report it as a duplicate of the first.
pub(super) fn unique<'a>(
    issues: &mut Issues,
    seen: &mut HashMap<&'a str, u32>,
    value: &'a str,
    index: usize,
    path: &str,
    field: &str,
    list: &str,
) {
    match seen.get(value) {
        Some(&first) => issues.push(
            format!("{path}.{field}"),
            format!("{value:?}"),
            Problem::Duplicate {
                first: format!("{list}[{first}].{field}"),
            },
        ),
        None => {
            seen.insert(value, index as u32);
        }
    }
}

pub(super) fn parse_digest(hex_digest: &str) -> Option<[u8; 32]> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut digest).ok()?;
    Some(digest)
}
