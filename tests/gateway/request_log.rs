//! Request logs: every API request is one line, and a workspace's recent ones are
//! listed, newest first and paginated, with the costs the receipts said.

use std::str::FromStr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use serde_json::{json, Value};
use tollgate::Decimal;

use crate::hygiene::tempdir;
use crate::support::{start_with, Options, Running};

/// What the client saw of one request: its id, status and charged cost.
#[derive(Debug, PartialEq)]
struct Seen {
    request_id: String,
    status: u16,
    cost: Option<Decimal>,
}

async fn post(gw: &Running, path: &str, key: &str, body: Value) -> (Seen, Value) {
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("{}{path}", gw.url))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = gw.client.request(request).await.unwrap();
    let status = response.status().as_u16();
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    // A whole JSON answer, or server-sent events whose usage chunk has the cost.
    let answer: Value = serde_json::from_str(&text).unwrap_or_else(|_| {
        text.split("\n\n")
            .filter_map(|event| event.strip_prefix("data: "))
            .filter_map(|data| serde_json::from_str::<Value>(data).ok())
            .find(|chunk| !chunk["x_tollgate"].is_null())
            .unwrap_or(Value::Null)
    });
    let cost = answer["x_tollgate"]["cost_usd"]
        .as_str()
        .map(|c| Decimal::from_str(c).unwrap());
    (
        Seen {
            request_id,
            status,
            cost,
        },
        answer,
    )
}

fn chat(content: &str) -> Value {
    json!({"model": "gpt-4o-mini", "max_tokens": 12, "messages": [{"role": "user", "content": content}]})
}

async fn page(gw: &Running, workspace: &str, query: &str) -> (StatusCode, Value) {
    let answer = gw
        .send(
            Method::GET,
            &format!("/admin/workspaces/{workspace}/requests{query}"),
            "sk-viewer-demo",
            None,
        )
        .await;
    (answer.status, answer.body)
}

fn seen_in(line: &Value) -> Seen {
    Seen {
        request_id: line["request_id"].as_str().unwrap().to_owned(),
        status: u16::try_from(line["status"].as_u64().unwrap()).unwrap(),
        cost: line["cost_usd"]
            .as_str()
            .map(|c| Decimal::from_str(c).unwrap()),
    }
}

#[tokio::test]
async fn a_workspace_lists_exactly_its_requests_newest_first_with_the_receipts_costs() {
    let dir = tempdir();
    let file = dir.join("requests.jsonl");
    let gw = start_with(Options {
        request_log: Some(file.clone()),
        ..Options::default()
    })
    .await;

    let mut prod = Vec::new();
    for content in ["one", "two", "three"] {
        prod.push(
            post(&gw, "/v1/chat/completions", "sk-demo-prod", chat(content))
                .await
                .0,
        );
    }
    let mut streamed = chat("streamed");
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    prod.push(
        post(&gw, "/v1/chat/completions", "sk-demo-prod", streamed)
            .await
            .0,
    );
    let embed = json!({"model": "text-embedding-3-small", "input": ["a", "b"]});
    prod.push(post(&gw, "/v1/embeddings", "sk-demo-prod", embed).await.0);
    // Staging allows three a minute: the fourth is refused and costs nothing.
    let mut staging = Vec::new();
    for _ in 0..4 {
        staging.push(
            post(&gw, "/v1/chat/completions", "sk-demo-staging", chat("hi"))
                .await
                .0,
        );
    }
    // Belongs to no workspace.
    let (stranger, _) = post(&gw, "/v1/chat/completions", "sk-nobody", chat("hi")).await;
    assert_eq!(stranger.status, 401);

    assert!(
        prod.iter().all(|s| s.status == 200 && s.cost.is_some()),
        "{prod:?}"
    );
    assert_eq!(staging[3].status, 429);
    assert_eq!(staging[3].cost, None);

    // The stream's line is written when its pump has committed, just after the
    // client read its last event.
    let wanted: Vec<&Seen> = prod.iter().rev().collect();
    let mut listed = Value::Null;
    for _ in 0..200 {
        let (status, body) = page(&gw, "ws-prod", "").await;
        assert_eq!(status, StatusCode::OK);
        listed = body;
        if listed["data"].as_array().unwrap().len() == prod.len() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let lines = listed["data"].as_array().unwrap();
    let got: Vec<Seen> = lines.iter().map(seen_in).collect();
    assert_eq!(
        got.iter().collect::<Vec<_>>(),
        wanted,
        "newest first, costs as charged"
    );
    assert_eq!(listed["has_more"], false);
    assert!(lines
        .iter()
        .all(|l| l["key_id"] == "key-prod" && l["workspace"] == "ws-prod"));
    assert_eq!(lines[0]["route"], "embeddings");
    assert_eq!(lines[1]["stream"], true);
    assert_eq!(lines[1]["model"], "gpt-4o-mini");
    assert!(lines[2]["input_tokens"].as_u64().unwrap() > 0);
    assert!(lines[2]["output_tokens"].as_u64().unwrap() > 0);

    let (_, staged) = page(&gw, "ws-staging", "").await;
    let staged: Vec<Seen> = staged["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(seen_in)
        .collect();
    assert_eq!(
        staged.iter().collect::<Vec<_>>(),
        staging.iter().rev().collect::<Vec<_>>()
    );
    let (_, staged) = page(&gw, "ws-staging", "?limit=1").await;
    assert_eq!(staged["data"][0]["code"], "rate_limited");
    assert_eq!(
        staged["data"][0]["key_id"], "key-staging",
        "a refusal is attributed"
    );

    // Pages of two walk back through all five without gaps or repeats.
    let mut walked = Vec::new();
    let mut query = "?limit=2".to_owned();
    loop {
        let (status, body) = page(&gw, "ws-prod", &query).await;
        assert_eq!(status, StatusCode::OK);
        walked.extend(body["data"].as_array().unwrap().iter().map(seen_in));
        if body["has_more"] == false {
            assert!(body["next_before"].is_null());
            break;
        }
        query = format!("?limit=2&before={}", body["next_before"]);
    }
    assert_eq!(walked.iter().collect::<Vec<_>>(), wanted);

    // The file has every request, the stranger's too, once flushed.
    gw.app.requests.flush();
    let text = std::fs::read_to_string(&file).unwrap();
    let ids: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["request_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), prod.len() + staging.len() + 1);
    assert!(ids.contains(&stranger.request_id));
}

#[tokio::test]
async fn the_requests_route_checks_its_workspace_query_and_caller() {
    let gw = start_with(Options::default()).await;
    let (status, _) = page(&gw, "ws-nowhere", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for bad in [
        "?limit=0",
        "?limit=501",
        "?limit=x",
        "?before=-1",
        "?sort=asc",
    ] {
        let (status, body) = page(&gw, "ws-prod", bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let answer = gw
        .send(
            Method::GET,
            "/admin/workspaces/ws-prod/requests",
            "sk-demo-prod",
            None,
        )
        .await;
    assert_eq!(
        answer.status,
        StatusCode::UNAUTHORIZED,
        "an API key is not an admin key"
    );
    let (status, body) = page(&gw, "ws-prod", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"], json!([]));
}
