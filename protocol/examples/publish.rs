//! Publishes one durable and one ephemeral message to a hub channel through Redis.
//!
//! `cargo run -p protocol --features redis --example publish -- redis://127.0.0.1:6379/ public:demo`

use protocol::{publish, Envelope};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379/".into());
    let channel = args.next().unwrap_or_else(|| "public:demo".into());
    let client = redis::Client::open(url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;

    let env = Envelope {
        event: Some("chat".into()),
        data: serde_json::json!({"text": "hello from Rust"}),
    };
    let id = publish::publish_durable(&mut conn, &channel, &env).await?;
    println!("durable message {id} published to {channel}");

    let ping = Envelope {
        event: Some("typing".into()),
        data: serde_json::json!(true),
    };
    let nodes = publish::publish_ephemeral(&mut conn, &channel, &ping, false).await?;
    println!("ephemeral message reached {nodes} hub node(s)");
    Ok(())
}
