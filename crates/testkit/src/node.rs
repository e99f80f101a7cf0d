//! A real `fanout serve` process on port 0, its bound addresses read from its log.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

pub struct Node {
    child: Child,
    pub public: SocketAddr,
    pub internal: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// Starts `bin serve` on loopback port 0 with extra `args` and waits until `/readyz`
    /// answers 200 (its broker is connected).
    pub fn start(bin: impl AsRef<Path>, args: &[&str]) -> Self {
        let node = Self::start_unready(bin, args);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !node.ready_blocking() {
            assert!(Instant::now() < deadline, "node never became ready; log:\n{}", node.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }

    /// Whether `/readyz` answers 200, without needing an async runtime.
    pub fn ready_blocking(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(self.internal) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out.starts_with(b"HTTP/1.1 200")
    }

    /// Starts `bin serve` on loopback port 0 with extra `args`, and waits only for its
    /// `listening public=… internal=…` line.
    pub fn start_unready(bin: impl AsRef<Path>, args: &[&str]) -> Self {
        let mut child = Command::new(bin.as_ref())
            .args(["serve", "--public-addr", "127.0.0.1:0", "--internal-addr", "127.0.0.1:0", "--log-level"])
            // FANOUT_TEST_LOG: a filter for looking into a failing test, `info` otherwise.
            .arg(std::env::var("FANOUT_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .args(args)
            .env_remove("FANOUT_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start fanout");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening public=").nth(1) {
                    let mut parts = rest.split(" internal=");
                    let public = parts.next().and_then(|p| p.trim().parse().ok());
                    let internal = parts
                        .next()
                        .and_then(|p| p.split_whitespace().next())
                        .and_then(|p| p.trim_end_matches('"').parse().ok());
                    if let (Some(p), Some(i)) = (public, internal) {
                        let _ = tx.send((p, i));
                    }
                }
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let (public, internal) = match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                panic!("fanout did not report its addresses; log:\n{}", logs.lock().unwrap().join("\n"));
            }
        };
        Self { child, public, internal, logs }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.public)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the node logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    pub fn signal(&self, sig: &str) {
        crate::signal(self.child.id(), sig);
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The current value of an unlabelled metric (or the sum over its label sets).
    pub async fn metric(&self, name: &str) -> f64 {
        self.metric_with(name, "").await
    }

    /// A metric summed over the series whose label text contains `label`
    /// (`reason="shed"`, say; `""`: every series).
    pub async fn metric_with(&self, name: &str, label: &str) -> f64 {
        let body = crate::http(self.internal, "GET", "/metrics", &[], b"").await.text();
        parse_metrics(&body)
            .iter()
            .filter(|(series, _)| series.split('{').next() == Some(name) && series.contains(label))
            .map(|(_, v)| v)
            .sum()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses the text exposition strictly enough to catch a malformed line, returning
/// `series → value`.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let words: Vec<&str> = rest.split_whitespace().collect();
            assert!(matches!(words.first(), Some(&"HELP") | Some(&"TYPE")), "bad comment line {line:?}");
            if words[0] == "TYPE" {
                assert!(
                    matches!(words.get(2), Some(&("counter" | "gauge" | "histogram" | "summary" | "untyped"))),
                    "{line:?}"
                );
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unterminated labels in {line:?}");
            for pair in series[name_end + 1..series.len() - 1].split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label in {line:?}"));
                assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line:?}");
                assert!(!v.contains('\n'));
            }
        }
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        out.insert(series.to_owned(), v);
    }
    out
}
