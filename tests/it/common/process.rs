//! The service binary as a separate process, so that a test can SIGKILL or SIGTERM it mid-stream.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::brokers::free_port;

/// A running `iotagent-mqtt` process on a free loopback port; killed when dropped.
pub struct ServiceProcess {
    child: Child,
    pub port: u16,
}

impl ServiceProcess {
    /// Starts the binary with only these environment variables (plus its listen address and text logs at `warn`).
    pub fn start(env: &[(&str, String)]) -> Self {
        Self::start_on(free_port(), env)
    }

    /// Starts the binary on a given port: a restart where VerneMQ would call the same endpoint again.
    pub fn start_on(port: u16, env: &[(&str, String)]) -> Self {
        Self::spawn(port, env, Stdio::null())
    }

    /// Starts the binary with its log (stderr) written to `log`, for tests that read what it logged.
    pub fn start_logging_to(log: &std::path::Path, env: &[(&str, String)]) -> Self {
        let file = std::fs::File::create(log).expect("create the log file");
        Self::spawn(free_port(), env, Stdio::from(file))
    }

    fn spawn(port: u16, env: &[(&str, String)], stderr: Stdio) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_iotagent-mqtt"))
            .env_clear()
            .env("IOTAGENT_LISTEN", format!("127.0.0.1:{port}"))
            .env("LOG_FORMAT", "text")
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start iotagent-mqtt");
        Self { child, port }
    }

    /// The process id (tests read its memory from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits until `/health/ready` answers 200 (every configured dependency up).
    pub async fn wait_ready(&self) {
        super::wait_ready(&self.url("/health/ready")).await;
    }

    /// SIGKILL: the harshest stop.
    pub fn kill(mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }

    /// SIGTERM, without waiting for the exit.
    pub fn signal_term(&self) {
        self.signal("TERM");
    }

    /// Sends the signal of this name (`TERM`, `INT`, …), without waiting for the exit.
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status();
    }

    /// Whether the process has not exited yet.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("wait for the service").is_none()
    }

    /// SIGTERM; the exit status and how long the exit took, failing past `limit`.
    pub async fn terminate_within(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        self.signal_term();
        self.exit_within(limit).await
    }

    /// The exit status and how long, from now, the exit took; failing past `limit`.
    pub async fn exit_within(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let since = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the service") {
                return (status, since.elapsed());
            }
            assert!(since.elapsed() < limit, "no exit within {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits (bounded: a shutdown that hangs is a failure, not a stuck test).
    pub fn terminate(mut self) -> ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "the service did not exit within 60 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}
