//! The Kubernetes API client of the agent: kube's default HTTP stack, but
//! negotiating HTTP/2 over TLS (ALPN `h2`, falling back to HTTP/1.1 when the server does not
//! offer it).
//!
//! kube's own client speaks HTTP/1.1 only, so every watch holds a TCP and TLS connection of its
//! own: an agent with its four watches (ImageRemovals, ImagePrunePolicies, its Node, its pods)
//! and its requests held five connections, and the API server of a 5,000-node cluster about
//! 25,000 sockets for the agents alone. Over HTTP/2 one connection per process carries every
//! watch and request as streams, as the kubelet's client does.
//!
//! The controller (one process per cluster) keeps kube's own client. With this one, the
//! removal's status did not converge after an API-server restart in 3 of 5 runs of
//! `faults::apiserver_restart_during_removal`. Two controller bugs found later fail that test
//! the same way on kube's client under load: reconciles that read a relist's store before it
//! was swapped in, and kube's `Controller` pausing all triggers for up to 30 s (both fixed in
//! `controller::run_removals`). The controller has not been tried on this client since.
//!
//! What kube's default stack layers and this one keeps: the base URI, the connect, read and
//! write timeouts of the configuration, the retry of 429/503/504 responses (when the
//! configuration asks for it), authentication (static or refreshed tokens, client
//! certificates through the TLS configuration, which re-reads an in-cluster CA file) and the
//! configuration's extra and impersonation headers. What it leaves out: the per-request tracing
//! span (debug-level spans of kube's own target; request errors reach the caller and are logged
//! there), response decompression (kube's `gzip` feature is off in this build, so kube's stack
//! has none either) and the expiry stamp of an exec plugin's client certificate (read only by
//! callers of `Client::valid_until`, which this project is not). Proxies go through kube's own
//! stack unchanged.

use std::time::Duration;

use hyper_rustls::FixedServerNameResolver;
use hyper_timeout::TimeoutConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::retry::RetryPolicy;
use kube::client::{ConfigExt, RustlsTlsError};
use kube::{Client, Config};
use tower::retry::RetryLayer;
use tower::{BoxError, ServiceBuilder};

/// When nothing arrived on an HTTP/2 connection for this long, the client pings the server...
const PING_INTERVAL: Duration = Duration::from_secs(30);
/// ...and closes the connection when the answer takes longer than this: its watches then end
/// and reconnect, instead of waiting on a dead peer. The kubelet's client uses the same pair.
const PING_TIMEOUT: Duration = Duration::from_secs(15);

/// A client configured from the environment as `kube::Client::try_default` does (in-cluster
/// ServiceAccount, else `KUBECONFIG` or `~/.kube/config`), over HTTP/2 where offered.
pub async fn try_default() -> Result<Client, kube::Error> {
    let config = Config::infer().await.map_err(kube::Error::InferConfig)?;
    from_config(config)
}

/// A client for `config`, over HTTP/2 where the server offers it.
pub fn from_config(config: Config) -> Result<Client, kube::Error> {
    if config.proxy_url.is_some() {
        return Client::try_from(config);
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config.rustls_client_config()?)
        .https_or_http();
    let tls = match &config.tls_server_name {
        Some(name) => {
            let name = name
                .clone()
                .try_into()
                .map_err(|e| kube::Error::RustlsTls(RustlsTlsError::InvalidServerName(e)))?;
            tls.with_server_name_resolver(FixedServerNameResolver::new(name))
        }
        None => tls,
    };
    let mut connector =
        TimeoutConnector::new(tls.enable_http1().enable_http2().wrap_connector(http));
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http_client = hyper_util::client::legacy::Builder::new(TokioExecutor::new())
        // The pool drops a connection not checked out for its idle timeout (90 s by default)
        // at the next request, even an HTTP/2 connection whose watches are still streaming: an
        // agent that made no request for 90 s (its watches run for minutes) would open a second
        // connection and a TLS handshake for its next request. Connections leave the pool when
        // they close instead.
        .pool_idle_timeout(None)
        .timer(TokioTimer::new())
        .http2_keep_alive_interval(PING_INTERVAL)
        .http2_keep_alive_timeout(PING_TIMEOUT)
        .build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(http_client);
    Ok(Client::new(service, config.default_namespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> Config {
        Config::new(url.parse().expect("a URL"))
    }

    #[tokio::test]
    async fn builds_for_https_and_plain_http() {
        from_config(config("https://127.0.0.1:6443")).expect("https");
        from_config(config("http://127.0.0.1:8080")).expect("http");
    }

    #[tokio::test]
    async fn refuses_an_invalid_tls_server_name() {
        let mut c = config("https://127.0.0.1:6443");
        c.tls_server_name = Some("not a name".into());
        let err = from_config(c).err().expect("refused");
        assert!(err.to_string().contains("invalid server name"), "{err}");
    }

    #[tokio::test]
    async fn leaves_proxies_to_kubes_own_stack() {
        let mut c = config("https://127.0.0.1:6443");
        c.proxy_url = Some("http://127.0.0.1:3128".parse().expect("a URL"));
        // kube is built without its proxy features: its stack refuses, as before this module.
        let err = from_config(c).err().expect("refused");
        assert!(err.to_string().contains("proxy"), "{err}");
    }
}
