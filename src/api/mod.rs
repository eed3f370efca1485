//! The HTTP boundary: handlers, the JSON body extractor, client authentication middleware and
//! the JSON fallbacks. Everything here translates between HTTP and the domain modules; no
//! domain rule lives here.

pub mod admin;
pub mod images;
pub mod models;
pub mod tasks;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use crate::app::AppState;
use crate::error::ApiError;
use crate::telemetry::RequestFacts;

/// A request body that is a JSON object. Every way a body can fail to be one (wrong content
/// type, too large, empty, not JSON, not an object) becomes an OpenAI-shaped [`ApiError`].
pub struct JsonObject(pub Map<String, Value>);

impl FromRequest<AppState> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(ApiError::unsupported_media_type());
        }
        // A compressed body would otherwise fail as "not valid JSON", which misleads.
        if request
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
        {
            return Err(ApiError::unsupported_encoding());
        }
        // Refused before reading a byte when the declared length is already over the limit.
        let limit = state.server.max_body_bytes;
        if request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|declared| declared > limit as u64)
        {
            return Err(ApiError::request_too_large(limit));
        }
        // A client that sends its head and then stalls (or declares more than it sends) would
        // otherwise hold the connection until the whole-request deadline and get a 504.
        let read = Bytes::from_request(request, state);
        let bytes = tokio::time::timeout(state.server.body_read_timeout(), read)
            .await
            .map_err(|_elapsed| ApiError::body_timeout())?
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::request_too_large(limit)
                } else {
                    ApiError::invalid_request("The request body could not be read.", None)
                }
            })?;
        if bytes.trim_ascii().is_empty() {
            return Err(ApiError::invalid_request(
                "The request body is empty; expected a JSON object.",
                None,
            ));
        }
        match serde_json::from_slice::<UniqueKeys>(&bytes) {
            Ok(UniqueKeys(Some(map))) => Ok(JsonObject(map)),
            Ok(UniqueKeys(None)) => Err(ApiError::invalid_request(
                "The request body must be a JSON object.",
                None,
            )),
            Err(e) => match e.to_string().strip_prefix(DUPLICATE) {
                Some(rest) => {
                    // `rest` is "`name` at line L column C": the name is what `param` wants.
                    let name = rest.rsplit_once(" at line ").map_or(rest, |(name, _)| name);
                    let name = name
                        .strip_prefix('`')
                        .and_then(|n| n.strip_suffix('`'))
                        .unwrap_or(name);
                    Err(ApiError::invalid_request(
                        format!("The field '{name}' appears more than once in the request body."),
                        Some(name),
                    ))
                }
                None => Err(ApiError::invalid_request(
                    format!(
                        "The request body is not valid JSON (line {}, column {}).",
                        e.line(),
                        e.column()
                    ),
                    None,
                )),
            },
        }
    }
}

/// The message prefix of a duplicate-field error from [`UniqueKeys`].
const DUPLICATE: &str = "duplicate field ";

/// A JSON body parsed as an object whose top-level keys are unique (`None` for any other
/// JSON value). A repeated key is refused rather than last-wins: anything in front of the
/// gateway that reads the first one would otherwise act on a request other than the one
/// validated and sent on.
struct UniqueKeys(Option<Map<String, Value>>);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;

        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = UniqueKeys;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut map = Map::new();
                while let Some(key) = access.next_key::<String>()? {
                    if map.contains_key(&key) {
                        return Err(serde::de::Error::custom(format_args!("{DUPLICATE}`{key}`")));
                    }
                    let value = access.next_value::<Value>()?;
                    map.insert(key, value);
                }
                Ok(UniqueKeys(Some(map)))
            }

            // Any other JSON value is consumed whole (so syntax errors are still reported as
            // such) and answered "must be an object" by the caller.
            fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys(None))
            }
            fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<UniqueKeys, A::Error> {
                while access.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(UniqueKeys(None))
            }
        }

        deserializer.deserialize_any(Visit)
    }
}

/// The request's `Authorization` header, or `None` if it has none or several: with two, which
/// one counts would depend on who reads them (a proxy in front may take the other).
fn sole_authorization(headers: &header::HeaderMap) -> Option<&header::HeaderValue> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let first = values.next();
    if values.next().is_some() { None } else { first }
}

/// Authenticates the client key before the handler (and before the body is read), and names
/// the client in the request's log facts.
pub async fn require_client(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let client = match state
        .runtime()
        .clients
        .authenticate(sole_authorization(request.headers()).map(|v| v.as_bytes()))
    {
        Ok(client) => client,
        Err(e) => return e.into_response(),
    };
    let id = client.id.clone();
    request.extensions_mut().insert(client);
    let mut response = next.run(request).await;
    let extensions = response.extensions_mut();
    match extensions.get_mut::<RequestFacts>() {
        Some(facts) => facts.client = Some(id),
        None => {
            extensions.insert(RequestFacts {
                client: Some(id),
                ..RequestFacts::default()
            });
        }
    }
    response
}

/// Lets only the admin token through to `/admin` routes. Without a configured token, nobody.
pub async fn require_admin(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let presented = sole_authorization(request.headers())
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let allowed = match (presented, &state.runtime().admin_token) {
        (Some(token), Some(expected)) => {
            use secrecy::ExposeSecret;
            use subtle::ConstantTimeEq;
            bool::from(token.as_bytes().ct_eq(expected.expose_secret().as_bytes()))
        }
        _ => false,
    };
    if !allowed {
        return ApiError::invalid_admin_token().into_response();
    }
    next.run(request).await
}

pub async fn route_not_found() -> ApiError {
    ApiError::route_not_found()
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}
