//! TLS: the gateway serves HTTPS from PEM files, with HTTP/1.1 or HTTP/2 chosen by ALPN.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use support::{Gateway, TempDir};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A self-signed certificate for `localhost`, written as PEM files.
fn certificate(dir: &TempDir) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("generate a certificate");
    let cert_file = dir.path().join("cert.pem");
    let key_file = dir.path().join("key.pem");
    std::fs::write(&cert_file, certified.cert.pem()).expect("write cert");
    std::fs::write(&key_file, certified.key_pair.serialize_pem()).expect("write key");
    (cert_file, key_file, certified.cert.der().clone())
}

async fn start_tls_gateway(dir: &TempDir) -> (Gateway, CertificateDer<'static>) {
    let (cert_file, key_file, der) = certificate(dir);
    let yaml = format!(
        "server: {{ listen: \"{{listen}}\", tls: {{ cert_file: \"{}\", key_file: \"{}\" }} }}\n\
         auth: {{ master_key: sk-master }}\n\
         models:\n  - {{ name: echo, provider: mock }}\n",
        cert_file.display(),
        key_file.display()
    );
    // The harness's readiness probe speaks plain HTTP, so wait for the log line instead.
    let gateway = Gateway::builder(&yaml).spawn();
    assert!(
        gateway
            .wait_for_log("listening", Duration::from_secs(15))
            .await,
        "gateway did not start:\n{}",
        gateway.logs()
    );
    (gateway, der)
}

/// Sends one chat call over TLS offering `alpn`; returns the negotiated protocol and the reply.
async fn chat_over_tls(
    port: u16,
    root: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> (Vec<u8>, u16, Value) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).expect("trust the test certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let server_name = ServerName::try_from("localhost").expect("server name");
    let tls = TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .expect("TLS handshake");
    let negotiated = tls.get_ref().1.alpn_protocol().unwrap_or_default().to_vec();
    let body = json!({"model": "echo", "messages": [{"role": "user", "content": "over tls"}]});
    let request = http::Request::post("/v1/chat/completions")
        .header("host", "localhost")
        .header("authorization", "Bearer sk-master")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let io = TokioIo::new(tls);
    let response = if negotiated == b"h2" {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("h2 handshake");
        tokio::spawn(connection);
        let mut request = request;
        *request.uri_mut() = format!("https://localhost:{port}/v1/chat/completions")
            .parse()
            .expect("uri");
        sender.send_request(request).await.expect("h2 request")
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("http1 handshake");
        tokio::spawn(connection);
        sender.send_request(request).await.expect("http1 request")
    };
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let json = serde_json::from_slice(&bytes).expect("json reply");
    (negotiated, status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_http1_and_http2_by_alpn() {
    let dir = TempDir::new("portcullis-tls");
    let (gateway, root) = start_tls_gateway(&dir).await;

    let (alpn, status, reply) = chat_over_tls(gateway.port(), &root, &[b"http/1.1"]).await;
    assert_eq!((alpn.as_slice(), status), (&b"http/1.1"[..], 200));
    assert_eq!(reply["choices"][0]["message"]["content"], "over tls");

    let (alpn, status, reply) = chat_over_tls(gateway.port(), &root, &[b"h2", b"http/1.1"]).await;
    assert_eq!((alpn.as_slice(), status), (&b"h2"[..], 200));
    assert_eq!(reply["model"], "echo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_certificate_is_reported_by_check_and_at_start() {
    let yaml = "server: { listen: \"{listen}\", tls: { cert_file: /nonexistent/cert.pem, key_file: /nonexistent/key.pem } }\nmodels:\n  - { name: echo, provider: mock }\n";
    let (code, output) = Gateway::check(yaml);
    assert_ne!(code, 0, "{output}");
    assert!(
        output.contains("server.tls: cert_file /nonexistent/cert.pem"),
        "{output}"
    );

    let mut gateway = Gateway::builder(yaml).spawn();
    let status = gateway
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the gateway refuses to start");
    assert!(!status.success());
    assert!(
        gateway.logs().contains("server.tls: cert_file"),
        "{}",
        gateway.logs()
    );
}
