//! The `hub` binary: check the configuration, set up logging, run the node (or, as
//! `hub healthcheck`, ask a running node's `/healthz`).

use std::process::ExitCode;

/// jemalloc, whose background thread gives freed memory back within seconds (glibc kept a
/// burst's memory for good, and costs ~4 KB more per stream: BENCHMARKS.md, "Allocator").
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // `hub healthcheck`: the container health check (asks this host's /healthz).
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return hub::healthcheck::main();
    }
    let config = match hub::Config::from_env_and_args() {
        Ok(c) => c,
        Err(line) => {
            eprintln!("hub: invalid configuration: {line}");
            return ExitCode::from(2);
        }
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&config.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("hub: invalid configuration: HUB_LOG {:?}: {e}", config.log);
            return ExitCode::from(2);
        }
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match actix_web::rt::System::new().block_on(hub::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hub: {e:#}");
            ExitCode::FAILURE
        }
    }
}
