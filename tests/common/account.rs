//! Credentials of a ServiceAccount for a process under test: a kubeconfig holding a token the API
//! server issued for the account through the TokenRequest API (the way a pod's projected token is
//! made since Kubernetes 1.24; no long-lived token Secret exists), never the admin token.

use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Client;
use kube::api::{Api, PostParams};

pub struct Account {
    pub namespace: String,
    /// The user name the API server sees (`system:serviceaccount:NS:NAME`), as in its audit log.
    pub user: String,
    pub kubeconfig: PathBuf,
}

/// Asks the API server for a token of ServiceAccount `namespace/name` (valid two hours: longer
/// than any test) and writes a kubeconfig for it into `dir`, readable by the owner only.
pub async fn service_account_kubeconfig(client: &Client, namespace: &str, name: &str, dir: &Path) -> Account {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        // `spec`, `audiences` and `status.token` are optional in the types since Kubernetes 1.36
        // (k8s-openapi `v1_36`); the server still needs the spec.
        spec: Some(TokenRequestSpec {
            audiences: Some(vec!["https://kubernetes.default.svc".into()]),
            expiration_seconds: Some(7200),
            ..Default::default()
        }),
        ..Default::default()
    };
    let what = format!("a token for ServiceAccount {namespace}/{name}");
    // The account may have been created a moment ago by `kubectl apply` or `helm install`.
    let token = super::wait_until(std::time::Duration::from_secs(30), &what, || {
        let (accounts, request) = (accounts.clone(), request.clone());
        async move {
            let issued = accounts.create_token_request(name, &PostParams::default(), &request).await.ok()?;
            issued.status.and_then(|s| s.token)
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
        user: format!("system:serviceaccount:{namespace}:{name}"),
        kubeconfig: path,
    }
}

/// A client that authenticates with `kubeconfig` (such as an [`Account`]'s).
pub async fn client_from(kubeconfig: &Path) -> Client {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    Client::try_from(config).unwrap()
}
