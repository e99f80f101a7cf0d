//! A real Redis Cluster per test: `redis-server --cluster-enabled yes` on free ports,
//! joined with `redis-cli --cluster create`, with helpers to find masters, fail one over
//! and move a slot.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use crate::redis::RedisServer;

pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// Names this cluster's node configuration files (`fanout-cluster-TAG-PORT.conf`).
    tag: String,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
            for ext in ["conf", "rdb"] {
                let file = format!("fanout-cluster-{}-{}.{ext}", self.tag, node.port());
                let _ = std::fs::remove_file(std::env::temp_dir().join(file));
            }
        }
    }
}

impl RedisCluster {
    /// `masters` masters with `replicas` replicas each, every slot assigned, state ok
    /// everywhere. A short node timeout so a killed master fails over in about a second.
    pub fn start(masters: usize, replicas: usize) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let tag = format!("{}-{nanos}", std::process::id());
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &format!("fanout-cluster-{tag}-{{port}}.conf"),
            // Never a dump another server left in the shared directory.
            "--dbfilename",
            &format!("fanout-cluster-{tag}-{{port}}.rdb"),
            "--cluster-node-timeout",
            "1000",
            // A replica of a dead master takes over at once, however stale it thinks it is.
            "--cluster-replica-validity-factor",
            "0",
        ];
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas)).map(|_| RedisServer::start_args(&args)).collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli not found");
        assert!(out.status.success(), "cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = Self { nodes, tag };
        cluster.wait_until("every node sees the cluster ok", |c| c.all_ok());
        cluster
    }

    /// The seed URLs, comma-separated, as `--redis-url` takes them.
    pub fn seeds(&self) -> String {
        self.nodes.iter().map(RedisServer::url).collect::<Vec<_>>().join(",")
    }

    /// Indexes of the running nodes that are masters now.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].cli(&["ROLE"]).starts_with("master")).collect()
    }

    /// The index of the master serving `slot`.
    pub fn master_of(&self, slot: u16) -> usize {
        self.masters()
            .into_iter()
            .find(|&i| {
                let id = self.node_id(i);
                self.owned_slots(i, &id).iter().any(|&(a, b)| (a..=b).contains(&slot))
            })
            .expect("no master serves the slot")
    }

    pub fn node_id(&self, i: usize) -> String {
        self.nodes[i].cli(&["CLUSTER", "MYID"]).trim().to_owned()
    }

    /// Slot ranges node `id` serves, as node `i` sees them.
    fn owned_slots(&self, i: usize, id: &str) -> Vec<(u16, u16)> {
        let nodes = self.nodes[i].cli(&["CLUSTER", "NODES"]);
        let Some(line) = nodes.lines().find(|l| l.starts_with(id)) else { return Vec::new() };
        line.split_whitespace()
            .skip(8)
            .filter(|r| !r.starts_with('['))
            .filter_map(|r| match r.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => r.parse().ok().map(|s| (s, s)),
            })
            .collect()
    }

    /// Whether every running node reports `cluster_state:ok` and agrees on one master per
    /// slot range.
    pub fn all_ok(&self) -> bool {
        self.nodes.iter().filter(|n| n.is_running()).all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
    }

    /// Waits until every replica has everything its master wrote (replication is
    /// asynchronous: a master killed before that loses its last writes, which is Redis's
    /// behaviour, not the gateway's).
    pub fn wait_replicated(&self) {
        self.wait_until("replicas caught up", |c| {
            c.masters().into_iter().all(|m| {
                let info = c.nodes[m].cli(&["INFO", "replication"]);
                let field = |line: &str, key: &str| -> Option<u64> {
                    line.split([',', ':']).find_map(|kv| kv.trim().strip_prefix(key)?.parse().ok())
                };
                let Some(top) = info.lines().find_map(|l| {
                    field(l, "master_repl_offset=")
                        .or_else(|| l.strip_prefix("master_repl_offset:")?.trim().parse().ok())
                }) else {
                    return false;
                };
                info.lines().filter(|l| l.starts_with("slave")).all(|l| field(l, "offset=") == Some(top))
            })
        });
    }

    /// Polls `check` every 50 ms for up to 30 s (a blocking wait: setup, not the test).
    pub fn wait_until(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check(self) {
            assert!(Instant::now() < deadline, "the cluster never got there: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The lowest slot master `i` serves: the one [`Self::reshard_one`] moves next.
    pub fn lowest_slot(&self, i: usize) -> u16 {
        self.owned_slots(i, &self.node_id(i)).iter().map(|r| r.0).min().expect("the node serves no slot")
    }

    /// Moves one slot, [`Self::lowest_slot`] of master `from`, to master `to` with
    /// `redis-cli --cluster reshard` (which takes a source's slots from the lowest up),
    /// and returns it once every running node agrees on its new owner.
    pub fn reshard_one(&self, from: usize, to: usize) -> u16 {
        let from_id = self.node_id(from);
        let slot = self.lowest_slot(from);
        let out = Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{}", self.nodes[from].port())])
            .args([
                "--cluster-from",
                &from_id,
                "--cluster-to",
                &self.node_id(to),
                "--cluster-slots",
                "1",
                "--cluster-yes",
            ])
            .output()
            .expect("redis-cli not found");
        assert!(out.status.success(), "reshard failed: {}", String::from_utf8_lossy(&out.stdout));
        self.wait_until("the moved slot's new owner is known everywhere", |c| {
            let to_id = c.node_id(to);
            (0..c.nodes.len())
                .filter(|&i| c.nodes[i].is_running())
                .all(|i| c.owned_slots(i, &to_id).iter().any(|&(a, b)| (a..=b).contains(&slot)))
        });
        slot
    }
}
