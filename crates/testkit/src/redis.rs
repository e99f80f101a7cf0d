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
    /// More `redis-server` arguments (a cluster node's, say).
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A server that requires `password` (`requirepass`).
    pub fn start_with(password: Option<&str>) -> Self {
        // A port that was free a moment ago can be taken by the time redis-server binds it
        // (by another test process): then try another.
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                password: password.map(str::to_owned),
                tls: None,
                extra: Vec::new(),
                child: None,
            };
            if server.try_spawn() {
                return server;
            }
        }
        panic!("redis-server could not bind a free port five times");
    }

    /// A free port with nothing listening on it (yet).
    pub fn unused_port() -> u16 {
        free_port()
    }

    /// A server started with more arguments, `{port}` in them replaced by its port.
    pub fn start_args(args: &[&str]) -> Self {
        for _ in 0..5 {
            let port = free_port();
            let extra = args.iter().map(|a| a.replace("{port}", &port.to_string())).collect();
            let mut server = Self { port, password: None, tls: None, extra, child: None };
            if server.try_spawn() {
                return server;
            }
        }
        panic!("redis-server could not bind a free port five times");
    }

    /// Starts a server on `port`, e.g. one a broker is already trying to reach.
    pub fn start_on(port: u16) -> Self {
        let mut server = Self { port, password: None, tls: None, extra: Vec::new(), child: None };
        server.spawn();
        server
    }

    /// A server that speaks only TLS, with a freshly made self-signed certificate (which no
    /// client trusts), logging verbosely to [`Self::log`]. Panics when `openssl` is missing
    /// (scripts/test.sh installs it): a TLS test that skips itself proves nothing.
    pub fn start_tls() -> Self {
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
        assert!(
            made.is_ok_and(|s| s.success()),
            "openssl is needed to make the test certificate (apt-get install openssl)"
        );
        let mut server = Self { port, password: None, tls: Some(dir), extra: Vec::new(), child: None };
        server.spawn();
        server
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
        assert!(self.try_spawn(), "redis-server could not listen on port {}", self.port);
    }

    /// Starts the process and waits until it answers; false when it exited instead (its
    /// port was taken).
    fn try_spawn(&mut self) -> bool {
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
        cmd.args(&self.extra);
        let child = cmd.spawn().expect("redis-server must be installed (apt-get install -y redis-server)");
        self.child = Some(child);
        let tls = self.tls.is_some();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if if tls { self.listening() } else { self.answering() } {
                return true;
            }
            if self.child.as_mut().is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_some())) {
                self.child = None;
                return false;
            }
            assert!(Instant::now() < deadline, "redis-server on port {} did not come up", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn listening(&self) -> bool {
        TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }

    /// Whether the server answers PING (or NOAUTH, which is an answer too).
    fn answering(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 64];
        s.write_all(b"PING\r\n").is_ok() && matches!(s.read(&mut buf), Ok(n) if n > 0)
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

    pub fn is_running(&self) -> bool {
        self.child.is_some()
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

    /// `PUBSUB CHANNELS pattern`, sorted, without fanout's own control channel
    /// (`{prefix}!control`, which every node holds).
    pub async fn pubsub_channels(&self, pattern: &str) -> Vec<String> {
        let mut con = self.connection().await;
        let mut channels: Vec<String> =
            redis::cmd("PUBSUB").arg("CHANNELS").arg(pattern).query_async(&mut con).await.unwrap();
        channels.retain(|c| !c.ends_with("!control"));
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

/// A loopback port that was free a moment ago, chosen below the kernel's ephemeral range:
/// a test that stops a server and starts it again on the same port must not find it taken
/// meanwhile by some connection's local port (which the kernel picks from that range, as it
/// does for a bind to port 0). Each process starts at its own offset and checks by binding.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const SPAN: u32 = 10_000;
    if low > SPAN + 1024 {
        let base = low - SPAN;
        let offset = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
        for _ in 0..SPAN {
            let port = base + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
            if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
                return port as u16;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free port")
}

fn signal(sig: &str, pid: u32) {
    crate::signal(pid, sig.trim_start_matches('-'));
}
