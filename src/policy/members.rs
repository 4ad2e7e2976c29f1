//! Checks of who may administer a workspace (its `members` and `owner`) and where its
//! events go (its `webhooks`). None of it changes what a request may do, so nothing
//! here is compiled into rules: the document is what readers (an admin API) use.

use std::collections::HashMap;

use crate::policy::document::{WorkspaceSpec, MAX_MEMBERS, MAX_WEBHOOKS};
use crate::policy::issue::{Issues, Problem};
use crate::policy::validate::{check_text, parse_digest, quoted, unique, MAX_ID_LEN};

/// Webhook URLs: at most this many characters.
pub(crate) const MAX_URL_LEN: usize = 512;

/// Member ids are ids that may also be e-mail addresses.
const MEMBER_CHARS: &str = "letters, digits, '-', '_', '.', ':' and '@'";
const URL_CHARS: &str = "printable ASCII characters without spaces";

/// Member credentials seen so far, across workspaces: one person has one secret, and
/// one secret opens one person.
#[derive(Default)]
pub(crate) struct Members {
    /// Member id -> its digest and where it was first given.
    by_member: HashMap<String, ([u8; 32], String)>,
    /// Digest -> the member id it opens and where it was first given.
    by_digest: HashMap<[u8; 32], (String, String)>,
}

impl Members {
    /// Check the members, owner and webhooks of the workspace at `path`.
    pub(crate) fn check(&mut self, issues: &mut Issues, path: &str, ws: &WorkspaceSpec) {
        if ws.members.len() > MAX_MEMBERS {
            issues.push(
                format!("{path}.members"),
                format!("{} members", ws.members.len()),
                Problem::CapExceeded {
                    count: ws.members.len(),
                    cap: MAX_MEMBERS as u32,
                },
            );
        }
        let list = format!("{path}.members");
        let mut ids: HashMap<&str, u32> = HashMap::new();
        for (m, member) in ws.members.iter().enumerate() {
            let mpath = format!("{list}[{m}]");
            check_member_id(issues, &format!("{mpath}.id"), &member.id);
            unique(issues, &mut ids, &member.id, m, &mpath, "id", &list);
            self.credential(issues, &mpath, &member.id, &member.secret_sha256);
        }
        if let Some(owner) = &ws.owner {
            let opath = format!("{path}.owner");
            check_member_id(issues, &opath, owner);
            if !ws.members.iter().any(|m| &m.id == owner) {
                issues.push(opath, quoted(owner), Problem::UnknownMember);
            }
        }
        check_webhooks(issues, path, &ws.webhooks);
    }

    /// Record a member's digest; a member keeps one digest, a digest one member.
    fn credential(&mut self, issues: &mut Issues, mpath: &str, id: &str, hex_digest: &str) {
        let field = format!("{mpath}.secret_sha256");
        let Some(digest) = parse_digest(hex_digest) else {
            // Never echo it: it may be a plaintext secret pasted by mistake.
            issues.push(
                field,
                format!("<{} characters>", hex_digest.chars().count()),
                Problem::BadDigest,
            );
            return;
        };
        match self.by_member.get(id) {
            Some((known, first)) if *known != digest => {
                issues.push(
                    field,
                    "<digest>",
                    Problem::ConflictingDigest {
                        first: first.clone(),
                    },
                );
                return;
            }
            Some(_) => return,
            None => {}
        }
        if let Some((other, first)) = self.by_digest.get(&digest) {
            if other != id {
                issues.push(
                    field,
                    "<digest>",
                    Problem::Duplicate {
                        first: first.clone(),
                    },
                );
                return;
            }
        }
        self.by_member
            .insert(id.to_owned(), (digest, field.clone()));
        self.by_digest.insert(digest, (id.to_owned(), field));
    }

    /// Where a member's digest equal to `digest` was first given, if any: a key's
    /// secret must not also open a member's access.
    pub(crate) fn digest_path(&self, digest: &[u8; 32]) -> Option<&str> {
        self.by_digest.get(digest).map(|(_, path)| path.as_str())
    }
}

fn check_member_id(issues: &mut Issues, path: &str, id: &str) {
    check_text(issues, path, id, MAX_ID_LEN, MEMBER_CHARS, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')
    });
}

fn check_webhooks(issues: &mut Issues, path: &str, urls: &[String]) {
    let list = format!("{path}.webhooks");
    if urls.len() > MAX_WEBHOOKS {
        issues.push(
            list.clone(),
            format!("{} URLs", urls.len()),
            Problem::CapExceeded {
                count: urls.len(),
                cap: MAX_WEBHOOKS as u32,
            },
        );
    }
    let mut seen: HashMap<&str, u32> = HashMap::new();
    for (u, url) in urls.iter().enumerate() {
        let upath = format!("{list}[{u}]");
        let before = issues.0.len();
        check_text(issues, &upath, url, MAX_URL_LEN, URL_CHARS, |c| {
            c.is_ascii_graphic()
        });
        if issues.0.len() == before && !is_http_url(url) {
            issues.push(upath.clone(), quoted(url), Problem::NotHttpUrl);
        }
        // `unique` names the field after the path; a list entry has none.
        if let Some(&first) = seen.get(url.as_str()) {
            issues.push(
                upath,
                quoted(url),
                Problem::Duplicate {
                    first: format!("{list}[{first}]"),
                },
            );
        } else {
            seen.insert(url, u as u32);
        }
    }
}

/// `http://HOST[:PORT][/PATH]`: plain HTTP (deliveries carry no secrets to protect
/// and a relay can add TLS), a host, a port that fits, and no user:password, which
/// would be a plaintext secret in the policy.
fn is_http_url(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.contains('@') {
        return false;
    }
    let (host, port) = match authority.rsplit_once(':') {
        // An IPv6 literal `[::1]` holds colons of its own.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    };
    let port_ok = match port {
        None => true,
        Some(p) => matches!(p.parse::<u16>(), Ok(p) if p != 0),
    };
    !host.is_empty() && port_ok
}
