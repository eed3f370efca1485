//! In-process quota counters: per client, the current UTC day and month, what is settled
//! there and what is held by pending reservations.
//!
//! Quota decisions for the embedded backends are made here, against memory, under one lock:
//! the check and the hold are one step, which is what makes concurrent reservations exact.
//! This type is plain data: it must not do I/O, and the caller must not hold its lock across
//! an `.await`.

use std::collections::HashMap;

use super::calendar::{UtcDay, UtcMonth, from_unix_secs};
use super::{ReserveError, Window, from_micros, to_micros};
use crate::config::ClientLimits;

/// One client's current windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientQuota {
    pub day: UtcDay,
    /// Settled images of `day`.
    pub day_images: u64,
    /// Images held by pending reservations made on `day`.
    pub day_reserved: u64,
    pub month: UtcMonth,
    pub month_images: u64,
    pub month_reserved: u64,
    pub month_spend_micros: i64,
    pub month_reserved_micros: i64,
}

impl ClientQuota {
    fn empty(today: UtcDay) -> ClientQuota {
        ClientQuota {
            day: today,
            day_images: 0,
            day_reserved: 0,
            month: today.month(),
            month_images: 0,
            month_reserved: 0,
            month_spend_micros: 0,
            month_reserved_micros: 0,
        }
    }

    /// Moves each window forward to the one containing `today`, starting it empty. Never
    /// backward: a clock stepped back must not reopen a window already left (its usage
    /// would be forgotten).
    ///
    /// Holds made in an earlier window leave with it: when they settle, their usage lands in
    /// their own window, not the current one (see [`Quotas::settle`]).
    fn roll(&mut self, today: UtcDay) {
        if today > self.day {
            self.day = today;
            self.day_images = 0;
            self.day_reserved = 0;
        }
        let month = today.month();
        if month > self.month {
            self.month = month;
            self.month_images = 0;
            self.month_reserved = 0;
            self.month_spend_micros = 0;
            self.month_reserved_micros = 0;
        }
    }
}

/// Every client's windows. Clients appear on first use.
#[derive(Debug, Default)]
pub struct Quotas {
    clients: HashMap<String, ClientQuota>,
}

impl Quotas {
    fn entry(&mut self, client: &str, today: UtcDay) -> &mut ClientQuota {
        let quota = self
            .clients
            .entry(client.to_owned())
            .or_insert_with(|| ClientQuota::empty(today));
        quota.roll(today);
        quota
    }

    /// Adds settled usage read from storage at start-up; rows outside `today`'s month are
    /// ignored.
    pub fn load(&mut self, client: &str, today: UtcDay, day: UtcDay, images: u64, spend: i64) {
        if day.month() != today.month() {
            return;
        }
        let quota = self.entry(client, today);
        if day == quota.day {
            quota.day_images = quota.day_images.saturating_add(images);
        }
        quota.month_images = quota.month_images.saturating_add(images);
        quota.month_spend_micros = quota.month_spend_micros.saturating_add(spend);
    }

    /// Adds a pending hold read from storage (a report from another process's file);
    /// holds outside `today`'s month are ignored.
    pub fn load_pending(
        &mut self,
        client: &str,
        today: UtcDay,
        day: UtcDay,
        images: u64,
        cost_micros: i64,
    ) {
        if day.month() != today.month() {
            return;
        }
        let quota = self.entry(client, today);
        if day == quota.day {
            quota.day_reserved = quota.day_reserved.saturating_add(images);
        }
        quota.month_reserved = quota.month_reserved.saturating_add(images);
        quota.month_reserved_micros = quota.month_reserved_micros.saturating_add(cost_micros);
    }

    /// Checks day, month and budget (in that order) and, if all have room, holds `images`
    /// and `cost_micros`. Returns the day the hold counts in.
    pub fn try_reserve(
        &mut self,
        client: &str,
        limits: &ClientLimits,
        images: u32,
        cost_micros: i64,
        today: UtcDay,
    ) -> Result<UtcDay, ReserveError> {
        let quota = self.entry(client, today);
        let wanted = u64::from(images);
        let day_taken = quota.day_images.saturating_add(quota.day_reserved);
        if day_taken.saturating_add(wanted) > limits.images_per_day {
            return Err(ReserveError::Exhausted {
                window: Window::Day,
                limit: limits.images_per_day as f64,
                used: day_taken as f64,
                resets_at: from_unix_secs(quota.day.next().start_secs()),
            });
        }
        let month_resets_at = from_unix_secs(quota.month.next().first_day().start_secs());
        let month_taken = quota.month_images.saturating_add(quota.month_reserved);
        if month_taken.saturating_add(wanted) > limits.images_per_month {
            return Err(ReserveError::Exhausted {
                window: Window::Month,
                limit: limits.images_per_month as f64,
                used: month_taken as f64,
                resets_at: month_resets_at,
            });
        }
        if let Some(budget) = limits.budget_per_month {
            let spent = quota
                .month_spend_micros
                .saturating_add(quota.month_reserved_micros);
            if spent.saturating_add(cost_micros) > to_micros(budget) {
                return Err(ReserveError::Exhausted {
                    window: Window::Budget,
                    limit: budget,
                    used: from_micros(spent),
                    resets_at: month_resets_at,
                });
            }
        }
        quota.day_reserved += wanted;
        quota.month_reserved += wanted;
        quota.month_reserved_micros = quota.month_reserved_micros.saturating_add(cost_micros);
        Ok(quota.day)
    }

    /// Ends a hold made on `day` of `held` images and `held_micros`, charging `charged`
    /// images and `charged_micros` (zero for a refund or an undone hold). A window that has
    /// rolled over since is left alone: the hold left with it.
    pub fn settle(
        &mut self,
        client: &str,
        day: UtcDay,
        (held, held_micros): (u32, i64),
        (charged, charged_micros): (u64, i64),
    ) {
        let Some(quota) = self.clients.get_mut(client) else {
            return;
        };
        let held = u64::from(held);
        if quota.day == day {
            quota.day_reserved = quota.day_reserved.saturating_sub(held);
            quota.day_images = quota.day_images.saturating_add(charged);
        }
        if quota.month == day.month() {
            quota.month_reserved = quota.month_reserved.saturating_sub(held);
            quota.month_images = quota.month_images.saturating_add(charged);
            quota.month_reserved_micros = quota.month_reserved_micros.saturating_sub(held_micros);
            quota.month_spend_micros = quota.month_spend_micros.saturating_add(charged_micros);
        }
    }

    /// The client's windows as of `today` (empty for a client never seen).
    pub fn view(&self, client: &str, today: UtcDay) -> ClientQuota {
        let mut quota = self
            .clients
            .get(client)
            .copied()
            .unwrap_or_else(|| ClientQuota::empty(today));
        quota.roll(today);
        quota
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(day: u64, month: u64, budget: Option<f64>) -> ClientLimits {
        ClientLimits {
            images_per_day: day,
            images_per_month: month,
            budget_per_month: budget,
            ..ClientLimits::default()
        }
    }

    fn window_of(err: ReserveError) -> Window {
        match err {
            ReserveError::Exhausted { window, .. } => window,
            other => panic!("expected Exhausted, got {other}"),
        }
    }

    #[test]
    fn holds_count_until_settled_and_release_the_unused_part() {
        let today = UtcDay::from_ymd(2026, 11, 25);
        let mut q = Quotas::default();
        let l = limits(10, 100, None);
        let day = q.try_reserve("a", &l, 4, 0, today).unwrap();
        q.try_reserve("a", &l, 4, 0, today).unwrap();
        assert_eq!(
            window_of(q.try_reserve("a", &l, 4, 0, today).unwrap_err()),
            Window::Day
        );
        q.settle("a", day, (4, 0), (1, 0));
        let v = q.view("a", today);
        assert_eq!((v.day_images, v.day_reserved), (1, 4));
        q.try_reserve("a", &l, 4, 0, today).unwrap();
        assert_eq!(q.view("b", today).day_images, 0);
    }

    #[test]
    fn budget_is_checked_in_micros() {
        let today = UtcDay::from_ymd(2026, 11, 25);
        let mut q = Quotas::default();
        let l = limits(1000, 1000, Some(1.0));
        let unit = to_micros(0.04);
        let granted = (0..30)
            .filter(|_| q.try_reserve("a", &l, 1, unit, today).is_ok())
            .count();
        assert_eq!(granted, 25);
        let err = q.try_reserve("a", &l, 1, unit, today).unwrap_err();
        assert!(
            matches!(err, ReserveError::Exhausted { window: Window::Budget, used, .. } if (used - 1.0).abs() < 1e-9)
        );
    }

    #[test]
    fn a_hold_settled_after_its_day_ended_does_not_touch_the_new_day() {
        let nov30 = UtcDay::from_ymd(2026, 11, 30);
        let mut q = Quotas::default();
        let l = limits(5, 100, None);
        let day = q.try_reserve("a", &l, 5, 0, nov30).unwrap();
        q.try_reserve("a", &l, 5, 0, nov30.next()).unwrap();
        q.settle("a", day, (5, 0), (5, 0));
        let v = q.view("a", nov30.next());
        assert_eq!((v.day_images, v.day_reserved), (0, 5));
        // Dec 1st is a new month too: the November hold left with November.
        assert_eq!((v.month_images, v.month_reserved), (0, 5));
    }

    #[test]
    fn a_clock_stepping_back_keeps_the_later_window() {
        let today = UtcDay::from_ymd(2026, 11, 25);
        let mut q = Quotas::default();
        let l = limits(1, 100, None);
        q.try_reserve("a", &l, 1, 0, today).unwrap();
        let err = q
            .try_reserve("a", &l, 1, 0, today.minus_days(1))
            .unwrap_err();
        assert_eq!(window_of(err), Window::Day);
    }
}
