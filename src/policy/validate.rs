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
    BudgetSpec, EndUserLimitsSpec, LimitsSpec, ModelLimitSpec, ModelSpec, PolicyDocument,
    TemporarySpec, DEFAULT_END_USER_IDLE_SECS, DEFAULT_MAX_TRACKED_END_USERS, MAX_BUDGETS,
    MAX_END_USER_IDLE_SECS, MAX_TRACKED_END_USERS, MIN_END_USER_IDLE_SECS, TOKENIZERS,
};
use crate::policy::issue::{Issues, Problem};
use crate::policy::members::Members;
use crate::policy::rules::{
    BudgetRule, EndUserRules, KeyPolicy, LevelRules, ModelPolicy, OrgPolicy, Temporary, TokenRule,
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
            aliases: model.aliases.iter().map(|a| a.as_str().into()).collect(),
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
    let names = ModelNames::check(&mut issues, doc, model_index);

    let org_budgets = Budgets::of(doc.org.budget.as_ref(), &doc.org.budgets);
    let org_span = org_budgets.span(Span::Period(BudgetPeriod::Month));
    let org_rules = level(
        &mut issues,
        "org",
        &LimitsSpec::default(),
        org_budgets,
        org_span,
    );
    let org_temporary = temporary(&mut issues, "org", doc.org.temporary.as_ref(), &org_rules);
    let wallet = doc.org.wallet.map(|balance| LevelRules {
        budget: Some(BudgetRule {
            limit: money(&mut issues, "org.wallet", balance),
            thresholds: Box::new([]),
            soft: false,
            span: Span::Forever,
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
            for (m, _) in names.named(&mut issues, &format!("{path}.models[{g}]"), model) {
                granted[m as usize] = true;
            }
        }

        let ws_budgets = Budgets::of(ws.budget.as_ref(), &ws.budgets);
        let span = ws_budgets.span(org_span);
        let mut model_rules = vec![LevelRules::unlimited(span); models.len()].into_boxed_slice();
        let chosen = model_limit_rules(
            &mut issues,
            &names,
            &format!("{path}.model_limits"),
            &ws.model_limits,
            span,
        );
        for (rules, chosen) in model_rules.iter_mut().zip(chosen) {
            if let Some(chosen) = chosen {
                *rules = chosen;
            }
        }

        let rules = level(&mut issues, &path, &ws.limits, ws_budgets, span);
        let ws_temporary = temporary(&mut issues, &path, ws.temporary.as_ref(), &rules);
        workspaces.push(WorkspacePolicy {
            id: ws.id.as_str().into(),
            name: ws.name.as_str().into(),
            environment: ws.environment,
            region: ws.region.as_str().into(),
            status: ws.status,
            granted,
            rules,
            temporary: ws_temporary,
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
        let granted = (!key.models.is_empty()).then(|| {
            let workspace = workspace.map(|w| &workspaces[w as usize]);
            let mut subset = vec![false; models.len()].into_boxed_slice();
            for (j, reference) in key.models.iter().enumerate() {
                let field = format!("{path}.models[{j}]");
                let named = names.named(&mut issues, &field, reference);
                let Some(ws) = workspace else { continue };
                // A pattern may reach past the workspace's grants as long as it
                // reaches some of them: the key gets the models in both.
                if !named.is_empty() && !named.iter().any(|&(m, _)| ws.granted[m as usize]) {
                    issues.push(
                        field,
                        quoted(reference),
                        Problem::NotGrantedToWorkspace {
                            workspace: ws.id.to_string(),
                        },
                    );
                }
                for (m, _) in named {
                    subset[m as usize] = ws.granted[m as usize];
                }
            }
            subset
        });
        let ws_span = workspace.map_or(org_span, |w| workspaces[w as usize].rules.span);
        let key_budgets = Budgets::of(key.budget.as_ref(), &key.budgets);
        let span = key_budgets.span(ws_span);
        let rules = level(&mut issues, &path, &key.limits, key_budgets, span);
        let key_temporary = temporary(&mut issues, &path, key.temporary.as_ref(), &rules);
        let model_rules = key_model_rules(&mut issues, &path, &key.model_limits, &names, span);
        keys.push(KeyPolicy {
            id: key.id.as_str().into(),
            workspace: workspace.unwrap_or(0),
            digest,
            previous,
            status: key.status,
            expires_at: key.expires_at.map(Timestamp::from_datetime),
            rules: (rules != LevelRules::unlimited(ws_span) || key_temporary.is_some())
                .then(|| Box::new(rules)),
            temporary: key_temporary,
            model_rules,
            granted,
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
            temporary: org_temporary,
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

/// The price table's names and aliases, which grants, `model_limits` and keys'
/// `models` refer to.
struct ModelNames<'a> {
    /// Every model name and alias, to its model's position.
    by_name: HashMap<&'a str, u32>,
    /// Model names by position: what patterns match.
    names: Vec<&'a str>,
}

/// How specific an exact name or alias is: more than any pattern.
const EXACT: usize = usize::MAX;

impl<'a> ModelNames<'a> {
    /// Check every alias against the model names (already checked, in `by_name`) and
    /// the other aliases.
    fn check(issues: &mut Issues, doc: &'a PolicyDocument, by_name: HashMap<&'a str, u32>) -> Self {
        let mut by_name = by_name;
        let mut first_alias: HashMap<&str, (usize, usize)> = HashMap::new();
        for (i, model) in doc.models.iter().enumerate() {
            for (j, alias) in model.aliases.iter().enumerate() {
                let path = format!("models[{i}].aliases[{j}]");
                check_text(issues, &path, alias, MAX_MODEL_LEN, MODEL_CHARS, |c| {
                    c.is_ascii_graphic()
                });
                let first = if let Some(&(k, l)) = first_alias.get(alias.as_str()) {
                    format!("models[{k}].aliases[{l}]")
                } else if let Some(&k) = by_name.get(alias.as_str()) {
                    format!("models[{k}].name")
                } else {
                    first_alias.insert(alias, (i, j));
                    by_name.insert(alias, i as u32);
                    continue;
                };
                issues.push(path, quoted(alias), Problem::Duplicate { first });
            }
        }
        ModelNames {
            by_name,
            names: doc.models.iter().map(|m| m.name.as_str()).collect(),
        }
    }

    /// The models `reference` names, each with how specifically: its name or alias
    /// ([`EXACT`]), or a pattern `prefix*` (the prefix's length). A name is looked up
    /// before it is read as a pattern, so a model whose name holds a `*` can still be
    /// named. Reports a reference that names nothing.
    fn named(&self, issues: &mut Issues, path: &str, reference: &str) -> Vec<(u32, usize)> {
        if let Some(&m) = self.by_name.get(reference) {
            return vec![(m, EXACT)];
        }
        let problem = match reference.find('*') {
            None => Problem::UnknownModel,
            Some(at) if at + 1 == reference.len() => {
                let prefix = &reference[..at];
                let matched: Vec<(u32, usize)> = (0..self.names.len() as u32)
                    .filter(|&m| self.names[m as usize].starts_with(prefix))
                    .map(|m| (m, prefix.len()))
                    .collect();
                if !matched.is_empty() {
                    return matched;
                }
                Problem::NoModelMatches
            }
            Some(_) => Problem::BadModelPattern,
        };
        issues.push(path, quoted(reference), problem);
        Vec::new()
    }
}

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

/// A scope's budgets as written: `budget` first, then `budgets`, with the path of each.
struct Budgets<'a> {
    first: Option<&'a BudgetSpec>,
    more: &'a [BudgetSpec],
}

impl<'a> Budgets<'a> {
    fn of(first: Option<&'a BudgetSpec>, more: &'a [BudgetSpec]) -> Self {
        Budgets { first, more }
    }

    fn none() -> Self {
        Budgets {
            first: None,
            more: &[],
        }
    }

    /// The periods the scope's usage is counted over: its first budget's, else
    /// `inherited`.
    fn span(&self, inherited: Span) -> Span {
        self.first
            .or(self.more.first())
            .map_or(inherited, |b| Span::Period(b.period))
    }

    /// Each budget with its path, `budget` first.
    fn each(&self, path: &str) -> Vec<(String, &'a BudgetSpec)> {
        let first = self.first.map(|b| (format!("{path}.budget"), b));
        let more = self
            .more
            .iter()
            .enumerate()
            .map(|(i, b)| (format!("{path}.budgets[{i}]"), b));
        first.into_iter().chain(more).collect()
    }
}

/// A scope's rules: its `limits` and its budgets.
fn level(
    issues: &mut Issues,
    path: &str,
    limits: &LimitsSpec,
    budgets: Budgets<'_>,
    span: Span,
) -> LevelRules {
    level_at(
        issues,
        path,
        &format!("{path}.limits"),
        limits,
        budgets,
        span,
    )
}

/// A level's rules: `limits` (whose fields are reported under `limits_path`) and
/// the budgets of the scope at `path`.
fn level_at(
    issues: &mut Issues,
    path: &str,
    limits_path: &str,
    limits: &LimitsSpec,
    budgets: Budgets<'_>,
    span: Span,
) -> LevelRules {
    let each = budgets.each(path);
    if each.len() > MAX_BUDGETS {
        issues.push(
            format!("{path}.budgets"),
            format!("{} budgets", each.len()),
            Problem::CapExceeded {
                count: each.len(),
                cap: MAX_BUDGETS as u32,
            },
        );
    }
    let mut rules: Vec<BudgetRule> = each
        .iter()
        .filter_map(|(bpath, spec)| budget(issues, bpath, Some(spec)))
        .collect();
    let first = (!rules.is_empty()).then(|| rules.remove(0));
    LevelRules {
        rpm: rate(issues, &format!("{limits_path}.rpm"), limits.rpm, MINUTE),
        rpd: rate(issues, &format!("{limits_path}.rpd"), limits.rpd, DAY),
        tpm: rate(issues, &format!("{limits_path}.tpm"), limits.tpm, MINUTE).map(|rate| {
            TokenRule {
                rate,
                counts: limits.tpm_counts,
            }
        }),
        max_concurrent: limits.max_concurrent.and_then(|max| {
            let field = format!("{limits_path}.max_concurrent");
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
        budget: first,
        more_budgets: rules.into_boxed_slice(),
        span,
    }
}

/// A workspace's or key's limits for one model.
fn model_level(issues: &mut Issues, path: &str, limit: &ModelLimitSpec, span: Span) -> LevelRules {
    let mut rules = level_at(
        issues,
        path,
        path,
        &LimitsSpec {
            rpm: limit.rpm,
            tpm: limit.tpm,
            tpm_counts: limit.tpm_counts,
            ..LimitsSpec::default()
        },
        Budgets::of(limit.budget.as_ref(), &[]),
        span,
    );
    // Its usage counts over the key's or workspace's periods unless it has a budget.
    if let Some(budget) = &rules.budget {
        rules.span = budget.span;
    }
    rules
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
    let budgets = Budgets::of(spec.budget.as_ref(), &[]);
    let span = budgets.span(workspace_span);
    let rules = level(issues, &path, &spec.limits, budgets, span);
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

/// A key's limits per model, sorted by model index.
fn key_model_rules(
    issues: &mut Issues,
    path: &str,
    limits: &[ModelLimitSpec],
    names: &ModelNames<'_>,
    span: Span,
) -> Box<[(u32, LevelRules)]> {
    let chosen = model_limit_rules(issues, names, &format!("{path}.model_limits"), limits, span);
    (0..chosen.len() as u32)
        .zip(chosen)
        .filter_map(|(m, rules)| Some((m, rules?)))
        .collect()
}

/// The rules of `limits` (the `model_limits` at `list`) for each model, by model
/// index: those of the most specific entry that matches it. Reports duplicates,
/// references that name nothing, and entries as specific as another for some model.
fn model_limit_rules(
    issues: &mut Issues,
    names: &ModelNames<'_>,
    list: &str,
    limits: &[ModelLimitSpec],
    span: Span,
) -> Vec<Option<LevelRules>> {
    let mut levels = Vec::with_capacity(limits.len());
    let mut seen: HashMap<&str, u32> = HashMap::new();
    // Per model: the most specific entry so far as (specificity, entry), and an entry
    // just as specific, if any.
    let mut best: Vec<Option<(usize, usize)>> = vec![None; names.names.len()];
    let mut tie: Vec<Option<usize>> = vec![None; names.names.len()];
    for (l, limit) in limits.iter().enumerate() {
        let lpath = format!("{list}[{l}]");
        unique(issues, &mut seen, &limit.model, l, &lpath, "model", list);
        levels.push(model_level(issues, &lpath, limit, span));
        for (m, rank) in names.named(issues, &format!("{lpath}.model"), &limit.model) {
            let m = m as usize;
            match best[m] {
                Some((held, _)) if held > rank => {}
                Some((held, first)) if held == rank => {
                    // The same text twice is already reported as a duplicate.
                    if tie[m].is_none() && limits[first].model != limit.model {
                        tie[m] = Some(l);
                    }
                }
                _ => {
                    best[m] = Some((rank, l));
                    tie[m] = None;
                }
            }
        }
    }
    let mut reported = Vec::new();
    for (m, (best, tie)) in best.iter().zip(&tie).enumerate() {
        if let (Some((_, first)), Some(second)) = (*best, *tie) {
            // One issue per pair of entries, however many models they share.
            if !reported.contains(&(first, second)) {
                reported.push((first, second));
                issues.push(
                    format!("{list}[{second}].model"),
                    quoted(&limits[second].model),
                    Problem::AmbiguousModelLimits {
                        first: format!("{list}[{first}].model"),
                        model: names.names[m].to_owned(),
                    },
                );
            }
        }
    }
    best.into_iter()
        .map(|b| b.map(|(_, l)| levels[l].clone()))
        .collect()
}

/// A scope's temporary override: `base` with the fields it sets replaced.
fn temporary(
    issues: &mut Issues,
    path: &str,
    spec: Option<&TemporarySpec>,
    base: &LevelRules,
) -> Option<Box<Temporary>> {
    let spec = spec?;
    let path = format!("{path}.temporary");
    let mut raised = base.clone();
    let before = issues.0.len();
    if spec.rpm.is_none()
        && spec.rpd.is_none()
        && spec.tpm.is_none()
        && spec.max_concurrent.is_none()
        && spec.budget.is_none()
    {
        issues.push(
            &path,
            format!("until {}", spec.until.to_rfc3339()),
            Problem::Empty,
        );
    }
    let replaced = level_at(
        issues,
        &path,
        &path,
        &LimitsSpec {
            rpm: spec.rpm,
            rpd: spec.rpd,
            tpm: spec.tpm,
            max_concurrent: spec.max_concurrent,
            ..LimitsSpec::default()
        },
        Budgets::none(),
        base.span,
    );
    if spec.rpm.is_some() {
        raised.rpm = replaced.rpm;
    }
    if spec.rpd.is_some() {
        raised.rpd = replaced.rpd;
    }
    if let Some(rate) = replaced.tpm {
        // The base's choice of which tokens count stays.
        let counts = base.tpm.as_ref().map_or(rate.counts, |t| t.counts);
        raised.tpm = Some(TokenRule {
            rate: rate.rate,
            counts,
        });
    }
    if spec.max_concurrent.is_some() {
        raised.max_concurrent = replaced.max_concurrent;
    }
    if let Some(amount) = spec.budget {
        let limit = money(issues, &format!("{path}.budget"), amount);
        match raised.budget.as_mut() {
            Some(budget) => budget.limit = limit,
            None => issues.push(
                format!("{path}.budget"),
                amount,
                Problem::MissingCompanion {
                    companion: "budget",
                },
            ),
        }
    }
    if let Some(reason) = &spec.reason {
        if reason.chars().count() > MAX_REASON_LEN {
            issues.push(
                format!("{path}.reason"),
                format!("<{} characters>", reason.chars().count()),
                Problem::TooLong {
                    max: MAX_REASON_LEN,
                },
            );
        }
    }
    (issues.0.len() == before).then(|| {
        Box::new(Temporary {
            until: Timestamp::from_datetime(spec.until),
            base: base.clone(),
            raised,
        })
    })
}

/// A temporary override's `reason`: at most this many characters.
const MAX_REASON_LEN: usize = 200;

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
        soft: spec.soft,
        span: Span::Period(spec.period),
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
