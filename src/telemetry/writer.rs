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
//! the lines of the last moment that the thread had not written yet. A stdout that fails
//! (a closed pipe) loses lines, as tracing's own writer would, and never stops the gateway:
//! the failure is reported once on stderr, and should the thread end for any reason, loggers
//! write straight to stdout instead of waiting for it.

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
    /// The guard dropped: the thread writes what is left, then ends.
    closed: bool,
    /// The thread has ended: loggers write straight to stdout.
    finished: bool,
    /// The writer thread is waiting on `lines`: the next line must wake it. While it sleeps
    /// or writes, lines just gather (no syscall on the logging thread).
    idle: bool,
}

/// Where a line goes once the thread has ended: stdout (a test's capture in tests).
type Direct = Box<dyn Fn(&[u8]) -> std::io::Result<usize> + Send + Sync>;

struct Shared {
    pending: Mutex<Pending>,
    direct: Direct,
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
        BatchedStdout::start_with(
            std::io::stdout,
            Box::new(|buf| std::io::stdout().write(buf)),
        )
    }

    fn start_with<W, F>(open: F, direct: Direct) -> std::io::Result<(BatchedStdout, LogGuard)>
    where
        F: FnOnce() -> W + Send + 'static,
        W: Write,
    {
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            direct,
            lines: Condvar::new(),
            room: Condvar::new(),
        });
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

/// Marks the thread finished however it ends (a panic included), so no logger waits for it.
struct Finished<'a>(&'a Shared);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.lock().finished = true;
        self.0.room.notify_all();
    }
}

fn write_lines<W: Write>(shared: &Shared, mut out: W) {
    let _finished = Finished(shared);
    let mut batch = Vec::new();
    // A failing stdout is reported once, and again only after it worked in between.
    let mut failing = false;
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
                // Closed, and everything is written. Marked here, under the same lock as the
                // check, so no line can be appended after it and never written.
                pending.finished = true;
                return;
            }
            if !pending.closed && pending.bytes.len() < MAX_PENDING / 2 {
                drop(pending);
                std::thread::sleep(GATHER);
                pending = shared.lock();
            }
            std::mem::swap(&mut pending.bytes, &mut batch);
        }
        shared.room.notify_all();
        match out.write_all(&batch).and_then(|()| out.flush()) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                // Nowhere else to say it. `eprintln!` would panic if stderr is closed too
                // (both ends of `2>&1 | collector` when the collector exits).
                let _ = writeln!(
                    std::io::stderr(),
                    "imagegate: cannot write the log to stdout, lines are lost until it works: {e}"
                );
            }
            Err(_) => {}
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
        while pending.bytes.len() >= MAX_PENDING && !pending.finished {
            pending = self
                .shared
                .room
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if pending.finished {
            // After the thread ended (the last lines of a shutdown): straight through. Until
            // then, lines logged after the guard dropped still queue behind the thread's last
            // batch, so they keep their order.
            drop(pending);
            return (self.shared.direct)(buf);
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

    /// For tests whose thread outlives every line.
    fn unused() -> Direct {
        Box::new(|_| panic!("no line goes straight to stdout while the thread runs"))
    }

    #[test]
    fn every_line_from_every_thread_is_written_once_and_whole_by_the_time_the_guard_drops() {
        let capture = Capture::default();
        let out = capture.clone();
        let (sink, guard) = BatchedStdout::start_with(move || out, unused()).unwrap();
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
        let (sink, guard) = BatchedStdout::start_with(move || Gated(g, c), unused()).unwrap();
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

    #[test]
    fn loggers_never_wait_for_a_writer_thread_that_died() {
        // A stdout whose write panics kills the thread; before, loggers then filled the
        // buffer and waited for room forever, freezing every thread that logs.
        struct Panics;
        impl Write for Panics {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                panic!("stdout is gone");
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let direct = Capture::default();
        let to = direct.clone();
        let (sink, guard) =
            BatchedStdout::start_with(|| Panics, Box::new(move |buf| to.clone().write(buf)))
                .unwrap();
        sink.make_writer()
            .write_all(b"the line that kills it\n")
            .unwrap();
        while !sink.shared.lock().finished {
            std::thread::yield_now();
        }
        // More than the buffer holds: goes straight through instead of waiting.
        let big = vec![b' '; MAX_PENDING];
        sink.make_writer().write_all(&big).unwrap();
        sink.make_writer().write_all(b"\n").unwrap();
        drop(guard);
        assert_eq!(direct.0.lock().unwrap().0.len(), MAX_PENDING + 1);
    }
}
