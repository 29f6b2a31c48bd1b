//! `fake-vastai`: a local HTTP server that speaks the Vast.ai API closely enough for the official
//! `vastai` CLI and our client, for tests, benchmarks and development without an account.
//!
//! - Offers come from a catalogue file or a generated catalogue; searches use the API's filter
//!   language, ordering and limits.
//! - Instances move `created → loading → running` after configurable delays, and carry
//!   `ssh_host`/`ssh_port` (and a `22/tcp` port mapping) pointing at a configured SSH endpoint.
//!   Attached SSH keys can be appended to an `authorized_keys` file that endpoint reads. With
//!   [`FakeConfig::ssh_per_instance`] each instance gets its own port in front of that endpoint,
//!   reachable only while the instance runs (`ssh_forward`), so a dead instance cuts SSH too.
//! - Destroy, label, stop/start, the paginated v1 listing, per-endpoint 429 rate limiting.
//! - Faults ([`Fault`]) and the request log and counters are reachable over `/_fake/...` and
//!   through [`FakeServer`] in-process.
//! - State is saved to a file after every change and loaded at start.
//!
//! Admin endpoints (no auth): `GET|DELETE /_fake/requests`, `GET /_fake/counters`,
//! `GET|POST|DELETE /_fake/faults`, `POST /_fake/instances/{id}/state {"state": ...}`,
//! `GET /_fake/state`.

mod faults;
mod query;
mod server;
mod ssh_forward;
mod state;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use faults::Fault;
pub use state::ForcedState;

/// How the fake behaves.
#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// The only accepted API key; `None` accepts any non-empty key (but never none).
    pub api_key: Option<String>,
    /// Where instances say SSH is (the test sshd).
    pub ssh_host: String,
    pub ssh_port: u16,
    /// Time from create to `loading`, and from create to `running`.
    pub loading_after: Duration,
    pub running_after: Duration,
    /// Minimum time between two calls to one endpoint; faster calls get 429. Zero disables.
    pub rate_limit_interval: Duration,
    /// Largest page of the v1 instance listing (the API's is 25).
    pub page_size: usize,
    /// Saved after every change and loaded at start.
    pub state_file: Option<PathBuf>,
    /// Offers to serve; the generated catalogue when unset.
    pub catalogue: Option<PathBuf>,
    /// Size of the generated catalogue.
    pub generated_offers: usize,
    /// Faults active from the start.
    pub faults: Vec<Fault>,
    /// Attached SSH public keys are appended here, so the SSH endpoint accepts them.
    pub authorized_keys_file: Option<PathBuf>,
    /// Give every instance its own SSH port on `ssh_host`, forwarding to `ssh_host:ssh_port`
    /// only while the instance runs: a dead, stopped or destroyed instance refuses and cuts
    /// connections, an offline one leaves them hanging (see `ssh_forward`). Without it every
    /// instance reports `ssh_port` itself and stays reachable whatever its state.
    pub ssh_per_instance: bool,
    /// Where the SSH of the nth rented instance goes: the first rent gets the first port, the
    /// second the second, and so on, the last repeated for every later rent (empty: `ssh_port`
    /// for all). So a test can give its first machine a hostile sshd and the replacement a good
    /// one. With `ssh_per_instance` the instance's own port forwards there; without, the
    /// instance reports it. [`FakeServer::set_ssh_endpoints`] replaces the list at run time.
    pub ssh_endpoints: Vec<u16>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            ssh_host: "127.0.0.1".into(),
            ssh_port: 22,
            loading_after: Duration::ZERO,
            running_after: Duration::ZERO,
            rate_limit_interval: Duration::ZERO,
            page_size: 25,
            state_file: None,
            catalogue: None,
            generated_offers: 48,
            faults: Vec::new(),
            authorized_keys_file: None,
            ssh_per_instance: false,
            ssh_endpoints: Vec::new(),
        }
    }
}

/// Errors starting the fake.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    #[error("failed to listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read the state file {path}")]
    LoadState {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read the catalogue {path}")]
    Catalogue {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the fake server stopped with an error")]
    Serve(#[source] std::io::Error),
}

/// One request as the fake saw it. The credential itself is never recorded, only how it came.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub seq: u64,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Endpoint name (`create_instance`, `show_instance`, ...); `unknown` for anything else.
    pub endpoint: String,
    /// `bearer`, `query` (legacy `?api_key=`), `invalid` (a key that was refused) or `none`.
    pub auth: String,
    /// 0 while unanswered, and for good when the client gave up first.
    pub status: u16,
    pub body: Option<Value>,
    pub user_agent: Option<String>,
    /// When the request arrived, in seconds since the Unix epoch (benchmarks time the operator
    /// by it).
    #[serde(default)]
    pub received_at: f64,
}

/// Requests per endpoint and status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Requests received.
    pub total: u64,
    /// endpoint → requests received (answered or not).
    pub arrived: BTreeMap<String, u64>,
    /// endpoint → status → requests answered.
    pub by_endpoint: BTreeMap<String, BTreeMap<u16, u64>>,
}

impl Counters {
    /// Requests to `endpoint` received, answered or not.
    pub fn endpoint(&self, endpoint: &str) -> u64 {
        self.arrived.get(endpoint).copied().unwrap_or(0)
    }

    /// Requests to `endpoint` answered `status`.
    pub fn status(&self, endpoint: &str, status: u16) -> u64 {
        self.by_endpoint.get(endpoint).and_then(|m| m.get(&status)).copied().unwrap_or(0)
    }
}

struct Inner {
    data: state::Persisted,
    faults: faults::Faults,
    log: Vec<RequestRecord>,
    counters: Counters,
    last_call: BTreeMap<String, tokio::time::Instant>,
    /// [`FakeConfig::ssh_endpoints`], or what replaced it, and the rents since it was set.
    ssh_endpoints: Vec<u16>,
    rents_since_endpoints: usize,
}

/// State shared by the handlers and the [`FakeServer`] handle.
pub struct Shared {
    config: FakeConfig,
    inner: Mutex<Inner>,
    /// Itself, for the tasks that serve per-instance SSH endpoints.
    me: Weak<Shared>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A handler that panicked mid-update leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn row_settings(&self, inner: &Inner) -> state::RowSettings {
        state::RowSettings {
            loading_after: self.config.loading_after,
            running_after: self.config.running_after.max(self.config.loading_after),
            ssh_host: self.config.ssh_host.clone(),
            ssh_port: self.config.ssh_port,
            lifetime: inner.faults.lifetime(),
        }
    }

    /// Saves the state file, if there is one. A failed save is logged, not fatal: the fake keeps
    /// serving from memory.
    fn persist(&self, inner: &Inner) {
        if let Some(path) = &self.config.state_file
            && let Err(error) = inner.data.save(path)
        {
            tracing::error!(path = %path.display(), %error, "Failed to save the fake Vast.ai state");
        }
    }

    /// Gives the instance `id` just rented the next entry of the SSH endpoint list, if any.
    fn assign_ssh_endpoint(&self, inner: &mut Inner, id: i64) {
        let Some(&last) = inner.ssh_endpoints.last() else { return };
        let port = inner.ssh_endpoints.get(inner.rents_since_endpoints).copied().unwrap_or(last);
        inner.rents_since_endpoints += 1;
        if let Some(inst) = inner.data.instances.get_mut(&id) {
            inst.ssh_upstream = Some(port);
            if !self.config.ssh_per_instance {
                inst.ssh_port = Some(port);
            }
        }
    }

    /// Opens instance `id`'s own SSH endpoint when [`FakeConfig::ssh_per_instance`] is set; the
    /// instance then reports its port. On failure the instance keeps the shared endpoint.
    fn open_ssh_endpoint(&self, inner: &mut Inner, id: i64) {
        if !self.config.ssh_per_instance {
            return;
        }
        let Some(inst) = inner.data.instances.get_mut(&id) else { return };
        let upstream_port = inst.ssh_upstream.unwrap_or(self.config.ssh_port);
        let upstream =
            std::net::ToSocketAddrs::to_socket_addrs(&(self.config.ssh_host.as_str(), upstream_port))
                .ok()
                .and_then(|mut addrs| addrs.next());
        let opened = upstream.ok_or_else(|| std::io::Error::other("unresolvable ssh_host")).and_then(|up| {
            let listener = ssh_forward::bind(&self.config.ssh_host, inst.ssh_port)?;
            Ok((listener.local_addr()?.port(), listener, up))
        });
        match opened {
            Ok((port, listener, upstream)) => {
                inst.ssh_port = Some(port);
                ssh_forward::spawn(self.me.clone(), id, listener, upstream);
            }
            Err(error) => {
                tracing::error!(instance.id = id, %error, "Failed to open the instance's own SSH endpoint");
                inst.ssh_port = None;
            }
        }
    }

    /// What instance `id`'s own SSH endpoint does now (its state decides).
    fn ssh_reach(&self, id: i64) -> ssh_forward::Reach {
        let inner = self.lock();
        let Some(inst) = inner.data.instances.get(&id) else { return ssh_forward::Reach::Gone };
        let settings = self.row_settings(&inner);
        match state::statuses(inst, state::now_epoch(), &settings).0 {
            "running" => ssh_forward::Reach::Open,
            "offline" => ssh_forward::Reach::Silent,
            _ => ssh_forward::Reach::Closed,
        }
    }

    fn add_fault(&self, fault: Fault) {
        let mut inner = self.lock();
        match fault {
            Fault::InstanceBecomes { id, state, after_secs } => {
                let at = state::now_epoch() + after_secs.max(0.0);
                if let Some(inst) = inner.data.instances.get_mut(&id) {
                    inst.forced = match state {
                        ForcedState::Running => None,
                        other => Some((other, at)),
                    };
                }
                self.persist(&inner);
            }
            Fault::InstancesBecome { .. } => {
                inner.faults.active.retain(|f| !matches!(f, Fault::InstancesBecome { .. }));
                inner.faults.active.push(fault);
            }
            other => inner.faults.active.push(other),
        }
    }
}

/// A running fake server. Dropping it stops the server.
pub struct FakeServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

/// Starts a fake on `127.0.0.1` with a free port: the cheap way for tests to get one.
pub async fn spawn(config: FakeConfig) -> Result<FakeServer, FakeError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|source| FakeError::Bind { addr: "127.0.0.1:0".into(), source })?;
    start(listener, config)
}

/// Starts a fake on an existing listener (loads state and catalogue first). Must be called
/// inside a Tokio runtime; the server runs as a task of it.
pub fn start(listener: TcpListener, config: FakeConfig) -> Result<FakeServer, FakeError> {
    let addr = listener.local_addr().map_err(|source| FakeError::Bind { addr: "listener".into(), source })?;
    let shared = build_shared(config)?;
    let (tx, rx) = oneshot::channel::<()>();
    let app = server::router(shared.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                // Either an explicit shutdown or the handle being dropped ends the server.
                let _ = rx.await;
            })
            .await
    });
    tracing::info!(%addr, "Fake Vast.ai listening");
    Ok(FakeServer { addr, shared, shutdown: Some(tx), task: Some(task) })
}

fn build_shared(config: FakeConfig) -> Result<Arc<Shared>, FakeError> {
    let mut data = match &config.state_file {
        Some(path) => state::Persisted::load(path)
            .map_err(|source| FakeError::LoadState { path: path.clone(), source })?
            .unwrap_or_default(),
        None => state::Persisted::default(),
    };
    if let Some(path) = &config.catalogue {
        data.offers = state::load_catalogue(path)
            .map_err(|source| FakeError::Catalogue { path: path.clone(), source })?;
    } else if data.offers.is_empty() {
        data.offers = state::generated_catalogue(config.generated_offers);
    }
    data.mark_rented();
    if data.next_id == 0 {
        data.next_id = 20_000_001;
    }
    let initial = config.faults.clone();
    let ssh_endpoints = config.ssh_endpoints.clone();
    let shared = Arc::new_cyclic(|me| Shared {
        config,
        inner: Mutex::new(Inner {
            data,
            faults: faults::Faults::default(),
            log: Vec::new(),
            counters: Counters::default(),
            last_call: BTreeMap::new(),
            ssh_endpoints,
            rents_since_endpoints: 0,
        }),
        me: me.clone(),
    });
    for fault in initial {
        shared.add_fault(fault);
    }
    {
        let mut inner = shared.lock();
        let loaded: Vec<i64> = inner.data.instances.keys().copied().collect();
        for id in loaded {
            shared.open_ssh_endpoint(&mut inner, id);
        }
        shared.persist(&inner);
    }
    Ok(shared)
}

impl FakeServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash (the `vastai` CLI's `VAST_URL`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request since start or the last [`clear_requests`](Self::clear_requests).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().log.clone()
    }

    pub fn counters(&self) -> Counters {
        self.shared.lock().counters.clone()
    }

    pub fn clear_requests(&self) {
        let mut inner = self.shared.lock();
        inner.log.clear();
        inner.counters = Counters::default();
    }

    pub fn add_fault(&self, fault: Fault) {
        self.shared.add_fault(fault);
    }

    /// The faults still active (counting ones with what is left of their count).
    pub fn faults(&self) -> Vec<Fault> {
        self.shared.lock().faults.active.clone()
    }

    pub fn clear_faults(&self) {
        self.shared.lock().faults.active.clear();
    }

    /// Forces an instance into a state now (`Running` lifts an earlier forced state).
    pub fn set_instance_state(&self, id: i64, state: ForcedState) {
        self.shared.add_fault(Fault::InstanceBecomes { id, state, after_secs: 0.0 });
    }

    /// Instance rows as the API would show them now.
    pub fn instances(&self) -> Vec<Map<String, Value>> {
        let inner = self.shared.lock();
        let settings = self.shared.row_settings(&inner);
        let now = state::now_epoch();
        inner.data.instances.values().map(|i| state::instance_row(i, now, &settings)).collect()
    }

    /// Replaces [`FakeConfig::ssh_endpoints`]: the next rent gets the first of `ports`, and so
    /// on, the last repeated. Instances already rented keep theirs.
    pub fn set_ssh_endpoints(&self, ports: Vec<u16>) {
        let mut inner = self.shared.lock();
        inner.ssh_endpoints = ports;
        inner.rents_since_endpoints = 0;
    }

    /// The SSH port [`FakeConfig::ssh_endpoints`] gave instance `id`; `None` when it uses the
    /// configured `ssh_port` (or does not exist).
    pub fn ssh_endpoint_of(&self, id: i64) -> Option<u16> {
        self.shared.lock().data.instances.get(&id).and_then(|i| i.ssh_upstream)
    }

    /// SSH public keys attached to an instance, in order.
    pub fn ssh_keys(&self, id: i64) -> Vec<String> {
        self.shared.lock().data.instances.get(&id).map(|i| i.ssh_keys.clone()).unwrap_or_default()
    }

    /// The catalogue, rented offers included.
    pub fn offers(&self) -> Vec<Map<String, Value>> {
        self.shared.lock().data.offers.clone()
    }

    /// Stops the server and waits for it.
    pub async fn shutdown(mut self) -> Result<(), FakeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => match task.await {
                Ok(result) => result.map_err(FakeError::Serve),
                Err(join) => Err(FakeError::Serve(std::io::Error::other(join))),
            },
            None => Ok(()),
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use url::Url;

    use super::*;
    use crate::provider::config::ApiKey;
    use crate::provider::vastai::{ClientOptions, VastClient};
    use crate::provider::{GpuProvider, InstanceId, LaunchRequest, OfferQuery};

    fn client(fake: &FakeServer) -> VastClient {
        VastClient::new(Url::parse(&fake.url()).unwrap(), &ApiKey::new("k"), ClientOptions::default())
            .unwrap()
    }

    /// Rents `n` instances and returns their ids, in order.
    async fn rent(client: &VastClient, n: usize) -> Vec<InstanceId> {
        let offers = client.search_offers(&OfferQuery::default()).await.unwrap();
        let mut ids = Vec::new();
        for offer in offers.iter().take(n) {
            let request = LaunchRequest {
                offer_id: offer.id,
                image: "img".into(),
                disk_gb: 10,
                env: Default::default(),
                onstart: None,
                label: Some("t".into()),
                ssh: true,
                ssh_public_key: None,
                bid_price_per_hour: None,
            };
            ids.push(client.create_instance(&request).await.unwrap());
        }
        ids
    }

    async fn ssh_port(client: &VastClient, id: InstanceId) -> u16 {
        client.get_instance(id).await.unwrap().ssh.expect("a running instance has SSH").port
    }

    #[tokio::test]
    async fn the_nth_rent_gets_the_nth_ssh_endpoint_and_the_last_repeats() {
        let fake =
            spawn(FakeConfig { ssh_endpoints: vec![1111, 2222], ..FakeConfig::default() }).await.unwrap();
        let client = client(&fake);
        let ids = rent(&client, 3).await;
        let mut ports = Vec::new();
        for id in &ids {
            ports.push(ssh_port(&client, *id).await);
        }
        assert_eq!(ports, [1111, 2222, 2222]);
        assert_eq!(fake.ssh_endpoint_of(ids[0].0), Some(1111));

        // Replaced at run time: the count starts again; rented instances keep theirs.
        fake.set_ssh_endpoints(vec![3333, 4444]);
        let id = rent(&client, 1).await[0];
        assert_eq!(ssh_port(&client, id).await, 3333);

        // Without a list every instance reports the configured endpoint.
        let plain = spawn(FakeConfig { ssh_port: 2022, ..FakeConfig::default() }).await.unwrap();
        let plain_client = self::client(&plain);
        let id = rent(&plain_client, 1).await[0];
        assert_eq!(ssh_port(&plain_client, id).await, 2022);
        assert_eq!(plain.ssh_endpoint_of(id.0), None);
    }

    /// A TCP server that greets every connection with `tag`.
    async fn greeter(tag: &'static [u8]) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, tag).await;
            }
        });
        port
    }

    async fn greeting(port: u16) -> Vec<u8> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
        )
        .await
        .expect("the endpoint answers")
        .unwrap();
        buf[..n].to_vec()
    }

    #[tokio::test]
    async fn with_own_ports_each_instance_forwards_to_its_entry() {
        let (bad, good) = (greeter(b"bad").await, greeter(b"good").await);
        let config =
            FakeConfig { ssh_per_instance: true, ssh_endpoints: vec![bad, good], ..FakeConfig::default() };
        let fake = spawn(config).await.unwrap();
        let client = client(&fake);
        let ids = rent(&client, 2).await;
        let (first, second) = (ssh_port(&client, ids[0]).await, ssh_port(&client, ids[1]).await);
        assert!(![bad, good].contains(&first) && ![bad, good].contains(&second));
        assert_eq!(greeting(first).await, b"bad");
        assert_eq!(greeting(second).await, b"good");
    }
}
