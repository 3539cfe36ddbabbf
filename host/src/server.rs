//! The listener: TCP (and optionally TLS), HTTP/1.1 and h2c, the route table, graceful shutdown.
//! **The only module that holds hyper's server types.**

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::admin;
use crate::config::{Config, TlsConfig};
use crate::error::GatewayError;
use crate::generation::{self, Generation, GenerationError};
use crate::governance::{self, Governance, StartError};
use crate::pipeline::respond::{error_response, json_response, ResponseBody};
use crate::pipeline::{self};
use crate::plugins::PluginError;
use crate::providers::Endpoint;
use crate::reload::Reloader;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: String, error: std::io::Error },
    #[error("server.tls: {0}")]
    Tls(String),
    #[error(transparent)]
    Plugins(#[from] PluginError),
    #[error(transparent)]
    Generation(#[from] GenerationError),
    #[error("store: {0}")]
    Store(#[from] StartError),
}

/// A slow client may not hold a connection open by trickling its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection shares.
#[derive(Debug)]
struct Shared {
    reloader: Arc<Reloader>,
    draining: AtomicBool,
}

/// Serves `config` (loaded from `config_path`, which is watched for changes) until `shutdown`
/// completes, then drains in-flight requests and streams for at most `server.shutdown_drain_s`.
/// `on_listening` learns the bound address (port 0 picks one) and gets the reloader, to reload on
/// request.
pub async fn serve(
    config_path: PathBuf,
    config: Config,
    shutdown: impl Future<Output = ()>,
    on_listening: impl FnOnce(SocketAddr, &Arc<Reloader>),
) -> Result<(), ServerError> {
    let listen = config.server.listen.clone();
    let listener = TcpListener::bind(&listen)
        .await
        .map_err(|error| ServerError::Bind {
            addr: listen.clone(),
            error,
        })?;
    let tls = config.server.tls.as_ref().map(tls_acceptor).transpose()?;
    let drain = Duration::try_from_secs_f64(config.server.shutdown_drain_s)
        .unwrap_or(Duration::from_secs(30));
    let governance = Governance::start(&config.database_url(), &config.store).await?;
    let shared_parts =
        generation::Shared::start(config.server.post_call_queue, Some(Arc::clone(&governance)))?;
    let reloader = Reloader::start(config_path, config, shared_parts).await?;
    if reloader.current().keys.is_open() {
        warn!("no keys configured: anyone who can reach this address may call every model");
    }
    reloader.spawn();
    let shared = Arc::new(Shared {
        reloader,
        draining: AtomicBool::new(false),
    });
    let local = listener.local_addr().map_err(|error| ServerError::Bind {
        addr: listen.clone(),
        error,
    })?;
    info!(address = %local, tls = tls.is_some(), "listening");
    on_listening(local, &shared.reloader);

    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            // Shutdown first: a busy listener must not starve the signal.
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let service = {
            let shared = Arc::clone(&shared);
            service_fn(move |request| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(dispatch(&shared, request).await) }
            })
        };
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    let connection = builder
                        .serve_connection(TokioIo::new(tcp), service)
                        .into_owned();
                    watcher.watch(connection).await
                }
                Some(acceptor) => match accept_tls(&acceptor, tcp).await {
                    Some(stream) => {
                        let connection = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .into_owned();
                        watcher.watch(connection).await
                    }
                    None => return,
                },
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }

    drop(listener);
    shared.draining.store(true, Ordering::Relaxed);
    info!(
        drain_s = drain.as_secs_f64(),
        "shutting down: draining in-flight requests"
    );
    tokio::select! {
        () = graceful.shutdown() => info!("all connections drained"),
        () = tokio::time::sleep(drain) => warn!("drain time over: closing the remaining connections"),
    }
    // After the drain, so the spend of the calls that finished during it is written too.
    governance.shutdown().await;
    Ok(())
}

async fn accept_tls(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            debug!("TLS handshake timed out");
            None
        }
    }
}

/// Builds the generation `config` would serve, plugins included, and drops it.
pub async fn check_plugins(config: &Config) -> Result<(), ServerError> {
    let shared = generation::Shared::start(1, None)?;
    Generation::build(config.clone(), &shared, None).await?;
    Ok(())
}

/// Reads the certificate and key as serving would, so `portcullis check` catches bad files.
pub fn check_tls(tls: &TlsConfig) -> Result<(), ServerError> {
    tls_acceptor(tls).map(drop)
}

fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, ServerError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|certs| certs.collect())
        .map_err(|e| ServerError::Tls(format!("cert_file {}: {e}", tls.cert_file.display())))?;
    if certs.is_empty() {
        return Err(ServerError::Tls(format!(
            "cert_file {}: no certificate found",
            tls.cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| ServerError::Tls(format!("key_file {}: {e}", tls.key_file.display())))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The route table. Every API route also answers without its `/v1` prefix.
async fn dispatch(shared: &Shared, request: Request<Incoming>) -> Response<ResponseBody> {
    let path = request.uri().path();
    let route = path
        .strip_prefix("/v1")
        .filter(|rest| rest.starts_with('/'))
        .unwrap_or(path)
        .trim_end_matches('/')
        .to_owned();
    let method = request.method().clone();
    let endpoint = match route.as_str() {
        "/chat/completions" => Some(Endpoint::ChatCompletions),
        "/completions" => Some(Endpoint::Completions),
        "/embeddings" => Some(Endpoint::Embeddings),
        _ => None,
    };
    if let Some(endpoint) = endpoint {
        if method != Method::POST {
            return method_not_allowed(&method, &route, "POST");
        }
        // One generation for the whole request, held as an `Arc` across every await.
        let generation = shared.reloader.current();
        let (parts, body) = request.into_parts();
        return pipeline::handle(generation, endpoint, parts.headers, body).await;
    }
    if let Some(id) = route.strip_prefix("/models/") {
        if method != Method::GET {
            return method_not_allowed(&method, &route, "GET");
        }
        return pipeline::retrieve_model(&shared.reloader.current(), request.headers(), id).await;
    }
    if let Some(allow) = governance::api::method_for(&route) {
        if method != allow {
            let allow = if allow == Method::POST { "POST" } else { "GET" };
            return method_not_allowed(&method, &route, allow);
        }
        let generation = shared.reloader.current();
        let query = request.uri().query().unwrap_or("").to_owned();
        let (parts, body) = request.into_parts();
        return governance::api::handle(&generation, &route, &query, &parts.headers, body).await;
    }
    match route.as_str() {
        "/models" if method == Method::GET => {
            pipeline::list_models(&shared.reloader.current(), request.headers()).await
        }
        "/admin/status" if method == Method::GET => {
            admin::status(&shared.reloader, request.headers()).await
        }
        "/health/liveliness" | "/health/liveness" if method == Method::GET => json_response(
            StatusCode::OK,
            Bytes::from_static(b"{\"status\":\"alive\"}"),
        ),
        "/health/readiness" if method == Method::GET => {
            if shared.draining.load(Ordering::Relaxed) {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Bytes::from_static(b"{\"status\":\"draining\"}"),
                )
            } else {
                json_response(
                    StatusCode::OK,
                    Bytes::from_static(b"{\"status\":\"ready\"}"),
                )
            }
        }
        "/models" | "/health/liveliness" | "/health/liveness" | "/health/readiness"
        | "/admin/status" => method_not_allowed(&method, &route, "GET"),
        _ => error_response(
            &GatewayError::RouteNotFound(format!("unknown route: {method} {path}")),
            None,
        ),
    }
}

fn method_not_allowed(method: &Method, route: &str, allow: &'static str) -> Response<ResponseBody> {
    let mut response = error_response(
        &GatewayError::MethodNotAllowed(format!("{method} is not allowed on {route}; use {allow}")),
        None,
    );
    response
        .headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    response
}
