//! Behaviour of the whole ledger over both embedded backends: exactness under concurrency,
//! budgets, settlement, UTC window boundaries, durability across a crash, write failures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::task::JoinSet;

use super::calendar::{UtcDay, from_unix_secs, unix_secs};
use super::*;
use crate::config::StorageConfig;

const MODEL: &str = "gemini-3.1-flash-image";

fn limits(day: u64, month: u64, budget: Option<f64>) -> ClientLimits {
    ClientLimits {
        images_per_day: day,
        images_per_month: month,
        budget_per_month: budget,
        ..ClientLimits::default()
    }
}

fn request<'a>(
    client: &'a str,
    limits: &'a ClientLimits,
    images: u32,
    price: f64,
) -> ReserveRequest<'a> {
    ReserveRequest {
        client,
        limits,
        model: MODEL,
        size: "1024x1024",
        quality: "standard",
        images,
        unit_price: price,
        holder: None,
    }
}

fn sqlite_config(path: &Path) -> StorageConfig {
    StorageConfig {
        backend: StorageBackend::Sqlite,
        path: path.to_owned(),
        url_env: None,
    }
}

/// 2026-11-25T12:00:00Z: an ordinary day, mid-month.
fn midday() -> Arc<ManualClock> {
    Arc::new(ManualClock::at_unix_secs(
        UtcDay::from_ymd(2026, 11, 25).start_secs() + 12 * 3600,
    ))
}

/// A fresh ledger file in its own temp dir (kept alive by the returned guard).
async fn sqlite_ledger(clock: Arc<ManualClock>) -> (Ledger, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data/imagegate.db");
    let ledger = Ledger::open(&sqlite_config(&path), clock).await.unwrap();
    (ledger, dir, path)
}

/// Runs `scenario` against a memory ledger and a fresh SQLite ledger.
async fn on_both_backends<F, Fut>(clock: impl Fn() -> Arc<ManualClock>, scenario: F)
where
    F: Fn(Ledger, Arc<ManualClock>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let memory_clock = clock();
    scenario(Ledger::in_memory(memory_clock.clone()), memory_clock).await;
    let sqlite_clock = clock();
    let (ledger, _dir, _) = sqlite_ledger(sqlite_clock.clone()).await;
    scenario(ledger.clone(), sqlite_clock).await;
    ledger.close().await;
}

fn exhausted_window(result: Result<QuotaReservation, ReserveError>) -> Window {
    match result {
        Err(ReserveError::Exhausted { window, .. }) => window,
        Err(other) => panic!("expected Exhausted, got {other}"),
        Ok(r) => panic!("expected Exhausted, got {r:?}"),
    }
}

async fn client_usage(ledger: &Ledger, client: &str, limits: &ClientLimits) -> ClientUsage {
    let clients = vec![(client.to_owned(), limits.clone())];
    let mut report = ledger.report(&clients, None, 7).await.unwrap();
    report.clients.remove(0)
}

/// `tasks` concurrent reserves of `each` images; returns (granted, refused-by-day).
async fn concurrent_reserves(
    ledger: &Ledger,
    limits: ClientLimits,
    tasks: usize,
    each: u32,
) -> (Vec<QuotaReservation>, usize) {
    let limits = Arc::new(limits);
    let mut set = JoinSet::new();
    for _ in 0..tasks {
        let ledger = ledger.clone();
        let limits = Arc::clone(&limits);
        set.spawn(async move { ledger.reserve(request("team", &limits, each, 0.0)).await });
    }
    let mut granted = Vec::new();
    let mut refused = 0;
    while let Some(joined) = set.join_next().await {
        match joined.unwrap() {
            Ok(r) => granted.push(r),
            Err(ReserveError::Exhausted {
                window: Window::Day,
                ..
            }) => refused += 1,
            Err(other) => panic!("unexpected refusal: {other}"),
        }
    }
    (granted, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_reserves_against_one_hundred_left_grant_exactly_one_hundred() {
    let (ledger, _dir, _) = sqlite_ledger(midday()).await;
    let day_limit = limits(100, 10_000, None);
    let (granted, refused) = concurrent_reserves(&ledger, day_limit.clone(), 500, 1).await;
    assert_eq!((granted.len(), refused), (100, 400));
    for r in granted {
        r.commit(1).await.unwrap();
    }
    let usage = client_usage(&ledger, "team", &day_limit).await;
    assert_eq!((usage.day.used, usage.day.reserved), (100, 0));
    assert_eq!(usage.today.requests, 100);
    ledger.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserves_of_four_against_one_hundred_left_grant_exactly_twenty_five() {
    let (ledger, _dir, _) = sqlite_ledger(midday()).await;
    let (granted, refused) = concurrent_reserves(&ledger, limits(100, 10_000, None), 500, 4).await;
    assert_eq!((granted.len(), refused), (25, 475));
    for r in granted {
        r.refund().await.unwrap();
    }
    ledger.close().await;
}

#[tokio::test]
async fn a_budget_of_one_at_four_cents_buys_exactly_twenty_five_images() {
    on_both_backends(midday, |ledger, _| async move {
        let budget = limits(1000, 1000, Some(1.0));
        let mut granted = 0;
        loop {
            match ledger.reserve(request("team", &budget, 1, 0.04)).await {
                Ok(r) => {
                    r.commit(1).await.unwrap();
                    granted += 1;
                }
                Err(e) => {
                    assert!(
                        matches!(
                            e,
                            ReserveError::Exhausted {
                                window: Window::Budget,
                                ..
                            }
                        ),
                        "{e}"
                    );
                    break;
                }
            }
            assert!(granted <= 25, "overspent");
        }
        assert_eq!(granted, 25);
        let usage = client_usage(&ledger, "team", &budget).await;
        let b = usage.budget.unwrap();
        assert!((b.spent - 1.0).abs() < 1e-9 && b.remaining == 0.0, "{b:?}");
        assert!((usage.today.spend - 1.0).abs() < 1e-9);
    })
    .await;
}

#[tokio::test]
async fn commit_charges_what_was_produced_and_refund_counts_a_failure() {
    on_both_backends(midday, |ledger, _| async move {
        let l = limits(10, 100, Some(10.0));
        let r = ledger.reserve(request("team", &l, 4, 0.5)).await.unwrap();
        assert_eq!(r.images(), 4);
        let during = client_usage(&ledger, "team", &l).await;
        assert_eq!(
            (during.day.used, during.day.reserved, during.day.remaining),
            (0, 4, 6)
        );
        assert!((during.budget.as_ref().unwrap().reserved - 2.0).abs() < 1e-9);

        r.commit(1).await.unwrap();
        let r = ledger.reserve(request("team", &l, 4, 0.5)).await.unwrap();
        r.refund().await.unwrap();
        // More than held is charged too: usage follows what the client got.
        let r = ledger.reserve(request("team", &l, 1, 0.5)).await.unwrap();
        r.commit(2).await.unwrap();

        let after = client_usage(&ledger, "team", &l).await;
        assert_eq!((after.day.used, after.day.reserved), (3, 0));
        assert_eq!((after.month.used, after.month.reserved), (3, 0));
        assert_eq!(after.today.requests, 2);
        assert_eq!(after.today.images, 3);
        assert_eq!(after.today.failures, 1);
        assert!((after.today.spend - 1.5).abs() < 1e-9);
        let budget = after.budget.unwrap();
        assert!((budget.spent - 1.5).abs() < 1e-9 && budget.reserved == 0.0);
        assert_eq!(after.by_model_today.len(), 1);
        assert_eq!(after.by_model_today[0].model, MODEL);
        assert_eq!(after.daily.len(), 7);
        assert_eq!(after.daily[6].images, 3);
        assert_eq!(after.daily[6].day, "2026-11-25");
    })
    .await;
}

#[tokio::test]
async fn cached_images_are_counted_but_spend_no_quota() {
    on_both_backends(midday, |ledger, _| async move {
        let l = limits(1, 1, None);
        ledger.record_cached("team", MODEL, "1024x1024", "hd", 3);
        // Nobody waits for that write; the writer applies writes in order, so once a later
        // one is durable, so is it.
        ledger.check_writable().await.unwrap();
        let usage = client_usage(&ledger, "team", &l).await;
        assert_eq!((usage.today.cached, usage.day.used), (3, 0));
        let r = ledger.reserve(request("team", &l, 1, 0.0)).await.unwrap();
        r.commit(1).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn the_day_resets_at_utc_midnight_and_the_month_at_the_first() {
    let nov29_last_second = UtcDay::from_ymd(2026, 11, 30).start_secs() - 1;
    on_both_backends(
        || Arc::new(ManualClock::at_unix_secs(nov29_last_second)),
        |ledger, clock| async move {
            let l = limits(10, 15, None);
            let r = ledger.reserve(request("team", &l, 10, 0.0)).await.unwrap();
            r.commit(10).await.unwrap();
            let refused = ledger.reserve(request("team", &l, 1, 0.0)).await;
            match &refused {
                Err(ReserveError::Exhausted { resets_at, .. }) => {
                    assert_eq!(unix_secs(*resets_at), nov29_last_second + 1);
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(exhausted_window(refused), Window::Day);

            // 2026-11-30T00:00:00Z: a new day in the same month.
            clock.advance(Duration::from_secs(1));
            let r = ledger.reserve(request("team", &l, 5, 0.0)).await.unwrap();
            r.commit(5).await.unwrap();
            let refused = ledger.reserve(request("team", &l, 1, 0.0)).await;
            assert_eq!(exhausted_window(refused), Window::Month);

            // 2026-11-30T23:59:59Z: still November.
            let dec1 = UtcDay::from_ymd(2026, 12, 1).start_secs();
            clock.set(from_unix_secs(dec1 - 1));
            let refused = ledger.reserve(request("team", &l, 1, 0.0)).await;
            assert_eq!(exhausted_window(refused), Window::Month);

            // 2026-12-01T00:00:00Z: both windows start again.
            clock.advance(Duration::from_secs(1));
            let r = ledger.reserve(request("team", &l, 10, 0.0)).await.unwrap();
            r.commit(10).await.unwrap();
            let usage = client_usage(&ledger, "team", &l).await;
            assert_eq!(usage.day.window_start, "2026-12-01");
            assert_eq!(usage.month.window_start, "2026-12");
            assert_eq!((usage.day.used, usage.month.used), (10, 10));
            assert_eq!(usage.day.resets_at, u64::try_from(dec1 + 86_400).unwrap());
            // The daily history still shows November's days.
            let days: Vec<(&str, u64)> = usage
                .daily
                .iter()
                .map(|d| (d.day.as_str(), d.images))
                .collect();
            assert_eq!(
                &days[4..],
                &[("2026-11-29", 10), ("2026-11-30", 5), ("2026-12-01", 10)]
            );
        },
    )
    .await;
}

#[tokio::test]
async fn usage_survives_a_crash_and_pending_reservations_are_charged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imagegate.db");
    let l = limits(100, 1000, Some(100.0));
    {
        let ledger = Ledger::open(&sqlite_config(&path), midday()).await.unwrap();
        let r = ledger.reserve(request("team", &l, 2, 1.0)).await.unwrap();
        r.commit(2).await.unwrap();
        let in_flight = ledger.reserve(request("team", &l, 3, 1.0)).await.unwrap();
        // A crash: no close, and the in-flight request is never settled (dropping an unsettled
        // reservation leaves it pending, as a crash would).
        drop(in_flight);
        drop(ledger);
    }
    let ledger = Ledger::open(&sqlite_config(&path), midday()).await.unwrap();
    let usage = client_usage(&ledger, "team", &l).await;
    assert_eq!((usage.day.used, usage.day.reserved), (5, 0));
    assert_eq!(usage.month.used, 5);
    assert_eq!(usage.today.requests, 2);
    assert!((usage.budget.unwrap().spent - 5.0).abs() < 1e-9);
    // The quota counters were loaded too, not just the report rows.
    let r = ledger.reserve(request("team", &l, 95, 0.0)).await.unwrap();
    r.refund().await.unwrap();
    let refused = ledger.reserve(request("team", &l, 96, 0.0)).await;
    assert_eq!(exhausted_window(refused), Window::Day);
    ledger.close().await;
    // Closing ends the writer; dropping the last handle releases the file's lock.
    drop(ledger);

    // Opening again changes nothing: the pending row was settled exactly once.
    let ledger = Ledger::open(&sqlite_config(&path), midday()).await.unwrap();
    let usage = client_usage(&ledger, "team", &l).await;
    assert_eq!((usage.day.used, usage.today.failures), (5, 1));
    ledger.close().await;
}

#[tokio::test]
async fn a_report_from_the_file_reads_a_live_ledger_without_settling_it() {
    let clock = midday();
    let (ledger, _dir, path) = sqlite_ledger(clock.clone()).await;
    let l = limits(10, 100, None);
    let r = ledger.reserve(request("team", &l, 2, 0.0)).await.unwrap();
    r.commit(2).await.unwrap();
    let in_flight = ledger.reserve(request("team", &l, 3, 0.0)).await.unwrap();
    let clients = vec![
        ("team".to_owned(), l.clone()),
        ("other".to_owned(), l.clone()),
    ];

    let report = report_from_file(&path, &clients, Some("team"), 3, clock.now())
        .await
        .unwrap();
    assert_eq!(report.clients.len(), 1);
    let team = &report.clients[0];
    assert_eq!((team.day.used, team.day.reserved), (2, 3));
    assert_eq!(team.daily.len(), 3);
    assert_eq!(
        report,
        ledger.report(&clients, Some("team"), 3).await.unwrap()
    );

    // The live ledger still owns its reservation.
    in_flight.commit(1).await.unwrap();
    let usage = client_usage(&ledger, "team", &l).await;
    assert_eq!((usage.day.used, usage.day.reserved), (3, 0));
    ledger.close().await;

    let missing =
        report_from_file(&path.with_extension("nope"), &clients, None, 1, clock.now()).await;
    assert!(missing.is_err());
}

#[tokio::test]
async fn an_unsettled_reservation_dropped_stays_counted() {
    on_both_backends(midday, |ledger, _| async move {
        let l = limits(3, 100, None);
        drop(ledger.reserve(request("team", &l, 2, 0.0)).await.unwrap());
        let usage = client_usage(&ledger, "team", &l).await;
        assert_eq!(usage.day.reserved, 2);
        let refused = ledger.reserve(request("team", &l, 2, 0.0)).await;
        assert_eq!(exhausted_window(refused), Window::Day);
    })
    .await;
}

#[tokio::test]
async fn a_file_with_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imagegate.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 1000).unwrap();
    }
    let err = Ledger::open(&sqlite_config(&path), midday())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("newer than this build"), "{err}");
}

#[tokio::test]
async fn redis_is_refused_until_it_exists() {
    let config = StorageConfig {
        backend: StorageBackend::Redis,
        ..StorageConfig::default()
    };
    let err = Ledger::open(&config, midday()).await.unwrap_err();
    assert!(
        matches!(err, LedgerError::BackendNotBuilt("redis")),
        "{err}"
    );
}

#[tokio::test]
async fn a_failed_write_refuses_the_request_and_gives_the_quota_back() {
    let (ledger, _dir, path) = sqlite_ledger(midday()).await;
    let l = limits(1, 100, None);
    // Another connection makes every reservation insert fail, as a full disk would.
    let saboteur = rusqlite::Connection::open(&path).unwrap();
    saboteur
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON reservations
             BEGIN SELECT RAISE(ABORT, 'simulated write failure'); END;",
        )
        .unwrap();
    let err = ledger
        .reserve(request("team", &l, 1, 0.0))
        .await
        .unwrap_err();
    assert!(matches!(err, ReserveError::Unavailable(_)), "{err}");
    assert!(!err.client_message().contains("simulated"));
    let usage = client_usage(&ledger, "team", &l).await;
    assert_eq!((usage.day.used, usage.day.reserved), (0, 0));

    saboteur.execute_batch("DROP TRIGGER refuse").unwrap();
    // The one image of today's quota is still there.
    let r = ledger.reserve(request("team", &l, 1, 0.0)).await.unwrap();
    r.commit(1).await.unwrap();

    // A stopped writer refuses too, and again holds nothing.
    ledger.check_writable().await.unwrap();
    ledger.close().await;
    assert!(ledger.check_writable().await.is_err());
    let more = limits(10, 100, None);
    let err = ledger
        .reserve(request("team", &more, 1, 0.0))
        .await
        .unwrap_err();
    assert!(matches!(err, ReserveError::Unavailable(_)), "{err}");
    let usage = client_usage(&ledger, "team", &more).await;
    assert_eq!((usage.day.used, usage.day.reserved), (1, 0));
}

#[tokio::test]
async fn a_reserve_abandoned_mid_write_releases_its_hold_and_row() {
    let (ledger, _dir, path) = sqlite_ledger(midday()).await;
    let l = limits(1, 100, None);
    let mut cancelled = false;
    for _ in 0..20 {
        // Poll once (the write is queued), then drop, as a disconnecting client would.
        match ledger.reserve(request("team", &l, 1, 0.0)).now_or_never() {
            None => {
                cancelled = true;
                break;
            }
            Some(done) => done.unwrap().refund().await.unwrap(),
        }
    }
    assert!(
        cancelled,
        "the writer answered before the first poll every time"
    );
    let r = ledger.reserve(request("team", &l, 1, 0.0)).await.unwrap();
    r.commit(1).await.unwrap();
    ledger.close().await;
    drop(ledger);
    let ledger = Ledger::open(&sqlite_config(&path), midday()).await.unwrap();
    let usage = client_usage(&ledger, "team", &l).await;
    assert_eq!(
        usage.day.used, 1,
        "the abandoned reservation's row must be gone"
    );
    ledger.close().await;
}

#[tokio::test]
async fn report_lists_configured_clients_or_only_the_one_asked_for() {
    let ledger = Ledger::in_memory(midday());
    let l = limits(10, 100, None);
    let r = ledger.reserve(request("a", &l, 1, 0.0)).await.unwrap();
    r.commit(1).await.unwrap();
    let clients = vec![("a".to_owned(), l.clone()), ("b".to_owned(), l.clone())];
    let all = ledger.report(&clients, None, 1).await.unwrap();
    let names: Vec<&str> = all.clients.iter().map(|c| c.client.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(all.clients[1].day.used, 0);
    let only = ledger.report(&clients, Some("b"), 1).await.unwrap();
    assert_eq!(only.clients.len(), 1);
    assert!(
        ledger
            .report(&clients, Some("nobody"), 1)
            .await
            .unwrap()
            .clients
            .is_empty()
    );
    let json = serde_json::to_value(&all).unwrap();
    assert_eq!(json["clients"][0]["day"]["window_start"], "2026-11-25");
    assert!(json["clients"][0]["budget"].is_null());
}

#[tokio::test]
async fn exhausted_errors_name_the_window_limit_and_reset() {
    let ledger = Ledger::in_memory(midday());
    let l = limits(0, 100, None);
    let err = ledger.reserve(request("a", &l, 1, 0.0)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "day quota exhausted: 0 of 0 used, resets at 2026-11-26T00:00:00Z"
    );
    assert!(
        err.client_message().contains("daily quota of 0 images"),
        "{}",
        err.client_message()
    );
}

/// Not a timed assertion: prints the figure for `--nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_of_reserve_and_commit_on_a_file() {
    let (ledger, _dir, _) = sqlite_ledger(midday()).await;
    let l = Arc::new(limits(1_000_000, 1_000_000, Some(1e9)));
    const TOTAL: usize = 2_000;
    const TASKS: usize = 64;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for task in 0..TASKS {
        let ledger = ledger.clone();
        let l = Arc::clone(&l);
        let share = TOTAL / TASKS + usize::from(task < TOTAL % TASKS);
        set.spawn(async move {
            for _ in 0..share {
                let r = ledger.reserve(request("team", &l, 1, 0.02)).await.unwrap();
                r.commit(1).await.unwrap();
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.unwrap();
    }
    let elapsed = started.elapsed();
    println!(
        "ledger throughput: {TOTAL} reserve+commit pairs from {TASKS} tasks in {elapsed:?} ({:.0} pairs/s)",
        TOTAL as f64 / elapsed.as_secs_f64()
    );
    let usage = client_usage(&ledger, "team", &l).await;
    assert_eq!(usage.today.images, TOTAL as u64);
    ledger.close().await;
}

#[tokio::test]
async fn held_reservations_outlive_a_restart_for_their_holder_and_others_are_charged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imagegate.db");
    let l = limits(10, 100, None);
    {
        let ledger = Ledger::open(&sqlite_config(&path), midday()).await.unwrap();
        let held = ledger
            .reserve(ReserveRequest {
                holder: Some("task_a"),
                ..request("team", &l, 3, 1.0)
            })
            .await
            .unwrap();
        let plain = ledger.reserve(request("team", &l, 2, 1.0)).await.unwrap();
        // A crash with both in flight.
        drop((held, plain));
        drop(ledger);
    }
    let ledger = Ledger::open(&sqlite_config(&path), midday()).await.unwrap();
    let usage = client_usage(&ledger, "team", &l).await;
    assert_eq!(
        (usage.day.used, usage.day.reserved),
        (2, 3),
        "the plain hold is charged, the task's stays held"
    );
    assert_eq!(ledger.held(), vec!["task_a".to_owned()]);
    // Held quota still counts against the limit.
    let refused = ledger.reserve(request("team", &l, 6, 0.0)).await;
    assert_eq!(exhausted_window(refused), Window::Day);
    let r = ledger.take_held("task_a").expect("handed to its holder");
    assert!(ledger.take_held("task_a").is_none(), "only once");
    r.commit(1).await.unwrap();
    let usage = client_usage(&ledger, "team", &l).await;
    assert_eq!((usage.day.used, usage.day.reserved), (3, 0));
    ledger.close().await;
    drop(ledger);

    let ledger = Ledger::open(&sqlite_config(&path), midday()).await.unwrap();
    assert!(ledger.held().is_empty());
    let usage = client_usage(&ledger, "team", &l).await;
    assert_eq!((usage.day.used, usage.today.requests), (3, 2));
    ledger.close().await;
}

#[tokio::test]
async fn a_released_reservation_counts_nothing() {
    on_both_backends(midday, |ledger, _| async move {
        let l = limits(10, 100, Some(10.0));
        let r = ledger.reserve(request("team", &l, 4, 1.0)).await.unwrap();
        r.release().await.unwrap();
        let usage = client_usage(&ledger, "team", &l).await;
        assert_eq!((usage.day.used, usage.day.reserved), (0, 0));
        assert_eq!((usage.today.requests, usage.today.failures), (0, 0));
        assert!(usage.budget.unwrap().spent.abs() < 1e-9);
    })
    .await;
}

#[tokio::test]
async fn an_unwaited_commit_settles_at_once_and_is_durable_by_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imagegate.db");
    let l = limits(10, 100, Some(10.0));
    let ledger = Ledger::open(&sqlite_config(&path), midday()).await.unwrap();
    let r = ledger.reserve(request("team", &l, 4, 1.0)).await.unwrap();
    r.commit_unwaited(3);
    let usage = client_usage(&ledger, "team", &l).await;
    assert_eq!(
        (usage.day.used, usage.day.reserved),
        (3, 0),
        "the quota is settled before the write is durable"
    );
    ledger.close().await;
    drop(ledger);

    let ledger = Ledger::open(&sqlite_config(&path), midday()).await.unwrap();
    let usage = client_usage(&ledger, "team", &l).await;
    assert_eq!((usage.day.used, usage.today.requests), (3, 1));
    assert!((usage.budget.unwrap().spent - 3.0).abs() < 1e-9);
    ledger.close().await;
}

#[tokio::test]
async fn cached_counts_whose_write_failed_are_kept_and_written_by_the_next_one() {
    let (ledger, _dir, path) = sqlite_ledger(midday()).await;
    let l = limits(1, 1, None);
    // Another connection moves the table away, so the write carrying the counts fails.
    let other = rusqlite::Connection::open(&path).unwrap();
    other
        .execute_batch("ALTER TABLE usage_daily RENAME TO usage_daily_away")
        .unwrap();
    ledger.record_cached("team", MODEL, "1024x1024", "hd", 3);
    // The flush's transaction carries the counts' write: failed by the time it returns.
    ledger.check_writable().await.unwrap();
    other
        .execute_batch("ALTER TABLE usage_daily_away RENAME TO usage_daily")
        .unwrap();
    ledger.record_cached("team", MODEL, "1024x1024", "hd", 2);
    let usage = client_usage(&ledger, "team", &l).await;
    assert_eq!(
        usage.today.cached, 5,
        "the 3 of the failed write were put back, not lost"
    );
    ledger.close().await;
}
