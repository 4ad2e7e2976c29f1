//! Who is calling the admin API, and what they may do where.
//!
//! A bearer secret is first looked up among the gateway-wide admin keys (whose role
//! applies everywhere, as before members existed), else among the workspace members
//! of the current policy. A member's role applies only in the workspaces that list
//! it: reads there (the workspace, its usage, its keys and requests) for any role,
//! settings and limits for editors and admins, keys for admins, members and owner for
//! admins. Actions on the whole org (creating or deleting a workspace) are for admin
//! keys only; lists, usage and the summary show a member only its own workspaces.

use sha2::{Digest, Sha256};
use tollgate::{MemberRole, PolicyDocument};

use crate::admin::{Action, AdminKeys, Role};

/// An authenticated caller.
pub enum Caller {
    /// A gateway-wide admin key.
    Key { name: String, role: Role },
    /// A workspace member, with its role in each workspace that lists it.
    Member {
        id: String,
        roles: Vec<(String, MemberRole)>,
    },
}

/// Why an action is refused: what to say, and the role that was not enough.
pub struct Refusal {
    pub message: String,
    pub role: Option<&'static str>,
}

/// Equal digests, compared in full so the time taken tells nothing.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The caller whose secret this is: an admin key, else a member of `doc`.
pub fn authenticate(keys: &AdminKeys, doc: &PolicyDocument, secret: &str) -> Option<Caller> {
    if let Some(key) = keys.authenticate(secret) {
        return Some(Caller::Key {
            name: key.name.clone(),
            role: key.role,
        });
    }
    let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    let mut found: Option<(String, Vec<(String, MemberRole)>)> = None;
    for ws in &doc.workspaces {
        for member in &ws.members {
            let mut digest = [0u8; 32];
            // The policy validated every digest; one that does not parse matches nothing.
            if hex::decode_to_slice(&member.secret_sha256, &mut digest).is_err()
                || !same(&digest, &presented)
            {
                continue;
            }
            // Validation gives one digest to one member id.
            let (_, roles) = found.get_or_insert_with(|| (member.id.clone(), Vec::new()));
            roles.push((ws.id.clone(), member.role));
        }
    }
    found.map(|(id, roles)| Caller::Member { id, roles })
}

/// What a member's role allows inside its workspace.
fn member_allows(role: MemberRole, action: Action) -> bool {
    match role {
        MemberRole::Admin => !action.is_org_wide(),
        MemberRole::Editor => action.is_read() || action == Action::UpdateWorkspace,
        MemberRole::Viewer => action.is_read(),
    }
}

impl Caller {
    /// The name in the audit log and in engine events.
    pub fn actor(&self) -> &str {
        match self {
            Caller::Key { name, .. } => name,
            Caller::Member { id, .. } => id,
        }
    }

    /// `admin_key` or `member`.
    pub fn credential(&self) -> &'static str {
        match self {
            Caller::Key { .. } => "admin_key",
            Caller::Member { .. } => "member",
        }
    }

    /// The caller's role in `workspace` (an admin key's everywhere).
    pub fn role_in(&self, workspace: Option<&str>) -> Option<&'static str> {
        match self {
            Caller::Key { role, .. } => Some(role.name()),
            Caller::Member { roles, .. } => {
                let workspace = workspace?;
                roles
                    .iter()
                    .find(|(w, _)| w == workspace)
                    .map(|(_, role)| role.name())
            }
        }
    }

    /// Whether the caller may see workspace `id` at all.
    pub fn sees(&self, id: &str) -> bool {
        match self {
            Caller::Key { .. } => true,
            Caller::Member { roles, .. } => roles.iter().any(|(w, _)| w == id),
        }
    }

    /// Whether the caller sees the whole org (its budget, wallet, every workspace).
    pub fn sees_org(&self) -> bool {
        matches!(self, Caller::Key { .. })
    }

    /// May the caller do `action` on `workspace`? `None` for a per-workspace action:
    /// the workspace is not known yet (the key to create names it in the body) or the
    /// key in the path does not exist (a 404 follows); an admin key's role is checked
    /// now, a member's once the handler knows the workspace.
    pub fn check(&self, action: Action, workspace: Option<&str>) -> Result<(), Refusal> {
        match self {
            Caller::Key { role, .. } if role.allows(action) => Ok(()),
            Caller::Key { role, .. } => Err(Refusal {
                message: format!("role `{}` may not `{}`", role.name(), action.name()),
                role: Some(role.name()),
            }),
            Caller::Member { id, roles } => {
                if action.is_org_wide() {
                    let on = workspace
                        .map(|w| format!(" (workspace `{w}`)"))
                        .unwrap_or_default();
                    return Err(Refusal {
                        message: format!(
                            "member `{id}` may not `{}`{on}: it acts on the whole org, which \
                             only admin keys may do",
                            action.name()
                        ),
                        role: None,
                    });
                }
                if action.is_listing() {
                    return Ok(());
                }
                // Not known yet: the handler checks once it is (a body that names it),
                // or the id names nothing and is answered 404.
                let Some(workspace) = workspace else {
                    return Ok(());
                };
                match roles.iter().find(|(w, _)| w == workspace) {
                    Some(&(_, role)) if member_allows(role, action) => Ok(()),
                    Some(&(_, role)) => Err(Refusal {
                        message: format!(
                            "member `{id}` is `{}` in workspace `{workspace}` and may not `{}` there",
                            role.name(),
                            action.name()
                        ),
                        role: Some(role.name()),
                    }),
                    None => Err(Refusal {
                        message: format!(
                            "member `{id}` is not a member of workspace `{workspace}` and may \
                             not `{}` there",
                            action.name()
                        ),
                        role: None,
                    }),
                }
            }
        }
    }
}
