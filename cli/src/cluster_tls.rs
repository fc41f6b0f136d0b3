//! The cluster-link flags every node takes (`--cluster-ca`, `--cert`, `--key`, or
//! `--insecure-cluster`), `switchyard certs`, and the throw-away cluster CA that `up` and
//! `serve` issue their nodes' certificates from.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use switchyard_proto::tls::{ClusterCa, ClusterLinks, ClusterTls, NodeIdentity, Role};

/// How this node's links to the rest of the cluster run.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClusterTlsArgs {
    /// The cluster CA's certificate (PEM): every node's certificate must be signed by it.
    /// With --cert and --key, cluster links run over mutual TLS (`switchyard certs` issues a
    /// set).
    #[arg(long, env = "SWITCHYARD_CLUSTER_CA", value_name = "PEM")]
    pub cluster_ca: Option<PathBuf>,
    /// This node's certificate (PEM), signed by --cluster-ca and naming the node
    /// (`spiffe://switchyard.cluster/<role>/<name>`).
    #[arg(long, env = "SWITCHYARD_CLUSTER_CERT", value_name = "PEM")]
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "SWITCHYARD_CLUSTER_KEY", value_name = "PEM")]
    pub key: Option<PathBuf>,
    /// Run cluster links in plaintext, unauthenticated: anyone who can reach a worker can
    /// send it hidden states and read its replies, and anyone who can reach the coordinator can
    /// join as a worker (and be sent authenticated users' hidden states) or rebalance. Only
    /// for a network nobody else can reach.
    #[arg(long, env = "SWITCHYARD_INSECURE_CLUSTER", conflicts_with_all = ["cluster_ca", "cert", "key"])]
    pub insecure_cluster: bool,
}

impl ClusterTlsArgs {
    /// The links of a `role` node: TLS material loaded and checked to be a `role`
    /// certificate, or plaintext when asked for; neither is an error.
    pub fn links(&self, role: Role) -> anyhow::Result<ClusterLinks> {
        self.load(role, true)
    }

    /// Links for an operator's command: an `admin` certificate is meant, but any node's
    /// will do where the call allows it (the server decides).
    pub fn client_links(&self) -> anyhow::Result<ClusterLinks> {
        self.load(Role::Admin, false)
    }

    fn load(&self, role: Role, strict: bool) -> anyhow::Result<ClusterLinks> {
        if self.insecure_cluster {
            tracing::warn!("cluster links run in plaintext, unauthenticated (--insecure-cluster)");
            return Ok(ClusterLinks::Insecure);
        }
        let (Some(ca), Some(cert), Some(key)) = (&self.cluster_ca, &self.cert, &self.key) else {
            let given: Vec<&str> = [
                ("--cluster-ca", self.cluster_ca.is_some()),
                ("--cert", self.cert.is_some()),
                ("--key", self.key.is_some()),
            ]
            .into_iter()
            .filter_map(|(f, set)| set.then_some(f))
            .collect();
            bail!(
                "cluster links need --cluster-ca, --cert and --key (a {role} certificate; `switchyard certs` issues a set){}, or --insecure-cluster to run them in plaintext, unauthenticated",
                if given.is_empty() {
                    String::new()
                } else {
                    format!("; got only {}", given.join(", "))
                }
            );
        };
        let tls = ClusterTls::load(ca, cert, key)
            .with_context(|| format!("loading the {role} certificate {}", cert.display()))?;
        if strict {
            tls.expect_role(role)
                .with_context(|| format!("--cert {}", cert.display()))?;
        }
        Ok(ClusterLinks::tls(tls))
    }

    /// The same flags for a child process.
    pub fn to_flags(&self) -> Vec<String> {
        if self.insecure_cluster {
            return vec!["--insecure-cluster".into()];
        }
        let mut out = Vec::new();
        for (flag, path) in [
            ("--cluster-ca", &self.cluster_ca),
            ("--cert", &self.cert),
            ("--key", &self.key),
        ] {
            if let Some(p) = path {
                out.extend([flag.to_string(), p.display().to_string()]);
            }
        }
        out
    }

    /// The flags of node `name` whose certificates lie in `dir` (as `switchyard certs` and
    /// [`LocalCerts`] write them).
    pub fn in_dir(dir: &Path, name: &str) -> ClusterTlsArgs {
        ClusterTlsArgs {
            cluster_ca: Some(dir.join("ca.pem")),
            cert: Some(dir.join(format!("{name}.pem"))),
            key: Some(dir.join(format!("{name}.key"))),
            insecure_cluster: false,
        }
    }
}

/// `switchyard certs`: a cluster CA and node certificates, for clusters started by hand.
#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    /// Directory to write into (created): `ca.pem`, `ca.key`, and `<name>.pem` / `<name>.key`
    /// per node.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Worker certificates to issue, named `worker-0`, `worker-1`, ….
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Router certificates to issue, named `router-0`, ….
    #[arg(long, default_value_t = 1)]
    pub routers: usize,
    /// Days the certificates stay valid.
    #[arg(long, default_value_t = 365)]
    pub days: u64,
    /// Replace certificates already in --out.
    #[arg(long)]
    pub force: bool,
    /// Also issue `api.pem` / `api.key`, a server certificate for the router's client APIs
    /// (`router --tls-cert`) valid for these DNS names or IP addresses; clients then trust
    /// `ca.pem` (`generate --tls-ca`). Repeatable.
    #[arg(long, value_name = "NAME")]
    pub api_name: Vec<String>,
}

/// The node names `switchyard certs` and `up` issue, in order: the coordinator, the
/// routers, the workers, and one `admin` for operators' commands.
pub fn cluster_nodes(workers: usize, routers: usize) -> Vec<NodeIdentity> {
    let mut nodes = vec![NodeIdentity::new(Role::Coordinator, "coordinator")];
    nodes.extend((0..routers).map(|r| NodeIdentity::new(Role::Router, format!("router-{r}"))));
    nodes.extend((0..workers).map(|w| NodeIdentity::new(Role::Worker, format!("worker-{w}"))));
    nodes.push(NodeIdentity::new(Role::Admin, "admin"));
    nodes
}

pub fn certs(args: CertsArgs) -> anyhow::Result<()> {
    if args.days == 0 || args.days > 36_500 {
        bail!("`--days` must be from 1 to 36500, got {}", args.days);
    }
    if args.out.join("ca.pem").exists() && !args.force {
        bail!(
            "{} already holds a cluster CA; pass --force to replace it (every node then needs the new certificates)",
            args.out.display()
        );
    }
    let ca = ClusterCa::generate(std::time::Duration::from_secs(args.days * 86_400))?;
    let nodes = cluster_nodes(args.workers, args.routers);
    let mut written = switchyard_proto::tls::write_cluster_certs(&args.out, &ca, &nodes, true)?;
    if !args.api_name.is_empty() {
        let api = ca.issue_server(&args.api_name)?;
        for (file, text, secret) in [
            ("api.pem", &api.cert_pem, false),
            ("api.key", &api.key_pem, true),
        ] {
            let path = args.out.join(file);
            switchyard_proto::tls::write_pem(&path, text.as_bytes(), secret)
                .with_context(|| format!("writing {}", path.display()))?;
            written.push(path);
        }
        eprintln!(
            "wrote api.pem / api.key for the client APIs, valid for {}",
            args.api_name.join(", ")
        );
    }
    eprintln!(
        "wrote a cluster CA and {} node certificates (valid {} days) to {}: {}",
        nodes.len(),
        args.days,
        args.out.display(),
        nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!(
        "start each node with --cluster-ca {0}/ca.pem --cert {0}/NAME.pem --key {0}/NAME.key; keep {0}/ca.key off the nodes",
        args.out.display()
    );
    tracing::debug!(files = written.len(), "certificates written");
    Ok(())
}

/// A throw-away cluster CA and node certificates for one `up` run, in a private temporary
/// directory removed when this is dropped. The CA's key is never written.
#[derive(Debug)]
pub struct LocalCerts {
    dir: tempfile::TempDir,
}

impl LocalCerts {
    pub fn issue(workers: usize, routers: usize) -> anyhow::Result<LocalCerts> {
        let dir = tempfile::Builder::new()
            .prefix("switchyard-certs-")
            .tempdir()
            .context("creating a directory for the cluster certificates")?;
        // Valid a week: the run's lifetime, not a credential to keep.
        let ca = ClusterCa::generate(std::time::Duration::from_secs(7 * 86_400))?;
        switchyard_proto::tls::write_cluster_certs(
            dir.path(),
            &ca,
            &cluster_nodes(workers, routers),
            false,
        )?;
        Ok(LocalCerts { dir })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The flags of node `name`.
    pub fn node(&self, name: &str) -> ClusterTlsArgs {
        ClusterTlsArgs::in_dir(self.dir.path(), name)
    }
}

/// Where `up`'s nodes get their certificates.
#[derive(Debug)]
pub enum NodeCerts {
    /// `--insecure-cluster`.
    Insecure,
    /// `--cluster-certs DIR`, as `switchyard certs` wrote it.
    Dir(PathBuf),
    /// A throw-away CA for this run.
    Local(LocalCerts),
}

impl NodeCerts {
    /// `up`'s choice: plaintext when asked, the certificates in `dir` when given, else (only
    /// where `throw_away` is allowed: one host) a throw-away CA for `workers` and `routers`.
    pub fn for_up(
        insecure: bool,
        dir: Option<&Path>,
        throw_away: Option<(usize, usize)>,
    ) -> anyhow::Result<NodeCerts> {
        if insecure {
            return Ok(NodeCerts::Insecure);
        }
        if let Some(dir) = dir {
            if !dir.join("ca.pem").exists() {
                bail!(
                    "--cluster-certs {}: no ca.pem there (write a set with `switchyard certs --out {}`)",
                    dir.display(),
                    dir.display()
                );
            }
            if dir.join("ca.key").exists() {
                tracing::warn!(
                    dir = %dir.display(),
                    "--cluster-certs holds ca.key, which can issue any node's certificate: keep it off the nodes' hosts"
                );
            }
            return Ok(NodeCerts::Dir(dir.to_path_buf()));
        }
        match throw_away {
            Some((workers, routers)) => Ok(NodeCerts::Local(LocalCerts::issue(workers, routers)?)),
            None => bail!(
                "a cluster file spans hosts, which must share a cluster CA: give --cluster-certs DIR (from `switchyard certs`: on each host, ca.pem and the pairs of the nodes it runs), or --insecure-cluster"
            ),
        }
    }

    /// Node `name`'s flags.
    pub fn node(&self, name: &str) -> ClusterTlsArgs {
        match self {
            NodeCerts::Insecure => ClusterTlsArgs {
                insecure_cluster: true,
                ..Default::default()
            },
            NodeCerts::Dir(dir) => ClusterTlsArgs::in_dir(dir, name),
            NodeCerts::Local(local) => local.node(name),
        }
    }

    /// What `up` prints about them.
    pub fn describe(&self) -> String {
        match self {
            NodeCerts::Insecure => "cluster links in plaintext (--insecure-cluster)".into(),
            NodeCerts::Dir(dir) => format!(
                "cluster links over mutual TLS, certificates from {}",
                dir.display()
            ),
            NodeCerts::Local(local) => format!(
                "cluster links over mutual TLS, a throw-away CA (admin certificate {}/admin.pem, removed on exit)",
                local.dir().display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flags_is_an_error_that_names_both_ways() {
        let err = ClusterTlsArgs::default()
            .links(Role::Worker)
            .expect_err("neither");
        let text = format!("{err:#}");
        assert!(text.contains("--cluster-ca, --cert and --key"), "{text}");
        assert!(text.contains("--insecure-cluster"), "{text}");
        let partial = ClusterTlsArgs {
            cert: Some("c.pem".into()),
            ..Default::default()
        };
        let text = format!("{:#}", partial.links(Role::Worker).expect_err("partial"));
        assert!(text.contains("got only --cert"), "{text}");
    }

    #[test]
    fn local_certs_load_for_their_role_only() {
        let certs = LocalCerts::issue(2, 1).expect("certs");
        let links = certs.node("worker-1").links(Role::Worker).expect("worker");
        assert_eq!(
            links.identity(),
            Some(&NodeIdentity::new(Role::Worker, "worker-1"))
        );
        let text = format!(
            "{:#}",
            certs
                .node("router-0")
                .links(Role::Worker)
                .expect_err("router cert")
        );
        assert!(text.contains("needs a worker certificate"), "{text}");
        assert!(certs.node("admin").links(Role::Admin).is_ok());
    }
}
