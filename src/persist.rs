//! Saving the in-memory engine's counters to a file and loading them on start, so a
//! restarted single-instance gateway does not forget this period's spend.
//!
//! The file is a checksummed JSON envelope written atomically (`durable`), so a
//! crash mid-write leaves the previous file whole, and a torn, edited or truncated
//! file fails its checksum or its parse: a clear error, never a silent reset.
//! Spend, requests and tokens of the current and previous periods are saved; rate
//! limit buckets and holds of requests in flight are not.

use std::fs;
use std::path::{Path, PathBuf};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::budget::PeriodTotals;
use crate::clock::Timestamp;
use crate::durable;
use crate::money::{picos_from_decimal, picos_to_decimal};
use crate::snapshot::Snapshot;
use crate::store::ScopeState;
use crate::sync::Arc;

const FORMAT: u32 = 1;

/// Why counters could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PersistError {
    /// Reading or writing the file failed.
    #[error("counter file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file is not a whole counter file written by tollgate.
    #[error("counter file {path} is corrupt: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong: checksum mismatch, parse error with position, version.
        detail: String,
    },
    /// The file belongs to another org.
    #[error("counter file {path} is for org {found:?}, not {expected:?}")]
    WrongOrg {
        /// The file.
        path: PathBuf,
        /// The org the running policy is for.
        expected: String,
        /// The org in the file.
        found: String,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    saved_at: Timestamp,
    org: String,
    scopes: Vec<SavedScope>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedScope {
    /// `key:<id>`, `workspace:<id>`, `model:<workspace>/<model>`, `org` or `wallet`.
    scope: String,
    current: SavedPeriod,
    previous: SavedPeriod,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedPeriod {
    start: Timestamp,
    end: Timestamp,
    spent: Decimal,
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
}

impl From<PeriodTotals> for SavedPeriod {
    fn from(t: PeriodTotals) -> Self {
        SavedPeriod {
            start: t.start,
            end: t.end,
            spent: picos_to_decimal(t.spent),
            requests: t.requests,
            input_tokens: t.input_tokens,
            output_tokens: t.output_tokens,
        }
    }
}

impl SavedPeriod {
    fn totals(&self) -> Option<PeriodTotals> {
        Some(PeriodTotals {
            start: self.start,
            end: self.end,
            spent: picos_from_decimal(self.spent).ok()?,
            held: 0,
            requests: self.requests,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
        })
    }
}

/// Every scope of a snapshot: its name in the file and its counters.
fn scopes<'a>(snap: &'a Snapshot) -> Vec<(String, &'a ScopeState)> {
    let policy = &snap.policy;
    let mut out = Vec::new();
    // Budgets beyond a scope's first, named after the scope.
    let extras =
        |out: &mut Vec<(String, &'a ScopeState)>, name: &str, cells: &'a [Arc<ScopeState>]| {
            for (i, cell) in cells.iter().enumerate() {
                out.push((format!("{name}/budget{}", i + 1), &**cell));
            }
        };
    for (k, key) in policy.keys.iter().enumerate() {
        let name = format!("key:{}", key.id);
        extras(&mut out, &name, &snap.key_budgets[k]);
        out.push((name, &*snap.keys[k]));
        for ((m, _), state) in key.model_rules.iter().zip(&*snap.key_models[k]) {
            let model = &policy.models[*m as usize].name;
            out.push((format!("keymodel:{}/{model}", key.id), &**state));
        }
    }
    for (w, ws) in policy.workspaces.iter().enumerate() {
        let name = format!("workspace:{}", ws.id);
        extras(&mut out, &name, &snap.workspace_budgets[w]);
        out.push((name, &**snap.workspaces[w]));
        for (m, model) in policy.models.iter().enumerate() {
            out.push((
                format!("model:{}/{}", ws.id, model.name),
                &**snap.workspace_models[w][m],
            ));
        }
    }
    extras(&mut out, "org", &snap.org_budgets);
    out.push(("org".into(), &**snap.org));
    out.push(("wallet".into(), &**snap.wallet));
    out
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        path: path.to_owned(),
        source,
    }
}

/// End users are saved as `enduser:<workspace id>/<end user id>`: workspace ids never
/// contain `/`, so the first one ends the workspace's.
const END_USER: &str = "enduser:";

/// Every end user tracked in `snap`'s workspaces, named as in the file.
fn end_users(snap: &Snapshot) -> Vec<(String, Arc<ScopeState>)> {
    let mut out = Vec::new();
    for (w, ws) in snap.policy.workspaces.iter().enumerate() {
        if let Some(table) = &snap.end_users[w] {
            for (id, state) in table.all() {
                out.push((format!("{END_USER}{}/{id}", ws.id), state));
            }
        }
    }
    out
}

fn saved(scope: String, state: &ScopeState, now: Timestamp) -> SavedScope {
    let (current, previous) = state.periods.totals(now);
    SavedScope {
        scope,
        current: current.into(),
        previous: previous.into(),
    }
}

/// Write every scope's counters (end users' included) to `path` atomically.
pub(crate) fn save(snap: &Snapshot, now: Timestamp, path: &Path) -> Result<(), PersistError> {
    let mut scopes: Vec<SavedScope> = scopes(snap)
        .into_iter()
        .map(|(scope, state)| saved(scope, state, now))
        .collect();
    scopes.extend(
        end_users(snap)
            .into_iter()
            .map(|(scope, state)| saved(scope, &state, now)),
    );
    let body = Body {
        saved_at: now,
        org: snap.policy.org.id.to_string(),
        scopes,
    };
    let body = serde_json::to_string(&body).expect("counters serialise");
    durable::write_atomically(path, &durable::seal(FORMAT, body)).map_err(io(path))
}

/// Load counters saved by [`save`] into a fresh snapshot's scopes, by id. Scopes in
/// the file that the policy no longer has are ignored; scopes it does not list
/// start from zero.
pub(crate) fn restore(snap: &Snapshot, now: Timestamp, path: &Path) -> Result<(), PersistError> {
    let corrupt = |detail: String| PersistError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    let text = fs::read(path).map_err(io(path))?;
    let body = durable::unseal(&text, FORMAT, "counter file").map_err(corrupt)?;
    let body: Body = serde_json::from_str(&body).map_err(|e| corrupt(format!("body: {e}")))?;
    if body.org != *snap.policy.org.id {
        return Err(PersistError::WrongOrg {
            path: path.to_owned(),
            expected: snap.policy.org.id.to_string(),
            found: body.org,
        });
    }
    let mut saved: std::collections::HashMap<&str, &SavedScope> =
        body.scopes.iter().map(|s| (s.scope.as_str(), s)).collect();
    // Check everything before changing anything.
    let mut loads = Vec::new();
    for (name, state) in scopes(snap) {
        if let Some(scope) = saved.remove(name.as_str()) {
            let (Some(current), Some(previous)) = (scope.current.totals(), scope.previous.totals())
            else {
                return Err(corrupt(format!("{name}: spend out of range")));
            };
            loads.push((state, current, previous));
        }
    }
    // End users of workspaces that still limit them, created as a request would
    // (within `max_tracked`: beyond it, the rest start from zero).
    let mut end_user_loads = Vec::new();
    for (name, scope) in saved {
        let Some((ws, id)) = name.strip_prefix(END_USER).and_then(|n| n.split_once('/')) else {
            continue;
        };
        let (Some(current), Some(previous)) = (scope.current.totals(), scope.previous.totals())
        else {
            return Err(corrupt(format!("{name}: spend out of range")));
        };
        end_user_loads.push((ws, id, current, previous));
    }
    for (state, current, previous) in loads {
        state.periods.restore(now, current, previous);
    }
    for (ws, id, current, previous) in end_user_loads {
        let Some(w) = snap.workspace_index(ws) else {
            continue;
        };
        let w = w as usize;
        let (Some(rules), Some(table)) = (
            snap.policy.workspaces[w].end_users.as_deref(),
            snap.end_users[w].as_ref(),
        ) else {
            continue;
        };
        if !crate::end_users::valid_id(id) {
            continue;
        }
        if let Ok(state) = table.counters(id, rules, now) {
            state.periods.restore(now, current, previous);
        }
    }
    Ok(())
}
