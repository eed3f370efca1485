//! Building and running the gateway: shared state, both listeners, graceful shutdown.
//!
//! [`App::build`] binds the listeners (port 0 works, so tests run in parallel) and
//! [`App::run`] serves until the shutdown future resolves. Connections are served with
//! hyper-util's builder rather than `axum::serve` because it has a header-read timeout (a
//! slow-loris guard) and per-connection graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::ClientKeys;
use crate::cache::ResponseCache;
use crate::config::{Config, ConfigError, Env, ServerConfig, StorageBackend, StorageConfig};
use crate::rate_limit::{MonotonicClock, RateLimits};
use crate::router;
use crate::storage::Database;
use crate::tasks::{LocalTaskStore, TaskStore, Tasks};
use crate::telemetry::metrics::Metrics;
use crate::upstream::Upstreams;
use crate::usage::{Ledger, LedgerError, SystemClock};
use crate::validate::Models;

/// Everything a request needs, shared by all of them.
///
/// What a config reload may change lives in [`Runtime`], swapped whole: a request takes one
/// snapshot and keeps it to the end, so a reload never changes the rules under an in-flight
/// request. What must survive reloads (listeners, and the state of limits, ledger and cache as
/// they land) lives here directly.
pub struct Gateway {
    /// `[server]` as at start: listeners and HTTP limits need a restart to change.
    pub server: ServerConfig,
    /// Per-client rate limits; reconfigured (not reset) on reload.
    pub limits: RateLimits,
    /// The response cache (`[cache]` as at start).
    pub cache: ResponseCache,
    pub metrics: Arc<Metrics>,
    /// Quotas and usage, durable in `[storage]`.
    pub ledger: Ledger,
    /// Async tasks, durable in `[storage]` (the same file as the ledger).
    pub tasks: Tasks,
    runtime: RwLock<Arc<Runtime>>,
    /// Unix seconds at start, reported as `created` of models.
    pub started_at: u64,
    /// Set at the start of shutdown: `/readyz` answers 503 from then on.
    pub draining: AtomicBool,
}

/// The reloadable part of the gateway: built from one config, replaced whole on reload.
pub struct Runtime {
    pub config: Config,
    pub clients: ClientKeys,
    pub models: Models,
    pub upstreams: Upstreams,
    pub admin_token: Option<SecretString>,
}

impl Runtime {
    /// Builds everything a config describes, resolving its secrets from `env`.
    pub fn build(
        config: Config,
        env: &Env,
        metrics: &Arc<Metrics>,
    ) -> Result<Runtime, ConfigError> {
        config.validate()?;
        let secrets = config.resolve_secrets(env)?;
        Ok(Runtime {
            clients: ClientKeys::from_config(&config),
            models: Models::from_config(&config),
            upstreams: Upstreams::from_config(&config, &secrets, Arc::clone(metrics))?,
            admin_token: secrets.admin_token,
            config,
        })
    }
}

impl Gateway {
    /// The current config snapshot. Cheap: one read lock and an `Arc` clone.
    pub fn runtime(&self) -> Arc<Runtime> {
        match self.runtime.read() {
            Ok(guard) => Arc::clone(&guard),
            // A panic while swapping cannot leave a half-written Arc; the value is usable.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replaces the reloadable config. In-flight requests keep the snapshot they started with.
    /// Settings that need a restart (`[server]`, `[storage]`) are reported and left as they are.
    pub fn reload(&self, config: Config, env: &Env) -> Result<(), ConfigError> {
        let mut runtime = Runtime::build(config, env, &self.metrics)?;
        // `[cache]` is fixed at start, so the reloaded upstreams' URL lifetimes must also stay
        // above the TTL actually in force.
        if let Some(ttl) = self.cache.ttl() {
            runtime.config.check_cache_ttl(ttl.as_secs())?;
        }
        let current = self.runtime();
        if toml::to_string(&runtime.config.server).ok() != toml::to_string(&self.server).ok()
            || runtime.config.storage.path != current.config.storage.path
            || runtime.config.storage.backend != current.config.storage.backend
            || toml::to_string(&runtime.config.cache).ok()
                != toml::to_string(&current.config.cache).ok()
        {
            tracing::warn!(
                "config reload: [server], [storage] and [cache] changes take effect only after a restart"
            );
        }
        if runtime.clients.is_empty() {
            tracing::warn!("no [[clients]] configured: every request will be refused with 401");
        }
        // Limits first: a client added by this reload must exist in the limiter before its key
        // can authenticate.
        self.limits.reconfigure(&runtime.clients.limits());
        // Key pools and retry budgets carry on (cooldowns, rate windows, in-flight counts), and
        // requests still running on the old snapshot share them with the new one.
        runtime.upstreams.carry_over_from(&current.upstreams);
        let summary = (
            runtime.clients.len(),
            runtime.config.models.len(),
            runtime.config.upstreams.len(),
        );
        match self.runtime.write() {
            Ok(mut guard) => *guard = Arc::new(runtime),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(runtime),
        }
        tracing::info!(
            client_keys = summary.0,
            models = summary.1,
            upstreams = summary.2,
            "config reloaded"
        );
        Ok(())
    }
}

/// Where a reload reads the config from: the file `serve` started with, and the same env.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub env: Env,
}

impl ConfigSource {
    /// Re-reads the file and applies it; an invalid file keeps the running config.
    pub fn reload_into(&self, gateway: &Gateway) {
        let result = Config::load(&self.path, &self.env)
            .and_then(|config| gateway.reload(config, &self.env));
        if let Err(e) = result {
            tracing::error!(error = %e, path = %self.path.display(), "config reload failed; keeping the running config");
        }
    }
}

pub type AppState = Arc<Gateway>;

/// The TLS crypto provider reqwest uses; must be installed before any client is built.
/// Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A built gateway with bound listeners, not yet serving.
pub struct App {
    state: AppState,
    public: TcpListener,
    admin: TcpListener,
    source: Option<ConfigSource>,
}

impl App {
    /// Resolves secrets from `env`, builds the state, and binds both listeners.
    pub async fn build(config: Config, env: &Env) -> anyhow::Result<App> {
        install_crypto_provider();
        let metrics = Arc::new(Metrics::new());
        let runtime = Runtime::build(config, env, &metrics)?;
        let (ledger, task_store) =
            open_storage(&runtime.config.storage)
                .await
                .with_context(|| {
                    format!(
                        "cannot open storage at storage.path {}",
                        runtime.config.storage.path.display()
                    )
                })?;
        if runtime.clients.is_empty() {
            tracing::warn!("no [[clients]] configured: every request will be refused with 401");
        }
        let state = Arc::new(Gateway {
            server: runtime.config.server.clone(),
            limits: RateLimits::new(&runtime.clients.limits(), Arc::new(MonotonicClock::new())),
            cache: ResponseCache::new(&runtime.config.cache),
            tasks: Tasks::new(
                task_store,
                runtime.config.tasks.clone(),
                Arc::clone(&metrics),
            ),
            metrics,
            ledger,
            runtime: RwLock::new(Arc::new(runtime)),
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            draining: AtomicBool::new(false),
        });
        // After the ledger settled what a crash left pending and before any request: tasks an
        // earlier run accepted go first.
        Tasks::start(&state)
            .await
            .context("cannot resume the async tasks in storage")?;
        let public = TcpListener::bind(state.server.listen)
            .await
            .with_context(|| format!("cannot listen on server.listen {}", state.server.listen))?;
        let admin = TcpListener::bind(state.server.admin_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on server.admin_listen {}",
                    state.server.admin_listen
                )
            })?;
        Ok(App {
            state,
            public,
            admin,
            source: None,
        })
    }

    /// Makes `SIGHUP` re-read `source` while serving.
    pub fn reload_on_sighup(mut self, source: ConfigSource) -> Self {
        self.source = Some(source);
        self
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.public.local_addr().unwrap_or(self.state.server.listen)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or(self.state.server.admin_listen)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then drains: `/readyz` turns 503 at once, the public
    /// listener stops accepting, and in-flight requests get `shutdown_grace_secs` to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let server = &self.state.server;
        let header_timeout = Duration::from_secs(server.header_read_timeout_secs);
        let grace = Duration::from_secs(server.shutdown_grace_secs);
        let stop_public = CancellationToken::new();
        let stop_admin = CancellationToken::new();
        tracing::info!(
            public = %self.public_addr(),
            admin = %self.admin_addr(),
            version = env!("CARGO_PKG_VERSION"),
            "imagegate listening"
        );
        let mut public = tokio::spawn(serve(
            self.public,
            router::public(Arc::clone(&self.state)),
            header_timeout,
            stop_public.clone(),
            grace,
        ));
        let admin = tokio::spawn(serve(
            self.admin,
            router::admin(Arc::clone(&self.state)),
            header_timeout,
            stop_admin.clone(),
            Duration::from_secs(1),
        ));
        let reloads = reload_on_signal(self.source.clone(), Arc::clone(&self.state));
        tokio::select! {
            () = shutdown => {}
            () = reloads => {}
            _ = &mut public => {
                anyhow::bail!("the public listener stopped unexpectedly");
            }
        }
        self.state.draining.store(true, Ordering::Release);
        tracing::info!(
            grace_secs = grace.as_secs(),
            "shutting down: draining in-flight requests"
        );
        stop_public.cancel();
        let _ = public.await;
        // Queued tasks stay in storage for the next start; running ones get the grace period.
        self.state.tasks.shutdown(grace).await;
        // Upstream calls whose clients went away still finish and are recorded.
        if tokio::time::timeout(grace, self.state.cache.close())
            .await
            .is_err()
        {
            tracing::warn!("grace period over with upstream calls still running");
        }
        // Last: everything above may still record usage or task outcomes. Flushes the writer
        // and checkpoints the file.
        self.state.ledger.close().await;
        stop_admin.cancel();
        let _ = admin.await;
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// Opens the configured storage for the ledger and the task store: one SQLite file with one
/// writer shared by both, or memory. `redis` is refused until it exists rather than silently
/// running without durable limits.
async fn open_storage(config: &StorageConfig) -> Result<(Ledger, Arc<dyn TaskStore>), LedgerError> {
    let clock = Arc::new(SystemClock);
    match config.backend {
        StorageBackend::Memory => Ok((
            Ledger::in_memory(clock),
            Arc::new(LocalTaskStore::in_memory()),
        )),
        StorageBackend::Redis => Err(LedgerError::BackendNotBuilt("redis")),
        StorageBackend::Sqlite => {
            let db = Database::open_async(&config.path).await?;
            let ledger = Ledger::with_database(db.clone(), clock).await?;
            Ok((ledger, Arc::new(LocalTaskStore::sqlite(db))))
        }
    }
}

/// Applies `source` to `gateway` on every SIGHUP; never resolves. Without a source (tests, the
/// demo), just waits.
async fn reload_on_signal(source: Option<ConfigSource>, gateway: AppState) {
    #[cfg(unix)]
    if let Some(source) = source {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hangups) => {
                while hangups.recv().await.is_some() {
                    tracing::info!(path = %source.path.display(), "SIGHUP: reloading config");
                    source.reload_into(&gateway);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP; config reload is off"),
        }
    }
    #[cfg(not(unix))]
    let _ = (source, gateway);
    std::future::pending::<()>().await;
}

/// Accepts connections on `listener` until `stop`, then gives open connections `grace` to
/// finish their requests before they are dropped.
async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    stop: CancellationToken,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        // 8 KiB for the request head (nginx allows 8 KiB per header line; Node.js 16 KiB in
        // all) and the read buffer: hyper grows it to 16 KiB otherwise, per connection.
        .max_buf_size(8192);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        let (stream, _peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (builder, service) = (builder.clone(), TowerToHyperService::new(router.clone()));
        let (watcher, stop) = (graceful.watcher(), stop.clone());
        connections.spawn(async move {
            // hyper's header timer starts at the first byte: a connection that never sends
            // one would be held open forever. It gets the same time for its first byte.
            // A peek, since `readable()` reports a fresh socket ready before any byte came.
            let mut first = [0u8; 1];
            tokio::select! {
                peeked = tokio::time::timeout(header_timeout, stream.peek(&mut first)) => {
                    // Nothing in time, an error, or an orderly close (0 bytes).
                    if !matches!(peeked, Ok(Ok(1..))) {
                        return;
                    }
                }
                () = stop.cancelled() => return,
            }
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
        // Reap finished connection tasks so the set stays as large as the open connections.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "grace period over: closing remaining connections"
        );
    }
    connections.abort_all();
}
