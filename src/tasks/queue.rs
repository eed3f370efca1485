//! The bounded queue of tasks waiting for a worker, served round-robin across clients so one
//! client's batch of thousands cannot make everyone else's single task wait behind it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// Waiting items per client, and whose turn is next.
struct State<T> {
    per_client: HashMap<String, VecDeque<T>>,
    /// Clients with waiting items, in the order they are served next.
    turn: VecDeque<String>,
    len: usize,
    /// Places promised to submissions that have not pushed yet.
    promised: usize,
    closed: bool,
}

pub struct FairQueue<T> {
    state: Mutex<State<T>>,
    ready: Notify,
    capacity: usize,
}

/// A place in the queue, taken before the work of a submission (quota, storage) so that a full
/// queue refuses the request before anything is spent. Given back when dropped unused.
pub struct Place<'a, T> {
    queue: &'a FairQueue<T>,
    used: bool,
}

impl<T> Drop for Place<'_, T> {
    fn drop(&mut self) {
        if !self.used {
            self.queue.lock().promised -= 1;
        }
    }
}

impl<T> FairQueue<T> {
    pub fn new(capacity: usize) -> FairQueue<T> {
        FairQueue {
            state: Mutex::new(State {
                per_client: HashMap::new(),
                turn: VecDeque::new(),
                len: 0,
                promised: 0,
                closed: false,
            }),
            ready: Notify::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every change is a few field updates that cannot panic half-way.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for one more item, or `None` when the queue is full or closed.
    pub fn reserve(&self) -> Option<Place<'_, T>> {
        let mut st = self.lock();
        if st.closed || st.len + st.promised >= self.capacity {
            return None;
        }
        st.promised += 1;
        Some(Place {
            queue: self,
            used: false,
        })
    }

    /// Queues `item` in the place taken for it.
    pub fn push(&self, mut place: Place<'_, T>, client: &str, item: T) {
        place.used = true;
        let mut st = self.lock();
        st.promised -= 1;
        Self::append(&mut st, client, item);
        drop(st);
        self.ready.notify_one();
    }

    /// Queues `item` beyond the bound: for tasks admitted before a restart, which were
    /// promised to their clients already.
    pub fn push_admitted(&self, client: &str, item: T) {
        Self::append(&mut self.lock(), client, item);
        self.ready.notify_one();
    }

    fn append(st: &mut State<T>, client: &str, item: T) {
        let queue = st.per_client.entry(client.to_owned()).or_default();
        if queue.is_empty() {
            st.turn.push_back(client.to_owned());
        }
        queue.push_back(item);
        st.len += 1;
    }

    fn try_pop(&self) -> Result<Option<T>, Closed> {
        let mut st = self.lock();
        if st.closed {
            return Err(Closed);
        }
        let Some(client) = st.turn.pop_front() else {
            return Ok(None);
        };
        let State {
            per_client, turn, ..
        } = &mut *st;
        let Some(queue) = per_client.get_mut(&client) else {
            return Ok(None);
        };
        let item = queue.pop_front();
        if queue.is_empty() {
            per_client.remove(&client);
        } else {
            // Still has work: back of the line behind every other waiting client.
            turn.push_back(client);
        }
        if item.is_some() {
            st.len -= 1;
        }
        Ok(item)
    }

    /// The next item in round-robin order across clients; waits while the queue is empty.
    /// `None` once the queue is closed.
    pub async fn pop(&self) -> Option<T> {
        loop {
            // Registered before looking, so a push between the look and the wait is not lost.
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_pop() {
                Ok(Some(item)) => return Some(item),
                Ok(None) => notified.await,
                Err(Closed) => return None,
            }
        }
    }

    /// Items waiting now.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Stops serving: every waiting `pop` returns `None`, and the items still queued are handed
    /// back (to be left durable for the next start).
    pub fn close(&self) -> Vec<T> {
        let mut st = self.lock();
        st.closed = true;
        st.turn.clear();
        st.len = 0;
        let items = st.per_client.drain().flat_map(|(_, q)| q).collect();
        drop(st);
        self.ready.notify_waiters();
        items
    }
}

struct Closed;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_take_turns_whatever_order_they_arrived_in() {
        let queue = FairQueue::new(100);
        for i in 0..5 {
            queue.push(queue.reserve().unwrap(), "batch", format!("batch-{i}"));
        }
        queue.push(queue.reserve().unwrap(), "single", "single-0".to_owned());
        let order: Vec<String> = std::iter::from_fn(|| queue.try_pop().ok().flatten()).collect();
        assert_eq!(
            order,
            [
                "batch-0", "single-0", "batch-1", "batch-2", "batch-3", "batch-4"
            ]
        );
    }

    #[test]
    fn the_bound_counts_promised_places_and_unused_places_come_back() {
        let queue: FairQueue<u32> = FairQueue::new(2);
        let a = queue.reserve().unwrap();
        let b = queue.reserve().unwrap();
        assert!(queue.reserve().is_none(), "two promised places fill it");
        drop(b);
        let c = queue.reserve().expect("an unused place is given back");
        queue.push(a, "x", 1);
        queue.push(c, "x", 2);
        assert!(queue.reserve().is_none());
        queue.push_admitted("y", 3);
        assert_eq!(queue.len(), 3, "resumed tasks may go beyond the bound");
    }

    #[tokio::test]
    async fn pop_waits_for_a_push_and_close_releases_waiters() {
        let queue = std::sync::Arc::new(FairQueue::new(10));
        let waiter = tokio::spawn({
            let queue = std::sync::Arc::clone(&queue);
            async move { queue.pop().await }
        });
        tokio::task::yield_now().await;
        queue.push(queue.reserve().unwrap(), "x", 7);
        assert_eq!(waiter.await.unwrap(), Some(7));

        let waiter = tokio::spawn({
            let queue = std::sync::Arc::clone(&queue);
            async move { queue.pop().await }
        });
        queue.push_admitted("x", 8);
        queue.push_admitted("x", 9);
        let first = waiter.await.unwrap();
        let left = queue.close();
        assert_eq!(first, Some(8));
        assert_eq!(left, vec![9], "what was still queued is handed back");
        assert_eq!(queue.pop().await, None);
        assert!(queue.reserve().is_none(), "a closed queue takes nothing");
    }
}
