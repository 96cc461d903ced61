//! etcd + kube-apiserver on loopback with generated certificates, an admin kubeconfig, and
//! ServiceAccount tokens (TokenRequest) so a test can act with one account's RBAC only.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::process::{Proc, free_port};
use crate::tools;

/// Where and how the API server serves.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The address it binds and advertises (the `kubernetes` Service's endpoint).
    pub address: IpAddr,
    /// Its port (a free one if `None`).
    pub port: Option<u16>,
    /// `--service-cluster-ip-range`; its first address is the `kubernetes` Service's.
    pub service_cidr: String,
    /// Authorize kubelets as a real cluster does: the Node authorizer before RBAC, the
    /// NodeRestriction admission plugin, and a client certificate to call kubelets with.
    pub node_authorization: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: None,
            service_cidr: "10.0.0.0/24".into(),
            node_authorization: false,
        }
    }
}

/// A running etcd + kube-apiserver pair.
pub struct Cluster {
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// Admin kubeconfig (client certificate in `system:masters`).
    pub admin_kubeconfig: PathBuf,
    dir: PathBuf,
    ca_file: PathBuf,
    etcd_url: String,
    etcd_dir: PathBuf,
    apiserver_args: Vec<String>,
    etcd_args: Vec<String>,
    apiserver: Option<Proc>,
    etcd: Option<Proc>,
    ca: CertifiedIssuer<'static, KeyPair>,
    pki_dir: PathBuf,
}

/// The API server's audit policy: every request made by a ServiceAccount, at `Metadata`
/// level (who, verb, resource, namespace, name, response code; no bodies), once complete.
/// Tests read the log to learn which calls a component really makes.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: [\"system:serviceaccounts\"]
  - level: None
";

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

fn write_pki(dir: &Path, address: IpAddr) -> Result<(Pki, CertifiedIssuer<'static, KeyPair>)> {
    fs::create_dir_all(dir)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "imagegc-testbed-ca");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default.svc.cluster.local".to_string(),
    ];
    if !address.is_loopback() {
        sans.push(address.to_string());
    }
    let mut server = CertificateParams::new(sans)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &ca)?;

    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin
        .distinguished_name
        .push(DnType::CommonName, "imagegc-testbed-admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_key = KeyPair::generate()?;
    let admin_cert = admin.signed_by(&admin_key, &ca)?;

    let sa = KeyPair::generate()?;
    let pki = Pki {
        ca: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        admin_cert: dir.join("admin.crt"),
        admin_key: dir.join("admin.key"),
        sa_key: dir.join("sa.key"),
        sa_pub: dir.join("sa.pub"),
    };
    fs::write(&pki.ca, ca.pem())?;
    fs::write(&pki.server_cert, server_cert.pem())?;
    fs::write(&pki.server_key, server_key.serialize_pem())?;
    fs::write(&pki.admin_cert, admin_cert.pem())?;
    fs::write(&pki.admin_key, admin_key.serialize_pem())?;
    fs::write(&pki.sa_key, sa.serialize_pem())?;
    fs::write(&pki.sa_pub, sa.public_key_pem())?;
    Ok((pki, ca))
}

/// Signs a client certificate for `common_name` (in group `organization`, if any) with `ca`;
/// writes `<dir>/<file>.crt` and `.key` and returns their paths.
fn write_client_cert(
    ca: &CertifiedIssuer<'static, KeyPair>,
    dir: &Path,
    file: &str,
    common_name: &str,
    organization: Option<&str>,
) -> Result<(PathBuf, PathBuf)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    let (cert_path, key_path) = (
        dir.join(format!("{file}.crt")),
        dir.join(format!("{file}.key")),
    );
    fs::write(&cert_path, cert.pem())?;
    fs::write(&key_path, key.serialize_pem())?;
    Ok((cert_path, key_path))
}

/// Writes a kubeconfig for `server` trusting `ca`, authenticating with either a client
/// certificate pair or a bearer token.
pub fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    user: &KubeconfigUser<'_>,
) -> Result<()> {
    let user_yaml = match user {
        KubeconfigUser::Cert { cert, key } => format!(
            "    client-certificate: {}\n    client-key: {}\n",
            cert.display(),
            key.display()
        ),
        KubeconfigUser::Token(t) => format!("    token: {t}\n"),
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testbed\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: user\n  user:\n{user_yaml}contexts:\n- name: testbed\n  context:\n    cluster: testbed\n    user: user\ncurrent-context: testbed\n",
        ca = ca.display()
    );
    fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))
}

/// How a kubeconfig authenticates.
pub enum KubeconfigUser<'a> {
    /// A client certificate and key file.
    Cert {
        /// Certificate PEM file.
        cert: &'a Path,
        /// Key PEM file.
        key: &'a Path,
    },
    /// A bearer token.
    Token(&'a str),
}

/// A client built from a kubeconfig file (kube's default HTTP/1.1 stack).
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    Ok(Client::try_from(config_from_kubeconfig(path).await?)?)
}

/// The client configuration a kubeconfig file describes, for building a client with another
/// HTTP stack (the product's own, in the benches).
pub async fn config_from_kubeconfig(path: &Path) -> Result<Config> {
    let kc = Kubeconfig::read_from(path)?;
    Ok(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)
}

impl Cluster {
    /// The running processes by name (`kube-apiserver`, `etcd`), for measuring them.
    pub fn processes(&self) -> Vec<(&'static str, &Proc)> {
        let mut out = Vec::new();
        if let Some(p) = &self.apiserver {
            out.push(("kube-apiserver", p));
        }
        if let Some(p) = &self.etcd {
            out.push(("etcd", p));
        }
        out
    }

    /// The API server's port.
    pub fn port(&self) -> Result<u16> {
        self.server
            .rsplit_once(':')
            .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
            .ok_or_else(|| anyhow!("no port in {}", self.server))
    }

    /// The API server's process ID, while it runs.
    pub fn apiserver_pid(&self) -> Option<u32> {
        self.apiserver.as_ref().map(Proc::pid)
    }

    /// Starts etcd and kube-apiserver on loopback under `bed_dir/cluster` and waits for
    /// `/readyz`.
    pub async fn start(bed_dir: &Path) -> Result<Cluster> {
        Cluster::start_with(bed_dir, &ClusterOptions::default()).await
    }

    /// Starts etcd and kube-apiserver as `opts` says under `bed_dir/cluster` and waits for
    /// `/readyz`.
    pub async fn start_with(bed_dir: &Path, opts: &ClusterOptions) -> Result<Cluster> {
        let etcd_bin = tools::go_tool("etcd")?;
        let apiserver_bin = tools::go_tool("kube-apiserver")?;
        let dir = bed_dir.join("cluster");
        let pki_dir = dir.join("pki");
        let (pki, ca) = write_pki(&pki_dir, opts.address)?;

        let (client_port, peer_port) = (free_port()?, free_port()?);
        let api_port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_dir = dir.join("etcd");
        let server = format!("https://{}:{api_port}", opts.address);
        let audit_policy = dir.join("audit-policy.yaml");
        fs::write(&audit_policy, AUDIT_POLICY)?;
        let mut apiserver_args = vec![
            format!("--audit-policy-file={}", audit_policy.display()),
            format!("--audit-log-path={}", dir.join("audit.log").display()),
            "--audit-log-format=json".into(),
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={}", opts.address),
            format!("--advertise-address={}", opts.address),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", pki.server_cert.display()),
            format!("--tls-private-key-file={}", pki.server_key.display()),
            format!("--client-ca-file={}", pki.ca.display()),
            format!("--service-account-key-file={}", pki.sa_pub.display()),
            format!(
                "--service-account-signing-key-file={}",
                pki.sa_key.display()
            ),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-cluster-ip-range={}", opts.service_cidr),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            format!("--cert-dir={}", dir.join("certs").display()),
        ];
        if opts.node_authorization {
            let (cert, key) = write_client_cert(
                &ca,
                &pki_dir,
                "apiserver-kubelet-client",
                "kube-apiserver-kubelet-client",
                Some("system:masters"),
            )?;
            apiserver_args.extend([
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                // Reach kubelets (logs, exec) at their node IP, never by resolving a name.
                "--kubelet-preferred-address-types=InternalIP".into(),
                format!("--kubelet-client-certificate={}", cert.display()),
                format!("--kubelet-client-key={}", key.display()),
            ]);
        } else {
            apiserver_args.push("--authorization-mode=RBAC".into());
        }
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        write_kubeconfig(
            &admin_kubeconfig,
            &server,
            &pki.ca,
            &KubeconfigUser::Cert {
                cert: &pki.admin_cert,
                key: &pki.admin_key,
            },
        )?;
        let etcd_args = vec![
            format!("--data-dir={}", etcd_dir.display()),
            "--name=testbed".into(),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=testbed={peer_url}"),
            // Test data only: skip fsync so the bed is fast on slow disks.
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ];
        let mut cluster = Cluster {
            server,
            admin_kubeconfig,
            ca_file: pki.ca,
            dir,
            etcd_url,
            etcd_dir,
            apiserver_args,
            etcd_args,
            apiserver: None,
            etcd: None,
            ca,
            pki_dir,
        };
        cluster.start_etcd(&etcd_bin)?;
        cluster.start_apiserver(&apiserver_bin)?;
        cluster.wait_ready(Duration::from_secs(90)).await?;
        Ok(cluster)
    }

    fn start_etcd(&mut self, bin: &Path) -> Result<()> {
        let bed_dir = self.dir.parent().unwrap_or(&self.dir).to_path_buf();
        self.etcd = Some(Proc::spawn(
            "etcd",
            bin,
            &self.etcd_args,
            &[],
            &bed_dir,
            &self.dir.join("etcd.log"),
        )?);
        Ok(())
    }

    /// SIGKILLs etcd, leaves it down for `down`, starts it again on the same data and ports
    /// (fault injection); waits until the API server is ready again.
    pub async fn restart_etcd(&mut self, down: Duration) -> Result<()> {
        if let Some(mut p) = self.etcd.take() {
            p.kill_hard();
        }
        tokio::time::sleep(down).await;
        self.start_etcd(&tools::go_tool("etcd")?)?;
        self.wait_ready(Duration::from_secs(90)).await
    }

    fn start_apiserver(&mut self, bin: &Path) -> Result<()> {
        let bed_dir = self.dir.parent().unwrap_or(&self.dir).to_path_buf();
        self.apiserver = Some(Proc::spawn(
            "kube-apiserver",
            bin,
            &self.apiserver_args,
            &[],
            &bed_dir,
            &self.dir.join("kube-apiserver.log"),
        )?);
        Ok(())
    }

    /// Waits until the API server answers `/readyz` with `ok`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let client = self.admin_client().await?;
        loop {
            for (name, p) in [
                ("etcd", &mut self.etcd),
                ("kube-apiserver", &mut self.apiserver),
            ] {
                if let Some(p) = p
                    && !p.is_running()
                {
                    bail!("{name} exited during start-up:\n{}", p.log_tail(30));
                }
            }
            let req = http::Request::get("/readyz").body(Vec::new())?;
            if let Ok(body) = client.request_text(req).await
                && body.trim() == "ok"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                let tail = self
                    .apiserver
                    .as_ref()
                    .map(|p| p.log_tail(30))
                    .unwrap_or_default();
                bail!("kube-apiserver not ready after {timeout:?}:\n{tail}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// SIGKILLs the API server and starts it again (fault injection); waits for readiness.
    pub async fn restart_apiserver(&mut self) -> Result<()> {
        self.kill_apiserver();
        self.start_apiserver_again().await
    }

    /// SIGKILLs the API server (fault injection); [`Cluster::start_apiserver_again`] brings
    /// it back.
    pub fn kill_apiserver(&mut self) {
        if let Some(mut p) = self.apiserver.take() {
            p.kill_hard();
        }
    }

    /// Starts the API server after [`Cluster::kill_apiserver`]; waits for readiness.
    pub async fn start_apiserver_again(&mut self) -> Result<()> {
        self.start_apiserver(&tools::go_tool("kube-apiserver")?)?;
        self.wait_ready(Duration::from_secs(90)).await
    }

    /// Advances etcd's revision (a write outside the API server's keys) and compacts its
    /// history up to there, physically: every older revision is gone, so a watch resuming
    /// from one can only be answered with `410 Gone`. Returns the compacted revision.
    pub async fn compact_etcd(&self) -> Result<i64> {
        let put = serde_json::json!({"key": "dGVzdGJlZC9jb21wYWN0", "value": "MQ=="});
        let reply = self.etcd_post("/v3/kv/put", &put).await?;
        let revision: i64 = reply["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .with_context(|| format!("etcd put returned no revision: {reply}"))?;
        let compact = serde_json::json!({"revision": revision.to_string(), "physical": true});
        self.etcd_post("/v3/kv/compaction", &compact).await?;
        Ok(revision)
    }

    /// POSTs `body` to etcd's JSON gateway and returns the JSON reply.
    async fn etcd_post(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let host = self.etcd_url.trim_start_matches("http://");
        let body = body.to_string();
        let mut stream = tokio::net::TcpStream::connect(host).await?;
        let request = format!(
            "POST {path} HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let (head, payload) = response
            .split_once("\r\n\r\n")
            .with_context(|| format!("etcd {path}: malformed reply {response:?}"))?;
        // HTTP/1.0, so the reply is never chunked.
        if head.split_whitespace().nth(1) != Some("200") {
            bail!("etcd {path}: {head}\n{payload}");
        }
        serde_json::from_str(payload.trim())
            .with_context(|| format!("etcd {path}: reply is not JSON: {payload:?}"))
    }

    /// The API server's audit log: one JSON `audit.k8s.io/v1` Event per line for every request
    /// a ServiceAccount made (see [`AUDIT_POLICY`]).
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// The etcd client URL.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// etcd's data directory.
    pub fn etcd_dir(&self) -> &Path {
        &self.etcd_dir
    }

    /// The CA certificate the API server's serving certificate chains to.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The ServiceAccount token signing key (for kube-controller-manager).
    pub fn service_account_key_file(&self) -> PathBuf {
        self.pki_dir.join("sa.key")
    }

    /// Writes a kubeconfig authenticating as `common_name` in group `organization` with a
    /// client certificate signed by the cluster's CA (as kubeadm does for kubelets and the
    /// control plane's components); returns its path.
    pub fn client_cert_kubeconfig(
        &self,
        file: &str,
        common_name: &str,
        organization: Option<&str>,
    ) -> Result<PathBuf> {
        let (cert, key) =
            write_client_cert(&self.ca, &self.pki_dir, file, common_name, organization)?;
        let path = self.dir.join(format!("{file}.kubeconfig"));
        write_kubeconfig(
            &path,
            &self.server,
            &self.ca_file,
            &KubeconfigUser::Cert {
                cert: &cert,
                key: &key,
            },
        )?;
        Ok(path)
    }

    /// A cluster-admin client.
    pub async fn admin_client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.admin_kubeconfig).await
    }

    /// Creates `namespace` and ServiceAccount `name` in it if missing.
    pub async fn ensure_service_account(&self, namespace: &str, name: &str) -> Result<()> {
        let client = self.admin_client().await?;
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(namespace.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        ignore_conflict(
            Api::<Namespace>::all(client.clone())
                .create(&PostParams::default(), &ns)
                .await,
        )?;
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        ignore_conflict(
            Api::<ServiceAccount>::namespaced(client, namespace)
                .create(&PostParams::default(), &sa)
                .await,
        )?;
        Ok(())
    }

    /// Issues a token for ServiceAccount `namespace/name` through the TokenRequest API,
    /// optionally bound to a Pod (`(name, uid)`), in which case the API server adds the
    /// pod's node name and UID as claims, as for a kubelet-mounted token.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        bound_pod: Option<(&str, &str)>,
    ) -> Result<String> {
        let bound = bound_pod.map(|(pod, uid)| BoundObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.into()),
            uid: Some(uid.into()),
        });
        self.service_account_token_bound_to(namespace, name, bound)
            .await
    }

    /// Issues a token for ServiceAccount `namespace/name` bound to any object the
    /// TokenRequest API accepts (a Pod, a Secret, or a Node, like `kubectl create token
    /// --bound-object-kind`), or to none.
    pub async fn service_account_token_bound_to(
        &self,
        namespace: &str,
        name: &str,
        bound: Option<BoundObjectReference>,
    ) -> Result<String> {
        let client = self.admin_client().await?;
        let api = Api::<ServiceAccount>::namespaced(client, namespace);
        let req = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: None,
                expiration_seconds: Some(3600 * 24),
                bound_object_ref: bound,
            }),
            ..Default::default()
        };
        let resp = api
            .create_token_request(name, &PostParams::default(), &req)
            .await
            .with_context(|| format!("TokenRequest for {namespace}/{name}"))?;
        resp.status
            .and_then(|s| s.token)
            .context("TokenRequest returned no status")
    }

    /// Writes a kubeconfig that authenticates with `token`; returns its path.
    pub fn token_kubeconfig(&self, file_name: &str, token: &str) -> Result<PathBuf> {
        let path = self.dir.join(file_name);
        write_kubeconfig(
            &path,
            &self.server,
            &self.ca_file,
            &KubeconfigUser::Token(token),
        )?;
        Ok(path)
    }

    /// A client acting as ServiceAccount `namespace/name` (unbound token).
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> Result<Client> {
        let token = self.service_account_token(namespace, name, None).await?;
        let path = self.token_kubeconfig(&format!("sa-{namespace}-{name}.kubeconfig"), &token)?;
        client_from_kubeconfig(&path).await
    }

    /// Runs `kubectl` with the admin kubeconfig; fails with its output if it fails.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new(tools::go_tool("kubectl")?)
            .arg("--kubeconfig")
            .arg(&self.admin_kubeconfig)
            .args(args)
            .output()
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply --server-side -f manifest`, retried for up to `timeout` while the API
    /// server settles (a fresh server may not serve every API group yet).
    pub async fn apply(&self, manifest: &Path, timeout: Duration) -> Result<()> {
        let manifest = manifest.to_str().context("manifest path is not UTF-8")?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.kubectl(&["apply", "--server-side", "-f", manifest]) {
                Ok(_) => return Ok(()),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops the API server, then etcd.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.apiserver.take() {
            p.stop(Duration::from_secs(10));
        }
        if let Some(mut p) = self.etcd.take() {
            p.stop(Duration::from_secs(10));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn ignore_conflict<T>(r: Result<T, kube::Error>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
