//! A fake image provider speaking the seed provider's OpenAI Images API.
//!
//! This module owns the server behind `imagegate mock-upstream --listen ADDR`,
//! which `imagegate demo`, the integration tests and the benchmarks also start
//! in-process. It is a real HTTP server (so the gateway's real upstream client
//! is exercised end to end) but it is never used on the production path.
//!
//! # Routes
//!
//! * `POST /v1/images/generations` (bearer key required): body fields `model`,
//!   `prompt`, `size` (`WxH`, default `1024x1024`), `quality`, `n` (1..=10,
//!   default 1), `response_format` (`url` | `b64_json`), `async` (bool).
//!   Answers an OpenAI `ImagesResponse`; images are real PNGs whose pixels
//!   derive from `(prompt, index)`, sized `size / image_divisor`.
//! * `GET /images/{id}.png`: images produced in `url` mode (the last 2048).
//! * `GET /v1/tasks/{id}` (same bearer key as the creator, else 404): the
//!   seed provider's async mode; `processing` until the task's latency has
//!   elapsed, then `completed` with the same `data` as a sync answer.
//! * `GET /__mock/stats`, `POST /__mock/faults` (`{"key": "...", "fault":
//!   "status=401" | null}`), `POST /__mock/reset`: control routes for
//!   out-of-process users (CI scripts, benchmarks).
//!
//! # Fault directives
//!
//! The gateway forwards prompts unchanged (and no client headers), so a
//! prompt is the per-request control channel. Any number of `[mock:...]`
//! directives may appear in it:
//!
//! * `[mock:latency_ms=1000]`: answer after this delay (async: complete then).
//! * `[mock:status=500]`: answer that status with an OpenAI error body.
//! * `[mock:status=429 retry_after=30]`: plus `Retry-After: 30`.
//! * `[mock:status=429 retry_after_date=30]`: `Retry-After` as an IMF-fixdate
//!   30 s in the future.
//! * `[mock:hang]`: never answer (until shutdown).
//! * `[mock:reset]`: drop the connection without any response.
//! * `[mock:bad_json]`: 200 `application/json` with a truncated body.
//! * `[mock:remaining_requests=42]`: a successful answer carries
//!   `x-ratelimit-remaining-requests: 42`, as providers report their limits.
//!
//! Tokens may be combined in one directive (`[mock:latency_ms=200
//! status=503]`); across directives the last latency and the last failure
//! win. A malformed directive is answered with a 400 so typos in tests do not
//! silently pass. The same syntax without the brackets ([`Fault`]'s `FromStr`)
//! sets a per-key fault, applied to every request carrying that bearer key
//! (generations and task polls); a prompt's failure directive takes precedence
//! over the key's.

mod fault;
mod png;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use fault::{Fault, FaultParseError, RetryAfter};

/// Most recent calls kept for [`MockUpstream::calls`].
const MAX_RECORDS: usize = 10_000;
/// Most recent `url`-mode images kept for `GET /images/{id}.png`.
const MAX_STORED_IMAGES: usize = 2_048;
/// Most recent async tasks kept; tasks are small (b64 data is re-rendered).
const MAX_TASKS: usize = 10_000;
/// OpenAI's own bound on `n`.
const MAX_N: u64 = 10;
/// Bound on each requested side, so a hostile `size` cannot exhaust memory.
const MAX_SIDE: u32 = 8_192;
/// Above this many pixels per request, rendering moves off the async workers
/// (benchmarks with divisor 1 would otherwise stall the runtime).
const INLINE_RENDER_PIXELS: u64 = 256 * 256;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Settings for a mock provider instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockOptions {
    /// Delay applied to every sync generation and used as the completion time
    /// of async tasks; per-request and per-key latency override it.
    pub latency: Duration,
    /// Requested size is divided by this to get the PNG's pixel size
    /// (0 is treated as 1).
    pub image_divisor: u32,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            image_divisor: 16,
        }
    }
}

/// One `POST /v1/images/generations` as seen by the mock.
#[derive(Debug, Clone)]
pub struct RecordedCall {
    /// The bearer key it carried (empty if none).
    pub key: String,
    /// The request headers it carried (name lowercase, value lossy UTF-8), in arrival order,
    /// so tests can check that nothing of the client's reaches the provider. The
    /// `authorization` value is redacted: the key is in `key`.
    pub headers: Vec<(String, String)>,
    /// When it arrived.
    pub at: Instant,
    /// When it arrived, as unix milliseconds.
    pub unix_ms: u64,
    /// The request body as JSON (`Null` if it was not valid JSON).
    pub request: Value,
    /// The status answered; 0 while in flight or when no response was ever
    /// sent (`hang`, `reset`, client gave up).
    pub status: u16,
    /// Images produced (0 on faults and errors).
    pub images: usize,
    /// The response body sent.
    pub response_body: Bytes,
}

/// Handle to a running mock provider. Dropping it leaves the server running;
/// [`MockUpstream::shutdown`] stops it.
#[derive(Clone)]
pub struct MockUpstream {
    shared: Arc<Shared>,
    stopped: CancellationToken,
}

impl fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockUpstream")
            .field("addr", &self.shared.addr)
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

impl MockUpstream {
    /// Binds `listen` (port 0 picks a free port), spawns the server on the
    /// current Tokio runtime and returns once it accepts connections.
    pub async fn start(listen: SocketAddr, options: MockOptions) -> std::io::Result<MockUpstream> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            options,
            addr,
            shutdown: CancellationToken::new(),
            state: Mutex::new(MockState::default()),
        });
        let stopped = CancellationToken::new();
        let app = router(Arc::clone(&shared));
        let signal = shared.shutdown.clone().cancelled_owned();
        let done = stopped.clone();
        tokio::spawn(async move {
            // Fires even if the runtime drops this task, so `wait` never hangs
            // on a server that is already gone.
            let _done = done.drop_guard();
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await
            {
                tracing::debug!(%error, "mock upstream server stopped with an error");
            }
        });
        tracing::debug!(%addr, "mock upstream listening");
        Ok(MockUpstream { shared, stopped })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://<addr>/v1`, the base URL to configure as the provider endpoint
    /// (an unspecified listen IP is replaced by loopback so it is connectable).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", connectable(self.shared.addr))
    }

    /// Sets (`Some`) or clears (`None`) the fault applied to every request
    /// carrying `key`.
    pub fn set_key_fault(&self, key: &str, fault: Option<Fault>) {
        self.shared.set_key_fault(key, fault);
    }

    /// The recorded generation calls, oldest first (at most the last 10 000).
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.shared
            .state()
            .records
            .iter()
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// Generation calls received since start or the last reset.
    pub fn call_count(&self) -> usize {
        self.shared.state().calls
    }

    /// Generation calls received carrying `key`.
    pub fn calls_for_key(&self, key: &str) -> usize {
        self.shared
            .state()
            .calls_by_key
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Images produced (sync answers plus created async tasks).
    pub fn images_produced(&self) -> usize {
        self.shared.state().images
    }

    /// `GET /v1/tasks/{id}` requests received.
    pub fn poll_count(&self) -> usize {
        self.shared.state().polls
    }

    /// Clears recorded calls and all counters (faults, tasks and stored
    /// images are kept).
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Stops accepting, ends in-flight requests (hanging ones are released
    /// with a 503) and resolves once the server has stopped.
    pub async fn shutdown(self) {
        self.shared.shutdown.cancel();
        self.stopped.cancelled().await;
    }

    /// Resolves when the server has stopped.
    pub async fn wait(&self) {
        self.stopped.cancelled().await;
    }
}

struct Shared {
    options: MockOptions,
    addr: SocketAddr,
    shutdown: CancellationToken,
    state: Mutex<MockState>,
}

#[derive(Default)]
struct MockState {
    /// `(sequence number, call)`; sequence numbers are contiguous so a call
    /// can be found by offset from the front when its answer is known.
    records: VecDeque<(u64, RecordedCall)>,
    next_seq: u64,
    calls: usize,
    calls_by_key: HashMap<String, usize>,
    images: usize,
    polls: usize,
    key_faults: HashMap<String, Fault>,
    stored_images: HashMap<String, Bytes>,
    image_order: VecDeque<String>,
    tasks: HashMap<String, Task>,
    task_order: VecDeque<String>,
}

struct Task {
    key: String,
    started: Instant,
    latency: Duration,
    created: u64,
    spec: RenderSpec,
    /// `url` mode: rendered at creation so the URLs are stable. `b64_json`
    /// mode re-renders on completion instead of holding megabytes per task.
    urls: Option<Arc<Vec<String>>>,
}

#[derive(Clone)]
struct RenderSpec {
    prompt: String,
    revised: String,
    width: u32,
    height: u32,
    n: u32,
}

/// A parsed generation request.
struct GenRequest {
    prompt: String,
    width: u32,
    height: u32,
    n: u32,
    b64: bool,
    is_async: bool,
}

#[derive(Serialize)]
struct ImageItem {
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    b64_json: Option<String>,
    revised_prompt: String,
}

#[derive(Serialize)]
struct ImagesResponse<'a> {
    created: u64,
    data: &'a [ImageItem],
}

#[derive(Serialize)]
struct TaskResponse<'a> {
    id: &'a str,
    status: &'static str,
    progress: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a [ImageItem]>,
}

/// A fully decided HTTP answer.
struct Reply {
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    images: usize,
    retry_after: Option<String>,
    /// `x-ratelimit-remaining-requests`, when a directive asked for it.
    remaining_requests: Option<u64>,
}

enum Outcome {
    Reply(Reply),
    /// Close the connection without answering.
    Reset,
}

/// Panic payload used to abort a connection; see [`reset_connection`].
struct MockConnectionReset;

impl Reply {
    fn json(status: StatusCode, body: Vec<u8>, images: usize) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: Bytes::from(body),
            images,
            retry_after: None,
            remaining_requests: None,
        }
    }

    fn error(status: StatusCode, message: &str) -> Self {
        Self::json(status, error_body(status, message), 0)
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        if let Ok(id) = HeaderValue::from_str(&format!("mock-{:016x}", rand::random::<u64>())) {
            headers.insert(X_REQUEST_ID, id);
        }
        if let Some(value) = self
            .retry_after
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            headers.insert(RETRY_AFTER, value);
        }
        if let Some(remaining) = self.remaining_requests {
            headers.insert(
                "x-ratelimit-remaining-requests",
                HeaderValue::from(remaining),
            );
        }
        response
    }
}

/// Ends the current connection without a response. Unwinding out of the
/// handler makes hyper's connection task die with it, which closes the socket;
/// Tokio contains the unwind to that task, and `resume_unwind` (unlike
/// `panic!`) does not run the panic hook, so nothing is printed. Requires the
/// default `panic = "unwind"`.
fn reset_connection() -> ! {
    std::panic::resume_unwind(Box::new(MockConnectionReset))
}

fn outcome_response(outcome: Outcome) -> Response {
    match outcome {
        Outcome::Reply(reply) => reply.into_response(),
        Outcome::Reset => reset_connection(),
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, MockState> {
        // The state stays consistent even if a holder panicked (no holder
        // runs code that can), so poisoning is not a reason to fail.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_key_fault(&self, key: &str, fault: Option<Fault>) {
        let mut st = self.state();
        match fault {
            Some(f) => {
                tracing::debug!(fault = %f, "mock upstream: per-key fault set");
                st.key_faults.insert(key.to_owned(), f);
            }
            None => {
                tracing::debug!("mock upstream: per-key fault cleared");
                st.key_faults.remove(key);
            }
        }
    }

    fn key_fault(&self, key: &str) -> Option<Fault> {
        self.state().key_faults.get(key).cloned()
    }

    fn reset(&self) {
        let mut st = self.state();
        st.records.clear();
        st.calls = 0;
        st.calls_by_key.clear();
        st.images = 0;
        st.polls = 0;
    }

    fn record_arrival(&self, key: &str, headers: &HeaderMap, request: Value) -> u64 {
        let call = RecordedCall {
            key: key.to_owned(),
            headers: headers
                .iter()
                .map(|(name, value)| {
                    let value = if name == AUTHORIZATION {
                        "[redacted]".to_owned()
                    } else {
                        String::from_utf8_lossy(value.as_bytes()).into_owned()
                    };
                    (name.as_str().to_owned(), value)
                })
                .collect(),
            at: Instant::now(),
            unix_ms: unix_ms(),
            request,
            status: 0,
            images: 0,
            response_body: Bytes::new(),
        };
        let mut st = self.state();
        st.calls += 1;
        *st.calls_by_key.entry(key.to_owned()).or_default() += 1;
        let seq = st.next_seq;
        st.next_seq += 1;
        st.records.push_back((seq, call));
        while st.records.len() > MAX_RECORDS {
            st.records.pop_front();
        }
        seq
    }

    fn record_answer(&self, seq: u64, reply: &Reply) {
        let mut st = self.state();
        st.images += reply.images;
        let Some(&(front, _)) = st.records.front() else {
            return;
        };
        // Gone if evicted or cleared by a reset while the call was in flight.
        let index = seq.checked_sub(front).and_then(|i| usize::try_from(i).ok());
        if let Some((s, call)) = index.and_then(|i| st.records.get_mut(i))
            && *s == seq
        {
            call.status = reply.status.as_u16();
            call.images = reply.images;
            call.response_body = reply.body.clone();
        }
    }

    fn store_image(&self, png: Vec<u8>) -> String {
        let id = format!("{:032x}", rand::random::<u128>());
        let mut st = self.state();
        st.stored_images.insert(id.clone(), Bytes::from(png));
        st.image_order.push_back(id.clone());
        while st.image_order.len() > MAX_STORED_IMAGES {
            if let Some(old) = st.image_order.pop_front() {
                st.stored_images.remove(&old);
            }
        }
        id
    }

    fn pixel_size(&self, width: u32, height: u32) -> (u32, u32) {
        let divisor = self.options.image_divisor.max(1);
        ((width / divisor).max(1), (height / divisor).max(1))
    }

    /// Sleeps, unless the server shuts down first (then returns false), so
    /// long latencies never hold up a graceful shutdown.
    async fn pause(&self, delay: Duration) -> bool {
        if delay.is_zero() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = self.shutdown.cancelled() => false,
        }
    }

    async fn apply_fault(&self, fault: Fault) -> Outcome {
        match fault {
            Fault::Status {
                status,
                retry_after,
            } => {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let mut reply = Reply::error(
                    status,
                    &format!("mock: injected status {}", status.as_u16()),
                );
                reply.retry_after = retry_after.map(|r| r.header_value());
                Outcome::Reply(reply)
            }
            Fault::Hang => {
                self.shutdown.cancelled().await;
                Outcome::Reply(shutting_down())
            }
            Fault::Reset => Outcome::Reset,
            Fault::BadJson => {
                let full = format!(
                    r#"{{"created":{},"data":[{{"url":"http://{}/images/"#,
                    unix_secs(),
                    connectable(self.addr)
                );
                Outcome::Reply(Reply::json(StatusCode::OK, full.into_bytes(), 0))
            }
            // Latency is not a failure: callers apply it before getting here.
            Fault::Latency(_) => Outcome::Reply(Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "mock: latency is not a failure fault",
            )),
        }
    }

    async fn generation(
        &self,
        key: Option<&str>,
        body: Option<&Value>,
        authority: &str,
    ) -> Outcome {
        let Some(key) = key else {
            return Outcome::Reply(Reply::error(
                StatusCode::UNAUTHORIZED,
                "You didn't provide an API key. Provide it as `Authorization: Bearer <key>`.",
            ));
        };
        let (key_latency, key_failure) = match self.key_fault(key) {
            Some(Fault::Latency(d)) => (Some(d), None),
            other => (None, other),
        };
        let parsed = body
            .ok_or_else(|| "The request body is not valid JSON.".to_owned())
            .and_then(parse_generation)
            .and_then(|req| {
                fault::prompt_directives(&req.prompt)
                    .map(|(directives, revised)| (req, directives, revised))
                    .map_err(|e| e.to_string())
            });
        let (req, directives, revised) = match parsed {
            Ok(p) => p,
            // A key-level failure (e.g. a revoked key) wins over body errors,
            // like a real provider checking auth before validation.
            Err(message) => {
                return match key_failure {
                    Some(f) => self.apply_fault(f).await,
                    None => Outcome::Reply(Reply::error(StatusCode::BAD_REQUEST, &message)),
                };
            }
        };
        let latency = directives
            .latency
            .or(key_latency)
            .unwrap_or(self.options.latency);
        let failure = directives.fault.or(key_failure);
        let (width, height) = self.pixel_size(req.width, req.height);
        let spec = RenderSpec {
            prompt: req.prompt,
            revised,
            width,
            height,
            n: req.n,
        };

        if req.is_async {
            // Async creation answers at once; the latency is the task's
            // completion time and failures hit the creation request.
            if let Some(f) = failure {
                return self.apply_fault(f).await;
            }
            return Outcome::Reply(
                self.create_task(key, spec, req.b64, latency, authority)
                    .await,
            );
        }

        if !self.pause(latency).await {
            return Outcome::Reply(shutting_down());
        }
        if let Some(f) = failure {
            return self.apply_fault(f).await;
        }
        let Some(items) = self.render_items(&spec, req.b64, authority).await else {
            return Outcome::Reply(Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "mock: rendering failed",
            ));
        };
        let body = ImagesResponse {
            created: unix_secs(),
            data: &items,
        };
        let mut reply = json_reply(StatusCode::OK, &body, items.len());
        reply.remaining_requests = directives.remaining_requests;
        Outcome::Reply(reply)
    }

    async fn create_task(
        &self,
        key: &str,
        spec: RenderSpec,
        b64: bool,
        latency: Duration,
        authority: &str,
    ) -> Reply {
        let urls = if b64 {
            None
        } else {
            let Some(items) = self.render_items(&spec, false, authority).await else {
                return Reply::error(StatusCode::INTERNAL_SERVER_ERROR, "mock: rendering failed");
            };
            Some(Arc::new(items.into_iter().filter_map(|i| i.url).collect()))
        };
        let id = format!("task_{:024x}", rand::random::<u128>() >> 32);
        let images = spec.n as usize;
        let task = Task {
            key: key.to_owned(),
            started: Instant::now(),
            latency,
            created: unix_secs(),
            spec,
            urls,
        };
        {
            let mut st = self.state();
            st.tasks.insert(id.clone(), task);
            st.task_order.push_back(id.clone());
            while st.task_order.len() > MAX_TASKS {
                if let Some(old) = st.task_order.pop_front() {
                    st.tasks.remove(&old);
                }
            }
        }
        let body = TaskResponse {
            id: &id,
            status: "queued",
            progress: 0,
            created: None,
            data: None,
        };
        json_reply(StatusCode::OK, &body, images)
    }

    /// Renders the request's images and turns them into response items
    /// (`url` mode stores them for `GET /images/{id}.png`).
    async fn render_items(
        &self,
        spec: &RenderSpec,
        b64: bool,
        authority: &str,
    ) -> Option<Vec<ImageItem>> {
        let pngs = render_pngs(spec).await?;
        let items = pngs
            .into_iter()
            .map(|png| {
                if b64 {
                    ImageItem {
                        url: None,
                        b64_json: Some(base64::engine::general_purpose::STANDARD.encode(&png)),
                        revised_prompt: spec.revised.clone(),
                    }
                } else {
                    let id = self.store_image(png);
                    ImageItem {
                        url: Some(format!("http://{authority}/images/{id}.png")),
                        b64_json: None,
                        revised_prompt: spec.revised.clone(),
                    }
                }
            })
            .collect();
        Some(items)
    }

    async fn poll(&self, key: Option<&str>, id: &str) -> Outcome {
        self.state().polls += 1;
        let Some(key) = key else {
            return Outcome::Reply(Reply::error(
                StatusCode::UNAUTHORIZED,
                "You didn't provide an API key. Provide it as `Authorization: Bearer <key>`.",
            ));
        };
        match self.key_fault(key) {
            None | Some(Fault::Latency(_)) => {}
            Some(failure) => return self.apply_fault(failure).await,
        }
        let snapshot = {
            let st = self.state();
            st.tasks.get(id).filter(|t| t.key == key).map(|t| {
                (
                    t.started.elapsed(),
                    t.latency,
                    t.created,
                    t.spec.clone(),
                    t.urls.clone(),
                )
            })
        };
        let Some((elapsed, latency, created, spec, urls)) = snapshot else {
            return Outcome::Reply(Reply::error(
                StatusCode::NOT_FOUND,
                &format!("No task found with id '{id}'."),
            ));
        };
        if elapsed < latency {
            let pct = elapsed.as_millis() * 100 / latency.as_millis().max(1);
            let body = TaskResponse {
                id,
                status: "processing",
                progress: u8::try_from(pct.clamp(1, 99)).unwrap_or(99),
                created: None,
                data: None,
            };
            return Outcome::Reply(json_reply(StatusCode::OK, &body, 0));
        }
        let items = match urls {
            Some(urls) => urls
                .iter()
                .map(|u| ImageItem {
                    url: Some(u.clone()),
                    b64_json: None,
                    revised_prompt: spec.revised.clone(),
                })
                .collect(),
            None => match self.render_items(&spec, true, "").await {
                Some(items) => items,
                None => {
                    return Outcome::Reply(Reply::error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "mock: rendering failed",
                    ));
                }
            },
        };
        let body = TaskResponse {
            id,
            status: "completed",
            progress: 100,
            created: Some(created),
            data: Some(&items),
        };
        Outcome::Reply(json_reply(StatusCode::OK, &body, 0))
    }
}

async fn render_pngs(spec: &RenderSpec) -> Option<Vec<Vec<u8>>> {
    let render_all = |spec: &RenderSpec| -> Vec<Vec<u8>> {
        (0..spec.n as usize)
            .map(|i| png::render(&spec.prompt, i, spec.width, spec.height))
            .collect()
    };
    let pixels = u64::from(spec.width) * u64::from(spec.height) * u64::from(spec.n);
    if pixels <= INLINE_RENDER_PIXELS {
        return Some(render_all(spec));
    }
    let owned = spec.clone();
    tokio::task::spawn_blocking(move || render_all(&owned))
        .await
        .ok()
}

fn json_reply<T: Serialize>(status: StatusCode, body: &T, images: usize) -> Reply {
    match serde_json::to_vec(body) {
        Ok(bytes) => Reply::json(status, bytes, images),
        Err(_) => Reply::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "mock: could not encode the response",
        ),
    }
}

fn shutting_down() -> Reply {
    Reply::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "mock: server is shutting down",
    )
}

/// OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`.
fn error_body(status: StatusCode, message: &str) -> Vec<u8> {
    let (kind, code) = match status.as_u16() {
        401 => ("invalid_request_error", Some("invalid_api_key")),
        403 => ("invalid_request_error", Some("forbidden")),
        404 => ("invalid_request_error", Some("not_found")),
        429 => ("requests", Some("rate_limit_exceeded")),
        500..=599 => ("server_error", None),
        _ => ("invalid_request_error", None),
    };
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    // Serializing a `Value` built from strings cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

fn parse_generation(body: &Value) -> Result<GenRequest, String> {
    let obj = body
        .as_object()
        .ok_or("The request body must be a JSON object.")?;
    let field = |name: &str| obj.get(name).filter(|v| !v.is_null());
    let prompt = match field("prompt") {
        Some(Value::String(p)) if !p.trim().is_empty() => p.clone(),
        Some(Value::String(_)) | None => return Err("Missing required parameter: 'prompt'.".into()),
        Some(_) => return Err("Invalid type for 'prompt': expected a string.".into()),
    };
    let (width, height) = match field("size") {
        None => (1024, 1024),
        Some(Value::String(s)) => parse_size(s)?,
        Some(_) => return Err("Invalid type for 'size': expected a string.".into()),
    };
    let n = match field("n") {
        None => 1,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=MAX_N).contains(n))
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("Invalid 'n': expected an integer between 1 and {MAX_N}."))?,
    };
    let b64 = match field("response_format") {
        None => false,
        Some(Value::String(f)) if f == "url" => false,
        Some(Value::String(f)) if f == "b64_json" => true,
        Some(_) => return Err("Invalid 'response_format': expected 'url' or 'b64_json'.".into()),
    };
    let is_async = match field("async") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("Invalid type for 'async': expected a boolean.".into()),
    };
    Ok(GenRequest {
        prompt,
        width,
        height,
        n,
        b64,
        is_async,
    })
}

fn parse_size(size: &str) -> Result<(u32, u32), String> {
    if size == "auto" {
        return Ok((1024, 1024));
    }
    let invalid = || format!("Invalid 'size' '{size}': expected 'WIDTHxHEIGHT'.");
    let (w, h) = size.split_once(['x', 'X']).ok_or_else(invalid)?;
    let side = |s: &str| s.parse::<u32>().ok().filter(|v| (1..=MAX_SIDE).contains(v));
    match (side(w), side(h)) {
        (Some(w), Some(h)) => Ok((w, h)),
        _ => Err(invalid()),
    }
}

fn bearer_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

/// The authority for image URLs: the `Host` the caller used (so URLs work
/// through port mappings and container names), else the bound address.
fn url_authority(headers: &HeaderMap, addr: SocketAddr) -> String {
    headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '[' | ']' | '_')
                })
        })
        .map_or_else(|| connectable(addr).to_string(), str::to_owned)
}

fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn unix_secs() -> u64 {
    unix_ms() / 1_000
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/v1/tasks/{id}", get(task_status))
        .route("/images/{file}", get(stored_image))
        .route("/__mock/stats", get(stats))
        .route("/__mock/faults", post(set_fault))
        .route("/__mock/reset", post(reset_route))
        .fallback(not_found)
        .with_state(shared)
}

async fn generations(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = bearer_key(&headers);
    let request: Option<Value> = serde_json::from_slice(&body).ok();
    let seq = shared.record_arrival(
        key.as_deref().unwrap_or(""),
        &headers,
        request.clone().unwrap_or(Value::Null),
    );
    let authority = url_authority(&headers, shared.addr);
    let outcome = shared
        .generation(key.as_deref(), request.as_ref(), &authority)
        .await;
    match &outcome {
        Outcome::Reply(reply) => {
            shared.record_answer(seq, reply);
            tracing::debug!(
                status = reply.status.as_u16(),
                images = reply.images,
                "mock generation answered"
            );
        }
        Outcome::Reset => tracing::debug!("mock generation: resetting the connection"),
    }
    outcome_response(outcome)
}

async fn task_status(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let key = bearer_key(&headers);
    outcome_response(shared.poll(key.as_deref(), &id).await)
}

async fn stored_image(State(shared): State<Arc<Shared>>, Path(file): Path<String>) -> Response {
    let png = file
        .strip_suffix(".png")
        .and_then(|id| shared.state().stored_images.get(id).cloned());
    match png {
        Some(bytes) => (
            [(CONTENT_TYPE, HeaderValue::from_static("image/png"))],
            bytes,
        )
            .into_response(),
        None => Reply::error(
            StatusCode::NOT_FOUND,
            "mock: no such image (it may have been evicted)",
        )
        .into_response(),
    }
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    let body = {
        let st = shared.state();
        serde_json::json!({
            "calls": st.calls,
            "calls_by_key": st.calls_by_key,
            "images": st.images,
            "polls": st.polls,
        })
    };
    json_reply(StatusCode::OK, &body, 0).into_response()
}

#[derive(serde::Deserialize)]
struct FaultRequest {
    key: String,
    #[serde(default)]
    fault: Option<String>,
}

async fn set_fault(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let request: FaultRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let message = format!("expected {{\"key\": string, \"fault\": string | null}}: {e}");
            return Reply::error(StatusCode::BAD_REQUEST, &message).into_response();
        }
    };
    let fault = match request
        .fault
        .as_deref()
        .map(str::parse::<Fault>)
        .transpose()
    {
        Ok(f) => f,
        Err(e) => return Reply::error(StatusCode::BAD_REQUEST, &e.to_string()).into_response(),
    };
    let canonical = fault.as_ref().map(ToString::to_string);
    shared.set_key_fault(&request.key, fault);
    json_reply(
        StatusCode::OK,
        &serde_json::json!({ "ok": true, "fault": canonical }),
        0,
    )
    .into_response()
}

async fn reset_route(State(shared): State<Arc<Shared>>) -> Response {
    shared.reset();
    json_reply(StatusCode::OK, &serde_json::json!({ "ok": true }), 0).into_response()
}

async fn not_found() -> Response {
    Reply::error(StatusCode::NOT_FOUND, "mock: unknown route").into_response()
}
