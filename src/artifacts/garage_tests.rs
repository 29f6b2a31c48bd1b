//! Tests against a real S3 server that checks SigV4 signatures: Garage, started by
//! `tests/env/up.sh` on loopback. The "machine" is a `LocalExec` work dir, so uploads really go
//! through `sh` and `curl` exactly as on a rented instance.

use std::time::{Duration, SystemTime};

use md5::Md5;

use super::plan::Destination;
use super::recording::RecordingExec;
use super::s3::S3Store;
use super::script::FileReport;
use super::store::Validity;
use super::verify::verify_object;
use super::{ArtifactError, ObjectStore, S3Credentials, S3Settings, UploadItem, UploadSettings, Uploader};
use crate::remote::local::LocalExec;
use crate::remote::{RemoteExec, RunOptions};

const MIB: usize = 1024 * 1024;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run `source $GPU_TRAINER_ENV_DIR/env` after tests/env/up.sh")
    })
}

fn settings() -> S3Settings {
    S3Settings {
        endpoint: Some(env("GPU_TRAINER_TEST_S3_ENDPOINT")),
        region: env("GPU_TRAINER_TEST_S3_REGION"),
        force_path_style: true,
        credentials: S3Credentials {
            access_key_id: env("GPU_TRAINER_TEST_S3_ACCESS_KEY_ID"),
            secret_access_key: env("GPU_TRAINER_TEST_S3_SECRET_ACCESS_KEY"),
            session_token: None,
        },
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    remote: LocalExec,
    store: S3Store,
    dest: Destination,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let remote = LocalExec::new(dir.path().join("work")).unwrap();
    let unique = format!("t-{}", rand::random::<u64>());
    Fixture {
        remote,
        store: S3Store::new(&settings()),
        dest: Destination { bucket: env("GPU_TRAINER_TEST_S3_BUCKET"), job_prefix: unique },
        _dir: dir,
    }
}

impl Fixture {
    fn write(&self, rel: &str, data: &[u8]) {
        let path = self.remote.work_dir().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }

    /// PUTs `file` to `request` with curl on the "machine"; returns the HTTP status curl saw.
    async fn curl_put(&self, request: &super::PresignedRequest, file: &str) -> String {
        self.curl_put_with_body(request, file).await.0
    }

    /// Like `curl_put`, with the response body (S3's XML error).
    async fn curl_put_with_body(&self, request: &super::PresignedRequest, file: &str) -> (String, String) {
        let out = self
            .remote
            .run(
                &format!("curl -s -o body.xml -w '%{{http_code}}' -T {file} \"$URL\""),
                RunOptions {
                    timeout: Duration::from_secs(60),
                    env: vec![("URL".into(), request.url.clone())],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let body = std::fs::read_to_string(self.remote.work_dir().join("body.xml")).unwrap_or_default();
        (out.stdout_lossy(), body)
    }

    async fn curl_get(&self, request: &super::PresignedRequest) -> Vec<u8> {
        let out = self
            .remote
            .run(
                "curl -sS --fail \"$URL\"",
                RunOptions {
                    timeout: Duration::from_secs(60),
                    env: vec![("URL".into(), request.url.clone())],
                    // Whole objects come back on stdout.
                    output_limit: 64 << 20,
                },
            )
            .await
            .unwrap();
        assert!(out.success(), "{}", out.stderr_lossy());
        out.require_complete("the object read back").unwrap();
        out.stdout
    }
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i * 7919) as u8).wrapping_add(seed)).collect()
}

fn small_parts() -> UploadSettings {
    UploadSettings { multipart_threshold: 8 * MIB as u64, part_size: 5 * MIB as u64, ..Default::default() }
}

#[tokio::test]
#[ignore = "needs tests/ environment"]
async fn presigned_put_from_shell_curl_is_stored_and_verified() {
    let f = fixture();
    let content = b"lora weights, small".to_vec();
    f.write("output/demo.safetensors", &content);
    let object = f.dest.object("demo.safetensors");
    let items = vec![UploadItem {
        name: "model".into(),
        path: "output/demo.safetensors".into(),
        object: object.clone(),
    }];
    let statuses =
        Uploader::new(&f.store, UploadSettings::default()).upload(&f.remote, &items).await.unwrap().artifacts;
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0].uri, object.uri());
    assert_eq!(statuses[0].size_bytes, content.len() as u64);
    use sha2::Digest as _;
    assert_eq!(statuses[0].sha256.as_deref(), Some(hex::encode(sha2::Sha256::digest(&content)).as_str()));
    // What is stored is what was sent, read back through a presigned GET (the dataset path).
    let get = f.store.presign_get(&object, Validity::from_now(Duration::from_secs(60))).await.unwrap();
    assert_eq!(f.curl_get(&get).await, content);
}

#[tokio::test]
#[ignore = "needs tests/ environment"]
async fn file_above_the_threshold_goes_up_in_parts() {
    let f = fixture();
    let content = data(12 * MIB + 4321, 3);
    f.write("output/big.safetensors", &content);
    let object = f.dest.object("big.safetensors");
    let items = vec![UploadItem {
        name: "model".into(),
        path: "output/big.safetensors".into(),
        object: object.clone(),
    }];
    let statuses = Uploader::new(&f.store, small_parts()).upload(&f.remote, &items).await.unwrap().artifacts;
    assert_eq!(statuses[0].size_bytes, content.len() as u64);
    let head = f.store.head(&object).await.unwrap().unwrap();
    assert_eq!(head.size, content.len() as u64);
    // Three 5 MiB parts: the ETag is the multipart kind.
    assert!(head.etag.as_deref().is_some_and(|e| e.ends_with("-3")), "{head:?}");
    let get = f.store.presign_get(&object, Validity::from_now(Duration::from_secs(60))).await.unwrap();
    assert!(f.curl_get(&get).await == content, "content differs after multipart upload");
}

#[tokio::test]
#[ignore = "needs tests/ environment"]
async fn folder_checkpoint_is_uploaded_file_by_file() {
    let f = fixture();
    f.write("output/checkpoint-500/adapter.safetensors", b"adapter");
    f.write("output/checkpoint-500/optimizer/state.bin", b"state!");
    let inventory_cp = crate::monitor::checkpoints::Checkpoint {
        path: "checkpoint-500".into(),
        step: Some(500),
        epoch: None,
        size_bytes: 13,
    };
    let synced = super::checkpoints::sync_checkpoints(
        &f.store,
        &UploadSettings::default(),
        &f.remote,
        &f.dest,
        "output",
        &[inventory_cp],
    )
    .await
    .unwrap();
    assert_eq!((synced.files, synced.bytes), (2, 13));
    let synced = synced.checkpoints;
    assert_eq!(synced[0].step, 500);
    assert_eq!(synced[0].size_bytes, Some(13));
    let uri = synced[0].uri.clone().unwrap();
    assert!(uri.ends_with("/checkpoints/checkpoint-500/"), "{uri}");
    let head = f.store.head(&f.dest.object("checkpoints/checkpoint-500/optimizer/state.bin")).await.unwrap();
    assert_eq!(head.map(|h| h.size), Some(6));
}

#[tokio::test]
#[ignore = "needs tests/ environment"]
async fn a_synced_checkpoint_folder_comes_back_onto_a_new_machine() {
    let f = fixture();
    f.write("output/checkpoint-500/adapter.safetensors", &data(3 * MIB, 1));
    f.write("output/checkpoint-500/optimizer/state.bin", b"state!");
    f.write("output/checkpoint-5000/adapter.safetensors", b"a later one, not asked for");
    let folder = |path: &str, step| crate::monitor::checkpoints::Checkpoint {
        path: path.into(),
        step: Some(step),
        epoch: None,
        size_bytes: 1,
    };
    super::checkpoints::sync_checkpoints(
        &f.store,
        &UploadSettings::default(),
        &f.remote,
        &f.dest,
        "output",
        &[folder("checkpoint-500", 500), folder("checkpoint-5000", 5000)],
    )
    .await
    .unwrap();

    let fresh = tempfile::tempdir().unwrap();
    let machine = LocalExec::new(fresh.path().join("work")).unwrap();
    let items =
        super::checkpoints::restore_items(&f.store, &f.dest, "output", "checkpoint-500").await.unwrap();
    assert_eq!(items.len(), 2, "{items:?}");
    let ttl = Duration::from_secs(120);
    super::download::download(&f.store, &machine, &items, ttl, ttl).await.unwrap();
    let restored = fresh.path().join("work/output/checkpoint-500");
    assert!(std::fs::read(restored.join("adapter.safetensors")).unwrap() == data(3 * MIB, 1));
    assert_eq!(std::fs::read(restored.join("optimizer/state.bin")).unwrap(), b"state!");
    assert!(!fresh.path().join("work/output/checkpoint-5000").exists());
}

#[tokio::test]
#[ignore = "needs tests/ environment"]
async fn expired_url_is_refused() {
    let f = fixture();
    f.write("m.bin", b"x");
    let object = f.dest.object("expired.bin");
    // Valid for one second, two hours ago.
    let validity =
        Validity { start: SystemTime::now() - Duration::from_secs(7200), expires_in: Duration::from_secs(1) };
    let request = f.store.presign_put(&object, 1, validity).await.unwrap();
    // AWS answers 403 "Request has expired"; Garage 2.5 answers 400 "Date is too old". Either
    // way the upload is refused, and the message is about the age of the signature.
    let (status, body) = f.curl_put_with_body(&request, "m.bin").await;
    assert!(status == "403" || status == "400", "{status}: {body}");
    let lower = body.to_ascii_lowercase();
    assert!(lower.contains("too old") || lower.contains("expired"), "{body}");
    assert!(f.store.head(&object).await.unwrap().is_none());
    // The same request, fresh, is accepted: the 403 was the expiry, not something else.
    let fresh = f.store.presign_put(&object, 1, Validity::from_now(Duration::from_secs(60))).await.unwrap();
    assert_eq!(f.curl_put(&fresh, "m.bin").await, "200");
}

#[tokio::test]
#[ignore = "needs tests/ environment"]
async fn tampered_url_is_refused() {
    let f = fixture();
    f.write("m.bin", b"x");
    let object = f.dest.object("signed-for-this.bin");
    let request =
        f.store.presign_put(&object, 1, Validity::from_now(Duration::from_secs(600))).await.unwrap();
    let tampered = [
        // Another key than the one signed.
        request.url.replace("signed-for-this.bin", "something-else.bin"),
        // A longer lifetime than the one signed.
        request.url.replace("X-Amz-Expires=600", "X-Amz-Expires=604800"),
        // One character of the signature changed.
        {
            let (head, sig) = request.url.split_once("X-Amz-Signature=").unwrap();
            let first = if sig.starts_with('0') { '1' } else { '0' };
            format!("{head}X-Amz-Signature={first}{}", &sig[1..])
        },
    ];
    for url in tampered {
        assert_ne!(url, request.url);
        let r = super::PresignedRequest { url, ..request.clone() };
        assert_eq!(f.curl_put(&r, "m.bin").await, "403");
    }
    assert!(f.store.head(&object).await.unwrap().is_none());
    assert!(f.store.head(&f.dest.object("something-else.bin")).await.unwrap().is_none());
    assert_eq!(f.curl_put(&request, "m.bin").await, "200");
}

#[tokio::test]
#[ignore = "needs tests/ environment"]
async fn a_put_of_another_length_than_signed_is_refused() {
    let f = fixture();
    f.write("short.bin", &data(9, 1));
    f.write("exact.bin", &data(10, 1));
    f.write("long.bin", &data(11, 1));
    let object = f.dest.object("ten-bytes.bin");
    let request =
        f.store.presign_put(&object, 10, Validity::from_now(Duration::from_secs(60))).await.unwrap();
    for other in ["short.bin", "long.bin"] {
        let (status, body) = f.curl_put_with_body(&request, other).await;
        assert_eq!(status, "403", "{other}: {body}");
    }
    assert!(f.store.head(&object).await.unwrap().is_none());
    assert_eq!(f.curl_put(&request, "exact.bin").await, "200");

    // The same for a part of a multipart upload.
    let big = f.dest.object("parts.bin");
    let upload_id = f.store.create_multipart(&big).await.unwrap();
    let five = 5 * MIB;
    f.write("part.bin", &data(five, 2));
    f.write("part-plus-one.bin", &data(five + 1, 2));
    let part = f
        .store
        .presign_part(&big, &upload_id, 1, five as u64, Validity::from_now(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(f.curl_put(&part, "part-plus-one.bin").await, "403");
    assert!(f.store.list_parts(&big, &upload_id).await.unwrap().is_empty());
    assert_eq!(f.curl_put(&part, "part.bin").await, "200");
    assert_eq!(f.store.list_parts(&big, &upload_id).await.unwrap().len(), 1);
    f.store.abort_multipart(&big, &upload_id).await.unwrap();
}

#[tokio::test]
#[ignore = "needs tests/ environment"]
async fn head_verification_catches_a_truncated_upload() {
    let f = fixture();
    let content = data(300_000, 9);
    f.write("model.bin", &content);
    f.write("truncated.bin", &content[..200_000]);
    // What the machine reported when it hashed the whole file...
    use sha2::Digest as _;
    let report = FileReport {
        size: content.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(&content)),
        md5: Some(hex::encode(Md5::digest(&content))),
        parts: Default::default(),
        complete: true,
    };
    // ...but only part of it reached storage. (A URL signed for the whole length refuses the
    // shorter body outright, see `a_put_of_another_length_than_signed_is_refused`; here the
    // truncated length was signed, as if the plan had been made from a lying listing.)
    let object = f.dest.object("model.bin");
    let validity = Validity::from_now(Duration::from_secs(60));
    let short = f.store.presign_put(&object, 200_000, validity).await.unwrap();
    assert_eq!(f.curl_put(&short, "truncated.bin").await, "200");
    let request = f.store.presign_put(&object, content.len() as u64, validity).await.unwrap();
    let head = f.store.head(&object).await.unwrap();
    let err = verify_object(&object.uri(), head.as_ref(), &report).unwrap_err();
    assert!(matches!(err, ArtifactError::Verification { .. }), "{err}");
    assert!(err.to_string().contains("200000 bytes"), "{err}");
    // Same size, different bytes: caught by the ETag (an MD5 on Garage, as on S3).
    let mut altered = content.clone();
    altered[10] ^= 0xff;
    f.write("altered.bin", &altered);
    assert_eq!(f.curl_put(&request, "altered.bin").await, "200");
    let head = f.store.head(&object).await.unwrap();
    assert!(verify_object(&object.uri(), head.as_ref(), &report).is_err());
    // And the honest upload passes.
    assert_eq!(f.curl_put(&request, "model.bin").await, "200");
    let head = f.store.head(&object).await.unwrap();
    verify_object(&object.uri(), head.as_ref(), &report).unwrap();
}

#[tokio::test]
#[ignore = "needs tests/ environment"]
async fn credentials_never_reach_the_machine() {
    let f = fixture();
    let recording = RecordingExec::new(f.remote.clone());
    f.write("output/m.safetensors", b"small model");
    f.write("output/big.safetensors", &data(9 * MIB, 1));
    let items = vec![
        UploadItem {
            name: "model".into(),
            path: "output/m.safetensors".into(),
            object: f.dest.object("m.safetensors"),
        },
        UploadItem {
            name: "big".into(),
            path: "output/big.safetensors".into(),
            object: f.dest.object("big.safetensors"),
        },
    ];
    Uploader::new(&f.store, small_parts()).upload(&recording, &items).await.unwrap();
    // A dataset download as the machine would do it.
    let get = f
        .store
        .presign_get(&f.dest.object("m.safetensors"), Validity::from_now(Duration::from_secs(60)))
        .await
        .unwrap();
    recording
        .run(
            "curl -sS --fail -o dataset.tar \"$URL\"",
            RunOptions {
                timeout: Duration::from_secs(60),
                env: vec![("URL".into(), get.url)],
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let secret = settings().credentials.secret_access_key;
    assert!(!secret.is_empty());
    let sent = recording.everything_sent();
    assert!(sent.len() >= 4, "nothing recorded");
    for bytes in &sent {
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains(&secret),
            "the S3 secret key was sent to the machine: {}",
            super::redact_url(&text)
        );
        assert!(!text.contains("AWS_SECRET_ACCESS_KEY") && !text.contains("AWS_ACCESS_KEY_ID"), "{text}");
    }
    // Command texts carry no presigned URL either (they travel in the environment only).
    for s in recording.commands() {
        assert!(!s.command.contains("X-Amz-Signature"), "{}", s.command);
        for (name, _) in &s.env {
            assert!(name.starts_with("GT_PUT_") || name == "URL", "unexpected variable {name}");
        }
    }
}

#[tokio::test]
#[ignore = "needs tests/ environment"]
async fn upload_over_ssh_reaches_storage_verified() {
    use crate::remote::ssh::{SshExec, SshKey, SshOptions, SshTarget};
    let f = fixture();
    let target = SshTarget {
        host: env("GPU_TRAINER_TEST_SSH_HOST"),
        port: env("GPU_TRAINER_TEST_SSH_PORT").parse().unwrap(),
        user: env("GPU_TRAINER_TEST_SSH_USER"),
    };
    let key = SshKey::from_file(std::path::Path::new(&env("GPU_TRAINER_TEST_SSH_KEY"))).unwrap();
    let options = SshOptions { connect_deadline: Duration::from_secs(30), ..Default::default() };
    let ssh = SshExec::connect(target, key, None, options).await.unwrap();
    // The sshd runs on this machine, so the fixture's folder is the "instance's" disk.
    let content = data(9 * MIB + 17, 5);
    f.write("output/over-ssh.safetensors", &content);
    let path = f.remote.work_dir().join("output/over-ssh.safetensors").display().to_string();
    let object = f.dest.object("over-ssh.safetensors");
    let items = vec![UploadItem { name: "model".into(), path, object: object.clone() }];
    let statuses = Uploader::new(&f.store, small_parts()).upload(&ssh, &items).await.unwrap().artifacts;
    assert_eq!(statuses[0].size_bytes, content.len() as u64);
    let head = f.store.head(&object).await.unwrap().unwrap();
    assert_eq!(head.size, content.len() as u64);
}
