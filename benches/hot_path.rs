//! Micro-benchmarks of the per-request hot path, through the crate's public API: body parse,
//! client-key lookup, validation, cache key, rate-limit admission, a cache hit, and all of
//! them in a row. `cargo bench --bench hot_path` runs them; CI only compiles them (clippy
//! `--all-targets`). The load benchmark against nginx is `bench/run.sh` (BENCHMARKS.md).

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Map, Value};

use imagegate::auth::{ClientKeys, key_digest_hex};
use imagegate::cache::{CachePolicy, ResponseCache};
use imagegate::config::{ClientConfig, ClientLimits, Config, ModelConfig};
use imagegate::error::ApiError;
use imagegate::rate_limit::{MonotonicClock, RateLimits};
use imagegate::upstream::UpstreamResponse;
use imagegate::validate::{Models, validate};

/// Clients in the key table: lookups are by digest, so the count should not matter; a
/// realistic handful plus the one being looked up.
const CLIENTS: usize = 50;
const BODY: &[u8] = br#"{"model":"gemini-3.1-flash-image","prompt":"A cozy coffee shop interior with warm lighting and bookshelves","size":"1024x1024","n":1,"response_format":"url"}"#;

struct Fixture {
    keys: ClientKeys,
    models: Models,
    limits: RateLimits,
    cache: ResponseCache<ApiError>,
    body: Map<String, Value>,
}

/// The key of client `i`.
fn client_key(i: usize) -> String {
    format!("sk-ig-bench-{i:064}")
}

fn fixture() -> Fixture {
    let mut config = Config::default();
    config
        .models
        .push(ModelConfig::new("gemini-3.1-flash-image", &[]));
    // Limits far above what the benchmark spends, so every admission succeeds.
    config.client_defaults = ClientLimits {
        requests_per_minute: u32::MAX,
        images_per_minute: u32::MAX,
        max_concurrent: 1_000_000,
        ..ClientLimits::default()
    };
    for i in 0..CLIENTS {
        let key = client_key(i);
        config.clients.push(ClientConfig::new(
            &format!("team-{i}"),
            &key_digest_hex(&key),
        ));
    }
    let keys = ClientKeys::from_config(&config);
    let body = match serde_json::from_slice::<Value>(BODY) {
        Ok(Value::Object(map)) => map,
        _ => panic!("BODY is a JSON object"),
    };
    Fixture {
        limits: RateLimits::new(&keys.limits(), Arc::new(MonotonicClock::new())),
        models: Models::from_config(&config),
        cache: ResponseCache::new(&config.cache),
        keys,
        body,
    }
}

fn hot_path(c: &mut Criterion) {
    let f = fixture();
    let header = format!("Bearer {}", client_key(CLIENTS / 2));
    let client = f
        .keys
        .authenticate(Some(header.as_bytes()))
        .expect("the key is configured");
    let request = validate(&f.body, &f.models, &client).expect("the body is valid");
    let key = f.cache.key(&request, &client.id);

    c.bench_function("parse body (JSON object)", |b| {
        b.iter(|| serde_json::from_slice::<Map<String, Value>>(black_box(BODY)))
    });
    c.bench_function("auth: bearer + SHA-256 + lookup", |b| {
        b.iter(|| f.keys.authenticate(Some(black_box(header.as_bytes()))))
    });
    c.bench_function("validate", |b| {
        b.iter(|| validate(black_box(&f.body), &f.models, &client))
    });
    c.bench_function("cache key", |b| {
        b.iter(|| f.cache.key(black_box(&request), &client.id))
    });
    c.bench_function("rate limit: admit + release", |b| {
        b.iter(|| f.limits.admit(black_box(&client.id), 1))
    });

    // A hit: the store holds the answer, so the work is never run.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let stored = UpstreamResponse {
        body: Bytes::from_static(br#"{"created":1,"data":[{"url":"http://mock/images/x.png"}]}"#),
        images: 1,
        upstream: Arc::from("mock"),
        key_id: Arc::from("k1"),
        upstream_request_id: None,
    };
    let answer = stored.clone();
    let (stored_first, _) = runtime.block_on(f.cache.get_or_generate(
        key,
        CachePolicy::NORMAL,
        async move { Ok(answer) },
    ));
    assert!(
        stored_first.is_ok(),
        "the first generation stores the answer"
    );
    c.bench_function("cache hit (get_or_generate)", |b| {
        b.iter(|| {
            runtime.block_on(
                f.cache
                    .get_or_generate(black_box(key), CachePolicy::NORMAL, async {
                        Err(ApiError::internal())
                    }),
            )
        })
    });

    c.bench_function("all of the above, once", |b| {
        b.iter(|| {
            let body =
                serde_json::from_slice::<Map<String, Value>>(black_box(BODY)).expect("valid JSON");
            let client = f
                .keys
                .authenticate(Some(header.as_bytes()))
                .expect("known key");
            let request = validate(&body, &f.models, &client).expect("valid");
            let _admission = f.limits.admit(&client.id, request.n).expect("admitted");
            let key = f.cache.key(&request, &client.id);
            runtime.block_on(f.cache.get_or_generate(key, CachePolicy::NORMAL, async {
                Err(ApiError::internal())
            }))
        })
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
