//! The admin API under `/admin/`, with its own keys and roles, and workspace members.
//!
//! Admin keys are bearer secrets, separate from the API keys of the policy, each with
//! a name (the actor in the audit log and in engine events) and a role that applies to
//! the whole gateway. Only their SHA-256 digests are kept. A secret that is no admin
//! key may be a workspace member's from the policy (`access.rs`): its role applies in
//! the workspaces that list it, and lists, usage and the summary show it only those.
//!
//! | route                              | action             | admin key roles       |
//! |------------------------------------|--------------------|-----------------------|
//! | `GET /admin/workspaces`            | `workspace.list`   | admin, editor, viewer |
//! | `GET /admin/workspaces/{id}`       | `workspace.read`   | admin, editor, viewer |
//! | `GET /admin/usage`                 | `usage.read`       | admin, editor, viewer |
//! | `GET /admin/summary`               | `summary.read`     | admin, editor, viewer |
//! | `GET /admin/workspaces/{id}/requests` | `requests.read` | admin, editor, viewer |
//! | `PATCH /admin/workspaces/{id}`     | `workspace.update` | admin, editor         |
//! | the same, setting `owner`/`members` | `workspace.members` | admin              |
//! | `POST /admin/workspaces`           | `workspace.create` | admin                 |
//! | `DELETE /admin/workspaces/{id}`    | `workspace.delete` | admin                 |
//! | `POST /admin/keys`                 | `key.create`       | admin                 |
//! | `POST /admin/keys/{id}/rotate`     | `key.rotate`       | admin                 |
//! | `POST /admin/keys/{id}/revoke`     | `key.revoke`       | admin                 |
//!
//! Editors change what a workspace may do (status, environment, region, model grants,
//! limits, budgets, webhooks); creating and deleting workspaces, who administers one
//! and anything about keys is for admins. A member has the same rights inside its
//! workspaces, except creating and deleting workspaces (org-wide: admin keys only).
//! Errors use the gateway's OpenAI-style shape: 401 for a missing or unknown
//! admin key, 403 naming the role, the action and the workspace, 404 for an unknown
//! route or id, 405 for a known route with another method, 400 for a body that is not
//! JSON of the expected shape, 409 for an id already in use, 422 with tollgate's policy
//! issues (`path`, `value`, `problem`) when the change would make the policy invalid,
//! 503 when the counter store fails. Every request is audited, whatever its outcome,
//! with the workspace it was about.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, WWW_AUTHENTICATE};
use hyper::{Method, Request, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tollgate::{
    BudgetSpec, EndUserLimitsSpec, Environment, Error, KeySpec, LimitsSpec, MemberSpec,
    ModelLimitSpec, NewKey, PolicyDocument, PolicyError, PolicyIssue, Problem, StoreFailureMode,
    TemporarySpec, WorkspaceSpec, WorkspaceStatus, WorkspaceUpdate,
};

use crate::access::{self, Caller};
use crate::app::App;
use crate::audit::AdminRecord;
use crate::connections::Peer;
use crate::http::{self, bearer, error, json_reply, BodyError, Reply};
use crate::summary;

/// What an admin key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Admin,
    /// Workspace settings, limits, budgets, grants.
    Editor,
    /// Read only.
    Viewer,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Editor => "editor",
            Role::Viewer => "viewer",
        }
    }

    fn parse(text: &str) -> Option<Role> {
        match text.to_ascii_lowercase().as_str() {
            "admin" => Some(Role::Admin),
            "editor" => Some(Role::Editor),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }

    pub fn allows(self, action: Action) -> bool {
        match self {
            Role::Admin => true,
            Role::Editor => action.is_read() || action == Action::UpdateWorkspace,
            Role::Viewer => action.is_read(),
        }
    }
}

/// One admin key: who, with which role, and the SHA-256 of its secret.
pub struct AdminKey {
    pub name: String,
    pub role: Role,
    digest: [u8; 32],
}

/// Admin keys by the SHA-256 of their secret. `AdminKeys::default()` has none, so
/// every admin request is refused with 401.
#[derive(Default)]
pub struct AdminKeys {
    keys: Vec<AdminKey>,
}

/// The admin keys used when none are configured: `(name, role, secret)`.
pub const DEMO_KEYS: [(&str, Role, &str); 3] = [
    ("demo-admin", Role::Admin, "sk-admin-demo"),
    ("demo-editor", Role::Editor, "sk-editor-demo"),
    ("demo-viewer", Role::Viewer, "sk-viewer-demo"),
];

/// Shorter secrets are refused: an admin key guards everything.
const MIN_SECRET_LEN: usize = 12;

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl AdminKeys {
    /// The three demo keys of [`DEMO_KEYS`].
    pub fn demo() -> Self {
        AdminKeys {
            keys: DEMO_KEYS
                .iter()
                .map(|&(name, role, secret)| AdminKey {
                    name: name.into(),
                    role,
                    digest: digest(secret),
                })
                .collect(),
        }
    }

    /// Keys from specs `NAME:ROLE:SECRET`, or `NAME:ROLE:sha256=HEX` to give only the
    /// digest (so the secret need not appear on a command line). Names and secrets
    /// must be unique.
    pub fn parse<S: AsRef<str>>(specs: &[S]) -> Result<Self, String> {
        let mut keys: Vec<AdminKey> = Vec::new();
        for spec in specs {
            let spec = spec.as_ref().trim();
            let mut parts = spec.splitn(3, ':');
            let (Some(name), Some(role), Some(secret)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(format!(
                    "admin key {:?}: expected NAME:ROLE:SECRET",
                    redact(spec)
                ));
            };
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
            {
                return Err(format!(
                    "admin key name {name:?}: use letters, digits and - _ . @"
                ));
            }
            let role = Role::parse(role).ok_or_else(|| {
                format!("admin key {name}: role {role:?} is not admin, editor or viewer")
            })?;
            let digest = match secret.strip_prefix("sha256=") {
                Some(hex_digest) => {
                    let mut bytes = [0u8; 32];
                    hex::decode_to_slice(hex_digest, &mut bytes)
                        .map_err(|_| format!("admin key {name}: sha256= needs 64 hex digits"))?;
                    bytes
                }
                None if secret.len() < MIN_SECRET_LEN => {
                    return Err(format!(
                        "admin key {name}: the secret must be at least {MIN_SECRET_LEN} characters"
                    ))
                }
                None => digest(secret),
            };
            if keys.iter().any(|k| k.name == name) {
                return Err(format!("admin key {name}: name used twice"));
            }
            if keys.iter().any(|k| k.digest == digest) {
                return Err(format!(
                    "admin key {name}: secret already used by another key"
                ));
            }
            keys.push(AdminKey {
                name: name.into(),
                role,
                digest,
            });
        }
        Ok(AdminKeys { keys })
    }

    pub fn keys(&self) -> &[AdminKey] {
        &self.keys
    }

    /// The key whose secret this is. Compares every digest in full, so the time
    /// taken does not tell how much of a digest matched.
    pub fn authenticate(&self, secret: &str) -> Option<&AdminKey> {
        let presented = digest(secret);
        let mut found = None;
        for key in &self.keys {
            let difference = key
                .digest
                .iter()
                .zip(&presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if difference == 0 {
                found = Some(key);
            }
        }
        found
    }
}

/// A spec with its secret hidden, for error messages.
fn redact(spec: &str) -> String {
    match spec.rsplit_once(':') {
        Some((head, _)) => format!("{head}:…"),
        None => "…".into(),
    }
}

/// What an admin request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    ListWorkspaces,
    ReadWorkspace,
    ReadUsage,
    ReadRequests,
    CreateWorkspace,
    UpdateWorkspace,
    DeleteWorkspace,
    CreateKey,
    RotateKey,
    RevokeKey,
    ReadSummary,
    /// A workspace update that changes its owner or members.
    UpdateMembers,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::ListWorkspaces => "workspace.list",
            Action::ReadWorkspace => "workspace.read",
            Action::ReadUsage => "usage.read",
            Action::ReadRequests => "requests.read",
            Action::CreateWorkspace => "workspace.create",
            Action::UpdateWorkspace => "workspace.update",
            Action::DeleteWorkspace => "workspace.delete",
            Action::CreateKey => "key.create",
            Action::RotateKey => "key.rotate",
            Action::RevokeKey => "key.revoke",
            Action::ReadSummary => "summary.read",
            Action::UpdateMembers => "workspace.members",
        }
    }

    pub fn is_read(self) -> bool {
        matches!(
            self,
            Action::ListWorkspaces
                | Action::ReadWorkspace
                | Action::ReadUsage
                | Action::ReadRequests
                | Action::ReadSummary
        )
    }

    /// Acts on the org as a whole: for admin keys only.
    pub fn is_org_wide(self) -> bool {
        matches!(self, Action::CreateWorkspace | Action::DeleteWorkspace)
    }

    /// Reads across workspaces, answered with what the caller may see.
    pub fn is_listing(self) -> bool {
        matches!(
            self,
            Action::ListWorkspaces | Action::ReadUsage | Action::ReadSummary
        )
    }
}

enum Route {
    /// The action and the id in the path, if any.
    Found(Action, Option<String>),
    /// A known path with another method: the methods it takes.
    WrongMethod(&'static str),
    NotFound,
}

fn route(method: &Method, path: &str) -> Route {
    let Some(rest) = path.strip_prefix("/admin/") else {
        return Route::NotFound;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Route::NotFound;
    }
    let found = |action, id: Option<&str>| Route::Found(action, id.map(str::to_owned));
    match (parts.as_slice(), method) {
        (["workspaces"], &Method::GET) => found(Action::ListWorkspaces, None),
        (["workspaces"], &Method::POST) => found(Action::CreateWorkspace, None),
        (["workspaces"], _) => Route::WrongMethod("GET, POST"),
        (["workspaces", id], &Method::GET) => found(Action::ReadWorkspace, Some(id)),
        (["workspaces", id], &Method::PATCH) => found(Action::UpdateWorkspace, Some(id)),
        (["workspaces", id], &Method::DELETE) => found(Action::DeleteWorkspace, Some(id)),
        (["workspaces", _], _) => Route::WrongMethod("GET, PATCH, DELETE"),
        (["workspaces", id, "requests"], &Method::GET) => found(Action::ReadRequests, Some(id)),
        (["workspaces", _, "requests"], _) => Route::WrongMethod("GET"),
        (["keys"], &Method::POST) => found(Action::CreateKey, None),
        (["keys", id, "rotate"], &Method::POST) => found(Action::RotateKey, Some(id)),
        (["keys", id, "revoke"], &Method::POST) => found(Action::RevokeKey, Some(id)),
        (["keys"] | ["keys", _, "rotate" | "revoke"], _) => Route::WrongMethod("POST"),
        (["usage"], &Method::GET) => found(Action::ReadUsage, None),
        (["usage"], _) => Route::WrongMethod("GET"),
        (["summary"], &Method::GET) => found(Action::ReadSummary, None),
        (["summary"], _) => Route::WrongMethod("GET"),
        _ => Route::NotFound,
    }
}

/// Serve one `/admin/` request and audit it, whatever the outcome.
pub async fn handle(app: &App, request: Request<Incoming>) -> Reply {
    let mut record = AdminRecord {
        peer: request.extensions().get::<Peer>().map(|p| p.0.ip()),
        ..AdminRecord::default()
    };
    let reply = serve(app, request, &mut record).await;
    app.audit.admin(record, reply.status());
    reply
}

/// An error reply whose message is also the audit line's reason.
fn fail(record: &mut AdminRecord, status: StatusCode, code: &str, message: String) -> Reply {
    let reply = error(status, code, &message);
    record.reason = Some(message);
    reply
}

async fn serve(app: &App, request: Request<Incoming>, record: &mut AdminRecord) -> Reply {
    let found = route(request.method(), request.uri().path());
    match &found {
        Route::Found(action, id) => {
            record.action = action.name().into();
            record.target.clone_from(id);
        }
        _ => {
            record.action = "unknown".into();
            record.target = Some(format!("{} {}", request.method(), request.uri().path()));
        }
    }

    let policy = app.backend.policy();
    let caller = bearer(&request)
        .and_then(|secret| access::authenticate(&app.admin, policy.document(), secret));
    let Some(caller) = caller else {
        let message = if bearer(&request).is_some() {
            "unknown admin key"
        } else {
            "missing admin key (Authorization: Bearer ...)"
        };
        let mut reply = fail(
            record,
            StatusCode::UNAUTHORIZED,
            "invalid_admin_key",
            message.into(),
        );
        reply.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tollgate-admin\""),
        );
        return reply;
    };
    record.actor = Some(caller.actor().to_owned());
    record.credential = Some(caller.credential());
    record.role = caller.role_in(None);

    let (action, id) = match found {
        Route::Found(action, id) => (action, id),
        Route::WrongMethod(allow) => {
            let mut reply = fail(
                record,
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not served here; allowed: {allow}", request.method()),
            );
            reply
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
            return reply;
        }
        Route::NotFound => {
            return fail(
                record,
                StatusCode::NOT_FOUND,
                "not_found",
                "no such admin route".into(),
            )
        }
    };
    let workspace = workspace_of(policy.document(), action, id.as_deref());
    drop(policy);
    if let Err(refusal) = authorize(&caller, action, workspace.as_deref(), record) {
        return json_reply(StatusCode::FORBIDDEN, &refusal);
    }

    let actor = caller.actor();
    let id = id.unwrap_or_default();
    let result = match action {
        Action::ListWorkspaces => Ok(list_workspaces(app, &caller)),
        Action::ReadWorkspace => read_workspace(app, &id),
        Action::ReadUsage => read_usage(app, &caller).await,
        Action::ReadSummary => read_summary(app, &caller).await,
        Action::ReadRequests => read_requests(app, &id, request.uri().query()),
        Action::CreateWorkspace => create_workspace(app, request, actor, record).await,
        Action::UpdateWorkspace | Action::UpdateMembers => {
            update_workspace(app, request, &id, &caller, record).await
        }
        Action::DeleteWorkspace => delete_workspace(app, &id, actor).await,
        Action::CreateKey => create_key(app, request, &caller, record).await,
        Action::RotateKey => rotate_key(app, request, &id, actor).await,
        Action::RevokeKey => revoke_key(app, &id, actor).await,
    };
    result.unwrap_or_else(|failure| failure.reply(record))
}

/// The workspace an action is about, when the route tells: the id in the path, or
/// the workspace of the key in the path.
fn workspace_of(doc: &PolicyDocument, action: Action, id: Option<&str>) -> Option<String> {
    let id = id?;
    match action {
        Action::ReadWorkspace
        | Action::UpdateWorkspace
        | Action::UpdateMembers
        | Action::DeleteWorkspace
        | Action::ReadRequests => Some(id.to_owned()),
        Action::RotateKey | Action::RevokeKey => doc
            .keys
            .iter()
            .find(|k| k.id == id)
            .map(|k| k.workspace.clone()),
        _ => None,
    }
}

/// Check `caller` may do `action` on `workspace`, recording the workspace and the
/// caller's role there; a refusal is the body of the 403.
fn authorize(
    caller: &Caller,
    action: Action,
    workspace: Option<&str>,
    record: &mut AdminRecord,
) -> Result<(), Value> {
    if workspace.is_some() {
        record.workspace = workspace.map(str::to_owned);
        record.role = caller.role_in(workspace);
    }
    let Err(refusal) = caller.check(action, workspace) else {
        return Ok(());
    };
    record.reason = Some(refusal.message.clone());
    Err(json!({"error": {
        "message": refusal.message,
        "type": "permission_error",
        "code": "admin_forbidden",
        "role": refusal.role,
        "action": action.name(),
        "workspace": workspace,
        "actor": caller.actor(),
    }}))
}

/// Why an admin request failed, before it becomes a reply.
enum Failure {
    /// 400: the body is not JSON of the expected shape.
    BadBody(String),
    /// 404: the id in the path names nothing.
    NotFound(String),
    /// 409: the id is already used.
    Conflict(Vec<PolicyIssue>),
    /// 422: the change would make the policy invalid.
    Invalid(Vec<PolicyIssue>),
    /// 413, 408 or 400: the body is too big, too slow or cut off.
    Body(BodyError),
    /// 503: the counter or policy store failed (nothing was changed).
    Store(String),
    /// 500: anything else.
    Internal(String),
    /// 403, with its body (a check once the body named the workspace).
    Forbidden(Value),
}

fn issues_json(issues: &[PolicyIssue]) -> Value {
    issues
        .iter()
        .map(|i| json!({"path": i.path, "value": i.value, "problem": i.problem.to_string()}))
        .collect()
}

impl Failure {
    /// A backend error; `lookup` is where the path's id is looked up (`workspaces` or
    /// `keys`), so that an unknown id there is a 404 rather than a 422.
    fn from_backend(err: Error, lookup: Option<&str>) -> Failure {
        match err {
            Error::Policy(PolicyError::Invalid { issues }) => {
                let unknown_id = |i: &PolicyIssue| {
                    Some(i.path.as_str()) == lookup
                        && matches!(i.problem, Problem::UnknownWorkspace | Problem::UnknownKey)
                };
                if let Some(issue) = issues.iter().find(|i| unknown_id(i)) {
                    let noun = issue.path.trim_end_matches('s');
                    Failure::NotFound(format!("no {noun} has id {}", issue.value))
                } else if issues
                    .iter()
                    .any(|i| matches!(i.problem, Problem::Duplicate { .. }))
                {
                    Failure::Conflict(issues)
                } else {
                    Failure::Invalid(issues)
                }
            }
            // The change could not be stored (state file, Redis): it was not applied.
            Error::Policy(PolicyError::Persist(e)) => Failure::Store(e.to_string()),
            Error::Store(e) => Failure::Store(e.to_string()),
            other => Failure::Internal(other.to_string()),
        }
    }

    fn reply(self, record: &mut AdminRecord) -> Reply {
        let with_issues = |record: &mut AdminRecord, status, code: &str, issues: &[PolicyIssue]| {
            let summary: Vec<String> = issues.iter().map(ToString::to_string).collect();
            let message = summary.join("; ");
            record.reason = Some(message.clone());
            json_reply(
                status,
                &json!({"error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "code": code,
                    "issues": issues_json(issues),
                }}),
            )
        };
        match self {
            Failure::BadBody(message) => fail(
                record,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                message,
            ),
            Failure::NotFound(message) => fail(record, StatusCode::NOT_FOUND, "not_found", message),
            Failure::Conflict(issues) => {
                with_issues(record, StatusCode::CONFLICT, "conflict", &issues)
            }
            Failure::Invalid(issues) => with_issues(
                record,
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_policy",
                &issues,
            ),
            Failure::Body(e) => {
                let (status, code, message) = e.parts();
                fail(record, status, code, message.into())
            }
            Failure::Store(message) => fail(
                record,
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                message,
            ),
            Failure::Internal(message) => fail(
                record,
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                message,
            ),
            Failure::Forbidden(body) => json_reply(StatusCode::FORBIDDEN, &body),
        }
    }
}

type Handled = Result<Reply, Failure>;

async fn read_body(app: &App, request: Request<Incoming>) -> Result<Bytes, Failure> {
    http::read_body(request, app.limits.body_timeout)
        .await
        .map_err(Failure::Body)
}

/// The body as `T`; an empty body is `T::default()` when `optional`.
fn parse<T: DeserializeOwned + Default>(bytes: &[u8], optional: bool) -> Result<T, Failure> {
    if optional && bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| {
        Failure::BadBody(match e.classify() {
            serde_json::error::Category::Data => format!("body does not fit: {e}"),
            _ => format!("body is not JSON: {e}"),
        })
    })
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A workspace as listed: its settings, whether it is the default, its members (ids
/// and roles, never digests) and its keys (ids and status, never digests).
fn workspace_json(doc: &PolicyDocument, ws: &WorkspaceSpec) -> Value {
    let mut value = serde_json::to_value(ws).unwrap_or(Value::Null);
    let keys: Vec<Value> = doc
        .keys
        .iter()
        .filter(|k| k.workspace == ws.id)
        .map(key_json)
        .collect();
    let members: Vec<Value> = ws
        .members
        .iter()
        .map(|m| json!({"id": m.id, "role": m.role}))
        .collect();
    if let Value::Object(map) = &mut value {
        let default = doc.org.default_workspace.as_deref() == Some(ws.id.as_str());
        map.insert("default".into(), json!(default));
        map.insert("owner".into(), json!(ws.owner));
        map.insert("members".into(), json!(members));
        map.insert("webhooks".into(), json!(ws.webhooks));
        map.insert("keys".into(), json!(keys));
    }
    value
}

fn key_json(key: &KeySpec) -> Value {
    json!({
        "id": key.id,
        "status": key.status,
        "expires_at": key.expires_at.map(rfc3339),
        "previous_secret_expires_at": key.previous_secret_expires_at.map(rfc3339),
        "limits": key.limits,
        "budget": key.budget,
        "budgets": key.budgets,
        "models": key.models,
        "model_limits": key.model_limits,
        "temporary": key.temporary,
    })
}

fn list_workspaces(app: &App, caller: &Caller) -> Reply {
    let policy = app.backend.policy();
    let doc = policy.document();
    let data: Vec<Value> = doc
        .workspaces
        .iter()
        .filter(|ws| caller.sees(&ws.id))
        .map(|ws| workspace_json(doc, ws))
        .collect();
    json_reply(
        StatusCode::OK,
        &json!({"object": "list", "default_workspace": doc.org.default_workspace, "data": data}),
    )
}

fn read_workspace(app: &App, id: &str) -> Handled {
    let policy = app.backend.policy();
    let doc = policy.document();
    let ws = doc
        .workspaces
        .iter()
        .find(|w| w.id == id)
        .ok_or_else(|| Failure::NotFound(format!("no workspace has id {id:?}")))?;
    Ok(json_reply(StatusCode::OK, &workspace_json(doc, ws)))
}

/// The workspace as it is now, answered with `status`.
fn workspace_reply(app: &App, id: &str, status: StatusCode) -> Reply {
    let policy = app.backend.policy();
    let doc = policy.document();
    let body = doc
        .workspaces
        .iter()
        .find(|w| w.id == id)
        .map_or_else(|| json!({"id": id}), |ws| workspace_json(doc, ws));
    json_reply(status, &body)
}

/// Usage of what the caller may see: everything for an admin key; for a member, its
/// workspaces and their keys, without the org's totals or wallet.
async fn read_usage(app: &App, caller: &Caller) -> Handled {
    let mut usage = app
        .backend
        .usage()
        .await
        .map_err(|e| Failure::from_backend(e, None))?;
    usage.workspaces.retain(|w| caller.sees(&w.id));
    usage.keys.retain(|k| caller.sees(&k.workspace));
    let mut body = serde_json::to_value(&usage).map_err(|e| Failure::Internal(e.to_string()))?;
    if let (false, Value::Object(map)) = (caller.sees_org(), &mut body) {
        map.remove("org");
        map.remove("wallet_spent");
    }
    Ok(json_reply(StatusCode::OK, &body))
}

/// `GET /admin/summary`: the workspaces the caller may see, in figures.
async fn read_summary(app: &App, caller: &Caller) -> Handled {
    let usage = app
        .backend
        .usage()
        .await
        .map_err(|e| Failure::from_backend(e, None))?;
    let policy = app.backend.policy();
    let body = summary::summarize(policy.document(), &usage, |id| caller.sees(id));
    Ok(json_reply(StatusCode::OK, &body))
}

/// Page size of `GET /admin/workspaces/{id}/requests` unless `limit` says otherwise.
const REQUESTS_PAGE: usize = 50;
/// The largest `limit` taken.
const REQUESTS_PAGE_MAX: usize = 500;

/// A workspace's recent requests, newest first: `?limit=N` (1 to 500, default 50) and
/// `?before=SEQ` (the `next_before` of the previous page) to page back.
fn read_requests(app: &App, id: &str, query: Option<&str>) -> Handled {
    let policy = app.backend.policy();
    if !policy.document().workspaces.iter().any(|w| w.id == id) {
        return Err(Failure::NotFound(format!("no workspace has id {id}")));
    }
    let mut limit = REQUESTS_PAGE;
    let mut before = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=REQUESTS_PAGE_MAX).contains(n))
                    .ok_or_else(|| {
                        Failure::BadBody(format!(
                            "limit {value:?}: expected a whole number from 1 to {REQUESTS_PAGE_MAX}"
                        ))
                    })?;
            }
            "before" => {
                before = Some(value.parse::<u64>().map_err(|_| {
                    Failure::BadBody(format!("before {value:?}: expected a request `seq`"))
                })?);
            }
            other => {
                return Err(Failure::BadBody(format!(
                    "unknown query parameter {:?}; expected limit, before",
                    other.chars().take(64).collect::<String>()
                )))
            }
        }
    }
    let (lines, has_more) = app.requests.recent(id, limit, before);
    let next_before = if has_more {
        lines.last().map(|line| line.seq)
    } else {
        None
    };
    Ok(json_reply(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": lines.iter().map(|line| &**line).collect::<Vec<_>>(),
            "has_more": has_more,
            "next_before": next_before,
        }),
    ))
}

async fn create_workspace(
    app: &App,
    request: Request<Incoming>,
    actor: &str,
    record: &mut AdminRecord,
) -> Handled {
    let spec: WorkspaceSpec = parse(&read_body(app, request).await?, false)?;
    record.target = Some(spec.id.clone());
    let id = spec.id.clone();
    app.backend
        .create_workspace(spec, actor)
        .await
        .map_err(|e| Failure::from_backend(e, None))?;
    Ok(workspace_reply(app, &id, StatusCode::CREATED))
}

/// `PATCH /admin/workspaces/{id}`: only the fields given change. `budget: null`
/// removes the budget.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkspacePatch {
    status: Option<WorkspaceStatus>,
    environment: Option<Environment>,
    region: Option<String>,
    models: Option<Vec<String>>,
    limits: Option<LimitsSpec>,
    model_limits: Option<Vec<ModelLimitSpec>>,
    #[serde(default, deserialize_with = "present")]
    budget: Option<Option<BudgetSpec>>,
    budgets: Option<Vec<BudgetSpec>>,
    #[serde(default, deserialize_with = "present")]
    temporary: Option<Option<TemporarySpec>>,
    #[serde(default, deserialize_with = "present")]
    end_user_limits: Option<Option<EndUserLimitsSpec>>,
    on_store_error: Option<StoreFailureMode>,
    #[serde(default, deserialize_with = "present")]
    owner: Option<Option<String>>,
    members: Option<Vec<MemberSpec>>,
    webhooks: Option<Vec<String>>,
}

/// A field that is present, even as `null`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

async fn update_workspace(
    app: &App,
    request: Request<Incoming>,
    id: &str,
    caller: &Caller,
    record: &mut AdminRecord,
) -> Handled {
    let patch: WorkspacePatch = parse(&read_body(app, request).await?, false)?;
    // Who may administer the workspace is for its admins (or admin keys) to change.
    if patch.owner.is_some() || patch.members.is_some() {
        record.action = Action::UpdateMembers.name().into();
        authorize(caller, Action::UpdateMembers, Some(id), record).map_err(Failure::Forbidden)?;
    }
    let update = WorkspaceUpdate {
        status: patch.status,
        environment: patch.environment,
        region: patch.region,
        models: patch.models,
        limits: patch.limits,
        model_limits: patch.model_limits,
        budget: patch.budget,
        budgets: patch.budgets,
        temporary: patch.temporary,
        end_user_limits: patch.end_user_limits,
        on_store_error: patch.on_store_error,
        owner: patch.owner,
        members: patch.members,
        webhooks: patch.webhooks,
    };
    if update == WorkspaceUpdate::default() {
        return Err(Failure::BadBody(
            "nothing to change: give status, environment, region, models, limits, \
             model_limits, budget, budgets, temporary, end_user_limits, on_store_error, owner, \
             members or webhooks"
                .into(),
        ));
    }
    let actor = caller.actor();
    app.backend
        .update_workspace(id, update, actor)
        .await
        .map_err(|e| Failure::from_backend(e, Some("workspaces")))?;
    Ok(workspace_reply(app, id, StatusCode::OK))
}

async fn delete_workspace(app: &App, id: &str, actor: &str) -> Handled {
    app.backend
        .delete_workspace(id, actor)
        .await
        .map_err(|e| Failure::from_backend(e, Some("workspaces")))?;
    Ok(json_reply(
        StatusCode::OK,
        &json!({"id": id, "deleted": true}),
    ))
}

/// `POST /admin/keys`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRequest {
    id: String,
    workspace: String,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    limits: LimitsSpec,
    #[serde(default)]
    budget: Option<BudgetSpec>,
    #[serde(default)]
    budgets: Vec<BudgetSpec>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    model_limits: Vec<ModelLimitSpec>,
    #[serde(default)]
    temporary: Option<TemporarySpec>,
}

const SHOWN_ONCE: &str = "store the secret now: it is not shown again";

async fn create_key(
    app: &App,
    request: Request<Incoming>,
    caller: &Caller,
    record: &mut AdminRecord,
) -> Handled {
    let asked: KeyRequest = parse(&read_body(app, request).await?, false)?;
    record.target = Some(asked.id.clone());
    authorize(caller, Action::CreateKey, Some(&asked.workspace), record)
        .map_err(Failure::Forbidden)?;
    let actor = caller.actor();
    let workspace = asked.workspace.clone();
    let issued = app
        .backend
        .create_key(
            NewKey {
                id: asked.id,
                workspace: asked.workspace,
                expires_at: asked.expires_at,
                limits: asked.limits,
                budget: asked.budget,
                budgets: asked.budgets,
                models: asked.models,
                model_limits: asked.model_limits,
                temporary: asked.temporary,
            },
            actor,
        )
        .await
        .map_err(|e| Failure::from_backend(e, None))?;
    Ok(json_reply(
        StatusCode::CREATED,
        &json!({
            "id": issued.id,
            "workspace": workspace,
            "secret": issued.secret,
            "expires_at": asked.expires_at.map(rfc3339),
            "note": SHOWN_ONCE,
        }),
    ))
}

/// `POST /admin/keys/{id}/rotate`, body optional.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    /// How long the old secret keeps working; default 0 (refused at once).
    #[serde(default)]
    grace_seconds: i64,
}

/// The longest grace a rotation may give the old secret: 7 days.
const MAX_GRACE_SECONDS: i64 = 7 * 86_400;

async fn rotate_key(app: &App, request: Request<Incoming>, id: &str, actor: &str) -> Handled {
    let asked: RotateRequest = parse(&read_body(app, request).await?, true)?;
    if !(0..=MAX_GRACE_SECONDS).contains(&asked.grace_seconds) {
        let problem = if asked.grace_seconds < 0 {
            Problem::Negative
        } else {
            Problem::TooLarge {
                max: MAX_GRACE_SECONDS.to_string(),
            }
        };
        return Err(Failure::Invalid(vec![PolicyIssue {
            path: "grace_seconds".into(),
            value: asked.grace_seconds.to_string(),
            problem,
        }]));
    }
    let grace = Duration::from_secs(asked.grace_seconds.unsigned_abs());
    let issued = app
        .backend
        .rotate_key(id, grace, actor)
        .await
        .map_err(|e| Failure::from_backend(e, Some("keys")))?;
    // As the policy records it (on the Redis backend, measured on Redis TIME).
    let old_until = app
        .backend
        .policy()
        .document()
        .keys
        .iter()
        .find(|k| k.id == issued.id)
        .and_then(|k| k.previous_secret_expires_at)
        .map(rfc3339);
    Ok(json_reply(
        StatusCode::OK,
        &json!({
            "id": issued.id,
            "secret": issued.secret,
            "old_secret_valid_until": old_until,
            "note": SHOWN_ONCE,
        }),
    ))
}

async fn revoke_key(app: &App, id: &str, actor: &str) -> Handled {
    app.backend
        .revoke_key(id, actor)
        .await
        .map_err(|e| Failure::from_backend(e, Some("keys")))?;
    Ok(json_reply(
        StatusCode::OK,
        &json!({"id": id, "revoked": true}),
    ))
}
