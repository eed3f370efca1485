//! HTTP hygiene: request ids, slow clients, timeouts, graceful shutdown, health endpoints.

use std::time::{Duration, Instant};

use imagegate::mock_upstream::MockOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{body, error_body, spawn_app, spawn_app_with};

#[tokio::test]
async fn a_well_formed_client_request_id_is_kept_and_a_bad_one_replaced() {
    let app = spawn_app().await;
    let send = |id: &'static str| {
        app.http
            .post(app.url("/v1/images/generations"))
            .bearer_auth(&app.client_key)
            .header("x-request-id", id)
            .json(&body("ids"))
            .send()
    };
    let kept = send("trace-42.a_b").await.unwrap();
    assert_eq!(kept.headers()["x-request-id"], "trace-42.a_b");

    for bad in [
        "has space",
        "semi;colon",
        "toolong-toolong-toolong-toolong-toolong-toolong-toolong-toolong-x",
    ] {
        let replaced = send(bad).await.unwrap();
        let id = replaced.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_ne!(id, bad);
        assert!(id.starts_with("req_") && id.len() <= 64, "{id}");
    }

    let missing = app.http.get(app.url("/v1/models")).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert!(
        missing.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_")
    );
}

/// Connects, sends `sent` (maybe nothing), and asserts the gateway closes the connection
/// on its own within 3 s, with `header_read_timeout_secs = 1`.
async fn closed_after_the_header_read_timeout(sent: &[u8]) {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.server.header_read_timeout_secs = 1
    })
    .await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(sent).await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    // The server must end the connection on its own; the outer timeout only bounds the test.
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection still open after 10 s");
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(3), "closed after {elapsed:?}");
}

#[tokio::test]
async fn a_slow_loris_connection_is_closed_after_the_header_read_timeout() {
    closed_after_the_header_read_timeout(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nX-Slow: ",
    )
    .await;
}

#[tokio::test]
async fn a_connection_that_never_sends_a_byte_is_closed_after_the_header_read_timeout() {
    // hyper's own header timer starts at the first byte; the gateway's peek covers this.
    closed_after_the_header_read_timeout(b"").await;
}

/// Sends `head` (and whatever body bytes it carries) on a fresh connection and returns the
/// first answer the gateway writes, or panics if none comes within 10 s.
async fn raw_exchange(app: &crate::helpers::TestApp, head: &[u8]) -> String {
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(head).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("the gateway answers before the test gives up")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn a_body_that_stalls_gets_408_at_the_body_read_timeout_not_a_5xx_at_the_request_deadline() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.server.body_read_timeout_secs = 1;
        c.server.request_timeout_secs = 30;
    })
    .await;
    let head = format!(
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        app.client_key
    );
    let started = Instant::now();
    let text = raw_exchange(&app, head.as_bytes()).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"body_timeout\""), "{text}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(app.mock.call_count(), 0);
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_at_once_and_a_compressed_body_is_refused() {
    let app = spawn_app().await;
    let head = |extra: &str| {
        format!(
            "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n{extra}\r\n",
            app.client_key
        )
    };
    // No body byte follows: the answer can only come from the declared length.
    let started = Instant::now();
    let text = raw_exchange(&app, head("Content-Length: 10000000000\r\n").as_bytes()).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("request_too_large"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(2));

    let json = serde_json::to_vec(&body("gzip")).unwrap();
    let request = format!(
        "{}{}",
        head(&format!(
            "Content-Encoding: gzip\r\nContent-Length: {}\r\n",
            json.len()
        )),
        String::from_utf8(json).unwrap()
    );
    let text = raw_exchange(&app, request.as_bytes()).await;
    assert!(text.starts_with("HTTP/1.1 415"), "{text}");
    assert!(text.contains("Content-Encoding"), "{text}");
    assert_eq!(app.mock.call_count(), 0);
}

#[tokio::test]
async fn health_and_readiness_answer_on_the_admin_listener_only() {
    let app = spawn_app().await;
    let health = app
        .http
        .get(app.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = app.http.get(app.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let public = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(public.status(), 404);
    error_body(public).await;
}

#[tokio::test]
async fn shutdown_turns_readiness_off_at_once_and_lets_in_flight_requests_finish() {
    let app = spawn_app().await;
    let in_flight = {
        let request = app
            .http
            .post(app.url("/v1/images/generations"))
            .bearer_auth(&app.client_key)
            .json(&body("[mock:latency_ms=1500] slow"));
        tokio::spawn(request.send())
    };
    // Wait until the request has reached the upstream, so it really is in flight.
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.mock.call_count() == 0 {
        assert!(Instant::now() < deadline, "request never reached the mock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    app.begin_shutdown();
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let ready = app.http.get(app.admin_url("/readyz")).send().await.unwrap();
        if ready.status() == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readyz still {} while draining",
            ready.status()
        );
        tokio::task::yield_now().await;
    }

    let finished = in_flight
        .await
        .unwrap()
        .expect("in-flight request completes");
    assert_eq!(
        finished.status(),
        200,
        "the in-flight request finished normally"
    );
    let public = app.addr;
    app.join().await.expect("clean shutdown");
    assert!(
        TcpStream::connect(public).await.is_err(),
        "the public listener is closed"
    );
}

#[tokio::test]
async fn a_request_head_over_8_kib_gets_431_while_a_body_over_8_kib_is_read_in_full() {
    let app = spawn_app().await;
    // The head (request line and headers) must fit the connection's 8 KiB read buffer, which
    // stays that small so ~1 000 requests in flight do not hold 16 KiB each.
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nX-Padding: {}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}",
        app.client_key,
        "p".repeat(9 * 1024)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    let fits = app
        .http
        .post(app.url("/v1/images/generations"))
        .bearer_auth(&app.client_key)
        .header("x-padding", "p".repeat(6 * 1024))
        .json(&body("head"))
        .send()
        .await
        .unwrap();
    assert_eq!(fits.status(), 200);
    // Bodies stream through the buffer in pieces: 4 000 three-byte characters (12 kB) are
    // read whole.
    let long = app
        .http
        .post(app.url("/v1/images/generations"))
        .bearer_auth(&app.client_key)
        .json(&body(&"€".repeat(4_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(long.status(), 200, "{}", long.text().await.unwrap());
    assert_eq!(app.mock.call_count(), 2);
}
