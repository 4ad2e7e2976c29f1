//! Workspace owners, members and webhooks in the policy: every bad field is a typed
//! issue naming its path and value (a secret digest is never echoed), good ones load
//! from TOML and JSON, and they travel through the control plane and the file store.

use std::path::PathBuf;
use std::sync::Arc;

use tollgate::*;

const ID_CHARS: &str = "letters, digits, '-', '_', '.', ':' and '@'";
const URL_CHARS: &str = "printable ASCII characters without spaces";

fn digest(secret: &str) -> String {
    KeySpec::digest_of(secret)
}

/// Two workspaces; `a` has an owner, two members and a webhook.
fn base() -> PolicyDocument {
    PolicyDocument::new(OrgSpec::new("acme"))
        .model(ModelSpec::new("m", Decimal::ONE, Decimal::ONE))
        .workspace(
            WorkspaceSpec::new("a", "alpha")
                .grant("m")
                .member(MemberSpec::new(
                    "alice@example.com",
                    MemberRole::Admin,
                    "alice-secret",
                ))
                .member(MemberSpec::new("bob", MemberRole::Viewer, "bob-secret"))
                .owner("alice@example.com")
                .webhook("http://127.0.0.1:9000/hooks/a"),
        )
        .workspace(WorkspaceSpec::new("b", "beta").grant("m"))
        .key(KeySpec::new("k1", "a", "key-secret"))
}

fn issue(path: &str, value: &str, problem: Problem) -> PolicyIssue {
    PolicyIssue {
        path: path.to_owned(),
        value: value.to_owned(),
        problem,
    }
}

fn issues(doc: PolicyDocument) -> Vec<PolicyIssue> {
    match Policy::new(doc) {
        Err(PolicyError::Invalid { issues }) => issues,
        Err(other) => panic!("expected PolicyError::Invalid, got: {other}"),
        Ok(_) => panic!("expected PolicyError::Invalid, got a valid policy"),
    }
}

/// The base policy with `edit` applied reports exactly `expected`.
fn assert_reports(case: &str, edit: impl FnOnce(&mut PolicyDocument), expected: &[PolicyIssue]) {
    let mut doc = base();
    edit(&mut doc);
    assert_eq!(issues(doc), expected, "case {case}");
}

#[test]
fn owners_members_and_webhooks_load_from_toml_and_json_alike() {
    let policy = Policy::new(base()).expect("base is valid");
    let doc = policy.document();
    let toml_text = toml::to_string(doc).unwrap();
    let json_text = serde_json::to_string(doc).unwrap();
    assert_eq!(Policy::from_toml_str(&toml_text).unwrap().document(), doc);
    assert_eq!(Policy::from_json_str(&json_text).unwrap().document(), doc);
    // A workspace without them writes none of them: older readers still read it.
    let b = serde_json::to_value(&doc.workspaces[1]).unwrap();
    for field in ["owner", "members", "webhooks"] {
        assert!(
            b.get(field).is_none(),
            "{field} written for an empty workspace"
        );
    }
    let written = r#"
        [org]
        id = "acme"
        [[workspaces]]
        id = "a"
        name = "alpha"
        owner = "carol"
        webhooks = ["http://hooks.internal/a", "http://[::1]:8080/x?y=1"]
        [[workspaces.members]]
        id = "carol"
        role = "editor"
        secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    "#;
    let loaded = Policy::from_toml_str(written).unwrap();
    let ws = &loaded.document().workspaces[0];
    assert_eq!(ws.owner.as_deref(), Some("carol"));
    assert_eq!(ws.members[0].role, MemberRole::Editor);
    assert_eq!(ws.webhooks.len(), 2);
}

#[test]
fn bad_member_ids_are_named_with_their_value() {
    let long = "m".repeat(65);
    let cases: Vec<(&str, String, PolicyIssue)> = vec![
        (
            "empty",
            String::new(),
            issue("workspaces[0].members[1].id", "\"\"", Problem::Empty),
        ),
        (
            "too long",
            long.clone(),
            issue(
                "workspaces[0].members[1].id",
                &format!("{long:?}"),
                Problem::TooLong { max: 64 },
            ),
        ),
        (
            "space",
            "bob smith".into(),
            issue(
                "workspaces[0].members[1].id",
                "\"bob smith\"",
                Problem::BadCharacters { allowed: ID_CHARS },
            ),
        ),
        (
            "duplicate",
            "alice@example.com".into(),
            issue(
                "workspaces[0].members[1].id",
                "\"alice@example.com\"",
                Problem::Duplicate {
                    first: "workspaces[0].members[0].id".into(),
                },
            ),
        ),
    ];
    for (case, id, expected) in cases {
        let mut doc = base();
        doc.workspaces[0].members[1].id = id;
        let mut got = issues(doc);
        // A duplicate id with another secret is also a conflicting digest.
        got.retain(|i| !matches!(i.problem, Problem::ConflictingDigest { .. }));
        assert_eq!(got, vec![expected], "case {case}");
    }
}

#[test]
fn bad_member_digests_are_refused_without_echoing_them() {
    assert_reports(
        "plaintext secret",
        |doc| doc.workspaces[0].members[1].secret_sha256 = "bob-secret".into(),
        &[issue(
            "workspaces[0].members[1].secret_sha256",
            "<10 characters>",
            Problem::BadDigest,
        )],
    );
    assert_reports(
        "one member, two secrets",
        |doc| {
            doc.workspaces[1].members.push(MemberSpec::new(
                "bob",
                MemberRole::Admin,
                "other-secret",
            ))
        },
        &[issue(
            "workspaces[1].members[0].secret_sha256",
            "<digest>",
            Problem::ConflictingDigest {
                first: "workspaces[0].members[1].secret_sha256".into(),
            },
        )],
    );
    assert_reports(
        "two members, one secret",
        |doc| {
            doc.workspaces[1].members.push(MemberSpec::new(
                "carol",
                MemberRole::Admin,
                "bob-secret",
            ))
        },
        &[issue(
            "workspaces[1].members[0].secret_sha256",
            "<digest>",
            Problem::Duplicate {
                first: "workspaces[0].members[1].secret_sha256".into(),
            },
        )],
    );
    assert_reports(
        "a key's secret opens a member",
        |doc| doc.keys[0].secret_sha256 = digest("bob-secret"),
        &[issue(
            "keys[0].secret_sha256",
            "<digest>",
            Problem::Duplicate {
                first: "workspaces[0].members[1].secret_sha256".into(),
            },
        )],
    );
    // The same member in two workspaces with the same secret (and another role) is fine.
    let mut doc = base();
    doc.workspaces[1]
        .members
        .push(MemberSpec::new("bob", MemberRole::Editor, "bob-secret"));
    Policy::new(doc).expect("one person, one secret, two workspaces");
}

#[test]
fn an_owner_must_be_a_member() {
    assert_reports(
        "not a member",
        |doc| doc.workspaces[0].owner = Some("mallory".into()),
        &[issue(
            "workspaces[0].owner",
            "\"mallory\"",
            Problem::UnknownMember,
        )],
    );
    assert_reports(
        "a member of another workspace",
        |doc| doc.workspaces[1].owner = Some("bob".into()),
        &[issue(
            "workspaces[1].owner",
            "\"bob\"",
            Problem::UnknownMember,
        )],
    );
    assert_reports(
        "empty",
        |doc| doc.workspaces[0].owner = Some(String::new()),
        &[
            issue("workspaces[0].owner", "\"\"", Problem::Empty),
            issue("workspaces[0].owner", "\"\"", Problem::UnknownMember),
        ],
    );
}

#[test]
fn unknown_or_missing_roles_are_parse_errors_naming_them() {
    let text = |role: &str| {
        format!(
            r#"
            [org]
            id = "acme"
            [[workspaces]]
            id = "a"
            name = "alpha"
            [[workspaces.members]]
            id = "carol"
            {role}
            secret_sha256 = "{}"
            "#,
            digest("x")
        )
    };
    for (case, role, needle) in [
        ("unknown", "role = \"owner\"", "owner"),
        ("upper case", "role = \"Admin\"", "Admin"),
        ("missing", "", "role"),
    ] {
        match Policy::from_toml_str(&text(role)) {
            Err(PolicyError::Parse { message, .. }) => {
                assert!(message.contains(needle), "case {case}: {message}");
                assert!(message.contains("line"), "case {case}: {message}");
            }
            Err(other) => panic!("case {case}: expected a parse error, got {other}"),
            Ok(_) => panic!("case {case}: expected a parse error, got a valid policy"),
        }
    }
}

#[test]
fn bad_webhook_urls_are_named_with_their_value() {
    let not_http = |url: &str| {
        (
            url.to_owned(),
            issue(
                "workspaces[0].webhooks[0]",
                &format!("{url:?}"),
                Problem::NotHttpUrl,
            ),
        )
    };
    let long = format!("http://h/{}", "p".repeat(600));
    let cases = vec![
        not_http("https://hooks.example.com/a"),
        not_http("ftp://hooks.example.com/a"),
        not_http("hooks.example.com/a"),
        not_http("http://"),
        not_http("http:///path"),
        not_http("http://user:pass@hooks.example.com/a"),
        not_http("http://hooks.example.com:0/a"),
        not_http("http://hooks.example.com:99999/a"),
        not_http("http://hooks.example.com:/a"),
        (
            String::new(),
            issue("workspaces[0].webhooks[0]", "\"\"", Problem::Empty),
        ),
        (
            "http://hooks.example.com/a b".into(),
            issue(
                "workspaces[0].webhooks[0]",
                "\"http://hooks.example.com/a b\"",
                Problem::BadCharacters { allowed: URL_CHARS },
            ),
        ),
        (
            long.clone(),
            issue(
                "workspaces[0].webhooks[0]",
                &format!("{:?}… (609 characters)", &long[..80]),
                Problem::TooLong { max: 512 },
            ),
        ),
    ];
    for (url, expected) in cases {
        let mut doc = base();
        doc.workspaces[0].webhooks[0].clone_from(&url);
        assert_eq!(issues(doc), vec![expected], "url {url:?}");
    }
    assert_reports(
        "duplicate",
        |doc| {
            doc.workspaces[0]
                .webhooks
                .push("http://127.0.0.1:9000/hooks/a".into())
        },
        &[issue(
            "workspaces[0].webhooks[1]",
            "\"http://127.0.0.1:9000/hooks/a\"",
            Problem::Duplicate {
                first: "workspaces[0].webhooks[0]".into(),
            },
        )],
    );
    assert_reports(
        "too many",
        |doc| {
            doc.workspaces[1].webhooks = (0..=MAX_WEBHOOKS)
                .map(|i| format!("http://127.0.0.1:9000/{i}"))
                .collect()
        },
        &[issue(
            "workspaces[1].webhooks",
            "9 URLs",
            Problem::CapExceeded { count: 9, cap: 8 },
        )],
    );
}

#[test]
fn too_many_members_exceed_the_cap() {
    assert_reports(
        "members",
        |doc| {
            doc.workspaces[1].members = (0..=MAX_MEMBERS)
                .map(|i| MemberSpec::new(format!("m{i}"), MemberRole::Viewer, &format!("s{i}")))
                .collect()
        },
        &[issue(
            "workspaces[1].members",
            "101 members",
            Problem::CapExceeded {
                count: 101,
                cap: 100,
            },
        )],
    );
}

#[test]
fn existing_policy_files_stay_valid() {
    for file in ["tests/fixtures/policy.toml", "examples/gateway/policy.toml"] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(file);
        let policy = Policy::from_path(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(policy
            .document()
            .workspaces
            .iter()
            .all(|w| w.owner.is_none() && w.members.is_empty() && w.webhooks.is_empty()));
    }
}

/// The control plane sets them, refuses bad ones whole, and the file store keeps them.
#[test]
fn the_control_plane_and_file_store_carry_members_and_webhooks() {
    let dir = std::env::temp_dir().join(format!("tollgate-members-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("policy.json");
    let (store, policy) = FilePolicyStore::open_or_seed(&path, || Policy::new(base())).unwrap();
    let engine = Engine::builder(policy)
        .policy_store(Arc::new(store))
        .build();

    let members = vec![
        MemberSpec::new("dave", MemberRole::Editor, "dave-secret"),
        MemberSpec::new("bob", MemberRole::Admin, "bob-secret"),
    ];
    engine
        .update_workspace(
            "b",
            WorkspaceUpdate {
                owner: Some(Some("dave".into())),
                members: Some(members.clone()),
                webhooks: Some(vec!["http://127.0.0.1:9001/b".into()]),
                ..WorkspaceUpdate::default()
            },
            Some("test"),
        )
        .unwrap();
    let b = engine.policy().document().workspaces[1].clone();
    assert_eq!(b.owner.as_deref(), Some("dave"));
    assert_eq!(b.members, members);
    assert_eq!(b.webhooks, ["http://127.0.0.1:9001/b"]);

    // Removing the owner's membership while it is still the owner is refused whole.
    let refused = engine
        .update_workspace(
            "b",
            WorkspaceUpdate {
                members: Some(vec![]),
                webhooks: Some(vec!["https://nope".into()]),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap_err();
    let PolicyError::Invalid { issues } = refused else {
        panic!("expected Invalid, got {refused}");
    };
    assert_eq!(
        issues,
        [
            issue("workspaces[1].owner", "\"dave\"", Problem::UnknownMember),
            issue(
                "workspaces[1].webhooks[0]",
                "\"https://nope\"",
                Problem::NotHttpUrl
            ),
        ]
    );
    assert_eq!(engine.policy().document().workspaces[1], b);

    let (_, reloaded) = FilePolicyStore::open_or_seed(&path, || panic!("exists")).unwrap();
    assert_eq!(reloaded.document(), engine.policy().document());
    // The file holds digests, never the secrets.
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("dave-secret") && text.contains(&digest("dave-secret")));

    engine
        .update_workspace(
            "b",
            WorkspaceUpdate {
                owner: Some(None),
                members: Some(vec![]),
                webhooks: Some(vec![]),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();
    assert_eq!(
        engine.policy().document().workspaces[1],
        WorkspaceSpec::new("b", "beta").grant("m")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
