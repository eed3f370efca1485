//! Building and running the gateway: shared state, both listeners, graceful shutdown.
//!
//! [`App::build`] binds the listeners (port 0 works, so tests run in parallel) and
//! [`App::run`] serves until the shutdown future resolves. Connections are served with
//! hyper-util's builder rather than `axum::serve` because it has a header-read timeout (a
//! slow-loris guard) and per-connection graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::config::{Config, Env};
use crate::router;
use crate::upstream::Upstreams;
use crate::validate::Models;

/// Everything a request needs, shared by all of them.
pub struct Gateway {
    pub config: Config,
    pub clients: ClientKeys,
    pub models: Models,
    pub upstreams: Upstreams,
    pub admin_token: Option<SecretString>,
    /// Unix seconds at start, reported as `created` of models.
    pub started_at: u64,
    /// Set at the start of shutdown: `/readyz` answers 503 from then on.
    pub draining: AtomicBool,
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
}

impl App {
    /// Resolves secrets from `env`, builds the state, and binds both listeners.
    pub async fn build(config: Config, env: &Env) -> anyhow::Result<App> {
        install_crypto_provider();
        config.validate()?;
        let secrets = config.resolve_secrets(env)?;
        let upstreams = Upstreams::from_config(&config, &secrets)?;
        let state = Arc::new(Gateway {
            clients: ClientKeys::from_config(&config),
            models: Models::from_config(&config),
            upstreams,
            admin_token: secrets.admin_token,
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            draining: AtomicBool::new(false),
            config,
        });
        if state.clients.is_empty() {
            tracing::warn!("no [[clients]] configured: every request will be refused with 401");
        }
        let public = TcpListener::bind(state.config.server.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on server.listen {}",
                    state.config.server.listen
                )
            })?;
        let admin = TcpListener::bind(state.config.server.admin_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on server.admin_listen {}",
                    state.config.server.admin_listen
                )
            })?;
        Ok(App {
            state,
            public,
            admin,
        })
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.public
            .local_addr()
            .unwrap_or(self.state.config.server.listen)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or(self.state.config.server.admin_listen)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then drains: `/readyz` turns 503 at once, the public
    /// listener stops accepting, and in-flight requests get `shutdown_grace_secs` to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let server = &self.state.config.server;
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
        tokio::select! {
            () = shutdown => {}
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
        stop_admin.cancel();
        let _ = admin.await;
        tracing::info!("shutdown complete");
        Ok(())
    }
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
        .header_read_timeout(header_timeout);
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
        let service = TowerToHyperService::new(router.clone());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let connection = graceful.watch(connection.into_owned());
        connections.spawn(async move {
            if let Err(e) = connection.await {
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
