//! Model aliases, model patterns in grants and `model_limits`, and a key's own
//! subset of its workspace's models: what requests get, what validation refuses (with
//! path and value), and the file formats.

use std::str::FromStr;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use tollgate::*;

#[cfg(feature = "redis")]
#[path = "support/redis_server.rs"]
mod redis_server;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// 2026-11-23 12:00:00 UTC.
fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::at(
        Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap(),
    ))
}

fn engine(doc: PolicyDocument) -> Engine {
    Engine::builder(Policy::new(doc).expect("valid policy"))
        .clock(clock())
        .build()
}

/// `gpt-4o` (aliases `gpt-4o-latest`, `chatgpt-4o`), `gpt-4o-mini`, `gpt-4o-2024`,
/// `gpt-4.1` and `claude`, each at its own price; workspace `ws` with `grants`, key
/// `k` (secret `sk-k`) in it.
fn doc(grants: &[&str]) -> PolicyDocument {
    let mut ws = WorkspaceSpec::new("ws", "chatbot-production");
    for grant in grants {
        ws = ws.grant(*grant);
    }
    PolicyDocument::new(OrgSpec::new("org"))
        .model(
            ModelSpec::new("gpt-4o", dec("2.5"), dec("10"))
                .alias("gpt-4o-latest")
                .alias("chatgpt-4o"),
        )
        .model(ModelSpec::new("gpt-4o-mini", dec("0.15"), dec("0.6")))
        .model(ModelSpec::new("gpt-4o-2024", dec("2"), dec("8")))
        .model(ModelSpec::new("gpt-4.1", dec("2"), dec("8")))
        .model(ModelSpec::new("claude", dec("3"), dec("15")))
        .workspace(ws)
        .key(KeySpec::new("k", "ws", "sk-k"))
}

fn ask<'a>(secret: &'a str, model: &'a str) -> Request<'a> {
    Request::with_secret(secret, model)
        .input_tokens(1_000)
        .max_output_tokens(100)
}

fn admitted(engine: &Engine, secret: &str, model: &str) -> Reservation {
    engine
        .check_and_reserve(&ask(secret, model))
        .unwrap_or_else(|d| panic!("{model} with {secret} refused: {d:?}"))
}

fn refused(engine: &Engine, secret: &str, model: &str) -> (DenialReason, Scope) {
    match engine.check_and_reserve(&ask(secret, model)) {
        Err(d) => (d.reason, d.scope),
        Ok(_) => panic!("{model} with {secret} was admitted"),
    }
}

fn model_limit(model: &str, rpm: i64) -> ModelLimitSpec {
    ModelLimitSpec {
        model: model.into(),
        rpm: Some(rpm),
        ..ModelLimitSpec::default()
    }
}

fn issues(doc: PolicyDocument) -> Vec<PolicyIssue> {
    match Policy::new(doc) {
        Err(PolicyError::Invalid { issues }) => issues,
        Err(other) => panic!("expected PolicyError::Invalid, got: {other}"),
        Ok(_) => panic!("expected PolicyError::Invalid, got a valid policy"),
    }
}

fn issue(path: &str, value: &str, problem: Problem) -> PolicyIssue {
    PolicyIssue {
        path: path.into(),
        value: value.into(),
        problem,
    }
}

/// Requests this workspace × model has committed, by canonical model name.
fn model_requests(engine: &Engine, model: &str) -> u64 {
    let usage = engine.usage();
    let models = &usage.workspaces[0].models;
    let found = models.iter().find(|m| m.model == model);
    found.expect("model in usage").usage.current.requests
}

#[test]
fn an_alias_is_charged_at_its_models_price_into_the_same_counters() {
    let mut doc = doc(&["gpt-4o"]);
    doc.workspaces[0].model_limits = vec![model_limit("gpt-4o", 3)];
    let e = engine(doc);

    let by_name = admitted(&e, "sk-k", "gpt-4o");
    let by_alias = admitted(&e, "sk-k", "gpt-4o-latest");
    // 1,000 × 2.5/M + 100 × 10/M, whichever name the request used.
    assert_eq!(by_name.reserved_cost(), dec("0.0035"));
    assert_eq!(by_alias.reserved_cost(), dec("0.0035"));
    // Reported under the model's own name: the usage is the model's.
    assert_eq!(by_alias.rate_limits().requests.unwrap().remaining, 1);
    e.commit_usage(by_name, Usage::new(1_000, 100)).unwrap();
    let receipt = e.commit_usage(by_alias, Usage::new(1_000, 100)).unwrap();
    assert_eq!(receipt.cost(), dec("0.0035"));
    assert_eq!(model_requests(&e, "gpt-4o"), 2);

    // The workspace × model RPM of 3 is shared by every name of the model.
    let _third = admitted(&e, "sk-k", "chatgpt-4o");
    assert_eq!(
        refused(&e, "sk-k", "gpt-4o"),
        (DenialReason::RequestsPerMinute, Scope::WorkspaceModel)
    );
    assert_eq!(
        refused(&e, "sk-k", "gpt-4o-latest"),
        (DenialReason::RequestsPerMinute, Scope::WorkspaceModel)
    );
    // An alias is not a pattern: it does not reach models it merely prefixes.
    assert_eq!(
        refused(&e, "sk-k", "gpt-4o-latest-2"),
        (DenialReason::UnknownModel, Scope::WorkspaceModel)
    );
}

#[test]
fn grants_and_model_limits_may_name_an_alias() {
    let mut doc = doc(&["gpt-4o-latest"]);
    doc.workspaces[0].model_limits = vec![model_limit("chatgpt-4o", 1)];
    let e = engine(doc);
    let _one = admitted(&e, "sk-k", "gpt-4o");
    assert_eq!(
        refused(&e, "sk-k", "gpt-4o-latest"),
        (DenialReason::RequestsPerMinute, Scope::WorkspaceModel)
    );
    assert_eq!(
        refused(&e, "sk-k", "gpt-4o-mini"),
        (DenialReason::ModelNotGranted, Scope::WorkspaceModel)
    );
}

#[test]
fn a_pattern_grant_admits_matching_models_and_refuses_others() {
    let e = engine(doc(&["gpt-4o*"]));
    for model in ["gpt-4o", "gpt-4o-mini", "gpt-4o-2024", "gpt-4o-latest"] {
        drop(admitted(&e, "sk-k", model));
    }
    for model in ["gpt-4.1", "claude"] {
        assert_eq!(
            refused(&e, "sk-k", model),
            (DenialReason::ModelNotGranted, Scope::WorkspaceModel),
            "{model}"
        );
    }
    // A pattern is expanded when the policy is compiled; a request's name never is.
    assert_eq!(
        refused(&e, "sk-k", "gpt-4o*"),
        (DenialReason::UnknownModel, Scope::WorkspaceModel)
    );

    let all = engine(doc(&["*"]));
    for model in ["gpt-4o", "gpt-4o-mini", "gpt-4o-2024", "gpt-4.1", "claude"] {
        drop(admitted(&all, "sk-k", model));
    }
}

#[test]
fn the_most_specific_model_limit_applies() {
    let mut doc = doc(&["*"]);
    // Listed least specific last and first, so order cannot be what decides.
    doc.workspaces[0].model_limits = vec![
        model_limit("gpt-4o*", 2),
        model_limit("gpt-4o-mini", 1),
        model_limit("gpt*", 3),
    ];
    let e = engine(doc);
    let mut held = Vec::new();
    for (model, rpm) in [
        ("gpt-4o-mini", 1),
        ("gpt-4o", 2),
        ("gpt-4o-2024", 2),
        ("gpt-4.1", 3),
    ] {
        for _ in 0..rpm {
            held.push(admitted(&e, "sk-k", model));
        }
        assert_eq!(
            refused(&e, "sk-k", model),
            (DenialReason::RequestsPerMinute, Scope::WorkspaceModel),
            "{model} after {rpm}"
        );
    }
    // No pattern matches `claude`: it has no model limit.
    for _ in 0..10 {
        held.push(admitted(&e, "sk-k", "claude"));
    }
}

#[test]
fn equally_specific_model_limits_are_refused_naming_both_entries() {
    // A model named and limited through its alias as well.
    let mut d = doc(&["*"]);
    d.workspaces[0].model_limits = vec![
        model_limit("gpt-4o", 5),
        model_limit("gpt*", 5),
        model_limit("gpt-4o-latest", 6),
        model_limit("chatgpt-4o", 7),
    ];
    assert_eq!(
        issues(d),
        [issue(
            "workspaces[0].model_limits[2].model",
            "\"gpt-4o-latest\"",
            Problem::AmbiguousModelLimits {
                first: "workspaces[0].model_limits[0].model".into(),
                model: "gpt-4o".into(),
            }
        )]
    );

    // The same pattern twice: one issue, however many models it matches.
    let mut d = doc(&["*"]);
    d.workspaces[0].model_limits = vec![model_limit("gpt-4o*", 5), model_limit("gpt-4o*", 6)];
    assert_eq!(
        issues(d),
        [issue(
            "workspaces[0].model_limits[1].model",
            "\"gpt-4o*\"",
            Problem::Duplicate {
                first: "workspaces[0].model_limits[0].model".into(),
            }
        )]
    );
    let text = Problem::AmbiguousModelLimits {
        first: "workspaces[0].model_limits[0].model".into(),
        model: "gpt-4o".into(),
    }
    .to_string();
    assert!(
        text.contains("ambiguous") && text.contains("model_limits[0]"),
        "{text}"
    );
}

#[test]
fn a_star_anywhere_but_once_at_the_end_is_refused() {
    let mut d = doc(&["gpt-*-mini", "gpt-4o"]);
    d.workspaces[0].model_limits = vec![model_limit("**", 5), model_limit("*gpt", 5)];
    d.keys[0] = KeySpec::new("k", "ws", "sk-k").allow_model("gpt*4o");
    assert_eq!(
        issues(d),
        [
            issue(
                "workspaces[0].models[0]",
                "\"gpt-*-mini\"",
                Problem::BadModelPattern
            ),
            issue(
                "workspaces[0].model_limits[0].model",
                "\"**\"",
                Problem::BadModelPattern
            ),
            issue(
                "workspaces[0].model_limits[1].model",
                "\"*gpt\"",
                Problem::BadModelPattern
            ),
            issue("keys[0].models[0]", "\"gpt*4o\"", Problem::BadModelPattern),
        ]
    );
}

#[test]
fn a_pattern_matching_no_model_is_refused() {
    let mut d = doc(&["llama*", "gpt-4o"]);
    d.workspaces[0].model_limits = vec![model_limit("mistral*", 5)];
    assert_eq!(
        issues(d),
        [
            issue(
                "workspaces[0].models[0]",
                "\"llama*\"",
                Problem::NoModelMatches
            ),
            issue(
                "workspaces[0].model_limits[0].model",
                "\"mistral*\"",
                Problem::NoModelMatches
            ),
        ]
    );
    // A pattern matches model names, not aliases.
    let d = doc(&["chatgpt*"]);
    assert_eq!(
        issues(d),
        [issue(
            "workspaces[0].models[0]",
            "\"chatgpt*\"",
            Problem::NoModelMatches
        )]
    );
}

#[test]
fn aliases_follow_model_name_rules_and_clash_with_no_other_name() {
    let mut d = doc(&["gpt-4o"]);
    d.models[1].aliases = vec![
        "gpt-4.1".into(),       // another model's name
        "gpt-4o-latest".into(), // another model's alias
        "mini".into(),
        "mini".into(), // its own alias twice
        "gpt 4o mini".into(),
        String::new(),
        "gpt-4o-mini".into(), // its own name
    ];
    assert_eq!(
        issues(d),
        [
            issue(
                "models[1].aliases[0]",
                "\"gpt-4.1\"",
                Problem::Duplicate {
                    first: "models[3].name".into()
                }
            ),
            issue(
                "models[1].aliases[1]",
                "\"gpt-4o-latest\"",
                Problem::Duplicate {
                    first: "models[0].aliases[0]".into()
                }
            ),
            issue(
                "models[1].aliases[3]",
                "\"mini\"",
                Problem::Duplicate {
                    first: "models[1].aliases[2]".into()
                }
            ),
            issue(
                "models[1].aliases[4]",
                "\"gpt 4o mini\"",
                Problem::BadCharacters {
                    allowed: "printable characters without spaces"
                }
            ),
            issue("models[1].aliases[5]", "\"\"", Problem::Empty),
            issue(
                "models[1].aliases[6]",
                "\"gpt-4o-mini\"",
                Problem::Duplicate {
                    first: "models[1].name".into()
                }
            ),
        ]
    );
    let mut d = doc(&["gpt-4o"]);
    d.models[4].aliases = vec!["x".repeat(129)];
    let got = issues(d);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "models[4].aliases[0]");
    assert_eq!(got[0].problem, Problem::TooLong { max: 128 });
}

#[test]
fn a_keys_model_limits_take_aliases_and_patterns_too() {
    let mut d = doc(&["*"]);
    d.keys[0] = KeySpec::new("k", "ws", "sk-k")
        .model_limit(model_limit("gpt-4o*", 2))
        .model_limit(model_limit("gpt-4o-latest", 1));
    let e = engine(d);
    let _one = admitted(&e, "sk-k", "gpt-4o");
    assert_eq!(
        refused(&e, "sk-k", "chatgpt-4o"),
        (DenialReason::RequestsPerMinute, Scope::KeyModel)
    );
    for _ in 0..2 {
        drop(admitted(&e, "sk-k", "gpt-4o-mini"));
    }
    // `gpt-4o*` limits each model it matches: gpt-4o-2024 has its own two.
    let _two = [
        admitted(&e, "sk-k", "gpt-4o-2024"),
        admitted(&e, "sk-k", "gpt-4o-2024"),
    ];
    assert_eq!(
        refused(&e, "sk-k", "gpt-4o-2024"),
        (DenialReason::RequestsPerMinute, Scope::KeyModel)
    );
    drop(admitted(&e, "sk-k", "claude"));

    let mut d = doc(&["*"]);
    d.keys[0] = KeySpec::new("k", "ws", "sk-k")
        .model_limit(model_limit("chatgpt-4o", 2))
        .model_limit(model_limit("gpt-4o", 1))
        .model_limit(model_limit("gpt-*o", 1));
    assert_eq!(
        issues(d),
        // Ambiguity is known once every entry is read, so it is reported last.
        [
            issue(
                "keys[0].model_limits[2].model",
                "\"gpt-*o\"",
                Problem::BadModelPattern
            ),
            issue(
                "keys[0].model_limits[1].model",
                "\"gpt-4o\"",
                Problem::AmbiguousModelLimits {
                    first: "keys[0].model_limits[0].model".into(),
                    model: "gpt-4o".into(),
                }
            ),
        ]
    );
}

#[test]
fn a_key_with_its_own_models_may_call_only_those() {
    let mut d = doc(&["gpt-4o*", "claude"]);
    d.keys[0] = KeySpec::new("k", "ws", "sk-k")
        .allow_model("gpt-4o-mini")
        .allow_model("gpt-4o-latest");
    d = d.key(KeySpec::new("plain", "ws", "sk-plain"));
    d = d.key(KeySpec::new("gpts", "ws", "sk-gpts").allow_model("gpt*"));
    let e = engine(d);

    drop(admitted(&e, "sk-k", "gpt-4o-mini"));
    // Naming the model by an alias allows it by every name.
    drop(admitted(&e, "sk-k", "gpt-4o"));
    drop(admitted(&e, "sk-k", "chatgpt-4o"));
    for model in ["claude", "gpt-4o-2024"] {
        assert_eq!(
            refused(&e, "sk-k", model),
            (DenialReason::ModelNotGranted, Scope::Key),
            "{model}"
        );
        // The workspace grants it: a key without a subset may call it.
        drop(admitted(&e, "sk-plain", model));
    }
    // A model the workspace does not grant is refused at the workspace, as before.
    assert_eq!(
        refused(&e, "sk-k", "gpt-4.1"),
        (DenialReason::ModelNotGranted, Scope::WorkspaceModel)
    );
    // A pattern reaching past the workspace's grants gets the models in both.
    drop(admitted(&e, "sk-gpts", "gpt-4o-2024"));
    assert_eq!(
        refused(&e, "sk-gpts", "claude"),
        (DenialReason::ModelNotGranted, Scope::Key)
    );
    assert_eq!(
        refused(&e, "sk-gpts", "gpt-4.1"),
        (DenialReason::ModelNotGranted, Scope::WorkspaceModel)
    );
}

#[test]
fn a_key_may_not_name_models_its_workspace_does_not_grant() {
    let mut d = doc(&["gpt-4o*"]);
    d.keys[0] = KeySpec::new("k", "ws", "sk-k")
        .allow_model("gpt-4o")
        .allow_model("claude")
        .allow_model("gpt-4.*")
        .allow_model("gpt-4*")
        .allow_model("o3");
    assert_eq!(
        issues(d),
        [
            issue(
                "keys[0].models[1]",
                "\"claude\"",
                Problem::NotGrantedToWorkspace {
                    workspace: "ws".into()
                }
            ),
            issue(
                "keys[0].models[2]",
                "\"gpt-4.*\"",
                Problem::NotGrantedToWorkspace {
                    workspace: "ws".into()
                }
            ),
            issue("keys[0].models[4]", "\"o3\"", Problem::UnknownModel),
        ]
    );

    // The default workspace grants every model, so its keys may name any.
    let mut d = doc(&[]);
    d.org.default_workspace = Some("ws".into());
    d.keys[0] = KeySpec::new("k", "ws", "sk-k").allow_model("claude");
    let e = engine(d);
    drop(admitted(&e, "sk-k", "claude"));
    assert_eq!(
        refused(&e, "sk-k", "gpt-4o"),
        (DenialReason::ModelNotGranted, Scope::Key)
    );
}

#[test]
fn a_new_model_named_like_an_old_alias_gets_counters_of_its_own() {
    let mut d = doc(&["*"]);
    d.workspaces[0].model_limits = vec![model_limit("gpt-4o*", 2)];
    let e = engine(d.clone());
    let r = admitted(&e, "sk-k", "gpt-4o-latest");
    e.commit_usage(r, Usage::new(1, 1)).unwrap();
    assert_eq!(model_requests(&e, "gpt-4o"), 1);

    // `gpt-4o-latest` becomes a model of its own, priced differently.
    d.models[0].aliases = vec!["chatgpt-4o".into()];
    d = d.model(ModelSpec::new("gpt-4o-latest", dec("5"), dec("15")));
    e.apply_policy(Policy::new(d).unwrap()).unwrap();
    assert_eq!(model_requests(&e, "gpt-4o"), 1);
    assert_eq!(model_requests(&e, "gpt-4o-latest"), 0);
    let r = admitted(&e, "sk-k", "gpt-4o-latest");
    assert_eq!(r.reserved_cost(), dec("0.0065"));
    // Its RPM (from `gpt-4o*`) is its own: gpt-4o still has one request left.
    let _second = admitted(&e, "sk-k", "gpt-4o-latest");
    let _last = admitted(&e, "sk-k", "chatgpt-4o");
    assert_eq!(
        refused(&e, "sk-k", "gpt-4o"),
        (DenialReason::RequestsPerMinute, Scope::WorkspaceModel)
    );
}

const POLICY_TOML: &str = r#"
[org]
id = "acme"

[[models]]
name = "gpt-4o"
aliases = ["gpt-4o-latest", "chatgpt-4o"]
input_per_million = "2.50"
output_per_million = "10"

[[models]]
name = "gpt-4o-mini"
input_per_million = "0.15"
output_per_million = "0.60"

[[models]]
name = "claude-sonnet"
input_per_million = "3"
output_per_million = "15"

[[workspaces]]
id = "ws-chat"
name = "chatbot-production"
models = ["gpt-4o*", "claude-sonnet"]
model_limits = [
  { model = "gpt-4o*", rpm = 600 },
  { model = "gpt-4o-latest", rpm = 60 },
]

[[keys]]
id = "key-cheap"
workspace = "ws-chat"
secret_sha256 = "8e1d2c7f6b0a8f0d4d8a6e7c7f2f1e4b6a9c3d2e1f0a9b8c7d6e5f4a3b2c1d0e"
models = ["gpt-4o-mini"]
"#;

#[test]
fn the_new_fields_round_trip_through_toml_and_json() {
    let policy = Policy::from_toml_str(POLICY_TOML).expect("valid policy");
    let doc = policy.document();
    assert_eq!(doc.models[0].aliases, ["gpt-4o-latest", "chatgpt-4o"]);
    assert_eq!(doc.workspaces[0].models, ["gpt-4o*", "claude-sonnet"]);
    assert_eq!(doc.workspaces[0].model_limits[1].model, "gpt-4o-latest");
    assert_eq!(doc.keys[0].models, ["gpt-4o-mini"]);

    let toml_text = toml::to_string(doc).unwrap();
    let json_text = serde_json::to_string(doc).unwrap();
    assert_eq!(Policy::from_toml_str(&toml_text).unwrap().document(), doc);
    assert_eq!(Policy::from_json_str(&json_text).unwrap().document(), doc);

    // Unset, neither field is written, so existing files serialize as before.
    let plain = PolicyDocument::new(OrgSpec::new("acme"))
        .model(ModelSpec::new("m", dec("1"), dec("1")))
        .workspace(WorkspaceSpec::new("ws", "one").grant("m"))
        .key(KeySpec::new("k", "ws", "sk"));
    let json: serde_json::Value = serde_json::to_value(&plain).unwrap();
    assert!(json["models"][0].get("aliases").is_none(), "{json}");
    assert!(json["keys"][0].get("models").is_none(), "{json}");
    assert!(!toml::to_string(&plain).unwrap().contains("aliases"));
}

#[test]
fn the_example_policy_enforces_what_it_says() {
    let mut doc = Policy::from_toml_str(POLICY_TOML)
        .unwrap()
        .document()
        .clone();
    doc.keys[0].secret_sha256 = KeySpec::digest_of("sk-cheap");
    doc = doc.key(KeySpec::new("key-all", "ws-chat", "sk-all"));
    doc.workspaces[0].model_limits[1].rpm = Some(1);
    let e = engine(doc);
    // The alias's own entry is more specific than `gpt-4o*`: one request a minute.
    let _one = admitted(&e, "sk-all", "chatgpt-4o");
    assert_eq!(
        refused(&e, "sk-all", "gpt-4o"),
        (DenialReason::RequestsPerMinute, Scope::WorkspaceModel)
    );
    drop(admitted(&e, "sk-all", "gpt-4o-mini"));
    drop(admitted(&e, "sk-cheap", "gpt-4o-mini"));
    assert_eq!(
        refused(&e, "sk-cheap", "claude-sonnet"),
        (DenialReason::ModelNotGranted, Scope::Key)
    );
}

/// On Redis, counters are named by the model's own name: an alias and its model share
/// them across instances.
#[cfg(feature = "redis")]
mod on_redis {
    use super::redis_server::{require_redis, RedisServer};
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn an_alias_and_its_model_share_counters_on_redis() {
        if !require_redis() {
            eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
            return;
        }
        let server = RedisServer::start();
        let mut d = doc(&["gpt-4o"]);
        d.workspaces[0].model_limits = vec![model_limit("gpt-4o", 2)];
        let config = RedisConfig {
            prefix: "tg-model-names".into(),
            ..RedisConfig::default()
        };
        let e = RedisEngine::connect(&server.url(), Policy::new(d).unwrap(), config)
            .await
            .unwrap();
        let by_alias = e
            .check_and_reserve(&ask("sk-k", "gpt-4o-latest"))
            .await
            .unwrap();
        assert_eq!(by_alias.reserved_cost(), dec("0.0035"));
        e.commit_usage(by_alias, Usage::new(1_000, 100))
            .await
            .unwrap();
        let by_name = e.check_and_reserve(&ask("sk-k", "gpt-4o")).await.unwrap();
        e.commit_usage(by_name, Usage::new(1_000, 100))
            .await
            .unwrap();
        let third = e.check_and_reserve(&ask("sk-k", "chatgpt-4o")).await;
        let denial = third.expect_err("the model's RPM of 2 is spent");
        assert_eq!(
            (denial.reason, denial.scope),
            (DenialReason::RequestsPerMinute, Scope::WorkspaceModel)
        );
        let key = "tg-model-names:v2:{ws:ws}:model:gpt-4o";
        assert_eq!(server.cli(&["hget", key, "req"]), "2");
        assert_eq!(
            server.cli(&["exists", "tg-model-names:v2:{ws:ws}:model:gpt-4o-latest"]),
            "0"
        );
        let usage = e.usage().await.unwrap();
        let gpt4o = &usage.workspaces[0].models[0];
        assert_eq!(gpt4o.model, "gpt-4o");
        assert_eq!(gpt4o.usage.current.requests, 2);
        assert_eq!(gpt4o.usage.current.cost, dec("0.007"));
    }
}

#[test]
fn the_readme_example_is_valid_and_means_what_it_says() {
    let readme = include_str!("../README.md");
    let section = &readme[readme
        .find("### Model aliases, patterns and a key's own models")
        .expect("README section")..];
    let start = section.find("```toml\n").expect("TOML example") + "```toml\n".len();
    let example = &section[start..start + section[start..].find("```").unwrap()];
    let text = format!("[org]\nid = \"acme\"\n\n{example}").replace(
        "\"…64 hex digits…\"",
        &format!("{:?}", KeySpec::digest_of("sk-cheap")),
    );
    let mut doc = Policy::from_toml_str(&text)
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
        .document()
        .clone();
    doc = doc.key(KeySpec::new("key-all", "ws-chat-prod", "sk-all"));
    doc.workspaces[0].model_limits[0].rpm = Some(1);
    let e = engine(doc);
    // `gpt*` gives gpt-4o one request a minute, whatever name it is called by.
    let _one = admitted(&e, "sk-all", "chatgpt-4o-latest");
    assert_eq!(
        refused(&e, "sk-all", "gpt-4o"),
        (DenialReason::RequestsPerMinute, Scope::WorkspaceModel)
    );
    let _mini = admitted(&e, "sk-all", "gpt-4o-mini");
    let _cheap = admitted(&e, "sk-cheap", "gpt-4o-mini");
    assert_eq!(
        refused(&e, "sk-cheap", "gpt-4o-latest"),
        (DenialReason::ModelNotGranted, Scope::Key)
    );
}
