//! Usage reports: the JSON of `/admin/usage` and the table `imagegate usage` prints.
//!
//! Owns the report's shape and how it is assembled from a store's rows and quota windows, so
//! every backend reports alike. It must not query storage itself: stores hand it rows.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::calendar::{UtcDay, unix_secs};
use super::quota::ClientQuota;
use super::store::UsageKey;
use super::{from_micros, to_micros};
use crate::config::ClientLimits;

/// Longest daily history a report carries; bounds the work a large `days` can ask for.
pub const MAX_REPORT_DAYS: u32 = 400;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    /// Unix seconds.
    pub generated_at: u64,
    pub clients: Vec<ClientUsage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientUsage {
    pub client: String,
    pub day: WindowUsage,
    pub month: WindowUsage,
    /// `None` when the client has no budget.
    pub budget: Option<BudgetUsage>,
    pub today: Counters,
    pub this_month: Counters,
    /// Today's usage per model, size and quality, sorted by those.
    pub by_model_today: Vec<ModelUsage>,
    /// The last `days` UTC days, oldest first, days without usage included as zeros.
    pub daily: Vec<DailyUsage>,
}

/// An image-count window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowUsage {
    /// `2026-11-25` for a day, `2026-11` for a month.
    pub window_start: String,
    /// Settled images.
    pub used: u64,
    /// Images held by reservations in flight.
    pub reserved: u64,
    pub limit: u64,
    /// `limit - used - reserved`, never below zero.
    pub remaining: u64,
    /// Unix seconds.
    pub resets_at: u64,
}

/// The monthly budget, in price units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetUsage {
    pub limit: f64,
    pub spent: f64,
    /// Held by reservations in flight.
    pub reserved: f64,
    pub remaining: f64,
}

/// What happened in a period. `requests` are generations that produced a result (committed
/// reservations), `failures` are refunded ones, `images` are images generated (and charged),
/// `cached` are images served from the cache (not charged).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub requests: u64,
    pub images: u64,
    pub cached: u64,
    pub failures: u64,
    pub spend: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelUsage {
    pub model: String,
    pub size: String,
    pub quality: String,
    pub requests: u64,
    pub images: u64,
    pub cached: u64,
    pub failures: u64,
    pub spend: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DailyUsage {
    /// `2026-11-25`.
    pub day: String,
    pub requests: u64,
    pub images: u64,
    pub cached: u64,
    pub failures: u64,
    pub spend: f64,
}

/// Counters as stored: spend in micro-units so sums are exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub requests: u64,
    pub images: u64,
    pub cached: u64,
    pub failures: u64,
    pub spend_micros: i64,
}

impl Tally {
    pub fn add(&mut self, other: &Tally) {
        self.requests = self.requests.saturating_add(other.requests);
        self.images = self.images.saturating_add(other.images);
        self.cached = self.cached.saturating_add(other.cached);
        self.failures = self.failures.saturating_add(other.failures);
        self.spend_micros = self.spend_micros.saturating_add(other.spend_micros);
    }

    fn counters(&self) -> Counters {
        Counters {
            requests: self.requests,
            images: self.images,
            cached: self.cached,
            failures: self.failures,
            spend: from_micros(self.spend_micros),
        }
    }
}

/// One stored usage row: a key on a day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub key: UsageKey,
    pub day: UtcDay,
    pub tally: Tally,
}

/// The first day a report over `days` days of history needs rows from (it also needs the
/// whole current month).
pub fn first_day_needed(today: UtcDay, days: u32) -> UtcDay {
    let history_start = today.minus_days(i64::from(days.clamp(1, MAX_REPORT_DAYS)) - 1);
    history_start.min(today.month().first_day())
}

/// Assembles a report. `quotas[i]` are the windows of `clients[i]`; `rows` may contain other
/// clients and days, which are ignored.
pub fn build(
    clients: &[(String, ClientLimits)],
    quotas: &[ClientQuota],
    rows: &[UsageRow],
    days: u32,
    now: SystemTime,
) -> UsageReport {
    let today = UtcDay::containing(now);
    let days = days.min(MAX_REPORT_DAYS);
    let mut out = Vec::with_capacity(clients.len());
    for ((client, limits), quota) in clients.iter().zip(quotas) {
        let mut today_tally = Tally::default();
        let mut month_tally = Tally::default();
        let mut by_model: BTreeMap<(&str, &str, &str), Tally> = BTreeMap::new();
        let mut by_day: BTreeMap<UtcDay, Tally> = BTreeMap::new();
        for row in rows.iter().filter(|r| &r.key.client == client) {
            if row.day == today {
                today_tally.add(&row.tally);
                by_model
                    .entry((&row.key.model, &row.key.size, &row.key.quality))
                    .or_default()
                    .add(&row.tally);
            }
            if row.day.month() == today.month() {
                month_tally.add(&row.tally);
            }
            by_day.entry(row.day).or_default().add(&row.tally);
        }
        let daily = (0..i64::from(days))
            .rev()
            .map(|back| {
                let day = today.minus_days(back);
                let t = by_day.get(&day).copied().unwrap_or_default();
                DailyUsage {
                    day: day.to_string(),
                    requests: t.requests,
                    images: t.images,
                    cached: t.cached,
                    failures: t.failures,
                    spend: from_micros(t.spend_micros),
                }
            })
            .collect();
        let by_model_today = by_model
            .into_iter()
            .map(|((model, size, quality), t)| ModelUsage {
                model: model.to_owned(),
                size: size.to_owned(),
                quality: quality.to_owned(),
                requests: t.requests,
                images: t.images,
                cached: t.cached,
                failures: t.failures,
                spend: from_micros(t.spend_micros),
            })
            .collect();
        out.push(ClientUsage {
            client: client.clone(),
            day: window(
                quota.day.to_string(),
                quota.day_images,
                quota.day_reserved,
                limits.images_per_day,
                quota.day.next().start_secs(),
            ),
            month: window(
                quota.month.to_string(),
                quota.month_images,
                quota.month_reserved,
                limits.images_per_month,
                quota.month.next().first_day().start_secs(),
            ),
            budget: limits.budget_per_month.map(|limit| {
                let left = to_micros(limit)
                    .saturating_sub(quota.month_spend_micros)
                    .saturating_sub(quota.month_reserved_micros);
                BudgetUsage {
                    limit,
                    spent: from_micros(quota.month_spend_micros),
                    reserved: from_micros(quota.month_reserved_micros),
                    remaining: from_micros(left.max(0)),
                }
            }),
            today: today_tally.counters(),
            this_month: month_tally.counters(),
            by_model_today,
            daily,
        });
    }
    UsageReport {
        generated_at: u64::try_from(unix_secs(now)).unwrap_or(0),
        clients: out,
    }
}

fn window(start: String, used: u64, reserved: u64, limit: u64, resets_at: i64) -> WindowUsage {
    WindowUsage {
        window_start: start,
        used,
        reserved,
        limit,
        remaining: limit.saturating_sub(used.saturating_add(reserved)),
        resets_at: u64::try_from(resets_at).unwrap_or(0),
    }
}

/// The report as an aligned plain-text table, one client per line. Images held by
/// reservations in flight show as `(+N)` after the settled count.
pub fn render_table(report: &UsageReport) -> String {
    let header = [
        "CLIENT", "DAY", "MONTH", "BUDGET", "REQUESTS", "IMAGES", "CACHED", "FAILURES",
    ];
    let mut lines: Vec<[String; 8]> = vec![header.map(String::from)];
    for c in &report.clients {
        let used = |w: &WindowUsage| {
            if w.reserved > 0 {
                format!("{}(+{})/{}", w.used, w.reserved, w.limit)
            } else {
                format!("{}/{}", w.used, w.limit)
            }
        };
        let budget = c.budget.as_ref().map_or_else(
            || "-".to_owned(),
            |b| format!("{:.2}/{:.2}", b.spent, b.limit),
        );
        lines.push([
            c.client.clone(),
            used(&c.day),
            used(&c.month),
            budget,
            c.today.requests.to_string(),
            c.today.images.to_string(),
            c.today.cached.to_string(),
            c.today.failures.to_string(),
        ]);
    }
    let mut widths = [0usize; 8];
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let mut row = String::new();
        for (i, (cell, width)) in line.iter().zip(widths).enumerate() {
            // Names left-aligned, numbers right-aligned, so digits line up.
            if i == 0 {
                let _ = write!(row, "{cell:<width$}");
            } else {
                let _ = write!(row, "  {cell:>width$}");
            }
        }
        out.push_str(row.trim_end());
        out.push('\n');
    }
    if report.clients.is_empty() {
        out.push_str("(no clients)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::calendar::from_unix_secs;

    fn row(client: &str, model: &str, day: UtcDay, images: u64, spend_micros: i64) -> UsageRow {
        UsageRow {
            key: UsageKey::new(client, model, "1024x1024", "standard"),
            day,
            tally: Tally {
                requests: 1,
                images,
                spend_micros,
                ..Tally::default()
            },
        }
    }

    #[test]
    fn report_sums_today_month_and_fills_missing_days_with_zeros() {
        let now = from_unix_secs(UtcDay::from_ymd(2026, 11, 25).start_secs() + 3600);
        let today = UtcDay::containing(now);
        let limits = ClientLimits {
            images_per_day: 10,
            budget_per_month: Some(2.0),
            ..ClientLimits::default()
        };
        let rows = vec![
            row("a", "m2", today, 2, 80_000),
            row("a", "m1", today, 1, 40_000),
            row("a", "m1", today.minus_days(2), 3, 120_000),
            row("a", "m1", UtcDay::from_ymd(2026, 10, 31), 5, 0),
            row("b", "m1", today, 7, 0),
        ];
        let quota = ClientQuota {
            day: today,
            day_images: 3,
            day_reserved: 4,
            month: today.month(),
            month_images: 6,
            month_reserved: 4,
            month_spend_micros: 240_000,
            month_reserved_micros: 160_000,
        };
        let clients = vec![("a".to_owned(), limits)];
        let report = build(&clients, &[quota], &rows, 3, now);
        let a = &report.clients[0];
        assert_eq!(a.today.images, 3);
        assert_eq!(a.this_month.images, 6);
        assert!((a.this_month.spend - 0.24).abs() < 1e-9);
        assert_eq!(a.by_model_today.len(), 2);
        assert_eq!(a.by_model_today[0].model, "m1");
        let days: Vec<(&str, u64)> = a.daily.iter().map(|d| (d.day.as_str(), d.images)).collect();
        assert_eq!(
            days,
            vec![("2026-11-23", 3), ("2026-11-24", 0), ("2026-11-25", 3)]
        );
        assert_eq!(a.day.window_start, "2026-11-25");
        assert_eq!(a.day.remaining, 3);
        assert_eq!(a.month.window_start, "2026-11");
        let budget = a.budget.as_ref().unwrap();
        assert!((budget.remaining - 1.6).abs() < 1e-9);

        let table = render_table(&report);
        assert!(table.contains("3(+4)/10"), "{table}");
        assert!(table.contains("0.24/2.00"), "{table}");
        // The last column is right-aligned, so aligned lines all have the same length.
        let lengths: Vec<usize> = table.lines().map(str::len).collect();
        assert!(lengths.iter().all(|&l| l == lengths[0]), "{table}");
    }
}
