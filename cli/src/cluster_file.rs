//! The cluster file: one TOML description of a cluster across hosts, read by
//! `switchyard up --cluster FILE [--host NAME]`, which starts the nodes placed on this host.
//!
//! ```toml
//! model = "/models/deepseek-v3"   # a checkpoint directory (same path on every host)
//! replicas = 2                    # copies of each routed expert
//! lease_ms = 5000
//!
//! [coordinator]
//! host = "node-a"
//! addr = "10.0.0.1:50071"
//!
//! [[workers]]
//! host = "node-b"
//! addr = "10.0.0.2:50061"         # listened on and advertised to routers
//! memory = "120GiB"
//! device = "cpu"                  # or "cuda:N": the worker's experts on that GPU
//! threads = 16
//!
//! [[routers]]
//! host = "node-c"
//! addr = "10.0.0.3:50051"
//! device = "cuda:0,1"             # optional: `router --device` (default `up --router-device`)
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub model: PathBuf,
    #[serde(default = "one")]
    pub replicas: usize,
    #[serde(default = "default_lease")]
    pub lease_ms: u64,
    pub coordinator: NodeEntry,
    pub workers: Vec<WorkerEntry>,
    pub routers: Vec<NodeEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    #[serde(default)]
    pub host: Option<String>,
    pub addr: String,
    /// Routers only: also serve the OpenAI-compatible HTTP API here.
    #[serde(default)]
    pub http: Option<String>,
    /// Routers only: where the router's weights run (`cpu`, `cuda:N` or `cuda:0,1,…`, as
    /// `router --device`); without it, `up --router-device`.
    #[serde(default)]
    pub device: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerEntry {
    #[serde(default)]
    pub host: Option<String>,
    pub addr: String,
    #[serde(default = "default_memory")]
    pub memory: String,
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default = "one")]
    pub threads: usize,
}

fn one() -> usize {
    1
}

fn default_lease() -> u64 {
    3000
}

fn default_memory() -> String {
    "64GiB".into()
}

fn default_device() -> String {
    "cpu".into()
}

impl ClusterFile {
    pub fn read(path: &Path) -> anyhow::Result<ClusterFile> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: ClusterFile = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid cluster file", path.display()))?;
        file.validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(file)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.workers.is_empty() {
            bail!("`workers` must list at least one worker, got none");
        }
        if self.routers.is_empty() {
            bail!("`routers` must list at least one router, got none");
        }
        if self.replicas == 0 {
            bail!("`replicas` must be >= 1, got 0");
        }
        if self.coordinator.http.is_some() || self.coordinator.device.is_some() {
            bail!(
                "`coordinator` takes `host` and `addr` only; `http` and `device` are for routers"
            );
        }
        for r in &self.routers {
            if let Some(device) = &r.device {
                device
                    .parse::<switchyard_engine::Devices>()
                    .map_err(|e| anyhow::anyhow!("`routers.device` {e} (router {})", r.addr))?;
            }
        }
        let mut seen = BTreeSet::new();
        let addrs = std::iter::once(("coordinator.addr", &self.coordinator.addr))
            .chain(self.workers.iter().map(|w| ("workers.addr", &w.addr)))
            .chain(self.routers.iter().map(|r| ("routers.addr", &r.addr)));
        for (field, addr) in addrs {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                bail!("`{field}` must be IP:PORT, got {addr:?}");
            }
            if !seen.insert(addr.clone()) {
                bail!("`{field}` {addr:?} is used by two nodes");
            }
        }
        for w in &self.workers {
            switchyard_coordinator::capacity::parse_bytes(&w.memory)
                .map_err(|e| anyhow::anyhow!("`workers.memory`: {e}"))?;
            if w.threads == 0 {
                bail!("`workers.threads` must be >= 1, got 0 (worker {})", w.addr);
            }
            // Parsed here so a typo fails before anything starts; whether this binary and
            // host can open the device is the worker's start-up check.
            w.device
                .parse::<switchyard_engine::Device>()
                .map_err(|e| anyhow::anyhow!("`workers.device` {e} (worker {})", w.addr))?;
        }
        Ok(())
    }
}

/// Whether a node placed on `node_host` runs on `this` host (no host filter: every node).
pub fn on_this_host(node_host: &Option<String>, this: &Option<String>) -> bool {
    match (node_host, this) {
        (_, None) => true,
        (Some(n), Some(t)) => n == t,
        (None, Some(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<ClusterFile> {
        let f: ClusterFile = toml::from_str(text)?;
        f.validate()?;
        Ok(f)
    }

    const GOOD: &str = r#"
        model = "/m"
        [coordinator]
        addr = "127.0.0.1:1"
        [[workers]]
        addr = "127.0.0.1:2"
        [[routers]]
        addr = "127.0.0.1:3"
    "#;

    #[test]
    fn defaults_fill_in() {
        let f = parse(GOOD).unwrap();
        assert_eq!(
            (
                f.replicas,
                f.lease_ms,
                f.workers[0].memory.as_str(),
                f.workers[0].threads
            ),
            (1, 3000, "64GiB", 1)
        );
    }

    #[test]
    fn mistakes_name_the_field_and_value() {
        for (text, needle) in [
            (
                GOOD.replace("127.0.0.1:3", "127.0.0.1:2"),
                "used by two nodes",
            ),
            (
                GOOD.replace("127.0.0.1:3", "router-host"),
                "`routers.addr` must be IP:PORT",
            ),
            (
                GOOD.replace(
                    "[[workers]]\n        addr = \"127.0.0.1:2\"",
                    "[[workers]]\n        addr = \"127.0.0.1:2\"\n        memory = \"lots\"",
                ),
                "workers.memory",
            ),
            (
                GOOD.replace("model = \"/m\"", "model = \"/m\"\n        replicas = 0"),
                "`replicas` must be >= 1",
            ),
            (
                GOOD.replace(
                    "[[workers]]\n        addr = \"127.0.0.1:2\"",
                    "[[workers]]\n        addr = \"127.0.0.1:2\"\n        device = \"gpu0\"",
                ),
                "`workers.device` must be `cpu`, `cuda` or `cuda:N`, got \"gpu0\"",
            ),
            (
                GOOD.replace(
                    "\"127.0.0.1:3\"",
                    "\"127.0.0.1:3\"\n        device = \"cuda:0,0\"",
                ),
                "`routers.device` cuda:0 appears twice",
            ),
            (
                GOOD.replace(
                    "\"127.0.0.1:1\"",
                    "\"127.0.0.1:1\"\n        device = \"cuda:0\"",
                ),
                "`coordinator` takes `host` and `addr` only",
            ),
            (
                GOOD.replace("model = \"/m\"", "model = \"/m\"\n        colour = 1"),
                "colour",
            ),
        ] {
            let err = format!("{:#}", parse(&text).unwrap_err());
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn workers_may_name_a_cuda_device() {
        let text = GOOD.replace(
            "[[workers]]\n        addr = \"127.0.0.1:2\"",
            "[[workers]]\n        addr = \"127.0.0.1:2\"\n        device = \"cuda:1\"",
        );
        assert_eq!(parse(&text).unwrap().workers[0].device, "cuda:1");
    }

    #[test]
    fn routers_may_name_their_devices() {
        let text = GOOD.replace(
            "\"127.0.0.1:3\"",
            "\"127.0.0.1:3\"\n        device = \"cuda:0,1\"",
        );
        assert_eq!(
            parse(&text).unwrap().routers[0].device.as_deref(),
            Some("cuda:0,1")
        );
        assert_eq!(parse(GOOD).unwrap().routers[0].device, None);
    }

    #[test]
    fn the_example_in_deploy_is_valid() {
        let f = parse(include_str!("../../deploy/cluster.example.toml")).unwrap();
        assert_eq!((f.workers.len(), f.routers.len(), f.replicas), (3, 1, 2));
    }

    #[test]
    fn host_filter_picks_this_host_s_nodes() {
        assert!(on_this_host(&Some("a".into()), &None));
        assert!(on_this_host(&Some("a".into()), &Some("a".into())));
        assert!(!on_this_host(&Some("b".into()), &Some("a".into())));
        assert!(!on_this_host(&None, &Some("a".into())));
    }
}
