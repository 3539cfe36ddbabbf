//! Process lifecycle: graceful shutdown on SIGTERM, `portcullis check`, and config loading at startup.

mod support;

use std::time::{Duration, Instant};

use support::client;
use support::fixtures::{
    chat, chat_stream, standard, start, words, MASTER, PROMPTLY, STANDARD_CONFIG,
};
use support::{fill, wait_until, Fault, Gateway, MockUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The standard config pointed at an address nothing listens on: `check` never connects.
fn offline_standard_config() -> String {
    STANDARD_CONFIG.replace("{upstream}", "http://127.0.0.1:9")
}

const SIGINT: u32 = 2;
const SIGTERM: u32 = 15;

/// Sends `name` (TERM or INT) once the gateway has installed its handler for it. The wait works
/// around the gateway bug shown by `a_gateway_that_answers_readiness_already_handles_sigterm`;
/// without it these tests would flake on a loaded machine. It returns at once when fixed.
async fn send_signal(gateway: &Gateway, name: &str) {
    let signo = if name == "INT" { SIGINT } else { SIGTERM };
    assert!(
        gateway
            .wait_catches_signal(signo, Duration::from_secs(5))
            .await,
        "the gateway never installed a SIG{name} handler"
    );
    gateway.signal(name);
}

/// Whether a new TCP connection to the gateway is refused right now.
async fn refuses_connections(gateway: &Gateway) -> bool {
    TcpStream::connect(("127.0.0.1", gateway.port()))
        .await
        .is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_open_stream_finish_then_exits_0() {
    let upstream = MockUpstream::start().await;
    let mut gateway = standard(&upstream).await;
    // About 23 frames at 50 ms: a stream a little over a second long.
    upstream.set_delay_per_chunk(Duration::from_millis(50));
    let mut stream = client::open_stream(
        &format!("{}/v1/chat/completions", gateway.url()),
        MASTER,
        &chat_stream("gpt-4o-mini", &words(18)),
    )
    .await;
    assert_eq!(stream.status, 200);
    for _ in 0..3 {
        assert!(stream.next_event().await.is_some());
    }

    send_signal(&gateway, "TERM").await;
    let signalled = Instant::now();
    // The listener closes at once, while the stream is still going.
    let mut refused = false;
    while !refused && signalled.elapsed() < Duration::from_secs(2) {
        refused = refuses_connections(&gateway).await;
        if !refused {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(refused, "new connections still accepted after SIGTERM");
    assert!(gateway.is_running(), "exited before the stream was drained");

    let response = stream.collect().await;
    assert!(response.done(), "the stream was cut: {}", response.raw);
    assert_eq!(response.error, None);
    let expected: String = format!("echo: {}", words(18));
    // The first three events (role, "echo:", " w0") were read before `collect`.
    assert!(expected.ends_with(&response.content()), "{}", response.raw);

    let status = gateway
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("still running 5 s (the drain time) after SIGTERM"));
    assert!(status.success(), "exit status {status}");
    assert!(signalled.elapsed() < Duration::from_secs(5));
    assert!(
        !gateway.logs().contains("drain time over"),
        "{}",
        gateway.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_an_idle_gateway_exits_promptly() {
    let upstream = MockUpstream::start().await;
    let mut gateway = standard(&upstream).await;
    let response = client::post_json(
        &format!("{}/v1/chat/completions", gateway.url()),
        MASTER,
        &chat("gpt-4o-mini", "hi"),
    )
    .await;
    assert_eq!(response.status, 200);
    let signalled = Instant::now();
    send_signal(&gateway, "TERM").await;
    let status = gateway
        .wait_exit(Duration::from_secs(2))
        .await
        .unwrap_or_else(|| panic!("still running 2 s after SIGTERM:\n{}", gateway.logs()));
    assert!(status.success(), "exit status {status}");
    assert!(signalled.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_does_not_hold_up_shutdown() {
    let upstream = MockUpstream::start().await;
    let mut gateway = standard(&upstream).await;
    // A client that keeps its connection open after a request, as pooling clients do.
    let mut tcp = TcpStream::connect(("127.0.0.1", gateway.port()))
        .await
        .expect("connect");
    tcp.write_all(b"GET /health/liveliness HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .expect("send request");
    let mut head = vec![0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut head))
        .await
        .expect("response in time")
        .expect("read response");
    assert!(
        head[..read].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head[..read])
    );

    let signalled = Instant::now();
    send_signal(&gateway, "TERM").await;
    let status = gateway
        .wait_exit(Duration::from_secs(2))
        .await
        .unwrap_or_else(|| panic!("an idle connection held the gateway after SIGTERM"));
    assert!(status.success(), "exit status {status}");
    assert!(signalled.elapsed() < Duration::from_secs(2));
    drop(tcp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_does_not_hold_up_shutdown() {
    let upstream = MockUpstream::start().await;
    let mut gateway = standard(&upstream).await;
    let tcp = TcpStream::connect(("127.0.0.1", gateway.port()))
        .await
        .expect("connect");
    // Let the gateway accept it and start waiting for a request head.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let signalled = Instant::now();
    send_signal(&gateway, "TERM").await;
    let status = gateway
        .wait_exit(Duration::from_secs(2))
        .await
        .unwrap_or_else(|| panic!("a silent connection held the gateway after SIGTERM"));
    assert!(status.success(), "exit status {status}");
    assert!(signalled.elapsed() < Duration::from_secs(2));
    drop(tcp);
}

#[test]
fn check_accepts_a_valid_config() {
    let (code, output) = Gateway::check(&offline_standard_config());
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("ok"), "{output}");
    // The shipped example config is valid too.
    // Compiled in: a build reused from another checkout of the same sources still finds it.
    let example = include_str!("../../config/portcullis.yaml");
    let (code, output) = Gateway::check(example);
    assert_eq!(code, 0, "{output}");
}

#[test]
fn check_names_an_unknown_field() {
    let config = offline_standard_config().replace(
        "{ name: claude, provider: anthropic, model: claude-3-5-haiku-latest, api_base:",
        "{ name: claude, provider: anthropic, model: claude-3-5-haiku-latest, api_bsae:",
    );
    assert!(config.contains("api_bsae"), "the typo was planted");
    let (code, output) = Gateway::check(&config);
    assert_ne!(code, 0, "{output}");
    assert!(
        output.contains("models[2].api_bsae: unknown field"),
        "{output}"
    );
}

#[test]
fn check_names_an_unset_environment_variable() {
    let config = offline_standard_config().replacen(
        "api_key: \"sk-upstream-test\"",
        "api_key: \"${UNSET_VAR_XYZ}\"",
        1,
    );
    let (code, output) = Gateway::check(&config);
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("models[0].api_key"), "{output}");
    assert!(output.contains("UNSET_VAR_XYZ"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_an_invalid_config_with_the_same_message() {
    let config = offline_standard_config().replace("num_retries: 2", "num_retires: 2");
    let mut gateway = Gateway::builder(&config).spawn();
    let status = gateway
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("served an invalid config"));
    assert!(!status.success());
    assert!(
        gateway.logs().contains("router.num_retires: unknown field"),
        "{}",
        gateway.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variables_fill_in_the_config() {
    let upstream = MockUpstream::start().await;
    let config = fill(STANDARD_CONFIG, &upstream).replacen(
        "api_key: \"sk-upstream-test\"",
        "api_key: \"${E2E_UPSTREAM_KEY}\"",
        1,
    );
    let gateway = Gateway::builder(&config)
        .env("E2E_UPSTREAM_KEY", "sk-upstream-test")
        .start()
        .await;
    let response = client::post_json(
        &format!("{}/v1/chat/completions", gateway.url()),
        MASTER,
        &chat("gpt-4o-mini", "hi"),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let sent = upstream.last_request().expect("the upstream was called");
    assert_eq!(
        sent.header("authorization"),
        Some("Bearer sk-upstream-test")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_the_drain_time_is_cut_at_the_deadline() {
    let upstream = MockUpstream::start().await;
    let config = STANDARD_CONFIG.replace("shutdown_drain_s: 5", "shutdown_drain_s: 1");
    let mut gateway = Gateway::start(&fill(&config, &upstream)).await;
    // About 5 s of stream: far longer than the 1 s drain.
    upstream.set_delay_per_chunk(Duration::from_millis(50));
    let mut stream = client::open_stream(
        &format!("{}/v1/chat/completions", gateway.url()),
        MASTER,
        &chat_stream("gpt-4o-mini", &words(100)),
    )
    .await;
    assert!(stream.next_event().await.is_some());

    let signalled = Instant::now();
    send_signal(&gateway, "TERM").await;
    let status = gateway
        .wait_exit(Duration::from_secs(4))
        .await
        .unwrap_or_else(|| panic!("still running 4 s after SIGTERM with a 1 s drain"));
    let elapsed = signalled.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(2500),
        "exited at the drain deadline: {elapsed:?}"
    );
    let response = stream.collect().await;
    assert!(!response.done(), "the stream could not have finished");
    assert!(
        gateway.logs().contains("drain time over"),
        "{}",
        gateway.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_shuts_down_gracefully_too() {
    let upstream = MockUpstream::start().await;
    let mut gateway = standard(&upstream).await;
    send_signal(&gateway, "INT").await;
    let status = gateway
        .wait_exit(Duration::from_secs(2))
        .await
        .unwrap_or_else(|| panic!("still running 2 s after SIGINT"));
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_http2_stream_finish() {
    use bytes::Bytes;
    use http::header::{AUTHORIZATION, CONTENT_TYPE};
    use http::Request;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let upstream = MockUpstream::start().await;
    let mut gateway = standard(&upstream).await;
    upstream.set_delay_per_chunk(Duration::from_millis(50));
    let h2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let request = Request::post(format!("{}/v1/chat/completions", gateway.url()))
        .header(AUTHORIZATION, "Bearer sk-master")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            chat_stream("gpt-4o-mini", &words(18)).to_string(),
        )))
        .expect("valid request");
    let mut response = tokio::time::timeout(Duration::from_secs(10), h2.request(request))
        .await
        .expect("head in time")
        .expect("h2c request");
    assert_eq!(response.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(10), response.body_mut().frame())
        .await
        .expect("first frame in time");
    assert!(first.is_some());

    send_signal(&gateway, "TERM").await;
    let rest = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("the stream ends in time")
        .expect("the stream ends cleanly")
        .to_bytes();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let status = gateway
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("still running 5 s after SIGTERM"));
    assert!(status.success(), "exit status {status}");
}

/// Burns CPU on a few threads while alive, so that startup races show up as they do on a loaded
/// CI machine; the threads stop when it is dropped, panics included.
struct CpuLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuLoad {
    fn start(threads: usize) -> CpuLoad {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = std::sync::Arc::clone(&stop);
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        CpuLoad { stop, threads }
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_answers_readiness_already_handles_sigterm() {
    let upstream = MockUpstream::start().await;
    // On an idle machine the window is microseconds wide; under load it is hit within a few starts.
    let _load = CpuLoad::start(3);
    for round in 0..20 {
        let mut gateway = standard(&upstream).await;
        // An orchestrator may stop a pod the moment it turns ready.
        let caught = gateway.catches_signal(SIGTERM);
        gateway.terminate();
        let status = gateway
            .wait_exit(Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("round {round}: still running after SIGTERM"));
        assert_ne!(
            caught,
            Some(false),
            "round {round}: ready before SIGTERM was handled"
        );
        assert!(status.success(), "round {round}: exit status {status}");
    }
}

/// The standard config with no retries and a long attempt timeout, so a slow upstream answer is
/// waited for rather than retried.
fn patient_config() -> String {
    let config = STANDARD_CONFIG.replace(
        "num_retries: 2, timeout_s: 1,",
        "num_retries: 0, timeout_s: 10,",
    );
    assert_ne!(
        config, STANDARD_CONFIG,
        "the router line of STANDARD_CONFIG changed"
    );
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_delayed_whole_request_finish_and_readiness_reports_draining() {
    let upstream = MockUpstream::start().await;
    let mut gateway = start(&patient_config(), &upstream).await;

    // A connection whose request head is incomplete when the signal lands counts as in progress,
    // not idle, so the gateway still answers it: the one way to ask for readiness while it drains
    // (the listener itself closes at once).
    let mut probe = TcpStream::connect(("127.0.0.1", gateway.port()))
        .await
        .expect("connect");
    probe
        .write_all(b"GET /health/readiness HTTP/1.1\r\n")
        .await
        .expect("send the start of a request head");

    upstream.push_fault(Fault::Delay(Duration::from_secs(2)));
    let url = format!("{}/v1/chat/completions", gateway.url());
    let call = tokio::spawn(async move {
        let response = client::post_json(&url, MASTER, &chat("gpt-4o-mini", "almost there")).await;
        (response, Instant::now())
    });
    assert!(
        wait_until(PROMPTLY, || upstream.request_count() == 1).await,
        "the call never reached the upstream"
    );
    let signalled = Instant::now();
    send_signal(&gateway, "TERM").await;
    assert!(
        gateway
            .wait_for_log("shutting down: draining", PROMPTLY)
            .await,
        "no drain after SIGTERM: {}",
        gateway.logs()
    );

    probe
        .write_all(b"host: gateway\r\n\r\n")
        .await
        .expect("finish the request head");
    let mut answer = Vec::new();
    tokio::time::timeout(PROMPTLY, probe.read_to_end(&mut answer))
        .await
        .expect("readiness answered while draining")
        .expect("read the readiness answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#"{"status":"draining"}"#), "{answer}");

    let (response, answered) = call.await.expect("the call task");
    assert!(
        answered > signalled,
        "the call was not in flight at SIGTERM"
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.json()["choices"][0]["message"]["content"],
        "echo: almost there"
    );
    let status = gateway
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{}", gateway.logs()));
    assert!(status.success(), "exit status {status}");
    assert!(
        !gateway.logs().contains("drain time over"),
        "{}",
        gateway.logs()
    );
}
