//! The upstream HTTP client: built here and nowhere else, with the limits every upstream call
//! needs (connect timeout, no redirects, pooled keep-alive), and the helpers that read an
//! answer under a size cap and classify transport errors without their URLs.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::UpstreamError;

#[expect(
    clippy::disallowed_methods,
    reason = "the one place the upstream client is built"
)]
pub(super) fn client(connect_timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        // A redirect could send the server-held key to another host.
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        // HTTP/1.1 only, as the OpenAI SDKs speak it. Over https, ALPN would otherwise pick h2,
        // and hyper's pool keeps one h2 connection per host and never opens a second: past the
        // provider's SETTINGS_MAX_CONCURRENT_STREAMS (often 100-256), requests would wait
        // inside the client, unseen by the key pool's queue and its metrics, spending their
        // deadline. A generation takes seconds, so a connection per request in flight costs
        // nothing that matters, and the pool keeps them alive between requests.
        .http1_only()
        .tcp_nodelay(true)
        .user_agent(concat!("imagegate/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Maps a reqwest error to an [`UpstreamError`], dropping the URL from its text.
pub(super) fn classify(e: reqwest::Error) -> UpstreamError {
    let e = e.without_url();
    if e.is_connect() {
        // Nothing was sent: safe to retry elsewhere.
        UpstreamError::Connect(source_chain(&e))
    } else if e.is_timeout() {
        UpstreamError::Timeout
    } else {
        UpstreamError::Transport(source_chain(&e))
    }
}

fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Reads the whole body, refusing more than `cap` bytes.
pub(super) async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Bytes, UpstreamError> {
    if response
        .content_length()
        .is_some_and(|len| len > cap as u64)
    {
        return Err(UpstreamError::TooLarge(cap));
    }
    let mut buf =
        BytesMut::with_capacity(response.content_length().map_or(8 * 1024, |l| l as usize));
    while let Some(chunk) = response.chunk().await.map_err(classify)? {
        if buf.len() + chunk.len() > cap {
            return Err(UpstreamError::TooLarge(cap));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}
