//! The real `imagegate` binary as a child process: for signals, `kill -9`, and reading its logs.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_imagegate");

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    closed: bool,
}

/// A running `imagegate serve` whose stdout (JSON logs) is collected line by line.
pub struct GatewayProcess {
    child: Child,
    lines: Arc<(Mutex<Lines>, Condvar)>,
    reader: Option<std::thread::JoinHandle<()>>,
    pub public: String,
    pub admin: String,
}

impl GatewayProcess {
    /// Starts `imagegate serve --config <config>` with exactly `envs` as its environment and
    /// waits for its start-up line.
    pub fn start(config: &Path, envs: &[(&str, &str)]) -> GatewayProcess {
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env_clear()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let lines = Arc::new((Mutex::new(Lines::default()), Condvar::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let (lock, cvar) = &*sink;
                lock.lock().unwrap().lines.push(line);
                cvar.notify_all();
            }
            let (lock, cvar) = &*sink;
            lock.lock().unwrap().closed = true;
            cvar.notify_all();
        });
        let mut process = GatewayProcess {
            child,
            lines,
            reader: Some(reader),
            public: String::new(),
            admin: String::new(),
        };
        let started = process
            .wait_for_log(
                |v| v["message"] == "imagegate listening",
                Duration::from_secs(30),
            )
            .unwrap_or_else(|| panic!("gateway did not start; stderr: {}", process.stderr_now()));
        process.public = started["public"].as_str().unwrap().to_owned();
        process.admin = started["admin"].as_str().unwrap().to_owned();
        process
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.public, path)
    }

    /// Waits until a JSON log line (after those already matched) satisfies `pred`.
    pub fn wait_for_log(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
        timeout: Duration,
    ) -> Option<serde_json::Value> {
        self.wait_for_log_after(0, pred, timeout)
    }

    /// Like `wait_for_log`, considering only lines from index `from` on.
    pub fn wait_for_log_after(
        &self,
        from: usize,
        pred: impl Fn(&serde_json::Value) -> bool,
        timeout: Duration,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.lines;
        let mut guard = lock.lock().unwrap();
        let mut seen = from;
        loop {
            while seen < guard.lines.len() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&guard.lines[seen])
                    && pred(&v)
                {
                    return Some(v);
                }
                seen += 1;
            }
            let now = Instant::now();
            if guard.closed || now >= deadline {
                return None;
            }
            guard = cvar.wait_timeout(guard, deadline - now).unwrap().0;
        }
    }

    /// How many log lines have been read so far (a marker for `wait_for_log_after`).
    pub fn log_len(&self) -> usize {
        self.lines.0.lock().unwrap().lines.len()
    }

    pub fn logs(&self) -> String {
        self.lines.0.lock().unwrap().lines.join("\n")
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
        self.drain();
    }

    /// SIGTERM, then waits for exit; returns whether it exited successfully.
    pub fn stop(mut self) -> (bool, String, String) {
        self.signal("TERM");
        let status = self.child.wait().unwrap();
        let stderr = self.drain();
        (status.success(), self.logs(), stderr)
    }

    fn drain(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.stderr_now()
    }

    fn stderr_now(&mut self) -> String {
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        stderr
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config file in a temp dir that lives as long as the value.
pub struct ConfigFile {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl ConfigFile {
    pub fn new(text: &str) -> ConfigFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("imagegate.toml");
        std::fs::write(&path, text).unwrap();
        ConfigFile { _dir: dir, path }
    }

    /// The config built in code (see `helpers::base_config`), as the TOML file `serve` reads.
    pub fn from_config(config: &imagegate::Config) -> ConfigFile {
        ConfigFile::new(&config.to_toml())
    }

    pub fn write(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap();
    }
}

/// `imagegate usage --json --config <config>` with exactly `envs`: the usage report read from
/// the database file (while no gateway runs, or beside one).
pub fn usage_report(config: &Path, envs: &[(&str, &str)]) -> serde_json::Value {
    let mut command = Command::new(BIN);
    command
        .args(["usage", "--json", "--config"])
        .arg(config)
        .env_clear();
    for (k, v) in envs {
        command.env(k, v);
    }
    let out = command.output().expect("usage command runs");
    assert!(
        out.status.success(),
        "imagegate usage failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("usage --json prints JSON")
}
