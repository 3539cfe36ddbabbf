//! The `portcullis` command: `portcullis --config PATH` serves, `portcullis check --config PATH`
//! validates. The only place that uses `anyhow`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use portcullis::config::Config;
use tracing_subscriber::EnvFilter;

// A request allocates and frees a few hundred small objects (JSON values, headers, futures);
// mimalloc's thread-local free lists do that in about half glibc's instructions.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "An OpenAI-compatible LLM gateway"
)]
struct Cli {
    /// The YAML configuration to serve.
    #[arg(long, short, global = true, default_value = "config/portcullis.yaml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the configuration (the default).
    Serve,
    /// Check the configuration and exit: non-zero, naming the bad field, if it is invalid.
    Check,
    /// Work with plugin files.
    Plugins {
        #[command(subcommand)]
        command: PluginsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PluginsCommand {
    /// Print what a component exports and imports, its WIT version, and whether it can run here.
    Inspect {
        /// The `.wasm` file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    portcullis::plugins::quiet_library_backtraces();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Check => match check(&cli.config) {
            Ok(config) => {
                println!(
                    "{}: ok ({} deployments in {} model groups)",
                    cli.config.display(),
                    config.models.len(),
                    config
                        .models
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<std::collections::HashSet<_>>()
                        .len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e:#}", cli.config.display());
                ExitCode::FAILURE
            }
        },
        Command::Plugins {
            command: PluginsCommand::Inspect { file },
        } => match inspect(&file) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("{}: {e:#}", file.display());
                ExitCode::FAILURE
            }
        },
        Command::Serve => match serve(cli.config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("portcullis: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Everything serving would check before listening: the schema, the TLS files, and every
/// plugin (compiled, its exports checked, `init` run with its config).
fn check(path: &std::path::Path) -> anyhow::Result<Config> {
    let config = Config::load(path)?;
    if let Some(tls) = &config.server.tls {
        install_crypto_provider();
        portcullis::server::check_tls(tls)?;
    }
    if !config.plugins.enabled.is_empty() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        runtime.block_on(portcullis::server::check_plugins(&config))?;
    }
    Ok(config)
}

/// Prints the inspection; `Ok(false)` if the gateway cannot run the component.
fn inspect(file: &std::path::Path) -> anyhow::Result<bool> {
    let runtime = portcullis::plugins::PluginRuntime::new()?;
    let report = runtime.inspect(file)?;
    println!("file:     {}", file.display());
    println!("sha256:   {}", report.content_hash);
    println!(
        "kinds:    {}",
        if report.kinds.is_empty() {
            "-".to_owned()
        } else {
            report.kinds.join(", ")
        }
    );
    println!("exports:  {}", report.exports.join(", "));
    println!("imports:  {}", report.imports.join(", "));
    println!("contract: {}", report.contract.unwrap_or("-"));
    println!("gateway:  runs {}", report.supported.join(", "));
    match report.problem {
        None => {
            println!("status:   compatible");
            Ok(true)
        }
        Some(problem) => {
            println!("status:   incompatible: {problem}");
            Ok(false)
        }
    }
}

/// rustls needs one process-wide crypto provider; ring is the one compiled in.
fn install_crypto_provider() {
    // Fails only if one is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn serve(path: PathBuf) -> anyhow::Result<()> {
    init_logging();
    let config = Config::load(&path).with_context(|| format!("{}", path.display()))?;
    install_crypto_provider();
    let scheme = if config.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        let hangups = hangup_signal()?;
        portcullis::server::serve(path, config, shutdown, |address, reloader| {
            eprintln!("portcullis listening on {scheme}://{address}");
            hangups.reload_on_each(reloader);
        })
        .await?;
        anyhow::Ok(())
    })
}

/// Dependencies whose debug logs drown the gateway's own.
const QUIET_TARGETS: &str = "cranelift_codegen=warn,wasmtime_internal_cranelift=warn,wasmtime=info";

/// `PORTCULLIS_LOG` takes `tracing` filter directives (default `info`);
/// `PORTCULLIS_LOG_FORMAT=json` writes one JSON object per line.
fn init_logging() {
    // The compiler's debug output is thousands of lines per plugin and slows compiling down:
    // quiet it unless the directives name it (a later directive for a target wins).
    let directives = std::env::var("PORTCULLIS_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(format!("{QUIET_TARGETS},{directives}"))
        .unwrap_or_else(|_| EnvFilter::new(format!("{QUIET_TARGETS},info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if std::env::var("PORTCULLIS_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Registers for SIGINT and SIGTERM now, so a signal that arrives before the server polls the
/// returned future is not lost (and does not kill the process), and completes on either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {},
                _ = terminate.recv() => {},
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// SIGHUP, registered at start so that one arriving early does not kill the process (its default
/// action), and handed to the server once it listens: each one reloads the configuration.
struct Hangups {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

fn hangup_signal() -> anyhow::Result<Hangups> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let signal = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
        Ok(Hangups { signal })
    }
    #[cfg(not(unix))]
    Ok(Hangups {})
}

impl Hangups {
    fn reload_on_each(self, reloader: &std::sync::Arc<portcullis::reload::Reloader>) {
        #[cfg(unix)]
        {
            let reloader = std::sync::Arc::clone(reloader);
            let mut signal = self.signal;
            tokio::spawn(async move {
                while signal.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the configuration");
                    reloader.request();
                }
            });
        }
        #[cfg(not(unix))]
        let _ = reloader;
    }
}
