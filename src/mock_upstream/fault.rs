//! Fault descriptions for the mock provider: the `Fault` type, its text
//! syntax (shared by prompt directives, the per-key control route and the
//! handle API), prompt directive extraction and `Retry-After` formatting.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A misbehaviour the mock provider can be told to exhibit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status and an OpenAI-shaped error body.
    Status {
        status: u16,
        retry_after: Option<RetryAfter>,
    },
    /// Never answer (until the mock shuts down).
    Hang,
    /// Drop the connection without sending any response.
    Reset,
    /// Answer 200 `application/json` with a truncated, unparseable body.
    BadJson,
    /// Answer normally, but only after this delay.
    Latency(Duration),
}

/// How a `Retry-After` header is expressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    /// `Retry-After: <seconds>`.
    Seconds(u64),
    /// `Retry-After: <IMF-fixdate>` this many seconds after the answer.
    HttpDate { secs_from_now: u64 },
}

impl RetryAfter {
    /// The header value, computed at answer time.
    pub(crate) fn header_value(&self) -> String {
        match *self {
            RetryAfter::Seconds(s) => s.to_string(),
            RetryAfter::HttpDate { secs_from_now } => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                http_date(now.saturating_add(secs_from_now))
            }
        }
    }
}

/// Why a fault description could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid mock fault `{input}`: {reason}")]
pub struct FaultParseError {
    input: String,
    reason: String,
}

impl FaultParseError {
    fn new(input: &str, reason: impl Into<String>) -> Self {
        Self {
            input: input.to_owned(),
            reason: reason.into(),
        }
    }
}

/// What one directive body asks for: a delay, a fault, or both
/// (`latency_ms=500 status=503` is a slow failure).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Directives {
    pub latency: Option<Duration>,
    pub fault: Option<Fault>,
    /// Report this as `x-ratelimit-remaining-requests` on a successful answer, as real
    /// providers do (prompt directive only, not a per-key fault).
    pub remaining_requests: Option<u64>,
}

fn parse_number(input: &str, key: &str, value: &str) -> Result<u64, FaultParseError> {
    value.parse::<u64>().map_err(|_| {
        FaultParseError::new(
            input,
            format!("`{key}` needs a non-negative integer, got `{value}`"),
        )
    })
}

/// Parses the token list shared by [`Fault::from_str`] and prompt directives.
fn parse_tokens(input: &str) -> Result<Directives, FaultParseError> {
    let body = input.trim();
    // Accept the prompt form too, so the same string works everywhere.
    let body = body
        .strip_prefix("[mock:")
        .and_then(|b| b.strip_suffix(']'))
        .unwrap_or(body);

    let mut latency = None;
    let mut remaining_requests = None;
    let mut status = None;
    let mut retry_after = None;
    let mut other: Option<Fault> = None;
    let mut kinds = 0usize;

    for token in body
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
    {
        let token_lc = token.to_ascii_lowercase();
        match token_lc.split_once('=') {
            None => {
                let fault = match token_lc.as_str() {
                    "hang" => Fault::Hang,
                    "reset" => Fault::Reset,
                    "bad_json" => Fault::BadJson,
                    _ => {
                        return Err(FaultParseError::new(
                            input,
                            format!("unknown directive `{token}`"),
                        ));
                    }
                };
                kinds += 1;
                other = Some(fault);
            }
            Some((key, value)) => match key {
                "latency_ms" => {
                    if latency.is_some() {
                        return Err(FaultParseError::new(input, "`latency_ms` given twice"));
                    }
                    latency = Some(Duration::from_millis(parse_number(input, key, value)?));
                }
                "remaining_requests" => {
                    remaining_requests = Some(parse_number(input, key, value)?);
                }
                "status" => {
                    let code = parse_number(input, key, value)?;
                    // 1xx cannot carry a final answer; above 599 is not HTTP.
                    let code = u16::try_from(code)
                        .ok()
                        .filter(|c| (200..=599).contains(c))
                        .ok_or_else(|| {
                            FaultParseError::new(input, "`status` must be within 200..=599")
                        })?;
                    kinds += 1;
                    status = Some(code);
                }
                "retry_after" | "retry_after_date" => {
                    if retry_after.is_some() {
                        return Err(FaultParseError::new(
                            input,
                            "only one `retry_after`/`retry_after_date` allowed",
                        ));
                    }
                    let secs = parse_number(input, key, value)?;
                    retry_after = Some(if key == "retry_after" {
                        RetryAfter::Seconds(secs)
                    } else {
                        RetryAfter::HttpDate {
                            secs_from_now: secs,
                        }
                    });
                }
                _ => {
                    return Err(FaultParseError::new(
                        input,
                        format!("unknown directive `{token}`"),
                    ));
                }
            },
        }
    }

    if kinds > 1 {
        return Err(FaultParseError::new(
            input,
            "more than one fault in one directive",
        ));
    }
    if retry_after.is_some() && status.is_none() {
        return Err(FaultParseError::new(
            input,
            "`retry_after` needs a `status=`",
        ));
    }
    let fault = match status {
        Some(status) => Some(Fault::Status {
            status,
            retry_after,
        }),
        None => other,
    };
    if fault.is_none() && latency.is_none() && remaining_requests.is_none() {
        return Err(FaultParseError::new(input, "empty directive"));
    }
    Ok(Directives {
        latency,
        fault,
        remaining_requests,
    })
}

impl FromStr for Fault {
    type Err = FaultParseError;

    /// Parses `status=429 retry_after=30`, `status=503 retry_after_date=30`,
    /// `hang`, `reset`, `bad_json` or `latency_ms=10` (the `[mock:...]`
    /// wrapper is optional).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match parse_tokens(s)? {
            Directives {
                latency: Some(d),
                fault: None,
                remaining_requests: None,
            } => Ok(Fault::Latency(d)),
            Directives {
                latency: None,
                fault: Some(f),
                remaining_requests: None,
            } => Ok(f),
            _ => Err(FaultParseError::new(
                s,
                "a per-key fault is either a latency or a failure, not both",
            )),
        }
    }
}

impl fmt::Display for Fault {
    /// The canonical text form; parses back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Status {
                status,
                retry_after,
            } => {
                write!(f, "status={status}")?;
                match retry_after {
                    Some(RetryAfter::Seconds(s)) => write!(f, " retry_after={s}"),
                    Some(RetryAfter::HttpDate { secs_from_now }) => {
                        write!(f, " retry_after_date={secs_from_now}")
                    }
                    None => Ok(()),
                }
            }
            Fault::Hang => f.write_str("hang"),
            Fault::Reset => f.write_str("reset"),
            Fault::BadJson => f.write_str("bad_json"),
            Fault::Latency(d) => write!(f, "latency_ms={}", d.as_millis()),
        }
    }
}

const DIRECTIVE_OPEN: &str = "[mock:";

/// Extracts every `[mock:...]` directive from a prompt. Several directives
/// combine: the last latency and the last failure win. Returns the prompt
/// with the directives removed as well (used as the `revised_prompt`).
pub(crate) fn prompt_directives(prompt: &str) -> Result<(Directives, String), FaultParseError> {
    let mut out = Directives::default();
    let mut cleaned = String::with_capacity(prompt.len());
    let mut rest = prompt;
    while let Some(start) = rest.find(DIRECTIVE_OPEN) {
        cleaned.push_str(&rest[..start]);
        let after = &rest[start + DIRECTIVE_OPEN.len()..];
        let end = after
            .find(']')
            .ok_or_else(|| FaultParseError::new(&rest[start..], "missing closing `]`"))?;
        let parsed = parse_tokens(&after[..end])?;
        if parsed.latency.is_some() {
            out.latency = parsed.latency;
        }
        if parsed.fault.is_some() {
            out.fault = parsed.fault;
        }
        if parsed.remaining_requests.is_some() {
            out.remaining_requests = parsed.remaining_requests;
        }
        rest = &after[end + 1..];
    }
    cleaned.push_str(rest);
    let cleaned = cleaned.split_whitespace().collect::<Vec<_>>().join(" ");
    Ok((out, cleaned))
}

/// Formats a unix timestamp as an IMF-fixdate (RFC 9110 §5.6.7),
/// e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub(crate) fn http_date(unix_secs: u64) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    // Howard Hinnant's civil_from_days, restricted to dates after 1970.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs_of_day / 3_600,
        secs_of_day % 3_600 / 60,
        secs_of_day % 60
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn parses_every_fault_form() {
        assert_eq!(
            "status=500".parse::<Fault>().unwrap(),
            Fault::Status {
                status: 500,
                retry_after: None
            }
        );
        assert_eq!(
            "status=429 retry_after=30".parse::<Fault>().unwrap(),
            Fault::Status {
                status: 429,
                retry_after: Some(RetryAfter::Seconds(30))
            }
        );
        assert_eq!(
            "[mock:status=429 retry_after_date=30]"
                .parse::<Fault>()
                .unwrap(),
            Fault::Status {
                status: 429,
                retry_after: Some(RetryAfter::HttpDate { secs_from_now: 30 })
            }
        );
        assert_eq!("hang".parse::<Fault>().unwrap(), Fault::Hang);
        assert_eq!(" reset ".parse::<Fault>().unwrap(), Fault::Reset);
        assert_eq!("bad_json".parse::<Fault>().unwrap(), Fault::BadJson);
        assert_eq!(
            "latency_ms=10".parse::<Fault>().unwrap(),
            Fault::Latency(Duration::from_millis(10))
        );
    }

    #[test]
    fn rejects_malformed_faults() {
        for bad in [
            "",
            "status=abc",
            "status=99",
            "status=600",
            "retry_after=3",
            "status=429 retry_after=1 retry_after_date=2",
            "hang reset",
            "explode",
            "latency_ms=-1",
            "latency_ms=5 status=500",
        ] {
            assert!(bad.parse::<Fault>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn display_round_trips() {
        for f in [
            Fault::Status {
                status: 503,
                retry_after: None,
            },
            Fault::Status {
                status: 429,
                retry_after: Some(RetryAfter::Seconds(7)),
            },
            Fault::Status {
                status: 429,
                retry_after: Some(RetryAfter::HttpDate { secs_from_now: 9 }),
            },
            Fault::Hang,
            Fault::Reset,
            Fault::BadJson,
            Fault::Latency(Duration::from_millis(250)),
        ] {
            assert_eq!(f.to_string().parse::<Fault>().unwrap(), f);
        }
    }

    #[test]
    fn extracts_prompt_directives() {
        let (d, cleaned) =
            prompt_directives("a cat [mock:latency_ms=20] on a mat [mock:status=503]").unwrap();
        assert_eq!(d.latency, Some(Duration::from_millis(20)));
        assert_eq!(
            d.fault,
            Some(Fault::Status {
                status: 503,
                retry_after: None
            })
        );
        assert_eq!(cleaned, "a cat on a mat");

        let (d, _) = prompt_directives("[mock:latency_ms=5 status=500]").unwrap();
        assert_eq!(d.latency, Some(Duration::from_millis(5)));
        assert!(matches!(d.fault, Some(Fault::Status { status: 500, .. })));

        let (d, cleaned) = prompt_directives("plain [brackets] stay").unwrap();
        assert_eq!(d, Directives::default());
        assert_eq!(cleaned, "plain [brackets] stay");

        assert!(prompt_directives("x [mock:status=500").is_err());
        assert!(prompt_directives("x [mock:nope]").is_err());
    }

    #[test]
    fn remaining_requests_is_a_prompt_directive_but_not_a_key_fault() {
        let (d, cleaned) = prompt_directives("a fox [mock:remaining_requests=42]").unwrap();
        assert_eq!(d.remaining_requests, Some(42));
        assert_eq!(d.fault, None);
        assert_eq!(cleaned, "a fox");
        assert!("remaining_requests=42".parse::<Fault>().is_err());
    }

    #[test]
    fn formats_imf_fixdate() {
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(http_date(1_735_689_599), "Tue, 31 Dec 2024 23:59:59 GMT");
    }
}
