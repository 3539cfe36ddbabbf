//! The floor: the thinnest reverse proxy this stack allows, as the yardstick for what Portcullis
//! adds. No auth, no parsing; pooled upstream connections; the same server builder, runtime and
//! socket options as the gateway. Not a product.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// Serves on `listen` until the process ends, forwarding every request to `upstream`
/// (`http://host:port`), path and headers as they came but for `host`.
pub async fn serve(listen: SocketAddr, upstream: Uri) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("floor listening on http://{}", listener.local_addr()?);
    serve_on(listener, upstream).await
}

async fn serve_on(listener: TcpListener, upstream: Uri) -> anyhow::Result<()> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector);
    let upstream = Arc::new(upstream);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let client = client.clone();
        let upstream = Arc::clone(&upstream);
        let builder = Arc::clone(&builder);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let client = client.clone();
                let upstream = Arc::clone(&upstream);
                async move { Ok::<_, Infallible>(forward(&client, &upstream, request).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

async fn forward(
    client: &Client<HttpConnector, Incoming>,
    upstream: &Uri,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut target = upstream.clone().into_parts();
    target.path_and_query = path.parse().ok();
    parts.uri = match Uri::from_parts(target) {
        Ok(uri) => uri,
        Err(_) => return bad_gateway(),
    };
    parts.headers.remove(header::HOST);
    match client.request(Request::from_parts(parts, body)).await {
        Ok(response) => response.map(BodyExt::boxed_unsync),
        Err(_) => bad_gateway(),
    }
}

fn bad_gateway() -> Response<ProxyBody> {
    let body = http_body_util::Full::new(Bytes::from_static(b"bad gateway"))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{self, Pace, Target};
    use crate::mock::{self, Behavior};

    async fn through_floor(stream: bool) -> load::Outcome {
        let mock = mock::start(([127, 0, 0, 1], 0).into(), Behavior::default())
            .await
            .expect("mock starts");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let upstream: Uri = format!("http://{}", mock.address).parse().expect("uri");
        tokio::spawn(serve_on(listener, upstream));
        let target = Target {
            address,
            path: "/v1/chat/completions".into(),
            headers: Vec::new(),
            body: load::chat_body("bench-model", 1024, stream),
            stream,
        };
        load::run(
            &target,
            Pace::Closed {
                concurrency: 4,
                requests: 40,
            },
        )
        .await
    }

    #[tokio::test]
    async fn whole_answers_pass_through_the_floor() {
        let outcome = through_floor(false).await;
        assert_eq!(
            (outcome.ok, outcome.failed),
            (40, 0),
            "{:?}",
            outcome.first_failure
        );
        assert_eq!(outcome.latency.len(), 40);
        assert!(outcome.first_byte.is_empty());
    }

    #[tokio::test]
    async fn streams_pass_through_the_floor_with_a_first_byte_each() {
        let outcome = through_floor(true).await;
        assert_eq!(
            (outcome.ok, outcome.failed),
            (40, 0),
            "{:?}",
            outcome.first_failure
        );
        assert_eq!(outcome.first_byte.len(), 40);
    }
}
