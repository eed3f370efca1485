//! Logging setup and the per-request log line.
//!
//! Owns: the tracing subscriber (JSON or pretty), request ids, and the single structured line
//! written for every request (SPEC §8). What the line says about a request's outcome travels in
//! the response's extensions as [`RequestFacts`] and [`crate::error::ErrorKind`]: handlers and
//! errors state facts, and only the middleware here writes them out, once.
//!
//! Must not log: keys, key digests, `Authorization` values, image data, or prompts beyond what
//! `log.prompts` allows.

pub mod http;
pub mod metrics;
mod request_line;
pub mod writer;

pub use request_line::RequestLine;
use request_line::json_request_lines;

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::auth::ClientId;
use crate::config::{LogConfig, LogFormat, PromptLogging};

/// What a handler learned about a request, for its log line.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    pub client: Option<ClientId>,
    pub model: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
    pub upstream_key: Option<Arc<str>>,
    pub cache: Option<&'static str>,
    pub images: Option<usize>,
    /// Already reduced per `log.prompts`: absent, a hash, or the prompt.
    pub prompt: Option<String>,
}

/// The prompt as `log.prompts` allows it to be logged.
pub fn loggable_prompt(policy: PromptLogging, prompt: &str) -> Option<String> {
    match policy {
        PromptLogging::Off => None,
        PromptLogging::Hash => Some(format!(
            "sha256:{}",
            &hex::encode(Sha256::digest(prompt.as_bytes()))[..16]
        )),
        PromptLogging::Full => Some(prompt.to_owned()),
    }
}

/// `x-request-id` values kept from clients and upstreams: 1–64 of `[A-Za-z0-9._-]`.
pub fn is_valid_request_id(value: &[u8]) -> bool {
    (1..=64).contains(&value.len())
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b))
}

/// Installs the global subscriber writing to `writer`. Fails if the filter does not parse or a
/// subscriber is already installed.
///
/// In the JSON format the per-request line is written by [`RequestLine::log`] itself, to the
/// same writer: the same JSON as the subscriber's, at a fraction of its cost per request.
pub fn init_logging<W>(config: &LogConfig, writer: W, ansi: bool) -> anyhow::Result<()>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(&config.level)
        .map_err(|e| anyhow::anyhow!("log.level `{}` is not a valid filter: {e}", config.level))?;
    let writer = Arc::new(writer);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(SharedWriter(Arc::clone(&writer)));
    let result = match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().with_ansi(ansi).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
    if config.format == LogFormat::Json {
        request_line::write_json_to(move |line| {
            // As the subscriber does with a line it cannot write: nothing to report it to.
            let _ = std::io::Write::write_all(&mut writer.make_writer(), line);
        });
    }
    Ok(())
}

/// One writer shared by the subscriber and the request lines.
struct SharedWriter<W>(Arc<W>);

impl<'a, W: MakeWriter<'a>> MakeWriter<'a> for SharedWriter<W> {
    type Writer = W::Writer;

    fn make_writer(&'a self) -> W::Writer {
        self.0.make_writer()
    }
}
