//! The decision logic every backend shares: who is asking, may they call this model,
//! what the request asks each level for, and what a refusal tells the client.
//!
//! Backends differ only in where counters live (`store` in memory, Lua scripts in
//! Redis); both resolve a request here and turn a level's refusal into a `Denial`
//! here, so the two can never disagree about a decision.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::clock::Timestamp;
use crate::denial::{Denial, DenialReason, Quota, Scope};
use crate::end_users::valid_id;
use crate::money::{picos_to_decimal, usage_cost};
use crate::policy::{KeyStatus, WorkspaceStatus};
use crate::request::{Credential, Request};
use crate::snapshot::{Route, Snapshot, NO_KEY_MODEL};
use crate::store::{Ask, Refusal};

/// A request that passed the key, workspace and model checks: where its counters
/// are, and what it asks of each level.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Admission {
    pub(crate) route: Route,
    pub(crate) ask: Ask,
    /// Pico-dollars per input and per output token of the requested model.
    pub(crate) input_price: u64,
    pub(crate) output_price: u64,
}

/// Resolve the key and model and check status, expiry and grant; compute the
/// worst-case tokens and cost to hold. Allocates nothing.
#[inline]
pub(crate) fn admit(
    snap: &Snapshot,
    request: &Request<'_>,
    now: Timestamp,
    budget_status: u16,
) -> Result<Admission, Denial> {
    let policy = &snap.policy;
    let deny = |reason, scope| Err(denial(reason, scope, budget_status));

    let key_index = match request.credential {
        Credential::Secret(secret) => {
            let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
            snap.key_index_by_digest(&digest)
                .or_else(|| snap.key_index_by_previous_digest(&digest, now))
        }
        Credential::KeyId(id) => snap.key_index(id),
    };
    let Some(key_index) = key_index else {
        return deny(DenialReason::UnknownKey, Scope::Key);
    };
    let key = &policy.keys[key_index as usize];
    if key.status == KeyStatus::Revoked {
        return deny(DenialReason::KeyRevoked, Scope::Key);
    }
    if key.expires_at.is_some_and(|at| now >= at) {
        if let Some(events) = &snap.events {
            events.key_expired(snap, key_index, now);
        }
        return deny(DenialReason::KeyExpired, Scope::Key);
    }
    let ws = &policy.workspaces[key.workspace as usize];
    if ws.status != WorkspaceStatus::Active {
        return deny(
            DenialReason::WorkspaceNotActive(ws.status),
            Scope::Workspace,
        );
    }
    let Some(model_index) = snap.requested_model_index(request.model) else {
        return deny(DenialReason::UnknownModel, Scope::WorkspaceModel);
    };
    if !ws.granted[model_index as usize] {
        return deny(DenialReason::ModelNotGranted, Scope::WorkspaceModel);
    }
    if key
        .granted
        .as_ref()
        .is_some_and(|granted| !granted[model_index as usize])
    {
        return deny(DenialReason::ModelNotGranted, Scope::Key);
    }
    // Checked whether or not the workspace limits end users, so a bad id is refused
    // the same way before and after limits are set.
    if request.end_user.is_some_and(|id| !valid_id(id)) {
        return deny(DenialReason::InvalidEndUser, Scope::EndUser);
    }
    let model = &policy.models[model_index as usize];

    let output_tokens = request
        .max_output_tokens
        .or(key.default_max_output)
        .or(model.default_max_output)
        .or(ws.default_max_output)
        .unwrap_or(policy.org.default_max_output);
    let input = u64::from(request.input_tokens);
    // `n` outputs of up to `output_tokens` each: a u32 times a u32 fits in a u64.
    let output = u64::from(output_tokens) * u64::from(request.outputs.max(1));
    Ok(Admission {
        route: Route {
            key: key_index,
            workspace: key.workspace,
            model: model_index,
            key_model: key.model_position(model_index).unwrap_or(NO_KEY_MODEL),
        },
        ask: Ask {
            input_tokens: input,
            output_tokens: output,
            cost: usage_cost(input, output, model.input_price, model.output_price),
        },
        input_price: model.input_price,
        output_price: model.output_price,
    })
}

/// A denial that carries no numbers (a bad key, a model not granted).
pub(crate) fn denial(reason: DenialReason, scope: Scope, budget_status: u16) -> Denial {
    Denial {
        budget_status,
        ..Denial::new(reason, scope)
    }
}

/// What a level's refusal tells the client: the limit, what is left, when to retry.
pub(crate) fn refused(
    scope: Scope,
    wallet: bool,
    refusal: Refusal,
    ask: Ask,
    now: Timestamp,
    budget_status: u16,
) -> Denial {
    let deny = |reason| denial(reason, scope, budget_status);
    match refusal {
        Refusal::Requests {
            per_day,
            rule,
            remaining,
            retry_after,
            reset,
        } => Denial {
            quota: Some(Quota::Requests {
                limit: rule.limit,
                remaining,
                window: rule.window,
            }),
            retry_after,
            reset_after: Some(reset),
            ..deny(if per_day {
                DenialReason::RequestsPerDay
            } else {
                DenialReason::RequestsPerMinute
            })
        },
        Refusal::Tokens {
            rule,
            requested,
            remaining,
            retry_after,
            reset,
        } => Denial {
            quota: Some(Quota::Tokens {
                limit: rule.limit,
                remaining,
                window: rule.window,
                requested,
            }),
            retry_after,
            reset_after: Some(reset),
            ..deny(DenialReason::TokensPerMinute)
        },
        Refusal::Concurrency { limit, in_flight } => Denial {
            quota: Some(Quota::Concurrent { limit, in_flight }),
            // A slot frees when some request finishes: there is no time to promise.
            retry_after: Some(Duration::from_secs(1)),
            ..deny(DenialReason::Concurrency)
        },
        Refusal::Budget {
            limit,
            remaining,
            period_end,
        } => {
            let reset_after =
                (period_end.as_unix_nanos() != u64::MAX).then(|| period_end.saturating_since(now));
            Denial {
                quota: Some(Quota::Money {
                    limit: picos_to_decimal(limit),
                    remaining: picos_to_decimal(remaining),
                    requested: picos_to_decimal(ask.cost),
                }),
                retry_after: None,
                reset_after,
                ..deny(if wallet {
                    DenialReason::Wallet
                } else {
                    DenialReason::Budget
                })
            }
        }
    }
}
