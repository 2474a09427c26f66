use std::process::ExitCode;

use iotagent_mqtt::{Config, Listeners, config, healthcheck, pki, telemetry};
use tokio_util::sync::CancellationToken;

/// Every webhook call allocates and frees a few dozen small buffers on whichever thread serves it; mimalloc's
/// per-thread free lists took the allocator from about a sixth of the service's CPU per forwarded message
/// (glibc's malloc consolidating and unlinking chunks) to a few per cent (README, V2K bench).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Not a clap subcommand: `iotagent-mqtt healthcheck` must not need (or validate) the service's configuration.
    if std::env::args_os().nth(1).is_some_and(|arg| arg == healthcheck::COMMAND) {
        return healthcheck::run();
    }
    if std::env::args_os().nth(1).is_some_and(|arg| arg == pki::cli::COMMAND) {
        return config::pki::cli(std::env::args_os().skip(1));
    }
    service()
}

fn service() -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(serve_until_stopped());
    // Every shutdown step is over or out of budget: do not wait for blocking calls still running (a commit to an
    // unreachable coordinator), or the process would outlive SHUTDOWN_TIMEOUT.
    runtime.shutdown_background();
    code
}

async fn serve_until_stopped() -> ExitCode {
    let config = match Config::from_env_and_args(std::env::args_os()) {
        Ok(config) => config,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    // Refused like the configuration above (no logger yet to report it through).
    if let Err(e) = telemetry::init(&config.log_format) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "iotagent-mqtt stopped with an error");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    iotagent_mqtt::run(config, listeners, shutdown).await
}

async fn stop_on_signal(shutdown: CancellationToken) {
    match iotagent_mqtt::shutdown::on_signals(shutdown).await {
        // A second signal during the ordered stop: whatever it has not finished is given up.
        Ok(status) => std::process::exit(status.into()),
        Err(error) => tracing::error!(%error, "cannot install signal handlers; stop with SIGKILL"),
    }
}
