//! The `redtap` binary: parses arguments and calls the library.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use redtap::config::{Config, LogFormat, RunArgs};
use redtap::daemon::EX_USAGE;
use redtap::query::args::{CliError, Exit};
use redtap::query::cmd::{query, stats, tail, top};

#[derive(Parser)]
#[command(
    name = "redtap",
    version,
    about = "Capture who sends TCP traffic to an address; keep it in weighted Redis backends for a retention window."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture on an address and store records in Redis.
    Run(Box<RunArgs>),
    /// Check a configuration without running it: every backend (connect, AUTH, TLS, a small
    /// expiring write), the capture, the listen and admin addresses. Exit 0 when all is well,
    /// 64 when the configuration must change, 1 when a backend or the host is in the way.
    Check(Box<RunArgs>),
    /// Show backends, weights and shares; `weights set NAME=W…` changes them live.
    Weights {
        /// The agent's admin API: ADDR:PORT as for `run --admin`, or a URL (default: the config
        /// file's `admin`, else 127.0.0.1:9900).
        #[arg(long, global = true, env = "REDTAP_ADMIN", value_name = "ADDR")]
        admin: Option<String>,
        /// The agent's TOML configuration file: its `admin` and `admin_token`.
        #[arg(long, short = 'c', global = true)]
        config: Option<std::path::PathBuf>,
        /// Bearer token of the admin API, if it requires one (default: the file's).
        #[arg(
            long,
            global = true,
            env = "REDTAP_ADMIN_TOKEN",
            hide_env_values = true
        )]
        token: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(flatten)]
        fleet: Box<redtap::client::ControlArgs>,
        #[command(subcommand)]
        action: Option<WeightsAction>,
    },
    /// Print the records of a time window from every backend, oldest first.
    Query(Box<query::QueryArgs>),
    /// The busiest senders (or destinations, or pairs) of a time window.
    Top(Box<top::TopArgs>),
    /// Follow new records from every backend until Ctrl-C.
    Tail(Box<tail::TailArgs>),
    /// Per backend: records held, oldest and newest, memory, share against weight.
    Stats(Box<stats::StatsArgs>),
    /// Print shell completions: `redtap completions bash > /etc/bash_completion.d/redtap`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `redtap man > /usr/local/share/man/man1/redtap.1`.
    Man,
}

#[derive(Subcommand)]
enum WeightsAction {
    /// Change weights: `redtap weights set A=50 B=50`.
    Set {
        /// NAME=WEIGHT pairs (integers 0..=10000).
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// With --control: every change of the fleet's weights, oldest first.
    History {
        /// How many of the latest changes.
        #[arg(long, default_value_t = 20)]
        count: usize,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match cli.command {
        Command::Run(args) => {
            let config = match Config::load(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("redtap: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            if let Err(e) = init_tracing(config.log_format) {
                eprintln!("redtap: {e}");
                return ExitCode::from(EX_USAGE);
            }
            let log_format = config.log_format;
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(cancel_on_signal(shutdown.clone()));
                match redtap::run(config, shutdown).await {
                    Ok(_) => ExitCode::SUCCESS,
                    Err(e) => {
                        // Once: a JSON log stays all JSON for its collector; a terminal or
                        // journal gets the one plain line.
                        match log_format {
                            LogFormat::Json => tracing::error!("{e}"),
                            LogFormat::Text => eprintln!("redtap: {e}"),
                        }
                        ExitCode::from(e.exit_code())
                    }
                }
            })
        }
        Command::Check(args) => {
            let config = match Config::load(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("redtap: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            let report = rt.block_on(redtap::check::run(&config));
            print!("{}", report.text());
            ExitCode::from(report.exit_code())
        }
        Command::Weights {
            admin,
            config,
            token,
            json,
            fleet,
            action,
        } => rt.block_on(async {
            let file = match config.as_deref().map(redtap::config::read_file).transpose() {
                Ok(f) => f.unwrap_or_default(),
                Err(e) => {
                    eprintln!("redtap: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            if let Some(url) = fleet.control.clone().or(file.control.clone()) {
                return fleet_weights(&fleet, &url, file.prefix.clone(), action, json).await;
            }
            let admin = match admin.or(file.admin) {
                Some(a) if a == "off" => {
                    eprintln!("redtap: the agent's admin API is off (admin = \"off\")");
                    return ExitCode::from(EX_USAGE);
                }
                Some(a) => a,
                None => redtap::config::settings::spec::admin
                    .default_text()
                    .expect("admin has a fixed default")
                    .to_string(),
            };
            let token = token.or(file.admin_token);
            let token = token.as_deref();
            let result = match action {
                None => redtap::client::backends(&admin, token).await,
                Some(WeightsAction::Set { pairs }) => match redtap::client::parse_pairs(&pairs) {
                    Ok(w) => redtap::client::set(&admin, token, &w).await,
                    Err(e) => {
                        eprintln!("redtap: {e:#}");
                        return ExitCode::from(EX_USAGE);
                    }
                },
                Some(WeightsAction::History { .. }) => {
                    eprintln!("redtap: weights history needs --control URL (the control Redis)");
                    return ExitCode::from(EX_USAGE);
                }
            };
            if let Some(w) = result
                .as_deref()
                .ok()
                .and_then(redtap::client::unsaved_warning)
            {
                eprintln!("redtap: {w}");
            }
            match result {
                Ok(b) if json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&b).expect("serializable")
                    );
                    ExitCode::SUCCESS
                }
                Ok(b) => {
                    print!("{}", redtap::client::table(&b));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("redtap: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::Query(a) => read_exit(rt.block_on(query::run(&a, stdout()))),
        Command::Top(a) => read_exit(rt.block_on(top::run(&a, stdout()))),
        Command::Stats(a) => read_exit(rt.block_on(stats::run(&a, stdout()))),
        Command::Tail(a) => read_exit(rt.block_on(async {
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            tail::run(&a, stdout(), shutdown).await
        })),
        // Generated from the same clap definitions as the parser, so they never drift.
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "redtap", &mut stdout());
            ExitCode::SUCCESS
        }
        Command::Man => match clap_mangen::Man::new(Cli::command()).render(&mut stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("redtap: cannot write the man page: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `redtap weights … --control URL`: the fleet's weights, straight from the control Redis.
async fn fleet_weights(
    args: &redtap::client::ControlArgs,
    url: &str,
    file_prefix: Option<String>,
    action: Option<WeightsAction>,
    json: bool,
) -> ExitCode {
    use redtap::client::FleetAction;
    let prefix = args
        .prefix
        .clone()
        .or(file_prefix)
        .unwrap_or_else(|| "redtap".into());
    let action = match action {
        None => FleetAction::List,
        Some(WeightsAction::Set { pairs }) => match redtap::client::parse_pairs(&pairs) {
            Ok(w) => FleetAction::Set(w),
            Err(e) => {
                eprintln!("redtap: {e:#}");
                return ExitCode::from(EX_USAGE);
            }
        },
        Some(WeightsAction::History { count }) => FleetAction::History(count),
    };
    match redtap::client::fleet(args, url, &prefix, action, json).await {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("redtap: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn stdout() -> std::io::StdoutLock<'static> {
    std::io::stdout().lock()
}

/// Exit code of a read command: 0 complete, 2 partial, 64 usage, 1 output error.
fn read_exit(r: Result<Exit, CliError>) -> ExitCode {
    match r {
        Ok(exit) => ExitCode::from(exit.code()),
        Err(e) => {
            eprintln!("redtap: {e}");
            ExitCode::from(e.code())
        }
    }
}

/// Cancel `token` on SIGTERM or SIGINT. The handlers are installed when this is called, not
/// when the returned future first runs, so a signal that arrives at once is not fatal.
fn cancel_on_signal(token: CancellationToken) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        token.cancel();
    }
}

/// Log to stderr at `REDTAP_LOG` (default `info`). A value that would silence redtap's own
/// errors by mistake (a bare word that is not a level reads as a target name to `EnvFilter`,
/// turning every other line off) is refused.
fn init_tracing(format: LogFormat) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("REDTAP_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            check_log_directives(&v)?;
            EnvFilter::try_new(&v).map_err(|e| format!("REDTAP_LOG={v:?}: {e}"))?
        }
        _ => EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// Each comma-separated directive is a level, or `TARGET=LEVEL` (`redtap=debug`).
fn check_log_directives(v: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for d in v.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = d.rsplit_once('=').map_or(d, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "REDTAP_LOG={v:?}: {d:?} is not a log level; use one of {} (e.g. REDTAP_LOG=debug) \
                 or TARGET=LEVEL (e.g. REDTAP_LOG=info,redtap::sink=debug)",
                LEVELS.join(", ")
            ));
        }
    }
    Ok(())
}
