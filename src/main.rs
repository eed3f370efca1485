//! The `imagegate` binary: argument parsing and exit codes. Everything else is in the library.
#![expect(
    clippy::print_stderr,
    reason = "the CLI reports errors to its user on stderr"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use imagegate::app::ConfigSource;
use imagegate::config::{Config, ConfigError, Env, LogConfig, LogFormat, StorageBackend};
use imagegate::mock_upstream::{MockOptions, MockUpstream};
use imagegate::{App, auth, demo, telemetry, usage};

/// jemalloc instead of glibc malloc: under load it spent ~25 % less CPU per request and held
/// half the peak RSS (glibc's per-thread arenas fragment under the gateway's allocation
/// pattern); see BENCHMARKS.md. Only the binary: the library leaves the choice to its user.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// An OpenAI-compatible image-generation gateway.
///
/// Apps point an OpenAI SDK's base_url at imagegate and use their own client keys; imagegate
/// holds the real upstream keys, validates, limits and forwards. Start with `imagegate demo`.
#[derive(Parser)]
#[command(name = "imagegate", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with a config file.
    ///
    /// Any key can be overridden with env IMAGEGATE__SECTION__KEY (e.g.
    /// IMAGEGATE__SERVER__LISTEN=0.0.0.0:8080). Secrets come from the env vars or files the
    /// config names. SIGTERM or Ctrl-C drains in-flight requests and exits.
    Serve {
        /// TOML config file (see config/imagegate.example.toml).
        #[arg(
            long,
            short,
            env = "IMAGEGATE_CONFIG",
            default_value = "imagegate.toml"
        )]
        config: PathBuf,
    },
    /// Run the gateway in front of a built-in mock upstream, with client key `sk-demo`.
    ///
    /// Needs no network and no config; prints curl and Python snippets to try.
    Demo {
        /// Public listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin listener (health, readiness).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
    },
    /// Validate a config file and print the effective config (exit 0 if valid, 2 if not).
    ///
    /// Secrets are never printed: each is listed with where it comes from and [set] or
    /// [missing]. A missing secret is an error.
    CheckConfig {
        #[arg(
            long,
            short,
            env = "IMAGEGATE_CONFIG",
            default_value = "imagegate.toml"
        )]
        config: PathBuf,
    },
    /// Print usage per client from the gateway's SQLite file: today and this month against
    /// the limits, spend against the budget, requests, images, cached and failures.
    ///
    /// Reads the file named by `storage.path` read-only, so it is safe while `serve` runs.
    Usage {
        #[arg(
            long,
            short,
            env = "IMAGEGATE_CONFIG",
            default_value = "imagegate.toml"
        )]
        config: PathBuf,
        /// Only this client.
        #[arg(long)]
        client: Option<String>,
        /// Days of daily history in --json output.
        #[arg(long, default_value_t = 7)]
        days: u32,
        /// Print the full report as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a new random client key and the `key_sha256` line for its [[clients]] entry.
    ///
    /// Give the key to the client; put only the digest in the config.
    Keygen {
        /// The client id the entry is for.
        #[arg(long)]
        client: String,
    },
    /// Run the fake image provider used by the demo, tests and benchmarks.
    ///
    /// Speaks the OpenAI Images API (sync and async), returns real PNGs. Faults are injected
    /// per request with prompt directives like [mock:status=429 retry_after=30], [mock:hang],
    /// [mock:reset], [mock:bad_json], [mock:latency_ms=500]; or per key via POST /__mock/faults.
    /// GET /__mock/stats shows call counts.
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Latency of every generation, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Image side = requested side / this (1 gives full-size PNGs).
        #[arg(long, default_value_t = 16)]
        image_divisor: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Serve { config } => serve(&config).await,
        Command::Demo {
            listen,
            admin_listen,
        } => {
            let log = LogConfig {
                format: LogFormat::Pretty,
                ..LogConfig::default()
            };
            if let Err(e) = telemetry::init_logging(&log, std::io::stdout, stdout_is_terminal()) {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
            match demo::run(listen, admin_listen, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { config } => check_config(&config),
        Command::Usage {
            config,
            client,
            days,
            json,
        } => usage(&config, client.as_deref(), days, json).await,
        Command::Keygen { client } => {
            let key = auth::generate_client_key();
            println!(
                "# client key for `{client}` (give this to the client; it is not stored anywhere):"
            );
            println!("{key}");
            println!();
            println!("# add to the config:");
            println!("[[clients]]");
            println!("id = \"{client}\"");
            println!("key_sha256 = \"{}\"", auth::key_digest_hex(&key));
            ExitCode::SUCCESS
        }
        Command::MockUpstream {
            listen,
            latency_ms,
            image_divisor,
        } => {
            let _ = telemetry::init_logging(
                &LogConfig::default(),
                std::io::stdout,
                stdout_is_terminal(),
            );
            let options = MockOptions {
                latency: Duration::from_millis(latency_ms),
                image_divisor: image_divisor.max(1),
            };
            let mock = match MockUpstream::start(listen, options).await {
                Ok(mock) => mock,
                Err(e) => {
                    eprintln!("error: cannot listen on {listen}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            println!("mock upstream on {}", mock.base_url());
            shutdown_signal().await;
            mock.shutdown().await;
            ExitCode::SUCCESS
        }
    }
}

async fn serve(path: &std::path::Path) -> ExitCode {
    let env = Env::from_process();
    let config = match Config::load(path, &env) {
        Ok(config) => config,
        Err(e) => return config_error(&e),
    };
    // Lines are written by a thread of their own, batched (telemetry::writer); the guard
    // lives until `serve` returns, so every line of the shutdown is written.
    let (stdout, _log_guard) = match telemetry::writer::BatchedStdout::start() {
        Ok(started) => started,
        Err(e) => {
            eprintln!("error: cannot start the log writer: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = telemetry::init_logging(&config.log, stdout, stdout_is_terminal()) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let source = ConfigSource {
        path: path.to_owned(),
        env: env.clone(),
    };
    let app = match App::build(config, &env).await {
        Ok(app) => app.reload_on_sighup(source),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot start");
            eprintln!("error: {e:#}");
            return if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            };
        }
    };
    match app.run(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "stopped with an error");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let env = Env::from_process();
    let config = match Config::load(path, &env) {
        Ok(config) => config,
        Err(e) => return config_error(&e),
    };
    print!("{}", config.to_toml());
    println!();
    println!("# secrets");
    let mut missing = 0;
    for secret in config.describe_secrets(&env) {
        println!(
            "# {}: {}",
            secret.what,
            if secret.set { "[set]" } else { "[missing]" }
        );
        missing += usize::from(secret.required && !secret.set);
    }
    if missing > 0 {
        eprintln!("error: {missing} required secret(s) missing");
        return ExitCode::from(2);
    }
    eprintln!("config OK: {}", path.display());
    ExitCode::SUCCESS
}

async fn usage(path: &std::path::Path, client: Option<&str>, days: u32, json: bool) -> ExitCode {
    let config = match Config::load(path, &Env::from_process()) {
        Ok(config) => config,
        Err(e) => return config_error(&e),
    };
    if config.storage.backend != StorageBackend::Sqlite {
        eprintln!("error: storage.backend is not \"sqlite\": there is no usage file to read");
        return ExitCode::from(2);
    }
    let clients = config.client_limits();
    if let Some(only) = client
        && !clients.iter().any(|(id, _)| id == only)
    {
        eprintln!("error: no client `{only}` in the config");
        return ExitCode::from(2);
    }
    match usage::report_from_file(
        &config.storage.path,
        &clients,
        client,
        days,
        std::time::SystemTime::now(),
    )
    .await
    {
        Ok(report) if json => match serde_json::to_string_pretty(&report) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(report) => {
            print!("{}", usage::render_table(&report));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "error: cannot read usage from {}: {e}",
                config.storage.path.display()
            );
            ExitCode::FAILURE
        }
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(2)
}

fn stdout_is_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stdout())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
