//! The smallest complete use of tollgate: a policy in a few lines, one request
//! admitted and committed, one denied.
//!
//! Run with `cargo run --example quickstart`.

use tollgate::{Engine, Policy, RateLimitHeaders, Request, Usage};

const POLICY: &str = r#"
[org]
id = "acme"
budget = { limit = "50.00", period = "month" }

[[models]]
name = "gpt-4o-mini"
input_per_million = "0.15"
output_per_million = "0.60"

[[workspaces]]
id = "ws-chat"
name = "chatbot-production"
models = ["gpt-4o-mini"]
limits = { rpm = 1, tpm = 20000 }

[[keys]]
id = "key-demo"
workspace = "ws-chat"
# SHA-256 of "sk-demo" (KeySpec::digest_of); the secret itself is never stored.
secret_sha256 = "f77894fdfa58e447c57e077eaa9708e8e009c84dc6aba2db80461275e9b85be7"
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let engine = Engine::new(Policy::from_toml_str(POLICY)?);
    let request = Request::with_secret("sk-demo", "gpt-4o-mini")
        .input_tokens(1_200)
        .max_output_tokens(300);

    let reservation = engine.check_and_reserve(&request)?;
    println!(
        "admitted: holding ${} worst case",
        reservation.reserved_cost()
    );
    for (name, value) in RateLimitHeaders::for_reservation(&reservation).iter() {
        println!("  {name}: {value}");
    }
    let receipt = engine.commit_usage(reservation, Usage::new(1_180, 214))?;
    println!(
        "committed: cost ${} (reserved ${})",
        receipt.cost(),
        receipt.reserved_cost()
    );

    // The workspace allows one request per minute: the second is refused.
    match engine.check_and_reserve(&request) {
        Ok(_) => println!("unexpectedly admitted"),
        Err(denial) => {
            println!(
                "denied: HTTP {} {}: {}",
                denial.http_status(),
                denial.code(),
                denial
            );
            for (name, value) in RateLimitHeaders::for_denial(&denial).iter() {
                println!("  {name}: {value}");
            }
        }
    }
    Ok(())
}
