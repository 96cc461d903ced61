//! What both long-running processes share: logging setup, health flags, and a small HTTP
//! endpoint serving `/metrics` (Prometheus text format), `/livez` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// First retry delay after a failure; doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Exponential backoff after `attempts` consecutive failures (the first is 1): 1 s, 2 s,
/// 4 s … capped at 5 minutes. What both processes wait before retrying a failed write or
/// runtime call.
pub fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

/// Initialises `tracing`: level filter from `IMAGEGC_LOG` (e.g. `info` or
/// `info,imagegc=debug`; default `info`), written to stderr.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter: Targets = std::env::var("IMAGEGC_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
    }
}

/// Liveness and readiness, flipped by the process as it starts, syncs and loses or regains
/// its dependencies.
#[derive(Clone, Debug, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    /// Marks the process ready (or not).
    pub fn set_ready(&self, ready: bool) {
        let was = self.ready.swap(ready, Ordering::SeqCst);
        if was != ready {
            tracing::info!(ready, "readiness changed");
        }
    }

    /// Whether the process is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// A stop signal: flips once, on SIGTERM or SIGINT.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Listens for SIGTERM and SIGINT.
    pub fn on_signals() -> std::io::Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let which = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = which, "shutting down");
            let _ = tx.send(true);
        });
        Ok(Shutdown(rx))
    }

    /// A stop the caller triggers with the returned [`Trigger`] (for embedding).
    pub fn manual() -> (Trigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Trigger(tx), Shutdown(rx))
    }

    /// Whether the stop was requested.
    pub fn requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when the stop is requested.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// Requests the stop of a [`Shutdown::manual`].
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

impl Trigger {
    /// Requests the stop.
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

/// Serves `/metrics`, `/livez` and `/readyz` on `addr` until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    health: Health,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    serve_on(listener, registry, health, shutdown).await;
    Ok(())
}

/// Serves `/metrics`, `/livez` and `/readyz` on a bound `listener` until `shutdown`, with
/// hyper: one request per connection (what probes and scrapers need), the request head read
/// within 10 s.
pub async fn serve_on(
    listener: TcpListener,
    registry: Arc<Registry>,
    health: Health,
    mut shutdown: Shutdown,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /livez and /readyz");
    }
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, registry.clone(), health.clone()));
                }
                Err(e) => tracing::warn!(error = %e, "accepting a metrics connection failed"),
            },
        }
    }
}

/// Answers the one request of a connection.
async fn answer(stream: TcpStream, registry: Arc<Registry>, health: Health) {
    let service = service_fn(move |request: Request<Incoming>| {
        let (status, content_type, body) =
            route(request.method(), request.uri().path(), &registry, &health);
        let response = Response::builder()
            .status(status)
            .header(CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)));
        async move { response }
    });
    let connection = http1::Builder::new()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "a metrics connection failed");
    }
}

fn route(
    method: &Method,
    path: &str,
    registry: &Registry,
    health: &Health,
) -> (StatusCode, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return (StatusCode::METHOD_NOT_ALLOWED, TEXT, "use GET\n".into());
    }
    match path {
        "/livez" => (StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" if health.is_ready() => (StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n".into()),
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    "encoding metrics failed\n".into(),
                ),
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /metrics, /livez or /readyz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }

    #[test]
    fn routes_answer_as_documented() {
        let mut registry = Registry::default();
        let c: Counter = Counter::default();
        c.inc();
        registry.register("imagegc_test", "A test counter", c);
        let health = Health::default();
        assert_eq!(
            route(&Method::GET, "/livez", &registry, &health).0,
            StatusCode::OK
        );
        assert_eq!(
            route(&Method::GET, "/readyz", &registry, &health).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        health.set_ready(true);
        assert_eq!(
            route(&Method::GET, "/readyz", &registry, &health).0,
            StatusCode::OK
        );
        let (status, _, body) = route(&Method::GET, "/metrics", &registry, &health);
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("imagegc_test_total 1"), "{body}");
        assert_eq!(
            route(&Method::GET, "/nope", &registry, &health).0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&Method::POST, "/livez", &registry, &health).0,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[tokio::test]
    async fn answers_one_request_per_connection_over_a_socket() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, shutdown) = Shutdown::manual();
        let health = Health::default();
        health.set_ready(true);
        let registry = Arc::new(Registry::default());
        let server = tokio::spawn(serve_on(listener, registry, health, shutdown));
        let ask = |request: &'static str| async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            // Ends only because the server closes the connection after one answer.
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let live = ask("GET /livez HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(live.starts_with("HTTP/1.1 200 OK\r\n"), "{live}");
        assert!(live.ends_with("\r\n\r\nok\n"), "{live}");
        let head = ask("HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.ends_with("\r\n\r\n"),
            "a HEAD answer has no body: {head}"
        );
        let missing = ask("GET /metrics/x HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );
        let garbage = ask("NOT HTTP AT ALL\r\n\r\n").await;
        assert!(
            garbage.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{garbage}"
        );
        trigger.stop();
        server.await.unwrap();
    }
}
