//! The one log line per request (SPEC §8), and its fast JSON path.
//!
//! tracing-subscriber's JSON formatter visits every field through `dyn Visit`, builds a
//! serde map and formats the time through `fmt`: about a tenth of a cache hit's CPU in the load
//! benchmark. In the JSON format this module writes the same line itself (same keys, same
//! order, same value encoding; a test holds the two equal) straight to the log's writer. In
//! the pretty format, or before the subscriber is installed, the line is an ordinary
//! `tracing` event.

use std::io::Write;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::usage::UtcDay;

/// What the request line says. `None` fields are left out, as tracing leaves out `None`.
#[derive(Debug, Clone, Copy)]
pub struct RequestLine<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub latency_ms: f64,
    pub client: Option<&'a str>,
    pub model: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub upstream_key: Option<&'a str>,
    pub cache: Option<&'a str>,
    pub images: Option<usize>,
    pub prompt: Option<&'a str>,
    pub error_kind: Option<&'static str>,
}

const TARGET: &str = "imagegate::request";

type Sink = Box<dyn Fn(&[u8]) + Send + Sync>;

/// Set once, by `init_logging` in the JSON format.
static JSON_SINK: OnceLock<Sink> = OnceLock::new();

pub(super) fn write_json_to(sink: impl Fn(&[u8]) + Send + Sync + 'static) {
    // A second subscriber cannot be installed either, so a second call has nothing to do.
    let _ = JSON_SINK.set(Box::new(sink));
}

/// Whether request lines are written as JSON by this module.
pub(super) fn json_request_lines() -> bool {
    JSON_SINK.get().is_some()
}

impl RequestLine<'_> {
    /// Writes the line, if the log filter lets `imagegate::request` INFO through.
    pub fn log(&self) {
        match JSON_SINK.get() {
            Some(sink) => {
                if tracing::enabled!(target: TARGET, tracing::Level::INFO) {
                    LINE.with_borrow_mut(|buf| {
                        buf.clear();
                        self.write_json(SystemTime::now(), buf);
                        sink(buf);
                    });
                }
            }
            None => self.emit(),
        }
    }

    /// The line as a tracing event (the pretty format; and the reference for the JSON path).
    fn emit(&self) {
        tracing::info!(
            target: TARGET,
            request_id = %self.request_id,
            method = %self.method,
            route = %self.route,
            status = self.status,
            latency_ms = self.latency_ms,
            client = self.client,
            model = self.model,
            upstream = self.upstream,
            upstream_key = self.upstream_key,
            cache = self.cache,
            images = self.images,
            prompt = self.prompt,
            error_kind = self.error_kind,
            "request"
        );
    }

    /// The line as tracing-subscriber's JSON format (flattened event, no spans) writes it.
    fn write_json(&self, now: SystemTime, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(now, out);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\"");
        string(out, "request_id", Some(self.request_id));
        string(out, "method", Some(self.method));
        string(out, "route", Some(self.route));
        let _ = write!(out, ",\"status\":{}", self.status);
        out.extend_from_slice(b",\"latency_ms\":");
        // serde_json, as the subscriber: shortest round-trip form (`4.765`, `12.0`).
        let _ = serde_json::to_writer(&mut *out, &self.latency_ms);
        string(out, "client", self.client);
        string(out, "model", self.model);
        string(out, "upstream", self.upstream);
        string(out, "upstream_key", self.upstream_key);
        string(out, "cache", self.cache);
        if let Some(images) = self.images {
            let _ = write!(out, ",\"images\":{images}");
        }
        string(out, "prompt", self.prompt);
        string(out, "error_kind", self.error_kind);
        out.extend_from_slice(b",\"target\":\"imagegate::request\"}\n");
    }
}

thread_local! {
    /// Reused per thread: a line is built without allocating.
    static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn string(out: &mut Vec<u8>, key: &str, value: Option<&str>) {
    if let Some(value) = value {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        // JSON string escaping exactly as serde_json does it (the subscriber uses serde_json).
        let _ = serde_json::to_writer(&mut *out, value);
    }
}

/// `2026-12-02T08:12:44.049313Z`: RFC 3339 in UTC with microseconds, as the subscriber's
/// default timer prints it.
fn timestamp(now: SystemTime, out: &mut Vec<u8>) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    let in_day = secs.rem_euclid(86_400);
    let _ = write!(
        out,
        "{}T{:02}:{:02}:{:02}.{:06}Z",
        UtcDay::containing(now),
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60,
        since.subsec_micros()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    /// The line tracing-subscriber's JSON formatter writes for `line` (the format
    /// `init_logging` installs).
    fn from_subscriber(line: &RequestLine<'_>) -> String {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(buffer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || line.emit());
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    fn ours(line: &RequestLine<'_>) -> String {
        let mut out = Vec::new();
        line.write_json(SystemTime::now(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_fast_line_is_the_subscribers_line_byte_for_byte_after_the_timestamp() {
        let full = RequestLine {
            request_id: "req_0123",
            method: "POST",
            route: "/v1/images/generations",
            status: 200,
            latency_ms: 4.765,
            client: Some("team-a"),
            model: Some("gemini-3.1-flash-image"),
            upstream: Some("main"),
            upstream_key: Some("k1"),
            cache: Some("miss"),
            images: Some(2),
            prompt: Some("a \"quoted\" prompt\nwith a newline, a tab\t, ünïcode and \u{1}"),
            error_kind: Some("upstream_error"),
        };
        let sparse = RequestLine {
            client: None,
            model: None,
            upstream: None,
            upstream_key: None,
            cache: None,
            images: None,
            prompt: None,
            error_kind: None,
            status: 401,
            latency_ms: 12.0,
            ..full
        };
        for line in [full, sparse] {
            let (theirs, mine) = (from_subscriber(&line), ours(&line));
            let tail = |s: &str| s[s.find(",\"level\"").unwrap()..].to_owned();
            assert_eq!(tail(&mine), tail(&theirs));
            assert!(
                mine.ends_with("}\n") && mine.matches('\n').count() == 1,
                "{mine}"
            );
            // Same timestamp shape: `{"timestamp":"2026-12-02T08:12:44.049313Z"`.
            let stamp = |s: &str| s[..s.find(",\"level\"").unwrap()].len();
            assert_eq!(stamp(&mine), stamp(&theirs), "{mine} vs {theirs}");
            let parsed: serde_json::Value = serde_json::from_str(&mine).unwrap();
            assert_eq!(parsed["status"], u64::from(line.status));
        }
    }

    #[test]
    fn timestamps_are_utc_rfc3339_with_microseconds() {
        let at = UNIX_EPOCH + std::time::Duration::new(1_764_664_364, 49_313_999);
        let mut out = Vec::new();
        timestamp(at, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2025-12-02T08:32:44.049313Z"
        );
    }
}
