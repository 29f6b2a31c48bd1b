//! Credentials of a ServiceAccount for an operator that runs on the host instead of in a pod: a
//! kubeconfig holding a token the API server signs for the account (TokenRequest API, as the
//! kubelet asks for the token it mounts into a pod; token Secrets are no longer made for every
//! ServiceAccount since Kubernetes 1.24).

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Client;
use kube::api::{Api, PostParams};

/// A ServiceAccount's identity and a kubeconfig that authenticates as it.
pub struct Account {
    pub namespace: String,
    pub name: String,
    /// `system:serviceaccount:<namespace>:<name>`, as the audit log and RBAC see it.
    pub user: String,
    pub kubeconfig: PathBuf,
}

/// Lifetime of the tokens: longer than any test that uses one.
const TOKEN_SECONDS: i64 = 2 * 3600;

/// Asks the API server (as `client`, the admin) for a token of ServiceAccount `namespace/name`
/// (waiting for the account to exist) and writes a kubeconfig for it under `dir`.
pub async fn service_account_kubeconfig(client: &Client, namespace: &str, name: &str, dir: &Path) -> Account {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(TOKEN_SECONDS),
            ..Default::default()
        },
        ..Default::default()
    };
    let what = format!("a token of ServiceAccount {namespace}/{name}");
    let token = super::wait_until(Duration::from_secs(60), &what, || {
        let (accounts, request) = (accounts.clone(), request.clone());
        async move {
            let answer = accounts.create_token_request(name, &PostParams::default(), &request).await.ok()?;
            answer.status.map(|s| s.token).filter(|t| !t.is_empty())
        }
    })
    .await;
    let admin = std::fs::read_to_string(super::kubeconfig_path()).unwrap();
    let admin: serde_yaml::Value = serde_yaml::from_str(&admin).unwrap();
    let cluster = &admin["clusters"][0]["cluster"];
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": cluster["server"].as_str().unwrap(),
            "certificate-authority-data": cluster["certificate-authority-data"].as_str().unwrap(),
        }}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": name, "namespace": namespace}}],
        "current-context": "sa",
    });
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(format!("kubeconfig-{namespace}-{name}"));
    std::fs::write(&path, serde_yaml::to_string(&kubeconfig).unwrap()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    Account {
        namespace: namespace.to_string(),
        name: name.to_string(),
        user: format!("system:serviceaccount:{namespace}:{name}"),
        kubeconfig: path,
    }
}

/// A client that authenticates with `kubeconfig`.
pub async fn client_from(kubeconfig: &Path) -> Client {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    Client::try_from(config).unwrap()
}
