//! Async tasks (`"async": true`): the durable task record, the bounded fair queue and its
//! workers, native-mode pollers, resuming after a restart, expiry, and the task bodies clients
//! poll with `GET /v1/tasks/{id}`.
//!
//! Life of a task: the pipeline ([`crate::generate::submit`]) validates, rate-limits and
//! reserves quota exactly as for a sync request, with the reservation held by the task id, then
//! [`Tasks::insert`]s a durable `queued` row and queues a [`Job`]. A worker
//! ([`crate::generate::run_task`]) marks it `processing` and runs the normal pipeline (cache,
//! upstream keys and retries), or in native mode submits it to the upstream's own async API
//! and hands it to one poller per task. [`Tasks::complete`] / [`Tasks::fail`] record the
//! outcome first and settle the reservation second, so a crash between the two is settled
//! right by [`Tasks::resume`] at the next start: a held reservation whose task completed is
//! charged, one whose task failed or never got a row is refunded, and one whose task is still
//! pending goes back to it.
//!
//! Restart: queued tasks are queued again; processing ones are run again (gateway mode; the
//! client is charged once, the upstream may have been called twice) or polled again (native
//! mode). A gateway-mode task interrupted [`MAX_ATTEMPTS`] times fails with a clear error
//! instead of crash-looping. Graceful shutdown leaves queued tasks in the store.
//!
//! This module owns task state and its storage ([`store`]); it must not speak HTTP (the API
//! renders [`TaskView`]s) nor decide quotas (the ledger does).

mod queue;
pub mod store;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Gateway;
use crate::config::TasksConfig;
use crate::error::ApiError;
use crate::storage::StorageError;
use crate::telemetry::metrics::{Metrics, TaskGauges, TaskStateLabels};
use crate::upstream::{NativeStatus, UpstreamResponse};
use crate::usage::QuotaReservation;
use crate::validate::ValidRequest;
pub use queue::Place;
pub use store::{Finish, Inserted, LocalTaskStore, NativeRef, TaskRecord, TaskStore};

/// A gateway-mode task interrupted this many times (crashes mid-run) fails instead of running
/// again: something about it may be what crashes the process.
pub const MAX_ATTEMPTS: u32 = 3;
/// The polling hint of pending task bodies (`Retry-After`).
pub const POLL_HINT: Duration = Duration::from_secs(2);
/// First wait of a native poller; it grows by half each poll up to [`NATIVE_POLL_MAX`].
const NATIVE_POLL_FIRST: Duration = Duration::from_millis(500);
const NATIVE_POLL_MAX: Duration = Duration::from_secs(5);
/// How often expired tasks are deleted.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// What a processing task's progress estimate assumes before any task has finished.
const FIRST_EXPECTED: Duration = Duration::from_secs(20);

/// A task id: `task_` and 32 hex digits of 128 random bits (SPEC §2 asks for ≥ 122).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskId(Arc<str>);

impl TaskId {
    pub fn generate() -> TaskId {
        TaskId(Arc::from(format!("task_{:032x}", rand::random::<u128>())))
    }

    /// An id in the form [`generate`](TaskId::generate) makes; anything else cannot name a task.
    pub fn parse(text: &str) -> Option<TaskId> {
        let hex = text.strip_prefix("task_")?;
        (hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| TaskId(Arc::from(text)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Queued,
    Processing,
    Completed,
    Failed,
}

impl TaskState {
    pub const ALL: [TaskState; 4] = [
        TaskState::Queued,
        TaskState::Processing,
        TaskState::Completed,
        TaskState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Processing => "processing",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_finished(self) -> bool {
        matches!(self, TaskState::Completed | TaskState::Failed)
    }
}

/// A task on its way through a worker: its record and the quota it holds.
pub struct Job {
    pub record: TaskRecord,
    /// `None` only if the reservation could not be found after a restart (logged).
    pub reservation: Option<QuotaReservation>,
    /// When it was queued, for the time-queued metric.
    pub queued_at: Instant,
}

/// What a processing task shows as progress.
#[derive(Debug, Clone, Copy)]
struct Live {
    started: Instant,
    /// Native mode: progress is what the upstream reports, never an estimate (an estimate
    /// followed by a lower reported figure would make progress go backwards).
    native: bool,
    /// Reported by the upstream (native mode).
    reported: Option<u8>,
}

/// The task service: store, queue, workers and pollers.
pub struct Tasks {
    store: Arc<dyn TaskStore>,
    config: TasksConfig,
    queue: queue::FairQueue<Job>,
    live: Mutex<HashMap<TaskId, Live>>,
    /// Moving average of how long gateway-mode tasks take, for their progress estimate.
    expected: Mutex<Duration>,
    /// Workers, pollers and the sweeper.
    tracker: TaskTracker,
    /// Stops workers taking jobs and pollers polling (shutdown).
    stop: CancellationToken,
    started: AtomicBool,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for Tasks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tasks")
            .field("queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}

/// The Unix second at which a task finished at `finished` stops being served.
///
/// Rounded up, so a task is served for at least `ttl_secs`: rounding the finish down to its
/// second instead would let a task that finished at x.95 vanish 50 ms later when the ttl is 1 s.
pub fn expiry(finished: SystemTime, ttl_secs: u64) -> i64 {
    let since_epoch = finished.duration_since(UNIX_EPOCH).unwrap_or_default();
    let whole = since_epoch.as_secs().saturating_add(ttl_secs);
    let rounded_up = whole.saturating_add(u64::from(since_epoch.subsec_nanos() > 0));
    i64::try_from(rounded_up).unwrap_or(i64::MAX)
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    unix_secs(SystemTime::now())
}

fn unix_secs(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Tasks {
    pub fn new(store: Arc<dyn TaskStore>, config: TasksConfig, metrics: Arc<Metrics>) -> Tasks {
        Tasks {
            store,
            queue: queue::FairQueue::new(config.max_queued),
            config,
            live: Mutex::default(),
            expected: Mutex::new(FIRST_EXPECTED),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
            started: AtomicBool::new(false),
            metrics,
        }
    }

    /// A place in the queue for a new task, or `None` when `tasks.max_queued` are waiting.
    pub fn reserve_place(&self) -> Option<Place<'_, Job>> {
        self.queue.reserve()
    }

    /// How long a refused submitter should wait: about until the queue has moved by one
    /// round of workers (a task's expected run), at least a second, at most five minutes.
    pub fn retry_hint(&self) -> Duration {
        let expected = *self.expected.lock().unwrap_or_else(PoisonError::into_inner);
        expected.clamp(Duration::from_secs(1), Duration::from_secs(300))
    }

    pub async fn find_idempotent(
        &self,
        client: &str,
        key: &str,
    ) -> Result<Option<TaskRecord>, StorageError> {
        self.store.find_idempotent(client, key).await
    }

    /// Records a new queued task (durable when it returns `Ok(Created)`).
    pub async fn insert(&self, record: TaskRecord) -> Result<Inserted, StorageError> {
        self.store.insert(record).await
    }

    /// Queues a job in the place taken for it.
    pub fn enqueue(&self, place: Place<'_, Job>, job: Job) {
        let client = job.record.client.clone();
        self.queue.push(place, &client, job);
    }

    /// Starts `tasks.workers` workers, resumes what an earlier run left pending, and starts
    /// the sweeper. Call once, after the gateway is built.
    pub async fn start(gateway: &Arc<Gateway>) -> Result<(), StorageError> {
        let tasks = &gateway.tasks;
        if tasks.started.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        tasks.resume(gateway).await?;
        for _ in 0..tasks.config.workers.max(1) {
            let gateway = Arc::clone(gateway);
            tasks.tracker.spawn(async move {
                while let Some(job) = gateway.tasks.queue.pop().await {
                    crate::generate::run_task(&gateway, job).await;
                }
            });
        }
        let sweeper = Arc::clone(gateway);
        tasks.tracker.spawn(async move {
            let tasks = &sweeper.tasks;
            loop {
                tasks.remove_expired().await;
                tokio::select! {
                    () = tasks.stop.cancelled() => break,
                    () = tokio::time::sleep(SWEEP_EVERY) => {}
                }
            }
        });
        Ok(())
    }

    /// Picks up where an earlier run stopped; see the module docs.
    async fn resume(&self, gateway: &Arc<Gateway>) -> Result<(), StorageError> {
        let ledger = &gateway.ledger;
        let pending = self.store.pending().await?;
        let (mut queued, mut polling, mut failed) = (0, 0, 0);
        for record in pending {
            let reservation = ledger.take_held(record.id.as_str());
            if reservation.is_none() {
                tracing::warn!(task = %record.id, "resumed task has no quota reservation on record; its images will not be counted");
            }
            let job = Job {
                record,
                reservation,
                queued_at: Instant::now(),
            };
            let record = &job.record;
            if record.state == TaskState::Processing
                && record.native.is_none()
                && record.attempts >= MAX_ATTEMPTS
            {
                failed += 1;
                let error = ApiError::internal_task_interrupted();
                self.fail(job, &error).await;
                continue;
            }
            // Native tasks already running upstream go through a worker too: it re-validates
            // the request against the current config and hands the task to a poller.
            if record.native.is_some() {
                polling += 1;
            } else {
                queued += 1;
            }
            let client = job.record.client.clone();
            self.queue.push_admitted(&client, job);
        }
        // Holds whose task is finished or was never recorded (a crash between the
        // reservation and the task row: the client never got a task id).
        let mut settled = 0;
        for holder in ledger.held() {
            let Some(reservation) = ledger.take_held(&holder) else {
                continue;
            };
            settled += 1;
            let task = self.store.get(&holder).await?;
            let result = match task {
                Some(task) if task.state == TaskState::Completed => {
                    let images = task.images.unwrap_or_else(|| reservation.images());
                    reservation.commit(images).await
                }
                _ => reservation.refund().await,
            };
            if let Err(e) = result {
                tracing::error!(task = %holder, error = %e, "could not settle a task's reservation");
            }
        }
        if queued + polling + failed + settled > 0 {
            tracing::info!(
                queued,
                polling,
                failed,
                settled,
                "resumed async tasks left by the previous run"
            );
        }
        Ok(())
    }

    /// Marks a job's task as running (durable), and returns its attempt count.
    pub async fn start_job(&self, job: &Job) -> Result<u32, StorageError> {
        self.metrics
            .task_wait
            .observe(job.queued_at.elapsed().as_secs_f64());
        let attempts = self.store.start(&job.record.id, unix_now()).await?;
        self.live_set(
            &job.record.id,
            Live {
                started: Instant::now(),
                native: job.record.mode == crate::config::TaskMode::Native,
                reported: None,
            },
        );
        Ok(attempts)
    }

    /// Remembers where a native task lives upstream (durable), so polling survives restarts.
    pub async fn set_native(&self, job: &mut Job, native: NativeRef) -> Result<(), StorageError> {
        self.store.set_native(&job.record.id, &native).await?;
        job.record.native = Some(native);
        Ok(())
    }

    fn live_set(&self, id: &TaskId, live: Live) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), live);
    }

    fn live_remove(&self, id: &TaskId) -> Option<Live> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)
    }

    /// The finish time to record (Unix seconds) and when the task expires: see [`expiry`].
    /// One clock reading for both, so they are never a second further apart than the ttl.
    fn finish_times(&self) -> (i64, i64) {
        let now = SystemTime::now();
        (unix_secs(now), expiry(now, self.config.ttl_secs))
    }

    /// Records a completed task, then charges its reservation with the images produced, or,
    /// when the answer came from the cache, releases it and counts the images as cached.
    pub async fn complete(
        &self,
        job: Job,
        request: &ValidRequest,
        response: &UpstreamResponse,
        from_cache: bool,
        gateway: &Gateway,
    ) {
        let (now, expires_at) = self.finish_times();
        let images = u32::try_from(response.images).unwrap_or(u32::MAX);
        let finish = Finish::Completed {
            body: without_task_fields(&response.body),
            images,
        };
        self.finished(&job, TaskState::Completed);
        if let Err(e) = self
            .store
            .finish(&job.record.id, finish, now, expires_at)
            .await
        {
            // The images exist but the task cannot show them. Its reservation stays pending
            // for the task, which resumes at the next start and runs again.
            tracing::error!(task = %job.record.id, error = %e, "could not record a completed task");
            return;
        }
        let Some(reservation) = job.reservation else {
            return;
        };
        let client = job.record.client.as_str();
        let settled = if from_cache {
            let released = reservation.release().await;
            gateway.ledger.record_cached(
                client,
                request.model.name(),
                &request.size,
                &request.quality,
                images,
            );
            released
        } else {
            gateway.metrics.count_images(client, request, images);
            reservation.commit(images).await
        };
        if let Err(e) = settled {
            tracing::error!(task = %job.record.id, error = %e, "usage of a completed task not recorded; charged on restart");
        }
    }

    /// Records a failed task with `error` as its OpenAI-shaped error, then refunds it.
    pub async fn fail(&self, job: Job, error: &ApiError) {
        let (now, expires_at) = self.finish_times();
        let text = serde_json::to_string(&error.body()).unwrap_or_else(|_| {
            r#"{"message":"The task failed.","type":"server_error","param":null,"code":null}"#
                .to_owned()
        });
        self.finished(&job, TaskState::Failed);
        if let Err(e) = self
            .store
            .finish(
                &job.record.id,
                Finish::Failed { error: text },
                now,
                expires_at,
            )
            .await
        {
            tracing::error!(task = %job.record.id, error = %e, "could not record a failed task");
            return;
        }
        if let Some(reservation) = job.reservation
            && let Err(e) = reservation.refund().await
        {
            tracing::error!(task = %job.record.id, error = %e, "refund of a failed task not recorded");
        }
    }

    /// Bookkeeping common to both endings: progress estimate and live state.
    fn finished(&self, job: &Job, state: TaskState) {
        self.metrics
            .task_duration
            .observe(job.queued_at.elapsed().as_secs_f64());
        self.metrics
            .tasks_finished
            .get_or_create(&TaskStateLabels {
                state: state.as_str(),
            })
            .inc();
        if let Some(live) = self.live_remove(&job.record.id)
            && job.record.native.is_none()
        {
            let took = live.started.elapsed();
            let mut expected = self.expected.lock().unwrap_or_else(PoisonError::into_inner);
            // An exponential moving average: recent tasks say most about the next ones.
            *expected = expected.mul_f64(0.8) + took.mul_f64(0.2);
        }
    }

    /// Polls a native task until it ends, with growing waits; one poller per task however often
    /// its client polls imagegate.
    pub fn spawn_poller(
        &self,
        gateway: &Arc<Gateway>,
        job: Job,
        request: ValidRequest,
        native: NativeRef,
    ) {
        self.live_set(
            &job.record.id,
            Live {
                started: Instant::now(),
                native: true,
                reported: None,
            },
        );
        let gateway = Arc::clone(gateway);
        self.tracker.spawn(async move {
            let tasks = &gateway.tasks;
            let deadline = Instant::now() + Duration::from_secs(tasks.config.native_timeout_secs);
            let mut wait = NATIVE_POLL_FIRST;
            loop {
                tokio::select! {
                    // Shutdown: the task stays `processing` with its upstream reference, and
                    // polling resumes at the next start.
                    () = tasks.stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                let polled = gateway
                    .runtime()
                    .upstreams
                    .poll_task(&native.upstream, &native.key_id, &native.upstream_task_id)
                    .await;
                match polled {
                    Ok(NativeStatus::Pending { progress }) => {
                        if let Some(live) = tasks
                            .live
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_mut(&job.record.id)
                        {
                            live.reported = Some(progress);
                        }
                        wait = wait.mul_f64(1.5).min(NATIVE_POLL_MAX);
                    }
                    Ok(NativeStatus::Completed(response)) => {
                        tasks
                            .complete(job, &request, &response, false, &gateway)
                            .await;
                        return;
                    }
                    Ok(NativeStatus::Failed(e)) => {
                        tracing::warn!(task = %job.record.id, error = %e, "native task failed upstream");
                        tasks.fail(job, &ApiError::from(e)).await;
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(task = %job.record.id, error = %e, "native task poll failed; polling again");
                        wait = (wait * 2).min(NATIVE_POLL_MAX * 2);
                    }
                }
                if Instant::now() >= deadline {
                    tasks.fail(job, &ApiError::task_timed_out()).await;
                    return;
                }
            }
        });
    }

    async fn remove_expired(&self) {
        match self.store.remove_expired(unix_now()).await {
            Ok(0) => {}
            Ok(removed) => tracing::debug!(removed, "expired tasks removed"),
            Err(e) => tracing::warn!(error = %e, "expired tasks not removed"),
        }
    }

    /// The task `id` as `client` may see it: `None` if it does not exist, belongs to another
    /// client, or has expired (all the same 404, so ids cannot be probed).
    pub async fn view(&self, client: &str, id: &str) -> Result<Option<TaskView>, StorageError> {
        let Some(id) = TaskId::parse(id) else {
            return Ok(None);
        };
        let Some(record) = self.store.get(id.as_str()).await? else {
            return Ok(None);
        };
        if record.client != client || !record.is_live(unix_now()) {
            return Ok(None);
        }
        Ok(Some(self.view_of(&record)))
    }

    /// The body clients see for `record`.
    pub fn view_of(&self, record: &TaskRecord) -> TaskView {
        TaskView {
            state: record.state,
            body: render(record, self.progress(record)),
        }
    }

    /// 0 while queued, an estimate rising towards 95 while processing (the upstream's own
    /// figure in native mode), 100 when finished.
    fn progress(&self, record: &TaskRecord) -> u8 {
        match record.state {
            TaskState::Queued => 0,
            TaskState::Completed | TaskState::Failed => 100,
            TaskState::Processing => {
                let live = self
                    .live
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&record.id)
                    .copied();
                match live {
                    Some(Live {
                        native: true,
                        reported,
                        ..
                    }) => reported.unwrap_or(1).clamp(1, 99),
                    Some(Live { started, .. }) => {
                        let expected =
                            *self.expected.lock().unwrap_or_else(PoisonError::into_inner);
                        let share =
                            started.elapsed().as_secs_f64() / expected.as_secs_f64().max(0.001);
                        // Approaches 95 but never reaches it: an estimate must not claim done.
                        (1.0 + 94.0 * (1.0 - (-share).exp())).floor() as u8
                    }
                    None => 1,
                }
            }
        }
    }

    /// Tasks queued and processing now, for metrics.
    pub fn gauges(&self) -> TaskGauges {
        TaskGauges {
            queued: self.queue.len(),
            processing: self
                .live
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
        }
    }

    /// Stops taking jobs, leaves queued tasks in the store for the next start, and gives
    /// running ones `grace` to finish.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        let left = self.queue.close();
        if !left.is_empty() {
            tracing::info!(
                tasks = left.len(),
                "queued async tasks left for the next start"
            );
        }
        // Their reservations stay pending in the ledger, held for these task ids.
        drop(left);
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "grace period over with async tasks still running; they resume at the next start"
            );
        }
    }
}

/// What a task looks like to its client.
#[derive(Debug, Clone)]
pub struct TaskView {
    pub state: TaskState,
    /// The JSON body of `GET /v1/tasks/{id}` (and of the submit's 202).
    pub body: Bytes,
}

impl TaskView {
    pub fn is_pending(&self) -> bool {
        !self.state.is_finished()
    }
}

/// Fields imagegate puts at the top of a task body; a result's own fields of these names
/// would collide with them.
const TASK_FIELDS: [&str; 8] = [
    "id",
    "object",
    "status",
    "progress",
    "created_at",
    "finished_at",
    "expires_at",
    "error",
];

/// `body` without any top-level field that would collide with the task's own fields. Almost
/// always `body` itself (an `ImagesResponse` has none of them); only then is it re-serialised.
fn without_task_fields(body: &Bytes) -> Bytes {
    let keys: Result<HashMap<String, serde::de::IgnoredAny>, _> = serde_json::from_slice(body);
    match keys {
        Ok(keys) if !TASK_FIELDS.iter().any(|f| keys.contains_key(*f)) => body.clone(),
        _ => match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) {
            Ok(mut map) => {
                for field in TASK_FIELDS {
                    map.remove(field);
                }
                serde_json::to_vec(&map).map_or_else(|_| body.clone(), Bytes::from)
            }
            Err(_) => body.clone(),
        },
    }
}

#[derive(Serialize)]
struct Head<'a> {
    id: &'a str,
    object: &'static str,
    status: TaskState,
    progress: u8,
    created_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<i64>,
}

/// The task body: its own fields, then for a completed task the `ImagesResponse` fields at the
/// top level (spliced in as stored, not re-serialised), or for a failed one its `error`.
fn render(record: &TaskRecord, progress: u8) -> Bytes {
    let head = Head {
        id: record.id.as_str(),
        object: "image.task",
        status: record.state,
        progress,
        created_at: record.created_at,
        finished_at: record.finished_at,
        expires_at: record.expires_at,
    };
    // A struct of strings and integers always serialises.
    let head = serde_json::to_vec(&head).unwrap_or_default();
    let open = &head[..head.len().saturating_sub(1)]; // without the closing brace
    let tail: Option<&[u8]> = match record.state {
        TaskState::Completed => record.result.as_deref().and_then(|body| {
            // The stored result is a JSON object: splice its members after ours.
            let inner = body.trim_ascii().strip_prefix(b"{")?.trim_ascii_start();
            (inner != b"}").then_some(inner)
        }),
        _ => None,
    };
    let mut out = BytesMut::with_capacity(open.len() + tail.map_or(64, <[u8]>::len) + 16);
    out.put_slice(open);
    if let Some(tail) = tail {
        out.put_u8(b',');
        out.put_slice(tail);
    } else {
        if let (TaskState::Failed, Some(error)) = (record.state, &record.error) {
            out.put_slice(b",\"error\":");
            out.put_slice(error.as_bytes());
        }
        out.put_u8(b'}');
    }
    out.freeze()
}

#[cfg(test)]
mod tests;
