//! `loadgen`: holds many SSE streams against a server, publishes to it, and measures.
//!
//! - `loadgen hold`: one process holding up to a few thousand streams from one source address,
//!   counting every delivery per stream and timing it from the send timestamp in the data.
//! - `loadgen publish`: publishes `<seq> <unix micros>` messages over HTTP or Redis at a fixed
//!   rate or as fast as replies come, bounded in count.
//! - `loadgen run`: starts several `hold` processes on 127.0.0.2, .3, ... (so 18,000+ streams
//!   fit under the per-process file limit), publishes, merges their reports, reads the
//!   server's CPU time and memory from /proc, prints a summary and writes JSON.
//! - `loadgen presence-storm`: N users join a channel, reconnect all at once, leave; the
//!   presence events an observer gets and the Redis operations each phase cost; its users
//!   may be held by `loadgen presence-users` children (100,000 users need several).
//! - `loadgen auth-hook`: a backend's authorization hook answering locally (`HUB_AUTH_URL`).
//! - `loadgen attack`: a slowloris or a connection flood from one address (abuse limits).
//! - `loadgen tls-hold`: idle SSE streams over HTTPS, many per HTTP/2 connection or one per
//!   HTTP/1.1 connection (what a stream costs over each).
//!
//! Every mode is bounded in count and time and stops by itself; traffic goes to loopback only.

mod attack;
mod hold;
mod hook;
mod presence;
mod presence_users;
mod publish;
mod report;
mod run;
mod tls_hold;
mod webhook_rx;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loadgen", about = "Load generator for the hub")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Hold(hold::HoldArgs),
    AuthHook(hook::HookArgs),
    Publish(publish::PublishArgs),
    Run(Box<run::RunArgs>),
    TlsHold(tls_hold::TlsHoldArgs),
    PresenceStorm(presence::PresenceArgs),
    PresenceUsers(presence_users::UsersArgs),
    Attack(attack::AttackArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // reqwest is built with rustls but no provider of its own (the hub's choice, unified over
    // the workspace): ring, as everywhere else.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The hook stands for a backend on machines of its own: it answers on every core.
    let rt = match cli.cmd {
        Cmd::AuthHook(_) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    }
    .enable_all()
    .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start a runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async {
        match cli.cmd {
            Cmd::Hold(a) => hold::main(a).await,
            Cmd::AuthHook(a) => hook::main(a).await,
            Cmd::Publish(a) => publish::main(a)
                .await
                .map(|r| println!("{}", serde_json::to_string(&r).unwrap_or_default())),
            Cmd::Run(a) => run::main(*a).await,
            Cmd::TlsHold(a) => tls_hold::main(a).await,
            Cmd::PresenceStorm(a) => presence::main(a).await,
            Cmd::PresenceUsers(a) => presence_users::main(a).await,
            Cmd::Attack(a) => attack::main(a).await,
        }
    });
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
