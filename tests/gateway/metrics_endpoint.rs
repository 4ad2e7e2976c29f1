//! `GET /metrics` (feature `metrics`): after a scripted set of requests, the
//! Prometheus text reports exactly those admissions, denials and spend. Each gateway
//! has its own recorder, so other tests' gateways in this process do not show up.

use std::collections::BTreeMap;
use std::str::FromStr;

use hyper::{Method, StatusCode};
use serde_json::Value;
use tollgate::metric_names::{ADMITTED, DENIED, IN_FLIGHT, SPEND, TOKENS};
use tollgate::Decimal;

use crate::support::{start, Running};

/// Every sample of metric `name`: its labels and value.
fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, "}"));
            (metric == name).then_some(())?;
            let labels = labels
                .trim_end_matches('}')
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            Some((labels, value.parse().expect("a number")))
        })
        .collect()
}

/// The value of `name` with exactly these labels (0 if absent).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples(text, name)
        .into_iter()
        .find(|(l, _)| *l == wanted)
        .map_or(0.0, |(_, v)| v)
}

fn total(text: &str, name: &str) -> f64 {
    samples(text, name).iter().map(|(_, v)| v).sum()
}

async fn scrape(gw: &Running, key: &str) -> (StatusCode, String) {
    let request = hyper::Request::builder()
        .method(Method::GET)
        .uri(format!("{}/metrics", gw.url))
        .header("authorization", format!("Bearer {key}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = gw.client.request(request).await.unwrap();
    let status = response.status();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// Pico-dollars of a reply's `x_tollgate.cost_usd`.
fn picos(body: &Value) -> f64 {
    let cost = Decimal::from_str(body["x_tollgate"]["cost_usd"].as_str().expect("a cost")).unwrap();
    let picos: i64 = (cost * Decimal::from(1_000_000_000_000i64))
        .try_into()
        .unwrap();
    picos as f64
}

#[tokio::test]
async fn metrics_report_exactly_the_requests_made() {
    let gw = start().await;
    let (mut prod, mut staging, mut playground) = (0.0, 0.0, 0.0);
    for _ in 0..2 {
        let answer = gw.chat("sk-demo-prod", "gpt-4o-mini", None).await;
        assert_eq!(answer.status, StatusCode::OK);
        prod += picos(&answer.body);
    }
    for _ in 0..3 {
        let answer = gw.chat("sk-demo-staging", "gpt-4o-mini", None).await;
        assert_eq!(answer.status, StatusCode::OK);
        staging += picos(&answer.body);
    }
    // Denied: a fourth request in the minute, an ungranted model, an unknown key.
    let answer = gw.chat("sk-demo-staging", "gpt-4o-mini", None).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    let answer = gw.chat("sk-demo-staging", "gpt-4o", None).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    let answer = gw.chat("sk-nobody", "gpt-4o-mini", None).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    // The playground's day budget admits four gpt-4o calls, then 402.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let answer = gw.chat("sk-demo-default", "gpt-4o", Some(50)).await;
        if answer.status == StatusCode::OK {
            playground += picos(&answer.body);
        }
        statuses.push(answer.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 402]);

    let (status, text) = scrape(&gw, "sk-viewer-demo").await;
    assert_eq!(status, StatusCode::OK, "{text}");

    let admitted = |ws, model| value(&text, ADMITTED, &[("workspace", ws), ("model", model)]);
    assert_eq!(admitted("ws-prod", "gpt-4o-mini"), 2.0, "{text}");
    assert_eq!(admitted("ws-staging", "gpt-4o-mini"), 3.0);
    assert_eq!(admitted("ws-playground", "gpt-4o"), 4.0);
    assert_eq!(total(&text, ADMITTED), 9.0, "no other admissions");

    let denied = |scope, reason| value(&text, DENIED, &[("scope", scope), ("reason", reason)]);
    assert_eq!(denied("workspace", "rpm"), 1.0, "{text}");
    assert_eq!(denied("workspace_model", "model_not_granted"), 1.0);
    assert_eq!(denied("key", "unknown_key"), 1.0);
    assert_eq!(denied("workspace", "budget"), 1.0);
    assert_eq!(total(&text, DENIED), 4.0, "no other denials");

    let spend = |ws, model| value(&text, SPEND, &[("workspace", ws), ("model", model)]);
    assert_eq!(spend("ws-prod", "gpt-4o-mini"), prod);
    assert_eq!(spend("ws-staging", "gpt-4o-mini"), staging);
    assert_eq!(spend("ws-playground", "gpt-4o"), playground);
    assert_eq!(total(&text, SPEND), prod + staging + playground);
    // 8 tokens in ("Hello" with the chat framing) and 40 out per mock answer.
    let tokens = |direction| {
        value(
            &text,
            TOKENS,
            &[
                ("workspace", "ws-prod"),
                ("model", "gpt-4o-mini"),
                ("direction", direction),
            ],
        )
    };
    assert_eq!((tokens("input"), tokens("output")), (16.0, 80.0));
    assert_eq!(total(&text, IN_FLIGHT), 0.0, "nothing left in flight");
    // And the engine's own usage agrees with the spend.
    let usage = gw.usage().await;
    let org_picos: i64 = (usage.org.current.cost * Decimal::from(1_000_000_000_000i64))
        .try_into()
        .unwrap();
    assert_eq!(org_picos as f64, total(&text, SPEND));
}

#[tokio::test]
async fn metrics_need_an_admin_key_on_the_gateway_address() {
    let gw = start().await;
    let (status, _) = scrape(&gw, "sk-demo-prod").await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "an API key is not an admin key"
    );
    let (status, text) = scrape(&gw, "sk-viewer-demo").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.contains("# TYPE tollgate_requests_admitted_total counter"),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_are_served_without_a_key_on_their_own_listener() {
    let gw = start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let server = tokio::spawn(crate::metrics::serve(
        listener,
        gw.app.metrics.clone(),
        gw.app.limits.header_timeout,
    ));
    assert_eq!(
        gw.chat("sk-demo-prod", "gpt-4o-mini", None).await.status,
        200
    );
    let response = gw.client.get(url.parse().unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert_eq!(
        value(
            &text,
            ADMITTED,
            &[("workspace", "ws-prod"), ("model", "gpt-4o-mini")]
        ),
        1.0,
        "{text}"
    );
    server.abort();
}
