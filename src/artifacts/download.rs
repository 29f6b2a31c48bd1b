//! Bringing stored objects back onto a machine (a synced checkpoint for a replacement machine),
//! through short-lived presigned GETs: the machine never holds a storage credential.
//!
//! Like uploads, each URL reaches the machine only as a curl config snippet in the environment
//! of the command, never in its text or on a command line. Every file is written to a temporary
//! name, its size checked against what storage listed, and only then moved into place, so an
//! interrupted download never looks like a checkpoint.

use std::time::Duration;

use super::script::failure_message;
use super::store::Validity;
use super::{ArtifactError, ObjectRef, ObjectStore, PresignedRequest};
use crate::remote::{RemoteExec, RunOptions, shell_quote};

/// One object to fetch to `path` on the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadItem {
    pub object: ObjectRef,
    /// Size storage reported; the download must match it.
    pub size: u64,
    pub path: String,
}

const PRELUDE: &str = r#"set -u
gt_fail() { printf 'gt-error\t%s\n' "$*" >&2; exit 1; }
gt_get() {
  eval "gt_cfg=\${$1:-}"
  [ -n "$gt_cfg" ] || gt_fail "no download URL in $1"
  mkdir -p "$(dirname "$2")" || gt_fail "cannot create the folder of $2"
  gt_code=$(printf '%s\n' "$gt_cfg" | curl -K - --globoff --fail --silent --show-error \
    --retry 5 --retry-connrefused --connect-timeout 30 -o "$2.part" -w '%{http_code}') \
    || { rm -f "$2.part"; gt_fail "download of $2 failed (HTTP ${gt_code:-000})"; }
  gt_s=$(wc -c < "$2.part" | tr -d ' ')
  [ "$gt_s" = "$3" ] || { rm -f "$2.part"; gt_fail "$2: got $gt_s bytes, storage lists $3"; }
  mv -f "$2.part" "$2" || gt_fail "cannot move $2 into place"
  printf 'gt-got\t%s\n' "$2"
}
"#;

/// The download step for requests already presigned: the script (no URLs) and its environment.
pub fn render_download(
    items: &[(PresignedRequest, &DownloadItem)],
) -> Result<(String, Vec<(String, String)>), ArtifactError> {
    let mut script = String::from(PRELUDE);
    let mut env = Vec::new();
    for (i, (request, item)) in items.iter().enumerate() {
        let var = format!("GT_GET_{i}");
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        env.push((var.clone(), format!("url = \"{}\"\n", esc(&request.url))));
        let path = shell_quote(&item.path).map_err(|e| ArtifactError::Invalid(e.to_string()))?;
        script.push_str(&format!("gt_get {var} {path} {}\n", item.size));
    }
    Ok((script, env))
}

/// Downloads `items` onto `remote`; every file is in place with the listed size afterwards.
pub async fn download(
    store: &dyn ObjectStore,
    remote: &dyn RemoteExec,
    items: &[DownloadItem],
    url_ttl: Duration,
    timeout: Duration,
) -> Result<(), ArtifactError> {
    if items.is_empty() {
        return Ok(());
    }
    let mut requests = Vec::with_capacity(items.len());
    for item in items {
        requests.push((store.presign_get(&item.object, Validity::from_now(url_ttl)).await?, item));
    }
    let (script, env) = render_download(&requests)?;
    let out = remote
        .run(&script, RunOptions { timeout, env, ..Default::default() })
        .await
        .map_err(|e| ArtifactError::remote("download", e))?;
    if !out.success() {
        return Err(ArtifactError::StepFailed {
            step: "download",
            exit_code: out.exit_code,
            message: failure_message(&out.stderr_lossy()),
        });
    }
    let got = out.stdout_lossy().lines().filter(|l| l.starts_with("gt-got\t")).count();
    if got != items.len() {
        return Err(ArtifactError::Report {
            step: "download",
            message: format!("{got} of {} files reported", items.len()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::fake::FakeObjectStore;
    use crate::remote::local::LocalExec;

    fn request(url: &str) -> PresignedRequest {
        PresignedRequest {
            method: "GET".into(),
            url: url.into(),
            headers: vec![],
            expires_at: std::time::SystemTime::now(),
        }
    }

    #[test]
    fn urls_travel_in_the_environment_only() {
        let item = DownloadItem { object: ObjectRef::new("b", "k"), size: 3, path: "out/a b".into() };
        let (script, env) =
            render_download(&[(request("https://s3/b/k?X-Amz-Signature=secret"), &item)]).unwrap();
        assert!(!script.contains("secret"));
        assert!(script.contains("gt_get GT_GET_0 'out/a b' 3"));
        assert_eq!(env[0].0, "GT_GET_0");
        assert!(env[0].1.contains("X-Amz-Signature=secret"));
    }

    #[tokio::test]
    async fn a_download_lands_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = FakeObjectStore::new(&dir.path().join("store"));
        let object = ObjectRef::new("b", "runs/j/checkpoints/demo_10.safetensors");
        let stored = store.object_path(&object);
        std::fs::create_dir_all(stored.parent().unwrap()).unwrap();
        std::fs::write(&stored, b"weights").unwrap();
        let remote = LocalExec::new(dir.path().join("machine")).unwrap();
        let ttl = Duration::from_secs(60);
        let good =
            DownloadItem { object: object.clone(), size: 7, path: "output/demo_10.safetensors".into() };
        download(&store, &remote, std::slice::from_ref(&good), ttl, ttl).await.unwrap();
        let landed = dir.path().join("machine/output/demo_10.safetensors");
        assert_eq!(std::fs::read(&landed).unwrap(), b"weights");

        // A size that does not match what storage listed leaves nothing behind.
        let wrong = DownloadItem { size: 8, path: "output/other.safetensors".into(), ..good };
        let err = download(&store, &remote, &[wrong], ttl, ttl).await.unwrap_err();
        assert!(err.to_string().contains("got 7 bytes"), "{err}");
        assert!(!dir.path().join("machine/output/other.safetensors").exists());
        assert!(!dir.path().join("machine/output/other.safetensors.part").exists());
    }
}
