//! The `fanout` binary: parse and validate configuration, install logging, run a node.

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _};
use fanout_server::config::{Cli, CliCommand, Config, LogFormat};

/// EX_USAGE from sysexits.h: the command line or configuration is wrong.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    // Matches kept, not just the parsed struct: they say where each setting came from
    // (flag, environment or default), which is how the config file slots in between.
    let parsed = Cli::command().try_get_matches().and_then(|m| Cli::from_arg_matches(&m).map(|cli| (m, cli)));
    let (matches, cli) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_CONFIG),
            };
        }
    };
    match cli.command {
        CliCommand::Serve(_) => {
            let Some(serve) = matches.subcommand_matches("serve") else { return ExitCode::from(EXIT_CONFIG) };
            let config = match Config::load(serve) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("fanout: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_tracing(&config.log_level, config.log_format);
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("fanout: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let shutdown = match shutdown_signal(&runtime) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("fanout: cannot listen for SIGTERM/SIGINT: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(fanout_server::run(config, shutdown)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.downcast_ref::<fanout_server::ConfigError>().is_some() => {
                    tracing::error!("{e:#}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        CliCommand::Publish(args) => client_runtime(fanout_server::cli::publish(args)),
        CliCommand::Subscribe(args) => client_runtime(fanout_server::cli::subscribe(args)),
        CliCommand::History(args) => client_runtime(fanout_server::cli::history(args)),
        CliCommand::Presence(args) => client_runtime(fanout_server::cli::presence(args)),
        CliCommand::Disconnect(args) => client_runtime(fanout_server::cli::disconnect(args)),
        CliCommand::Channels(args) => client_runtime(fanout_server::cli::listing(args.api, false, args.namespace)),
        CliCommand::Nodes(args) => client_runtime(fanout_server::cli::listing(args, true, None)),
    }
}

/// The client commands need only a small runtime.
fn client_runtime(fut: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("fanout: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(filter: &str, format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Installs the SIGTERM and SIGINT handlers now, and returns a future that resolves on
/// either. Installed before the node binds anything: registered lazily (on the future's
/// first poll), a SIGTERM that arrives as soon as the node answers `/readyz` would still
/// meet the default action and kill the process without a drain.
fn shutdown_signal(runtime: &tokio::runtime::Runtime) -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let _entered = runtime.enter();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
