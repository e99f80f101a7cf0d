//! A real `redis-server` per test: started on a free loopback port, killable, restartable
//! on the same port, freezable (SIGSTOP) to fake a half-dead server, optionally with a
//! password or TLS only.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct RedisServer {
    port: u16,
    password: Option<String>,
    /// TLS-only server: the directory with its self-signed certificate and its log file.
    tls: Option<PathBuf>,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A server that requires `password` (`requirepass`).
    pub fn start_with(password: Option<&str>) -> Self {
        let mut server = Self { port: free_port(), password: password.map(str::to_owned), tls: None, child: None };
        server.spawn();
        server
    }

    /// A free port with nothing listening on it (yet).
    pub fn unused_port() -> u16 {
        free_port()
    }

    /// Starts a server on `port`, e.g. one a broker is already trying to reach.
    pub fn start_on(port: u16) -> Self {
        let mut server = Self { port, password: None, tls: None, child: None };
        server.spawn();
        server
    }

    /// A server that speaks only TLS, with a freshly made self-signed certificate (which no
    /// client trusts), logging verbosely to [`Self::log`]. `None` when `openssl` is missing.
    pub fn start_tls() -> Option<Self> {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("fanout-redis-tls-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let made = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
            .arg("-keyout")
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !made.is_ok_and(|s| s.success()) {
            return None;
        }
        let mut server = Self { port, password: None, tls: Some(dir), child: None };
        server.spawn();
        Some(server)
    }

    /// What a TLS server has logged so far.
    pub fn log(&self) -> String {
        self.tls
            .as_deref()
            .map(|d| std::fs::read_to_string(d.join("redis.log")).unwrap_or_default())
            .unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> redis::Client {
        let url = match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => self.url(),
        };
        redis::Client::open(url).unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let port = self.port.to_string();
        let dir = std::env::temp_dir();
        let mut cmd = Command::new(redis_server());
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match &self.tls {
            None => cmd.args(["--port", &port]),
            Some(tls) => cmd
                .args(["--port", "0", "--tls-port", &port, "--tls-auth-clients", "no", "--loglevel", "verbose"])
                .arg("--tls-cert-file")
                .arg(tls.join("cert.pem"))
                .arg("--tls-key-file")
                .arg(tls.join("key.pem"))
                .arg("--logfile")
                .arg(tls.join("redis.log")),
        };
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd.spawn().expect("redis-server must be installed (apt-get install -y redis-server)");
        self.child = Some(child);
        match &self.tls {
            None => self.wait_answering(),
            Some(_) => self.wait_listening(),
        }
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server on port {} did not come up", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Blocks until the server answers PING (or NOAUTH, which is an answer too).
    fn wait_answering(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 64];
                if s.write_all(b"PING\r\n").is_ok() && matches!(s.read(&mut buf), Ok(n) if n > 0) {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server on port {} did not come up", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: the server vanishes without a goodbye; the port is free to restart on.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty (killing it first if needed).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs a command through `redis-cli`, returning its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli not found");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGSTOP: connections stay open but nothing is answered.
    pub fn freeze(&self) {
        signal("-STOP", self.pid());
    }

    /// SIGCONT after [`Self::freeze`].
    pub fn thaw(&self) {
        signal("-CONT", self.pid());
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        self.client().get_multiplexed_async_connection().await.unwrap()
    }

    /// `PUBSUB CHANNELS pattern`, sorted.
    pub async fn pubsub_channels(&self, pattern: &str) -> Vec<String> {
        let mut con = self.connection().await;
        let mut channels: Vec<String> =
            redis::cmd("PUBSUB").arg("CHANNELS").arg(pattern).query_async(&mut con).await.unwrap();
        channels.sort();
        channels
    }

    /// How often Redis has executed `command` (from `INFO commandstats`).
    pub async fn command_calls(&self, command: &str) -> u64 {
        let mut con = self.connection().await;
        let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut con).await.unwrap();
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
            .unwrap_or(0)
    }

    /// `PUBLISH channel payload` from a plain client, as a backend would.
    pub async fn publish_raw(&self, channel: &str, payload: &[u8]) -> u64 {
        let mut con = self.connection().await;
        redis::cmd("PUBLISH").arg(channel).arg(payload).query_async(&mut con).await.unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL works on a stopped process too.
        self.kill();
        if let Some(dir) = self.tls.as_deref() {
            remove_dir(dir);
        }
    }
}

fn remove_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

fn redis_server() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free port")
}

fn signal(sig: &str, pid: u32) {
    crate::signal(pid, sig.trim_start_matches('-'));
}
