//! Where `serve` writes its log: stdout, through one writer thread that batches lines.
//!
//! Why: a `write` per line on the request path cost about a quarter of a cache hit's CPU in
//! the load benchmark (an ext4 append is ~10 µs; two runtime threads contend for stdout's
//! lock), and it sat between the handler and the response. Here a line is appended to a
//! shared buffer (a memcpy under a mutex) and the writer thread writes whatever has gathered
//! in one `write`: one line at a time when the gateway is quiet, hundreds under load.
//!
//! Nothing is dropped: when the buffer holds [`MAX_PENDING`] bytes (stdout is blocked, say a
//! full pipe), loggers wait for room, as they would on a blocking `write`. [`LogGuard`]
//! writes out what is left when dropped, so a graceful exit loses no line; a crash can lose
//! the lines of the last moment that the thread had not written yet.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Bytes waiting to be written beyond which loggers block.
const MAX_PENDING: usize = 4 << 20;

/// How long the thread lets lines gather after the first one woke it: under load that makes
/// one `write` per millisecond rather than one per line or two; a quiet gateway's lines are
/// written this much later.
const GATHER: Duration = Duration::from_millis(1);

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    closed: bool,
    /// The writer thread is waiting on `lines`: the next line must wake it. While it sleeps
    /// or writes, lines just gather (no syscall on the logging thread).
    idle: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    /// The writer thread waits here for lines.
    lines: Condvar,
    /// Loggers wait here for room.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Appending bytes cannot leave the buffer inconsistent, so a poisoned lock is usable.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The [`MakeWriter`] for the subscriber: each line goes to the shared buffer.
#[derive(Clone)]
pub struct BatchedStdout {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, after it has written every line logged before.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BatchedStdout {
    /// Starts the writer thread. Fails only if the thread cannot be spawned.
    pub fn start() -> std::io::Result<(BatchedStdout, LogGuard)> {
        BatchedStdout::start_with(std::io::stdout)
    }

    fn start_with<W, F>(open: F) -> std::io::Result<(BatchedStdout, LogGuard)>
    where
        F: FnOnce() -> W + Send + 'static,
        W: Write,
    {
        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("imagegate-log".to_owned())
            .spawn(move || write_lines(&thread_shared, open()))?;
        Ok((
            BatchedStdout {
                shared: Arc::clone(&shared),
            },
            LogGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }
}

fn write_lines<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::new();
    loop {
        {
            let mut pending = shared.lock();
            while pending.bytes.is_empty() && !pending.closed {
                pending.idle = true;
                pending = shared
                    .lines
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            pending.idle = false;
            if pending.bytes.is_empty() {
                return; // closed, and everything is written
            }
            if !pending.closed && pending.bytes.len() < MAX_PENDING / 2 {
                drop(pending);
                std::thread::sleep(GATHER);
                pending = shared.lock();
            }
            std::mem::swap(&mut pending.bytes, &mut batch);
        }
        shared.room.notify_all();
        // Nowhere to report a failing stdout but stderr, and once per batch at most.
        if let Err(e) = out.write_all(&batch).and_then(|()| out.flush()) {
            #[expect(clippy::print_stderr, reason = "the log itself cannot be written")]
            {
                eprintln!("imagegate: cannot write the log to stdout: {e}");
            }
        }
        batch.clear();
        // Do not keep a burst's worth of capacity forever.
        batch.shrink_to(64 << 10);
    }
}

/// One event's writer: tracing-subscriber formats a line, then calls `write_all` once.
pub struct LineSink<'a> {
    shared: &'a Shared,
}

impl Write for LineSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.shared.lock();
        while pending.bytes.len() >= MAX_PENDING && !pending.closed {
            pending = self
                .shared
                .room
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if pending.closed {
            // After the guard dropped (the last lines of a shutdown): straight through.
            drop(pending);
            return std::io::stdout().write(buf);
        }
        let wake = std::mem::take(&mut pending.idle);
        pending.bytes.extend_from_slice(buf);
        drop(pending);
        // Only a line that finds the thread waiting wakes it; later ones ride along.
        if wake {
            self.shared.lines.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedStdout {
    type Writer = LineSink<'a>;

    fn make_writer(&'a self) -> LineSink<'a> {
        LineSink {
            shared: &self.shared,
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        // Unconditionally: the thread may be about to wait.
        self.shared.lines.notify_one();
        self.shared.room.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` into a shared vector, counting `write` calls.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut c = self.0.lock().unwrap();
            c.0.extend_from_slice(buf);
            c.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_from_every_thread_is_written_once_and_whole_by_the_time_the_guard_drops() {
        let capture = Capture::default();
        let out = capture.clone();
        let (sink, guard) = BatchedStdout::start_with(move || out).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let sink = sink.clone();
                s.spawn(move || {
                    for i in 0..5_000 {
                        let line = format!("thread {t} line {i}\n");
                        sink.make_writer().write_all(line.as_bytes()).unwrap();
                    }
                });
            }
        });
        drop(guard);
        let (bytes, writes) = capture.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20_000);
        lines.sort_unstable();
        lines.dedup();
        assert_eq!(lines.len(), 20_000, "no line twice");
        for t in 0..4 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("thread {t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(
                mine,
                (0..5_000).collect::<Vec<_>>(),
                "thread {t}'s lines in order"
            );
        }
        assert!(writes < 20_000, "lines were batched: {writes} writes");
    }

    #[test]
    fn a_logger_waits_for_room_instead_of_dropping_lines() {
        // A writer that blocks until released: the buffer fills, the logger must wait.
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let capture = Capture::default();
        struct Gated(Arc<(Mutex<bool>, Condvar)>, Capture);
        impl Write for Gated {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let (open, cv) = &*self.0;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = cv.wait(open).unwrap();
                }
                self.1.write(buf)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (g, c) = (Arc::clone(&gate), capture.clone());
        let (sink, guard) = BatchedStdout::start_with(move || Gated(g, c)).unwrap();
        let line = vec![b'x'; 1 << 20];
        let logger = {
            let sink = sink.clone();
            let line = line.clone();
            std::thread::spawn(move || {
                for _ in 0..12 {
                    sink.make_writer().write_all(&line).unwrap();
                }
            })
        };
        // The logger cannot finish while the writer is stuck: 12 MiB > one batch + the limit.
        while sink.shared.lock().bytes.len() < MAX_PENDING {
            std::thread::yield_now();
        }
        assert!(!logger.is_finished(), "the logger waits for room");
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        logger.join().unwrap();
        drop(guard);
        assert_eq!(
            capture.0.lock().unwrap().0.len(),
            12 << 20,
            "nothing dropped"
        );
    }
}
