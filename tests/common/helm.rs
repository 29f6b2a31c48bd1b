//! The Helm 3 and Helm 4 CLIs that `tests/env/install.sh` builds from their Go modules, and the
//! chart they render and install. `tests/env/up.sh` names them in its env file as
//! `GPU_TRAINER_TEST_HELM3` and `GPU_TRAINER_TEST_HELM4`; a test that needs one fails (never
//! skips) when it is not there.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_yaml::Value;

pub fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/gpu-trainer")
}

/// One Helm CLI, with its own (empty) cache, config and data folders, so nothing of the user's
/// Helm setup (repositories, plugins, registry logins) takes part.
pub struct Helm {
    pub major: u8,
    path: PathBuf,
    home: tempfile::TempDir,
}

impl Helm {
    /// The Helm `major` (3 or 4) CLI of the test environment; panics when it is missing or is
    /// another version.
    pub fn new(major: u8) -> Self {
        let var = format!("GPU_TRAINER_TEST_HELM{major}");
        let path = match std::env::var_os(&var) {
            Some(path) if !path.is_empty() => PathBuf::from(path),
            _ => panic!(
                "{var} is not set: it names the Helm {major} CLI that tests/env/install.sh builds; \
                 run through tests/run.sh, or `source $GPU_TRAINER_ENV_DIR/env` after tests/env/up.sh"
            ),
        };
        assert!(path.is_file(), "{var}={}: no such file (run tests/env/install.sh)", path.display());
        let helm = Self { major, path, home: tempfile::tempdir().expect("a temporary Helm home") };
        let version = helm.ok(&["version", "--short"]);
        assert!(
            version.trim().starts_with(&format!("v{major}.")),
            "{var}={} is Helm {}, not Helm {major}",
            helm.path.display(),
            version.trim()
        );
        helm
    }

    /// `helm args...` (nothing run yet).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.path);
        command
            .args(args)
            .env("HELM_CACHE_HOME", self.home.path().join("cache"))
            .env("HELM_CONFIG_HOME", self.home.path().join("config"))
            .env("HELM_DATA_HOME", self.home.path().join("data"))
            .env_remove("HELM_NAMESPACE")
            .env_remove("HELM_KUBECONTEXT")
            .env_remove("HELM_DRIVER");
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap_or_else(|e| panic!("helm {} does not start: {e}", self.major))
    }

    /// Runs `helm args...` and returns stdout; panics with stderr when it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "helm {} {} failed ({}):\n{}{}",
            self.major,
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs `helm args...`, which must fail; returns stdout and stderr together.
    pub fn fails(&self, args: &[&str]) -> String {
        let output = self.run(args);
        let text =
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(
            !output.status.success(),
            "helm {} {} should fail; it printed:\n{text}",
            self.major,
            args.join(" ")
        );
        text
    }

    /// `helm template RELEASE charts/gpu-trainer --namespace NAMESPACE extra...` for the
    /// Kubernetes release the tests run, as text.
    pub fn template_text(&self, release: &str, namespace: &str, extra: &[&str]) -> String {
        let chart = chart_dir();
        let kube = kube_version();
        let mut args = vec![
            "template",
            release,
            chart.to_str().unwrap(),
            "--namespace",
            namespace,
            "--kube-version",
            &kube,
        ];
        args.extend_from_slice(extra);
        self.ok(&args)
    }

    /// The objects `helm template` renders (null documents dropped).
    pub fn template(&self, release: &str, namespace: &str, extra: &[&str]) -> Vec<Value> {
        documents(&self.template_text(release, namespace, extra), "helm template output")
    }

    /// `--kubeconfig` for the test API server (admin).
    pub fn kubeconfig_args() -> Vec<String> {
        vec!["--kubeconfig".into(), super::kubeconfig_path().display().to_string()]
    }
}

/// The YAML documents of `text` (empty ones dropped); panics naming `what` when one is broken.
pub fn documents(text: &str, what: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{what} is not well-formed YAML: {e}\n---\n{text}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Writes `values` (YAML) to `dir/name` and returns the path, for `--values`.
pub fn values_file(dir: &Path, name: &str, values: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_yaml::to_string(values).unwrap()).unwrap();
    path
}

/// The Kubernetes release the test environment runs (`KUBE_VERSION` in `tests/env/versions.env`):
/// `helm template` and `helm lint` render for it (`--kube-version`) rather than for the version of
/// the Kubernetes libraries Helm was built with.
pub fn kube_version() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/env/versions.env");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .find_map(|l| l.strip_prefix("KUBE_VERSION="))
        .unwrap_or_else(|| panic!("{} pins no KUBE_VERSION", path.display()))
        .trim()
        .to_string()
}
