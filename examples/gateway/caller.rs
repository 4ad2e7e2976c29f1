//! Who is calling: the policy's key for a bearer secret, found without touching any
//! counter. Routes use it to refuse an unknown, revoked or expired key before doing
//! work for it (reading and tokenizing a body costs far more than a lookup), and
//! `/v1/models` to list what a key may call without reserving anything (a probe
//! through `check_and_reserve` would count as admitted requests in the metrics).
//!
//! The lookup scans the policy's keys, comparing SHA-256 digests: fine for this
//! example's policies; the engines' own lookup (on the request path) is indexed. The
//! engine still decides every request: this only turns away what it would refuse
//! anyway, with the same status and code.

use chrono::{DateTime, Utc};
use hyper::StatusCode;
use sha2::{Digest, Sha256};
use tollgate::{KeySpec, KeyStatus, PolicyDocument, WorkspaceSpec, WorkspaceStatus};

use crate::http::{error, Reply};

/// The key whose current or rotated-out secret this is, whatever its state.
pub fn find_key<'p>(policy: &'p PolicyDocument, secret: &str) -> Option<&'p KeySpec> {
    let digest = hex::encode(Sha256::digest(secret.as_bytes()));
    policy.keys.iter().find(|key| {
        key.secret_sha256.eq_ignore_ascii_case(&digest)
            || key
                .previous_secret_sha256
                .as_deref()
                .is_some_and(|previous| previous.eq_ignore_ascii_case(&digest))
    })
}

/// The usable key for this secret and its workspace, or the 401 the engine would
/// answer: unknown (or a rotated-out secret past its grace), revoked, expired.
// The error is the reply itself, as `read_json`'s is: boxing it would only add a step.
#[allow(clippy::result_large_err)]
pub fn identify<'p>(
    policy: &'p PolicyDocument,
    secret: &str,
    now: DateTime<Utc>,
) -> Result<(&'p KeySpec, Option<&'p WorkspaceSpec>), Reply> {
    let refuse = |code: &str, message: &str| error(StatusCode::UNAUTHORIZED, code, message);
    let digest = hex::encode(Sha256::digest(secret.as_bytes()));
    let key =
        find_key(policy, secret).ok_or_else(|| refuse("invalid_api_key", "unknown API key"))?;
    let current = key.secret_sha256.eq_ignore_ascii_case(&digest);
    if !current
        && !key
            .previous_secret_expires_at
            .is_some_and(|until| until > now)
    {
        return Err(refuse("invalid_api_key", "unknown API key"));
    }
    if key.status == KeyStatus::Revoked {
        return Err(refuse("api_key_revoked", "this API key was revoked"));
    }
    if key.expires_at.is_some_and(|at| at <= now) {
        return Err(refuse("api_key_expired", "this API key has expired"));
    }
    let workspace = policy.workspaces.iter().find(|w| w.id == key.workspace);
    Ok((key, workspace))
}

/// The models a key's workspace may call now, by name: none while the workspace is
/// not active; every priced model for the org's default workspace.
pub fn callable_models<'p>(
    policy: &'p PolicyDocument,
    workspace: Option<&WorkspaceSpec>,
) -> Vec<&'p str> {
    let Some(workspace) = workspace.filter(|w| w.status == WorkspaceStatus::Active) else {
        return Vec::new();
    };
    let everything = policy.org.default_workspace.as_deref() == Some(workspace.id.as_str());
    policy
        .models
        .iter()
        .map(|model| model.name.as_str())
        .filter(|name| everything || workspace.models.iter().any(|granted| granted == name))
        .collect()
}
