//! Loading and validating policies: TOML, JSON, files and builders; one test (or a
//! table of cases) per validation problem, each checking the exact field path, value
//! and problem; every problem reported at once; malformed input is a typed error and
//! never a panic.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use tollgate::*;

const FIXTURE_TOML: &str = include_str!("fixtures/policy.toml");
const FIXTURE_JSON: &str = include_str!("fixtures/policy.json");

const NAME_CHARS: &str = "letters, digits, '-' and '_'";
const ID_CHARS: &str = "letters, digits, '-', '_', '.' and ':'";
const MODEL_CHARS: &str = "printable characters without spaces";
const MAX_MONEY: &str = "9223372.036854775807";
const U32_MAX: &str = "4294967295";

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// A small valid policy: two models, two workspaces, a key in each.
fn base_toml() -> String {
    format!(
        r#"[org]
id = "acme"

[[models]]
name = "gpt-4o-mini"
input_per_million = "0.15"
output_per_million = "0.60"

[[models]]
name = "claude-haiku"
input_per_million = "0.80"
output_per_million = "4"

[[workspaces]]
id = "ws-chat"
name = "chatbot-production"
models = ["gpt-4o-mini"]
limits = {{ rpm = 600, tpm = 200000 }}

[[workspaces]]
id = "ws-batch"
name = "batch-staging"
environment = "staging"
models = ["gpt-4o-mini", "claude-haiku"]
limits = {{ rpm = 1200, max_concurrent = 8 }}

[[keys]]
id = "key-1"
workspace = "ws-chat"
secret_sha256 = "{}"

[[keys]]
id = "key-2"
workspace = "ws-batch"
secret_sha256 = "{}"
"#,
        KeySpec::digest_of("chat-secret"),
        KeySpec::digest_of("batch-secret"),
    )
}

/// The base policy as a document, for tests that edit it in Rust.
fn base_doc() -> PolicyDocument {
    Policy::from_toml_str(&base_toml())
        .expect("base policy is valid")
        .document()
        .clone()
}

/// `text` with `from` (which must occur exactly once) replaced by `to`.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "test bug: {from:?} must occur exactly once"
    );
    text.replacen(from, to, 1)
}

/// The base policy with one edit.
fn base_with(from: &str, to: &str) -> String {
    edit(&base_toml(), from, to)
}

fn issue(path: &str, value: &str, problem: Problem) -> PolicyIssue {
    PolicyIssue {
        path: path.to_owned(),
        value: value.to_owned(),
        problem,
    }
}

fn invalid(result: Result<Policy, PolicyError>) -> Vec<PolicyIssue> {
    match result {
        Err(PolicyError::Invalid { issues }) => {
            assert!(!issues.is_empty(), "Invalid must list at least one issue");
            issues
        }
        Err(other) => panic!("expected PolicyError::Invalid, got: {other}"),
        Ok(policy) => panic!("expected PolicyError::Invalid, got a valid policy: {policy:?}"),
    }
}

fn doc_issues(doc: PolicyDocument) -> Vec<PolicyIssue> {
    invalid(Policy::new(doc))
}

/// Loading `text` reports exactly `expected` and nothing else.
fn assert_toml_reports(case: &str, text: &str, expected: &[PolicyIssue]) {
    let got = invalid_or_report(case, Policy::from_toml_str(text));
    assert_eq!(got, expected, "case {case}");
}

fn invalid_or_report(case: &str, result: Result<Policy, PolicyError>) -> Vec<PolicyIssue> {
    match result {
        Err(PolicyError::Invalid { issues }) => issues,
        Err(other) => panic!("case {case}: expected PolicyError::Invalid, got: {other}"),
        Ok(_) => panic!("case {case}: expected PolicyError::Invalid, got a valid policy"),
    }
}

fn assert_toml_valid(case: &str, text: &str) {
    if let Err(e) = Policy::from_toml_str(text) {
        panic!("case {case}: expected a valid policy, got: {e}");
    }
}

fn parse_error(result: Result<Policy, PolicyError>) -> (&'static str, String) {
    match result {
        Err(PolicyError::Parse { format, message }) => (format, message),
        Err(other) => panic!("expected PolicyError::Parse, got: {other}"),
        Ok(policy) => panic!("expected PolicyError::Parse, got a valid policy: {policy:?}"),
    }
}

/// A fresh, empty directory under the system temp dir.
fn temp_dir(test: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "tollgate-{test}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------
// 1. Loading TOML, JSON and files
// ---------------------------------------------------------------------------

#[test]
fn toml_and_json_fixtures_load_to_the_same_document() {
    let from_toml = Policy::from_toml_str(FIXTURE_TOML).expect("TOML fixture is valid");
    let from_json = Policy::from_json_str(FIXTURE_JSON).expect("JSON fixture is valid");
    assert_eq!(from_toml.document(), from_json.document());

    let doc = from_toml.document();
    assert_eq!(doc.org.id, "acme");
    assert_eq!(doc.org.wallet, Some(dec("2500")));
    assert_eq!(doc.org.max_workspaces, 10);
    assert_eq!(doc.org.default_workspace.as_deref(), Some("ws-default"));
    assert_eq!(doc.defaults.max_output_tokens, 2048);
    assert_eq!(doc.models.len(), 2);
    assert_eq!(doc.models[1].input_per_million, dec("0.8"));
    assert_eq!(doc.models[1].output_per_million, dec("4"));
    assert_eq!(doc.workspaces.len(), 3);

    let chat = &doc.workspaces[1];
    assert_eq!(chat.region, "eu-west");
    assert_eq!(chat.limits.rpm, Some(600));
    assert_eq!(chat.limits.rpd, Some(100_000));
    assert_eq!(chat.limits.tpm_counts, TokenCount::Input);
    assert_eq!(chat.limits.max_concurrent, Some(32));
    assert_eq!(chat.model_limits.len(), 1);
    assert_eq!(chat.model_limits[0].tpm_counts, TokenCount::Output);
    let budget = chat.budget.as_ref().unwrap();
    assert_eq!(budget.limit, dec("250.5"));
    assert_eq!(budget.period, BudgetPeriod::Day);
    assert_eq!(budget.alert_thresholds, vec![0, 100]);

    let lab = &doc.workspaces[2];
    assert_eq!(lab.environment, Environment::Sandbox);
    assert_eq!(lab.status, WorkspaceStatus::Review);
    assert_eq!(
        lab.budget.as_ref().unwrap().period,
        BudgetPeriod::Custom { seconds: 3600 }
    );

    assert_eq!(doc.keys[0].secret_sha256, KeySpec::digest_of("chat-secret"));
    assert_eq!(
        doc.keys[0].budget.as_ref().unwrap().limit,
        dec("5.000000000001")
    );
    assert_eq!(doc.keys[1].status, KeyStatus::Revoked);
    assert_eq!(
        doc.keys[1].expires_at.map(|t| t.to_rfc3339()).as_deref(),
        Some("2027-01-01T00:00:00+00:00")
    );
}

#[test]
fn from_path_picks_json_by_extension_and_toml_otherwise() {
    // The fixtures themselves.
    let toml = Policy::from_path(fixture_path("policy.toml")).expect("policy.toml loads");
    let json = Policy::from_path(fixture_path("policy.json")).expect("policy.json loads");
    assert_eq!(toml.document(), json.document());
    let expected = json.document().clone();

    let dir = temp_dir("from-path");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };

    // Content matching the extension loads.
    for (name, text) in [
        ("policy.json", FIXTURE_JSON),
        ("POLICY.JSON", FIXTURE_JSON),
        ("policy.toml", FIXTURE_TOML),
        ("policy.conf", FIXTURE_TOML),
        ("policy", FIXTURE_TOML),
    ] {
        let path = write(name, text);
        let policy = Policy::from_path(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(policy.document(), &expected, "{name}");
    }

    // Content not matching the extension is parsed by the extension's format and fails.
    for (name, text, format) in [
        ("json-inside.toml", FIXTURE_JSON, "TOML"),
        ("json-inside.json.bak", FIXTURE_JSON, "TOML"),
        ("json-inside", FIXTURE_JSON, "TOML"),
        ("toml-inside.json", FIXTURE_TOML, "JSON"),
    ] {
        let path = write(name, text);
        let (got, message) = parse_error(Policy::from_path(&path));
        assert_eq!(got, format, "{name}: {message}");
        assert!(!message.is_empty());
    }

    // A file that parses but breaks rules is Invalid, with the same paths as a string.
    let path = write("bad.toml", &base_with("rpm = 1200", "rpm = 0"));
    assert_eq!(
        invalid(Policy::from_path(&path)),
        vec![issue("workspaces[1].limits.rpm", "0", Problem::NotPositive)]
    );

    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_file_is_an_io_error_naming_the_path() {
    let dir = temp_dir("missing");
    let path = dir.join("no-such-policy.toml");
    match Policy::from_path(&path) {
        Err(PolicyError::Io {
            path: named,
            source,
        }) => {
            assert_eq!(named, path.display().to_string());
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected PolicyError::Io, got {other:?}"),
    }
    let message = Policy::from_path(&path).unwrap_err().to_string();
    assert!(
        message.contains(&path.display().to_string()),
        "the message names the file: {message}"
    );

    // A directory is not a policy file either.
    match Policy::from_path(&dir) {
        Err(PolicyError::Io { path: named, .. }) => assert_eq!(named, dir.display().to_string()),
        other => panic!("expected PolicyError::Io, got {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn binary_file_is_a_typed_error() {
    let dir = temp_dir("binary");
    let garbage: Vec<u8> = (0..=255u8).rev().cycle().take(1000).collect();
    for name in ["garbage.toml", "garbage.json"] {
        let path = dir.join(name);
        std::fs::write(&path, &garbage).unwrap();
        // Not UTF-8, so it cannot even be read as text.
        match Policy::from_path(&path) {
            Err(PolicyError::Io {
                path: named,
                source,
            }) => {
                assert_eq!(named, path.display().to_string());
                assert_eq!(source.kind(), std::io::ErrorKind::InvalidData);
            }
            other => panic!("{name}: expected PolicyError::Io, got {other:?}"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------
// 2. Every problem, with its exact path, value and problem
// ---------------------------------------------------------------------------

#[test]
fn duplicate_ids_names_digests_and_model_limits() {
    // Duplicate workspace id (its key moved along, so only the duplicate is wrong).
    let text = edit(
        &base_with(r#"id = "ws-batch""#, r#"id = "ws-chat""#),
        r#"workspace = "ws-batch""#,
        r#"workspace = "ws-chat""#,
    );
    assert_toml_reports(
        "workspace id",
        &text,
        &[issue(
            "workspaces[1].id",
            "\"ws-chat\"",
            Problem::Duplicate {
                first: "workspaces[0].id".into(),
            },
        )],
    );

    assert_toml_reports(
        "key id",
        &base_with(r#"id = "key-2""#, r#"id = "key-1""#),
        &[issue(
            "keys[1].id",
            "\"key-1\"",
            Problem::Duplicate {
                first: "keys[0].id".into(),
            },
        )],
    );

    // Duplicate model name (the grant of the renamed model removed).
    let text = edit(
        &base_with(r#"name = "claude-haiku""#, r#"name = "gpt-4o-mini""#),
        r#"models = ["gpt-4o-mini", "claude-haiku"]"#,
        r#"models = ["gpt-4o-mini"]"#,
    );
    assert_toml_reports(
        "model name",
        &text,
        &[issue(
            "models[1].name",
            "\"gpt-4o-mini\"",
            Problem::Duplicate {
                first: "models[0].name".into(),
            },
        )],
    );

    assert_toml_reports(
        "workspace name",
        &base_with(
            r#"name = "batch-staging""#,
            r#"name = "chatbot-production""#,
        ),
        &[issue(
            "workspaces[1].name",
            "\"chatbot-production\"",
            Problem::Duplicate {
                first: "workspaces[0].name".into(),
            },
        )],
    );

    // The same digest in upper case is the same key; the value never shows the digest.
    let digest = KeySpec::digest_of("chat-secret");
    assert_toml_reports(
        "key digest",
        &base_with(&KeySpec::digest_of("batch-secret"), &digest.to_uppercase()),
        &[issue(
            "keys[1].secret_sha256",
            "<digest>",
            Problem::Duplicate {
                first: "keys[0].secret_sha256".into(),
            },
        )],
    );

    assert_toml_reports(
        "model in model_limits",
        &base_with(
            "limits = { rpm = 1200, max_concurrent = 8 }",
            "limits = { rpm = 1200, max_concurrent = 8 }\n\
             model_limits = [{ model = \"claude-haiku\", rpm = 10 }, \
             { model = \"gpt-4o-mini\", rpm = 10 }, { model = \"claude-haiku\", tpm = 1000 }]",
        ),
        &[issue(
            "workspaces[1].model_limits[2].model",
            "\"claude-haiku\"",
            Problem::Duplicate {
                first: "workspaces[1].model_limits[0].model".into(),
            },
        )],
    );

    // The same model limited in two different workspaces is not a duplicate.
    assert_toml_valid(
        "same model limited in two workspaces",
        &edit(
            &base_with(
                "limits = { rpm = 1200, max_concurrent = 8 }",
                "limits = { rpm = 1200, max_concurrent = 8 }\n\
                 model_limits = [{ model = \"gpt-4o-mini\", rpm = 10 }]",
            ),
            "limits = { rpm = 600, tpm = 200000 }",
            "limits = { rpm = 600, tpm = 200000 }\n\
             model_limits = [{ model = \"gpt-4o-mini\", rpm = 10 }]",
        ),
    );
}

#[test]
fn references_to_unknown_workspaces() {
    assert_toml_reports(
        "key.workspace",
        &base_with(r#"workspace = "ws-batch""#, r#"workspace = "ws-nope""#),
        &[issue(
            "keys[1].workspace",
            "\"ws-nope\"",
            Problem::UnknownWorkspace,
        )],
    );
    assert_toml_reports(
        "org.default_workspace",
        &base_with(
            r#"id = "acme""#,
            "id = \"acme\"\ndefault_workspace = \"ws-gone\"",
        ),
        &[issue(
            "org.default_workspace",
            "\"ws-gone\"",
            Problem::UnknownWorkspace,
        )],
    );
    // Workspace ids are case-sensitive.
    assert_toml_reports(
        "case matters",
        &base_with(r#"workspace = "ws-chat""#, r#"workspace = "WS-CHAT""#),
        &[issue(
            "keys[0].workspace",
            "\"WS-CHAT\"",
            Problem::UnknownWorkspace,
        )],
    );
    assert_toml_valid(
        "existing default workspace",
        &base_with(
            r#"id = "acme""#,
            "id = \"acme\"\ndefault_workspace = \"ws-batch\"",
        ),
    );
}

#[test]
fn references_to_unpriced_models() {
    assert_toml_reports(
        "grant",
        &base_with(
            r#"models = ["gpt-4o-mini", "claude-haiku"]"#,
            r#"models = ["gpt-4o-mini", "gpt-5"]"#,
        ),
        &[issue(
            "workspaces[1].models[1]",
            "\"gpt-5\"",
            Problem::UnknownModel,
        )],
    );
    assert_toml_reports(
        "model_limits[].model",
        &base_with(
            "limits = { rpm = 600, tpm = 200000 }",
            "limits = { rpm = 600, tpm = 200000 }\n\
             model_limits = [{ model = \"gpt-4o-mini\", rpm = 5 }, { model = \"o3\", rpm = 5 }]",
        ),
        &[issue(
            "workspaces[0].model_limits[1].model",
            "\"o3\"",
            Problem::UnknownModel,
        )],
    );
    // Even the default workspace (which may call every priced model) cannot be
    // granted an unpriced one.
    let text = edit(
        &base_with(
            r#"id = "acme""#,
            "id = \"acme\"\ndefault_workspace = \"ws-chat\"",
        ),
        r#"models = ["gpt-4o-mini"]"#,
        r#"models = ["gpt-4o-mini", "llama"]"#,
    );
    assert_toml_reports(
        "default workspace grant",
        &text,
        &[issue(
            "workspaces[0].models[1]",
            "\"llama\"",
            Problem::UnknownModel,
        )],
    );
}

#[test]
fn empty_ids_and_names() {
    let mut doc = base_doc();
    doc.org.id = String::new();
    doc.workspaces[0].name = String::new();
    doc.keys[1].id = String::new();
    doc.models[1].name = String::new();
    doc.workspaces[1].models.retain(|m| m != "claude-haiku");
    let mut got = doc_issues(doc);
    got.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(
        got,
        vec![
            issue("keys[1].id", "\"\"", Problem::Empty),
            issue("models[1].name", "\"\"", Problem::Empty),
            issue("org.id", "\"\"", Problem::Empty),
            issue("workspaces[0].name", "\"\"", Problem::Empty),
        ]
    );

    // Loaded from TOML too.
    assert_toml_reports(
        "empty workspace id",
        &edit(
            &base_with(r#"id = "ws-batch""#, r#"id = """#),
            r#"workspace = "ws-batch""#,
            r#"workspace = """#,
        ),
        &[issue("workspaces[1].id", "\"\"", Problem::Empty)],
    );
}

#[test]
fn too_long_names_ids_and_model_names() {
    let name_30 = "a".repeat(30);
    let name_31 = "b".repeat(31);
    assert_toml_valid(
        "30-character name",
        &base_with(
            r#"name = "batch-staging""#,
            &format!("name = \"{name_30}\""),
        ),
    );
    assert_toml_reports(
        "31-character name",
        &base_with(
            r#"name = "batch-staging""#,
            &format!("name = \"{name_31}\""),
        ),
        &[issue(
            "workspaces[1].name",
            &format!("\"{name_31}\""),
            Problem::TooLong { max: 30 },
        )],
    );
    // Characters, not bytes: 30 allowed letters fit whatever their byte length, and
    // 31 multi-byte letters are reported as too long (not as bad characters first).
    let long_unicode = "é".repeat(31);
    assert_toml_reports(
        "31 two-byte characters",
        &base_with(
            r#"name = "batch-staging""#,
            &format!("name = \"{long_unicode}\""),
        ),
        &[issue(
            "workspaces[1].name",
            &format!("\"{long_unicode}\""),
            Problem::TooLong { max: 30 },
        )],
    );

    // Ids: 64 characters; model names: 128.
    let mut doc = base_doc();
    doc.keys[0].id = "k".repeat(64);
    assert!(
        Policy::new(doc.clone()).is_ok(),
        "a 64-character id is fine"
    );
    doc.keys[0].id = "k".repeat(65);
    doc.models[1].name = "m".repeat(129);
    doc.workspaces[1].models[1] = "m".repeat(129);
    assert_eq!(
        doc_issues(doc),
        vec![
            // Quoted back cut after 80 characters, with the length.
            issue(
                "models[1].name",
                &format!("{:?}… (129 characters)", "m".repeat(80)),
                Problem::TooLong { max: 128 }
            ),
            issue(
                "keys[0].id",
                &format!("{:?}", "k".repeat(65)),
                Problem::TooLong { max: 64 }
            ),
        ]
    );
}

#[test]
fn names_ids_and_model_names_with_bad_characters() {
    for (case, name) in [
        ("space", "chatbot production"),
        ("slash", "team/chatbot"),
        ("dot", "chatbot.prod"),
        ("non-ascii", "chatbot-ünicode"),
        ("tab", "chatbot\tprod"),
    ] {
        assert_toml_reports(
            case,
            &base_with(r#"name = "batch-staging""#, &format!("name = {name:?}")),
            &[issue(
                "workspaces[1].name",
                &format!("{name:?}"),
                Problem::BadCharacters {
                    allowed: NAME_CHARS,
                },
            )],
        );
    }
    assert_toml_valid(
        "letters, digits, '-' and '_'",
        &base_with(r#"name = "batch-staging""#, r#"name = "Batch_Staging-2""#),
    );

    // Ids allow '.' and ':' as well, but not spaces or '/'.
    assert_toml_valid(
        "id with . and :",
        &base_with(r#"id = "key-1""#, r#"id = "key.live:01""#),
    );
    assert_toml_reports(
        "id with space",
        &base_with(r#"id = "key-1""#, r#"id = "key 1""#),
        &[issue(
            "keys[0].id",
            "\"key 1\"",
            Problem::BadCharacters { allowed: ID_CHARS },
        )],
    );
    assert_toml_reports(
        "org id with slash",
        &base_with(r#"id = "acme""#, r#"id = "acme/corp""#),
        &[issue(
            "org.id",
            "\"acme/corp\"",
            Problem::BadCharacters { allowed: ID_CHARS },
        )],
    );

    // Model names: printable ASCII without spaces ('/' and '.' are fine).
    let mut doc = base_doc();
    doc.models[1].name = "openai/gpt-4.1".into();
    doc.workspaces[1].models[1] = "openai/gpt-4.1".into();
    assert!(Policy::new(doc.clone()).is_ok());
    doc.models[1].name = "gpt 4".into();
    doc.workspaces[1].models[1] = "gpt 4".into();
    assert_eq!(
        doc_issues(doc),
        vec![issue(
            "models[1].name",
            "\"gpt 4\"",
            Problem::BadCharacters {
                allowed: MODEL_CHARS
            },
        )]
    );
}

fn workspaces(n: usize) -> PolicyDocument {
    (0..n).fold(PolicyDocument::new(OrgSpec::new("acme")), |doc, i| {
        doc.workspace(WorkspaceSpec::new(
            format!("ws-{i}"),
            format!("workspace-{i}"),
        ))
    })
}

fn keys(doc: PolicyDocument, workspace: &str, n: usize) -> PolicyDocument {
    (0..n).fold(doc, |doc, i| {
        doc.key(KeySpec::new(
            format!("{workspace}-key-{i}"),
            workspace,
            &format!("{workspace}-secret-{i}"),
        ))
    })
}

#[test]
fn more_workspaces_or_keys_than_the_caps() {
    // The default caps are 20.
    assert_eq!(OrgSpec::new("acme").max_workspaces, 20);
    assert_eq!(OrgSpec::new("acme").max_keys_per_workspace, 20);
    let from_toml = Policy::from_toml_str("[org]\nid = \"acme\"").unwrap();
    assert_eq!(from_toml.document().org.max_workspaces, 20);
    assert_eq!(from_toml.document().org.max_keys_per_workspace, 20);

    assert!(
        Policy::new(workspaces(20)).is_ok(),
        "20 workspaces are fine"
    );
    assert_eq!(
        doc_issues(workspaces(21)),
        vec![issue(
            "workspaces",
            "21 workspaces",
            Problem::CapExceeded { count: 21, cap: 20 },
        )]
    );

    // A cap set in the file.
    assert_toml_reports(
        "max_workspaces = 1",
        &base_with(r#"id = "acme""#, "id = \"acme\"\nmax_workspaces = 1"),
        &[issue(
            "workspaces",
            "2 workspaces",
            Problem::CapExceeded { count: 2, cap: 1 },
        )],
    );

    // Keys are capped per workspace, not in total.
    let twenty_each = keys(keys(workspaces(2), "ws-0", 20), "ws-1", 20);
    assert!(
        Policy::new(twenty_each).is_ok(),
        "20 keys in each of 2 workspaces are fine"
    );
    let too_many = keys(keys(workspaces(3), "ws-0", 20), "ws-1", 21);
    assert_eq!(
        doc_issues(too_many),
        vec![issue(
            "workspaces[1]",
            "\"ws-1\" has 21 keys",
            Problem::CapExceeded { count: 21, cap: 20 },
        )]
    );
    assert_toml_reports(
        "max_keys_per_workspace = 1",
        &(base_with(
            r#"id = "acme""#,
            "id = \"acme\"\nmax_keys_per_workspace = 1",
        ) + &format!(
            "\n[[keys]]\nid = \"key-3\"\nworkspace = \"ws-batch\"\nsecret_sha256 = \"{}\"\n",
            KeySpec::digest_of("third")
        )),
        &[issue(
            "workspaces[1]",
            "\"ws-batch\" has 2 keys",
            Problem::CapExceeded { count: 2, cap: 1 },
        )],
    );
}

#[test]
fn zero_and_negative_limits_caps_and_counts_are_not_positive() {
    let with_org = |line: &str| base_with(r#"id = "acme""#, &format!("id = \"acme\"\n{line}"));
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "rpm = 0",
            base_with("rpm = 1200", "rpm = 0"),
            "workspaces[1].limits.rpm",
            "0",
        ),
        (
            "tpm = -5",
            base_with("tpm = 200000", "tpm = -5"),
            "workspaces[0].limits.tpm",
            "-5",
        ),
        (
            "max_concurrent = 0",
            base_with("max_concurrent = 8", "max_concurrent = 0"),
            "workspaces[1].limits.max_concurrent",
            "0",
        ),
        (
            "max_concurrent = -1",
            base_with("max_concurrent = 8", "max_concurrent = -1"),
            "workspaces[1].limits.max_concurrent",
            "-1",
        ),
        (
            "key rpd = 0",
            base_with(r#"id = "key-2""#, "id = \"key-2\"\nlimits = { rpd = 0 }"),
            "keys[1].limits.rpd",
            "0",
        ),
        (
            "model limit rpm = 0",
            base_with(
                "limits = { rpm = 600, tpm = 200000 }",
                "limits = { rpm = 600, tpm = 200000 }\n\
                 model_limits = [{ model = \"gpt-4o-mini\", rpm = 0 }]",
            ),
            "workspaces[0].model_limits[0].rpm",
            "0",
        ),
        (
            "max_workspaces = 0",
            with_org("max_workspaces = 0"),
            "org.max_workspaces",
            "0",
        ),
        (
            "max_workspaces = -3",
            with_org("max_workspaces = -3"),
            "org.max_workspaces",
            "-3",
        ),
        (
            "max_keys_per_workspace = 0",
            with_org("max_keys_per_workspace = 0"),
            "org.max_keys_per_workspace",
            "0",
        ),
        (
            "defaults.max_output_tokens = 0",
            base_toml() + "\n[defaults]\nmax_output_tokens = 0\n",
            "defaults.max_output_tokens",
            "0",
        ),
        (
            "model default_max_output_tokens = -1",
            base_with(
                r#"output_per_million = "4""#,
                "output_per_million = \"4\"\ndefault_max_output_tokens = -1",
            ),
            "models[1].default_max_output_tokens",
            "-1",
        ),
        (
            "workspace default_max_output_tokens = 0",
            base_with(
                r#"environment = "staging""#,
                "environment = \"staging\"\ndefault_max_output_tokens = 0",
            ),
            "workspaces[1].default_max_output_tokens",
            "0",
        ),
        (
            "custom budget period of 0 seconds",
            base_with(
                "limits = { rpm = 600, tpm = 200000 }",
                "limits = { rpm = 600, tpm = 200000 }\n\
                 budget = { limit = \"10\", period = { custom = { seconds = 0 } } }",
            ),
            "workspaces[0].budget.period.custom.seconds",
            "0",
        ),
    ];
    for (case, text, path, value) in cases {
        assert_toml_reports(case, &text, &[issue(path, value, Problem::NotPositive)]);
    }

    // 1 is the smallest accepted value everywhere.
    let ones = base_with(
        "limits = { rpm = 1200, max_concurrent = 8 }",
        "limits = { rpm = 1, rpd = 1, tpm = 1, max_concurrent = 1 }\n\
         default_max_output_tokens = 1\n\
         budget = { limit = \"1\", period = { custom = { seconds = 1 } } }",
    ) + "\n[defaults]\nmax_output_tokens = 1\n";
    assert_toml_valid("all ones", &ones);
    let doc = base_doc();
    let mut org = doc.org.clone();
    org.max_workspaces = 2;
    org.max_keys_per_workspace = 1;
    assert!(Policy::new(PolicyDocument { org, ..doc }).is_ok());
}

#[test]
fn numbers_above_their_maximum_are_too_large() {
    let with_org = |line: &str| base_with(r#"id = "acme""#, &format!("id = \"acme\"\n{line}"));
    let cases: Vec<(&str, String, &str, &str, &str)> = vec![
        (
            "rpm",
            base_with("rpm = 1200", "rpm = 600000001"),
            "workspaces[1].limits.rpm",
            "600000001",
            "600000000",
        ),
        (
            "tpm",
            base_with("tpm = 200000", "tpm = 9223372036854775807"),
            "workspaces[0].limits.tpm",
            "9223372036854775807",
            "600000000",
        ),
        (
            "rpd",
            base_with(
                r#"id = "key-1""#,
                "id = \"key-1\"\nlimits = { rpd = 864000000001 }",
            ),
            "keys[0].limits.rpd",
            "864000000001",
            "864000000000",
        ),
        (
            "model limit tpm",
            base_with(
                "limits = { rpm = 600, tpm = 200000 }",
                "limits = { rpm = 600, tpm = 200000 }\n\
                 model_limits = [{ model = \"gpt-4o-mini\", tpm = 600000001 }]",
            ),
            "workspaces[0].model_limits[0].tpm",
            "600000001",
            "600000000",
        ),
        (
            "max_concurrent",
            base_with("max_concurrent = 8", "max_concurrent = 4294967296"),
            "workspaces[1].limits.max_concurrent",
            "4294967296",
            U32_MAX,
        ),
        (
            "max_workspaces",
            with_org("max_workspaces = 4294967296"),
            "org.max_workspaces",
            "4294967296",
            U32_MAX,
        ),
        (
            "defaults.max_output_tokens",
            base_toml() + "\n[defaults]\nmax_output_tokens = 4294967296\n",
            "defaults.max_output_tokens",
            "4294967296",
            U32_MAX,
        ),
        (
            "price above 1000 per million",
            base_with(
                r#"input_per_million = "0.15""#,
                r#"input_per_million = "1000.000001""#,
            ),
            "models[0].input_per_million",
            "1000.000001",
            "1000",
        ),
        (
            "price of Decimal::MAX",
            base_with(
                r#"output_per_million = "4""#,
                r#"output_per_million = "79228162514264337593543950335""#,
            ),
            "models[1].output_per_million",
            "79228162514264337593543950335",
            "1000",
        ),
        (
            "wallet one pico-dollar above i64",
            with_org(r#"wallet = "9223372.036854775808""#),
            "org.wallet",
            "9223372.036854775808",
            MAX_MONEY,
        ),
        (
            "budget of Decimal::MAX",
            with_org(r#"budget = { limit = "79228162514264337593543950335" }"#),
            "org.budget.limit",
            "79228162514264337593543950335",
            MAX_MONEY,
        ),
        (
            "key budget of 10 million",
            base_with(
                r#"id = "key-2""#,
                "id = \"key-2\"\nbudget = { limit = 10000000 }",
            ),
            "keys[1].budget.limit",
            "10000000",
            MAX_MONEY,
        ),
    ];
    for (case, text, path, value, max) in cases {
        assert_toml_reports(
            case,
            &text,
            &[issue(path, value, Problem::TooLarge { max: max.into() })],
        );
    }

    // The maxima themselves are accepted.
    let at_max = with_org(&format!(
        "wallet = \"{MAX_MONEY}\"\nbudget = {{ limit = \"{MAX_MONEY}\" }}\nmax_workspaces = 4294967295"
    ));
    let at_max = edit(&at_max, "rpm = 1200", "rpm = 600000000, rpd = 864000000000");
    let at_max = edit(&at_max, "tpm = 200000", "tpm = 600000000");
    let at_max = edit(&at_max, "max_concurrent = 8", "max_concurrent = 4294967295");
    let at_max = edit(
        &at_max,
        r#"input_per_million = "0.15""#,
        r#"input_per_million = "1000""#,
    );
    let at_max = at_max + "\n[defaults]\nmax_output_tokens = 4294967295\n";
    assert_toml_valid("every maximum", &at_max);
}

#[test]
fn negative_money_is_refused() {
    let with_org = |line: &str| base_with(r#"id = "acme""#, &format!("id = \"acme\"\n{line}"));
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "budget limit",
            with_org(r#"budget = { limit = "-1" }"#),
            "org.budget.limit",
            "-1",
        ),
        (
            "wallet",
            with_org(r#"wallet = "-0.01""#),
            "org.wallet",
            "-0.01",
        ),
        (
            "input price",
            base_with(
                r#"input_per_million = "0.15""#,
                r#"input_per_million = "-0.5""#,
            ),
            "models[0].input_per_million",
            "-0.5",
        ),
        (
            "output price as a float",
            base_with(
                r#"output_per_million = "0.60""#,
                "output_per_million = -0.6",
            ),
            "models[0].output_per_million",
            "-0.6",
        ),
        (
            // The sign is checked before the precision: this is negative, not too precise.
            "tiny negative workspace budget",
            base_with(
                r#"environment = "staging""#,
                "environment = \"staging\"\nbudget = { limit = \"-0.0000000000001\" }",
            ),
            "workspaces[1].budget.limit",
            "-0.0000000000001",
        ),
    ];
    for (case, text, path, value) in cases {
        assert_toml_reports(case, &text, &[issue(path, value, Problem::Negative)]);
    }

    // Zero (even written "-0") is not negative.
    assert_toml_valid(
        "zero money",
        &with_org("wallet = \"0\"\nbudget = { limit = \"-0\" }"),
    );
    assert_toml_valid(
        "free model",
        &base_with(r#"input_per_million = "0.15""#, "input_per_million = 0"),
    );
}

#[test]
fn too_precise_money_is_refused_not_rounded() {
    let with_org = |line: &str| base_with(r#"id = "acme""#, &format!("id = \"acme\"\n{line}"));
    let cases: Vec<(&str, String, &str, &str, u32)> = vec![
        (
            "price with 7 decimals",
            base_with(
                r#"input_per_million = "0.15""#,
                r#"input_per_million = "0.0750001""#,
            ),
            "models[0].input_per_million",
            "0.0750001",
            6,
        ),
        (
            "price with 7 decimals as a float",
            base_with(
                r#"output_per_million = "4""#,
                "output_per_million = 0.0000001",
            ),
            "models[1].output_per_million",
            "0.0000001",
            6,
        ),
        (
            "budget with 13 decimals",
            with_org(r#"budget = { limit = "100.0000000000001" }"#),
            "org.budget.limit",
            "100.0000000000001",
            12,
        ),
        (
            "wallet with 13 decimals",
            with_org(r#"wallet = "0.0000000000001""#),
            "org.wallet",
            "0.0000000000001",
            12,
        ),
    ];
    for (case, text, path, value, max_decimals) in cases {
        assert_toml_reports(
            case,
            &text,
            &[issue(path, value, Problem::TooPrecise { max_decimals })],
        );
    }

    // 6 decimals for prices and 12 for amounts are fine, and trailing zeros are not precision.
    let ok =
        with_org("wallet = \"0.000000000001\"\nbudget = { limit = \"1.50000000000000000000\" }");
    let ok = edit(
        &ok,
        r#"input_per_million = "0.15""#,
        r#"input_per_million = "0.000001""#,
    );
    let ok = edit(
        &ok,
        r#"output_per_million = "0.60""#,
        r#"output_per_million = "0.6000000000""#,
    );
    assert_toml_valid("at the precision limits", &ok);
}

#[test]
fn alert_thresholds_outside_0_to_100() {
    // 256 and 356 would wrap to 0 and 100 in a `u8` cast; they are out of range too.
    let text = base_with(
        r#"id = "acme""#,
        "id = \"acme\"\nbudget = { limit = \"100\", alert_thresholds = [-1, 0, 50, 100, 101, 256, 356] }",
    );
    assert_toml_reports(
        "org thresholds",
        &text,
        &[
            issue(
                "org.budget.alert_thresholds[0]",
                "-1",
                Problem::ThresholdOutOfRange,
            ),
            issue(
                "org.budget.alert_thresholds[4]",
                "101",
                Problem::ThresholdOutOfRange,
            ),
            issue(
                "org.budget.alert_thresholds[5]",
                "256",
                Problem::ThresholdOutOfRange,
            ),
            issue(
                "org.budget.alert_thresholds[6]",
                "356",
                Problem::ThresholdOutOfRange,
            ),
        ],
    );

    assert_toml_reports(
        "key thresholds",
        &base_with(
            r#"id = "key-1""#,
            "id = \"key-1\"\nbudget = { limit = \"5\", alert_thresholds = [100, 101] }",
        ),
        &[issue(
            "keys[0].budget.alert_thresholds[1]",
            "101",
            Problem::ThresholdOutOfRange,
        )],
    );

    assert_toml_valid(
        "0 and 100",
        &base_with(
            r#"id = "acme""#,
            "id = \"acme\"\nbudget = { limit = \"100\", alert_thresholds = [0, 100, 100, 50] }",
        ),
    );
}

#[test]
fn malformed_digest_is_refused_without_echoing_it() {
    let pasted_secret = "sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c";
    let cases = [
        ("pasted secret", pasted_secret.to_owned()),
        ("63 hex digits", "a".repeat(63)),
        ("65 hex digits", "a".repeat(65)),
        ("64 non-hex", "g".repeat(64)),
        ("64 with a space", format!("{} ", "a".repeat(63))),
        ("empty", String::new()),
        (
            "base64 of a digest",
            "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=".into(),
        ),
        ("4 x 16 non-ascii bytes", "é".repeat(32)),
    ];
    for (case, given) in cases {
        let text = base_with(
            &KeySpec::digest_of("batch-secret"),
            &given.replace('\\', "\\\\"),
        );
        let got = invalid_or_report(case, Policy::from_toml_str(&text));
        assert_eq!(got.len(), 1, "case {case}: {got:?}");
        assert_eq!(got[0].path, "keys[1].secret_sha256", "case {case}");
        assert_eq!(got[0].problem, Problem::BadDigest, "case {case}");
        assert_eq!(
            got[0].value,
            format!("<{} characters>", given.chars().count()),
            "case {case}"
        );
        if given.len() > 1 {
            let display = PolicyError::Invalid {
                issues: got.clone(),
            }
            .to_string();
            assert!(
                !display.contains(&given) && !format!("{got:?}").contains(&given),
                "case {case}: the given text is echoed: {display}"
            );
        }
    }
    // Upper- and mixed-case hex are accepted.
    let digest = KeySpec::digest_of("batch-secret");
    let mixed: String = digest
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    assert_toml_valid("mixed case", &base_with(&digest, &mixed));
}

// ---------------------------------------------------------------------------
// 3. Every problem at once
// ---------------------------------------------------------------------------

#[test]
fn every_problem_in_a_document_is_reported_at_once() {
    let text = r#"
[org]
id = "acme corp"
wallet = "-5"
default_workspace = "ghost"
budget = { limit = "100", alert_thresholds = [50, 101] }

[defaults]
max_output_tokens = 0

[[models]]
name = "gpt-4o-mini"
input_per_million = "0.0000001"
output_per_million = "2000"

[[workspaces]]
id = "ws-chat"
name = "chat bot"
models = ["gpt-4o-mini", "gpt-5"]
limits = { rpm = 600 }

[[workspaces]]
id = "ws-batch"
name = "batch"
limits = { rpm = 0, tpm = -5 }

[[keys]]
id = "key-1"
workspace = "ws-nope"
secret_sha256 = "hunter2"

[[keys]]
id = "key-1"
workspace = "ws-batch"
secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
limits = { max_concurrent = 0 }
"#;
    let err = Policy::from_toml_str(text).unwrap_err();
    let display = err.to_string();
    let PolicyError::Invalid { issues } = err else {
        panic!("expected PolicyError::Invalid, got: {display}")
    };

    let mut found: Vec<(String, String, Problem)> = issues
        .iter()
        .map(|i| (i.path.clone(), i.value.clone(), i.problem.clone()))
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let s = |x: &str| x.to_owned();
    let mut expected = vec![
        (
            s("org.id"),
            s("\"acme corp\""),
            Problem::BadCharacters { allowed: ID_CHARS },
        ),
        (s("org.wallet"), s("-5"), Problem::Negative),
        (
            s("org.default_workspace"),
            s("\"ghost\""),
            Problem::UnknownWorkspace,
        ),
        (
            s("org.budget.alert_thresholds[1]"),
            s("101"),
            Problem::ThresholdOutOfRange,
        ),
        (
            s("defaults.max_output_tokens"),
            s("0"),
            Problem::NotPositive,
        ),
        (
            s("models[0].input_per_million"),
            s("0.0000001"),
            Problem::TooPrecise { max_decimals: 6 },
        ),
        (
            s("models[0].output_per_million"),
            s("2000"),
            Problem::TooLarge { max: s("1000") },
        ),
        (
            s("workspaces[0].name"),
            s("\"chat bot\""),
            Problem::BadCharacters {
                allowed: NAME_CHARS,
            },
        ),
        (
            s("workspaces[0].models[1]"),
            s("\"gpt-5\""),
            Problem::UnknownModel,
        ),
        (s("workspaces[1].limits.rpm"), s("0"), Problem::NotPositive),
        (s("workspaces[1].limits.tpm"), s("-5"), Problem::NotPositive),
        (
            s("keys[0].workspace"),
            s("\"ws-nope\""),
            Problem::UnknownWorkspace,
        ),
        (
            s("keys[0].secret_sha256"),
            s("<7 characters>"),
            Problem::BadDigest,
        ),
        (
            s("keys[1].id"),
            s("\"key-1\""),
            Problem::Duplicate {
                first: s("keys[0].id"),
            },
        ),
        (
            s("keys[1].limits.max_concurrent"),
            s("0"),
            Problem::NotPositive,
        ),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(issues.len(), 15, "{display}");
    assert_eq!(found, expected);

    // The message lists every issue as `path = value: message`, one per line.
    assert!(
        display.starts_with("policy has 15 problem(s):\n"),
        "{display}"
    );
    for issue in &issues {
        let line = format!("  - {} = {}: {}\n", issue.path, issue.value, issue.problem);
        assert_eq!(line, format!("  - {issue}\n"));
        assert!(display.contains(&line), "missing {line:?} in:\n{display}");
    }
    assert_eq!(display.lines().count(), 16, "{display}");
    for line in [
        "workspaces[1].limits.rpm = 0: must be at least 1",
        "workspaces[1].limits.tpm = -5: must be at least 1",
        "org.wallet = -5: must not be negative",
        "models[0].output_per_million = 2000: must be at most 1000",
        "models[0].input_per_million = 0.0000001: has more than 6 decimal places, which cannot be held exactly",
        "keys[1].id = \"key-1\": duplicate: already used by keys[0].id",
        "keys[0].workspace = \"ws-nope\": no workspace has this id",
        "workspaces[0].models[1] = \"gpt-5\": not in the price table (`models`)",
        "keys[0].secret_sha256 = <7 characters>: must be the 64 hex digits of a SHA-256 digest",
        "org.budget.alert_thresholds[1] = 101: alert threshold must be a percentage within 0-100",
        "workspaces[0].name = \"chat bot\": may only contain letters, digits, '-' and '_'",
    ] {
        assert!(display.contains(line), "missing {line:?} in:\n{display}");
    }
    assert!(!display.contains("hunter2"));
}

#[test]
fn problem_messages_name_their_limits() {
    let cases = [
        (Problem::Empty, "must not be empty"),
        (Problem::TooLong { max: 30 }, "longer than 30 characters"),
        (
            Problem::CapExceeded { count: 21, cap: 20 },
            "21 entries exceed the cap of 20",
        ),
        (
            Problem::TooLarge { max: "1000".into() },
            "must be at most 1000",
        ),
        (
            Problem::TooPrecise { max_decimals: 12 },
            "has more than 12 decimal places, which cannot be held exactly",
        ),
    ];
    for (problem, message) in cases {
        assert_eq!(problem.to_string(), message);
    }
    let issue = issue("workspaces[1].name", "\"x y\"", Problem::Empty);
    assert_eq!(
        issue.to_string(),
        "workspaces[1].name = \"x y\": must not be empty"
    );
}

// ---------------------------------------------------------------------------
// 4. Malformed input: a typed error, never a panic
// ---------------------------------------------------------------------------

fn assert_toml_parse_error(case: &str, text: &str, needle: &str) {
    match Policy::from_toml_str(text) {
        Err(PolicyError::Parse { format, message }) => {
            assert_eq!(format, "TOML", "case {case}");
            assert!(
                message.contains(needle),
                "case {case}: {needle:?} not in message: {message}"
            );
            let display = PolicyError::Parse { format, message }.to_string();
            assert!(
                display.starts_with("policy is not valid TOML: "),
                "{display}"
            );
        }
        Err(other) => panic!("case {case}: expected PolicyError::Parse, got: {other}"),
        Ok(_) => panic!("case {case}: expected PolicyError::Parse, got a valid policy"),
    }
}

fn assert_json_parse_error(case: &str, text: &str, needle: &str) {
    match Policy::from_json_str(text) {
        Err(PolicyError::Parse { format, message }) => {
            assert_eq!(format, "JSON", "case {case}");
            assert!(
                message.contains(needle),
                "case {case}: {needle:?} not in message: {message}"
            );
        }
        Err(other) => panic!("case {case}: expected PolicyError::Parse, got: {other}"),
        Ok(_) => panic!("case {case}: expected PolicyError::Parse, got a valid policy"),
    }
}

#[test]
fn invalid_toml_syntax_is_a_parse_error_with_its_position() {
    assert_toml_parse_error("unclosed header", "[org\nid = \"acme\"\n", "line 1");
    assert_toml_parse_error("unclosed string", "[org]\nid = \"acme\n", "line 2");
    assert_toml_parse_error("missing value", "[org]\nid =\n", "line 2");
    assert_toml_parse_error("duplicate key", "[org]\nid = \"a\"\nid = \"b\"\n", "line 3");
    assert_toml_parse_error(
        "integer overflow",
        &base_with("rpm = 1200", "rpm = 99999999999999999999"),
        "line",
    );
}

#[test]
fn wrong_types_are_parse_errors() {
    for (case, from, to, needle) in [
        ("rpm as a string", "rpm = 1200", "rpm = \"ten\"", "ten"),
        ("rpm as a float", "rpm = 1200", "rpm = 1.5", "rpm"),
        ("rpm as a bool", "rpm = 1200", "rpm = true", "rpm"),
        (
            "price as words",
            r#"input_per_million = "0.15""#,
            r#"input_per_million = "cheap""#,
            "cheap",
        ),
        (
            "price as a bool",
            r#"input_per_million = "0.15""#,
            "input_per_million = false",
            "input_per_million",
        ),
        (
            "price of nan",
            r#"input_per_million = "0.15""#,
            "input_per_million = nan",
            "input_per_million",
        ),
        (
            "price of inf",
            r#"input_per_million = "0.15""#,
            "input_per_million = inf",
            "input_per_million",
        ),
        (
            "price of 1e300",
            r#"input_per_million = "0.15""#,
            "input_per_million = 1e300",
            "input_per_million",
        ),
        (
            "models as a string",
            r#"models = ["gpt-4o-mini"]"#,
            r#"models = "gpt-4o-mini""#,
            "models",
        ),
        (
            "unknown environment",
            r#"environment = "staging""#,
            r#"environment = "prod""#,
            "prod",
        ),
        (
            "unknown tpm_counts",
            "tpm = 200000",
            "tpm = 200000, tpm_counts = \"both\"",
            "both",
        ),
        (
            "negative custom period",
            "limits = { rpm = 600, tpm = 200000 }",
            "limits = { rpm = 600, tpm = 200000 }\n\
             budget = { limit = \"1\", period = { custom = { seconds = -1 } } }",
            "seconds",
        ),
        (
            "unknown period",
            "limits = { rpm = 600, tpm = 200000 }",
            "limits = { rpm = 600, tpm = 200000 }\nbudget = { limit = \"1\", period = \"week\" }",
            "week",
        ),
        (
            "bad expiry",
            r#"id = "key-1""#,
            "id = \"key-1\"\nexpires_at = \"next tuesday\"",
            "expires_at",
        ),
        (
            "org as an array",
            "[org]\nid = \"acme\"",
            "org = [1]",
            "org",
        ),
    ] {
        assert_toml_parse_error(case, &base_with(from, to), needle);
    }
    assert_json_parse_error(
        "JSON rpm as a string",
        &FIXTURE_JSON.replace("\"rpm\": 600", "\"rpm\": \"ten\""),
        "ten",
    );
    assert_json_parse_error(
        "JSON negative max tokens as string",
        &FIXTURE_JSON.replace(
            "\"max_output_tokens\": 2048",
            "\"max_output_tokens\": \"-1\"",
        ),
        "-1",
    );
}

#[test]
fn unknown_fields_are_parse_errors() {
    assert_toml_parse_error(
        "org field",
        &base_with(r#"id = "acme""#, "id = \"acme\"\ncolour = \"blue\""),
        "unknown field `colour`",
    );
    assert_toml_parse_error(
        "limits field",
        &base_with("rpm = 1200", "rpmm = 1200"),
        "unknown field `rpmm`",
    );
    assert_toml_parse_error(
        "key field",
        &base_with(r#"id = "key-1""#, "id = \"key-1\"\nsecret = \"sk-oops\""),
        "unknown field `secret`",
    );
    assert_toml_parse_error(
        "budget field",
        &base_with(
            r#"id = "acme""#,
            "id = \"acme\"\nbudget = { limit = \"1\", currency = \"EUR\" }",
        ),
        "unknown field `currency`",
    );
    assert_toml_parse_error(
        "custom period field",
        &base_with(
            r#"id = "acme""#,
            "id = \"acme\"\nbudget = { limit = \"1\", period = { custom = { seconds = 60, minutes = 1 } } }",
        ),
        "minutes",
    );
    assert_toml_parse_error(
        "top-level table",
        &(base_toml() + "\n[pricing]\nx = 1\n"),
        "unknown field `pricing`",
    );
    assert_json_parse_error(
        "JSON model field",
        &FIXTURE_JSON.replace(
            "\"name\": \"gpt-4o-mini\",",
            "\"name\": \"gpt-4o-mini\", \"context_window\": 128000,",
        ),
        "unknown field `context_window`",
    );
}

#[test]
fn missing_required_fields_are_parse_errors() {
    assert_toml_parse_error(
        "no org",
        "[[models]]\nname = \"m\"\ninput_per_million = 1\noutput_per_million = 1\n",
        "missing field `org`",
    );
    assert_toml_parse_error("no org id", "[org]\nwallet = \"5\"\n", "missing field `id`");
    assert_toml_parse_error(
        "no workspace name",
        &base_with("name = \"batch-staging\"\n", ""),
        "missing field `name`",
    );
    assert_toml_parse_error(
        "no output price",
        &base_with("output_per_million = \"4\"\n", ""),
        "missing field `output_per_million`",
    );
    assert_toml_parse_error(
        "no key digest",
        &base_with(
            &format!(
                "secret_sha256 = \"{}\"\n",
                KeySpec::digest_of("chat-secret")
            ),
            "",
        ),
        "missing field `secret_sha256`",
    );
    assert_toml_parse_error(
        "no budget limit",
        &base_with(
            r#"id = "acme""#,
            "id = \"acme\"\nbudget = { period = \"day\" }",
        ),
        "missing field `limit`",
    );
    assert_json_parse_error(
        "JSON no key workspace",
        &FIXTURE_JSON.replace("\"workspace\": \"ws-lab\",", ""),
        "missing field `workspace`",
    );
}

#[test]
fn empty_arrays_and_garbage_are_parse_errors() {
    assert_toml_parse_error("empty", "", "missing field `org`");
    assert_toml_parse_error("whitespace", " \n\t\n", "missing field `org`");
    assert_json_parse_error("empty", "", "EOF");
    assert_json_parse_error("whitespace", "  \n", "EOF");
    assert_json_parse_error("array", "[]", "");
    assert_json_parse_error("array of policy", &format!("[{FIXTURE_JSON}]"), "");
    assert_json_parse_error("number", "42", "");
    assert_json_parse_error("null", "null", "");
    assert_json_parse_error("trailing text", &format!("{FIXTURE_JSON} x"), "trailing");
    assert_json_parse_error("truncated", &FIXTURE_JSON[..FIXTURE_JSON.len() / 2], "EOF");
    // TOML is not JSON and JSON is not TOML.
    assert_json_parse_error("TOML as JSON", FIXTURE_TOML, "");
    assert_toml_parse_error("JSON as TOML", FIXTURE_JSON, "");

    // Binary garbage (made valid UTF-8, since these take `&str`).
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for round in 0..50 {
        let bytes: Vec<u8> = (0..(round * 20 + 1))
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect();
        let text = String::from_utf8_lossy(&bytes);
        let case = format!("garbage round {round}");
        assert!(
            matches!(
                Policy::from_toml_str(&text),
                Err(PolicyError::Parse { format: "TOML", .. })
            ),
            "{case}"
        );
        assert!(
            matches!(
                Policy::from_json_str(&text),
                Err(PolicyError::Parse { format: "JSON", .. })
            ),
            "{case}"
        );
    }
    let nul = "\0\0\0[org]\0id = \"acme\"\u{feff}\u{fffd}";
    assert!(matches!(
        Policy::from_toml_str(nul),
        Err(PolicyError::Parse { format: "TOML", .. })
    ));
}

/// Loads `text` under `catch_unwind`, failing with the input if it panics.
fn load_without_panic(
    load: fn(&str) -> Result<Policy, PolicyError>,
    text: &str,
    what: &str,
) -> Result<Policy, PolicyError> {
    match catch_unwind(AssertUnwindSafe(|| load(text))) {
        Ok(result) => {
            if let Err(e) = &result {
                assert!(
                    matches!(e, PolicyError::Parse { .. } | PolicyError::Invalid { .. }),
                    "{what}: unexpected error kind {e:?}"
                );
                if let PolicyError::Invalid { issues } = e {
                    assert!(!issues.is_empty(), "{what}: Invalid with no issues");
                    assert!(issues.iter().all(|i| !i.path.is_empty()), "{what}");
                }
            }
            result
        }
        Err(_) => panic!("{what}: loading panicked on input:\n{text}"),
    }
}

/// Truncations and single-byte changes of `text` at every `step`-th byte of its first
/// `limit` bytes: returns (loaded, refused).
fn mutate_and_load(
    load: fn(&str) -> Result<Policy, PolicyError>,
    text: &str,
    limit: usize,
    step: usize,
) -> (usize, usize) {
    const REPLACEMENTS: &[u8] = b"\"'[]{}=,.\n #\\-0x:\0";
    assert!(text.is_ascii(), "mutations below assume ASCII");
    let (mut loaded, mut refused) = (0, 0);
    let mut count = |r: Result<Policy, PolicyError>| {
        if r.is_ok() {
            loaded += 1;
        } else {
            refused += 1;
        }
    };
    for i in (0..text.len().min(limit)).step_by(step) {
        count(load_without_panic(
            load,
            &text[..i],
            &format!("truncated at {i}"),
        ));
        let mut bytes = text.as_bytes().to_vec();
        let original = bytes[i];
        let flips = [original ^ 0x01, original ^ 0x20, original ^ 0x80, 0xff];
        for &b in REPLACEMENTS.iter().chain(flips.iter()) {
            if b == original {
                continue;
            }
            bytes[i] = b;
            let mutated = String::from_utf8_lossy(&bytes);
            count(load_without_panic(
                load,
                &mutated,
                &format!("byte {i} set to {b:#04x}"),
            ));
            // And an opening or escaping byte with the text cut just after it.
            if b"\"'[{=\\".contains(&b) {
                let cut = String::from_utf8_lossy(&bytes[..=i]);
                count(load_without_panic(
                    load,
                    &cut,
                    &format!("byte {i} set to {b:#04x}, truncated after it"),
                ));
            }
        }
        bytes[i] = original;
    }
    (loaded, refused)
}

#[test]
fn truncated_or_corrupted_toml_never_panics() {
    let text = base_toml();
    assert!(Policy::from_toml_str(&text).is_ok());
    let (loaded, refused) = mutate_and_load(Policy::from_toml_str, &text, 400, 1);
    // Most corruptions are refused; some (a digit changed in a limit) still load.
    assert!(refused > loaded, "loaded {loaded}, refused {refused}");
    assert!(loaded > 0, "loaded {loaded}, refused {refused}");

    // The richer fixture, past its leading comments: every fifth byte to its end.
    let body = &FIXTURE_TOML[FIXTURE_TOML.find("[org]").unwrap()..];
    let (loaded, refused) = mutate_and_load(Policy::from_toml_str, body, usize::MAX, 5);
    assert!(
        refused > 0 && loaded > 0,
        "loaded {loaded}, refused {refused}"
    );
}

#[test]
fn truncated_or_corrupted_json_never_panics() {
    let (loaded, refused) = mutate_and_load(Policy::from_json_str, FIXTURE_JSON, 400, 1);
    assert!(refused > loaded, "loaded {loaded}, refused {refused}");
}

// ---------------------------------------------------------------------------
// 5. Builders and secrets
// ---------------------------------------------------------------------------

#[test]
fn builders_make_a_valid_policy_that_keeps_only_the_digest() {
    let secret = "sk-live-Zq8vR2mN5tY7wX1c";
    let policy = Policy::new(
        PolicyDocument::new(OrgSpec::new("acme"))
            .model(ModelSpec::new("gpt-4o-mini", dec("0.15"), dec("0.60")))
            .workspace(
                WorkspaceSpec::new("ws1", "chatbot-production")
                    .grant("gpt-4o-mini")
                    .limits(LimitsSpec {
                        rpm: Some(600),
                        tpm: Some(100_000),
                        ..LimitsSpec::default()
                    })
                    .budget(BudgetSpec::new(dec("100"), BudgetPeriod::Month)),
            )
            .key(KeySpec::new("k1", "ws1", secret)),
    )
    .expect("builder policy is valid");

    let doc = policy.document();
    assert_eq!(doc.keys[0].secret_sha256, KeySpec::digest_of(secret));
    assert_eq!(doc.keys[0].secret_sha256.len(), 64);
    assert_eq!(
        KeySpec::digest_of("test"),
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "digest_of is the lower-case hex SHA-256"
    );
    assert_eq!(
        doc.workspaces[0].budget.as_ref().unwrap().alert_thresholds,
        vec![50, 80, 100]
    );

    let json = serde_json::to_string(doc).unwrap();
    assert!(!json.contains(secret), "the secret is serialized: {json}");
    assert!(!json.contains("Zq8vR2mN5tY7wX1c"));
    assert!(json.contains(&KeySpec::digest_of(secret)));
    assert!(!format!("{policy:?} {doc:?}").contains(secret));

    // The serialized document loads back to the same policy, via JSON and via TOML.
    let reloaded = Policy::from_json_str(&json).expect("serialized document reloads");
    assert_eq!(reloaded.document(), doc);
    let toml_text = toml::to_string(doc).unwrap();
    assert!(!toml_text.contains(secret));
    let reloaded = Policy::from_toml_str(&toml_text).expect("TOML document reloads");
    assert_eq!(reloaded.document(), doc);

    // A builder document is validated like any other.
    let broken = PolicyDocument::new(OrgSpec::new("acme"))
        .workspace(WorkspaceSpec::new("ws1", "chatbot-production").grant("gpt-4o-mini"))
        .key(KeySpec::new("k1", "ws2", secret));
    assert_eq!(
        doc_issues(broken),
        vec![
            issue(
                "workspaces[0].models[0]",
                "\"gpt-4o-mini\"",
                Problem::UnknownModel
            ),
            issue("keys[0].workspace", "\"ws2\"", Problem::UnknownWorkspace),
        ]
    );
}

#[test]
fn an_empty_org_is_valid() {
    let policy = Policy::new(PolicyDocument::new(OrgSpec::new("acme"))).unwrap();
    assert!(policy.document().workspaces.is_empty());
    assert_eq!(policy.document().defaults.max_output_tokens, 4096);
}

// ---------------------------------------------------------------------------
// 6. Money in config
// ---------------------------------------------------------------------------

#[test]
fn prices_as_strings_and_floats_are_the_same_exact_decimal() {
    let price_toml = |input: &str, output: &str| {
        format!(
            "[org]\nid = \"acme\"\n[[models]]\nname = \"m\"\n\
             input_per_million = {input}\noutput_per_million = {output}\n"
        )
    };
    let exact = Decimal::new(75, 3);
    for (case, input) in [("string", "\"0.075\""), ("float", "0.075")] {
        let policy = Policy::from_toml_str(&price_toml(input, "1")).unwrap();
        let price = policy.document().models[0].input_per_million;
        assert_eq!(price, exact, "TOML {case}");
        // Exactly 0.075, not the nearest binary float.
        assert_eq!(price.to_string(), "0.075", "TOML {case}");
        assert_eq!(
            price * Decimal::from(1_000),
            Decimal::from(75),
            "TOML {case}"
        );
    }
    for (case, input) in [("string", "\"0.075\""), ("number", "0.075")] {
        let json = format!(
            "{{\"org\": {{\"id\": \"acme\"}}, \"models\": [{{\"name\": \"m\", \
             \"input_per_million\": {input}, \"output_per_million\": 1}}]}}"
        );
        let policy = Policy::from_json_str(&json).unwrap();
        let price = policy.document().models[0].input_per_million;
        assert_eq!(price, exact, "JSON {case}");
        assert_eq!(price.to_string(), "0.075", "JSON {case}");
    }

    // Other values floats cannot hold exactly, and integers.
    for (written, expected) in [
        ("0.1", "0.1"),
        ("0.3", "0.3"),
        ("2.675", "2.675"),
        ("999.999999", "999.999999"),
        ("15", "15"),
        ("0", "0"),
    ] {
        let policy = Policy::from_toml_str(&price_toml(written, written)).unwrap();
        let model = &policy.document().models[0];
        assert_eq!(model.input_per_million, dec(expected), "{written}");
        assert_eq!(model.output_per_million, dec(expected), "{written}");
    }

    // Budgets and wallets as floats too.
    let policy =
        Policy::from_toml_str("[org]\nid = \"acme\"\nwallet = 12.34\nbudget = { limit = 0.1 }\n")
            .unwrap();
    assert_eq!(policy.document().org.wallet, Some(dec("12.34")));
    assert_eq!(
        policy.document().org.budget.as_ref().unwrap().limit,
        dec("0.1")
    );
}

/// `rust_decimal`'s own parser rounds a number with more than 28 significant
/// decimals, which would load this wallet as exactly 1; the document's money fields
/// parse with `Decimal::from_str_exact`, so it is a parse error instead.
#[test]
fn money_with_more_than_28_decimals_is_refused_not_rounded() {
    let text = base_with(
        r#"id = "acme""#,
        "id = \"acme\"\nwallet = \"1.00000000000000000000000000001\"",
    );
    assert!(
        Policy::from_toml_str(&text).is_err(),
        "a wallet of 1.00000000000000000000000000001 must not load as 1"
    );
}

#[test]
fn a_rotated_out_secret_needs_its_expiry_a_valid_digest_and_no_twin() {
    let until = chrono::DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let with = |digest: Option<&str>, expires: bool| {
        let mut doc = base_doc();
        doc.keys[0].previous_secret_sha256 = digest.map(str::to_owned);
        doc.keys[0].previous_secret_expires_at = expires.then_some(until);
        doc
    };
    let old = KeySpec::digest_of("old-secret");
    assert!(Policy::new(with(Some(&old), true)).is_ok());

    let missing = doc_issues(with(Some(&old), false));
    assert_eq!(
        missing,
        [issue(
            "keys[0].previous_secret_sha256",
            "<digest>",
            Problem::MissingCompanion {
                companion: "previous_secret_expires_at"
            }
        )]
    );
    let orphan = doc_issues(with(None, true));
    assert_eq!(orphan[0].path, "keys[0].previous_secret_expires_at");
    assert!(matches!(
        orphan[0].problem,
        Problem::MissingCompanion { .. }
    ));

    let bad = doc_issues(with(Some("xyz"), true));
    assert_eq!(
        bad,
        [issue(
            "keys[0].previous_secret_sha256",
            "<3 characters>",
            Problem::BadDigest
        )]
    );
    // The old secret may not open another key too.
    let current = base_doc().keys[0].secret_sha256.clone();
    let twin = doc_issues(with(Some(&current), true));
    assert_eq!(twin[0].path, "keys[0].previous_secret_sha256");
    assert!(matches!(twin[0].problem, Problem::Duplicate { .. }));
}

#[test]
fn a_region_is_short_plain_text_and_a_huge_one_is_not_echoed_back() {
    let mut doc = base_doc();
    doc.workspaces[1].region = String::new();
    assert!(Policy::new(doc.clone()).is_ok(), "no region is fine");
    doc.workspaces[1].region = "eu-west 1/a.b_c".into();
    assert!(Policy::new(doc.clone()).is_ok(), "plain text is fine");
    doc.workspaces[1].region = "r".repeat(64);
    assert!(Policy::new(doc.clone()).is_ok(), "64 characters fit");

    doc.workspaces[1].region = "r".repeat(100_000);
    let issues = doc_issues(doc.clone());
    assert_eq!(
        issues,
        vec![issue(
            "workspaces[1].region",
            &format!("{:?}… (100000 characters)", "r".repeat(80)),
            Problem::TooLong { max: 64 }
        )]
    );
    assert!(issues[0].value.len() < 200, "the value is not echoed whole");

    doc.workspaces[1].region = "<script>".into();
    assert!(matches!(
        doc_issues(doc)[0].problem,
        Problem::BadCharacters { .. }
    ));
}

#[test]
fn a_models_tokenizer_and_input_estimate_values_are_checked() {
    let known = "o200k_base, cl100k_base, p50k_base, r50k_base, o200k_harmony";
    assert_toml_reports(
        "unknown tokenizer",
        &base_with(
            r#"output_per_million = "4""#,
            "output_per_million = \"4\"\ntokenizer = \"o200k\"",
        ),
        &[issue(
            "models[1].tokenizer",
            "\"o200k\"",
            Problem::UnknownTokenizer { known },
        )],
    );
    for name in TOKENIZERS {
        assert!(known.contains(name), "{name} missing from the message");
    }
    assert_toml_reports(
        "zero and negative token values",
        &base_with(
            r#"output_per_million = "4""#,
            "output_per_million = \"4\"\nimage_tokens = 0\naudio_tokens = -5\nfile_tokens = 5000000000",
        ),
        &[
            issue("models[1].image_tokens", "0", Problem::NotPositive),
            issue("models[1].audio_tokens", "-5", Problem::NotPositive),
            issue(
                "models[1].file_tokens",
                "5000000000",
                Problem::TooLarge {
                    max: U32_MAX.to_owned(),
                },
            ),
        ],
    );
    for name in TOKENIZERS {
        assert_toml_valid(
            name,
            &base_with(
                r#"output_per_million = "4""#,
                &format!(
                    "output_per_million = \"4\"\ntokenizer = \"{name}\"\nimage_tokens = 765\naudio_tokens = 1\nfile_tokens = 4000"
                ),
            ),
        );
    }
}
