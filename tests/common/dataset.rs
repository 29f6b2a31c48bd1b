//! The small photo dataset the end-to-end tests train on, packed by `gpu-trainer dataset pack`.

use std::path::{Path, PathBuf};

/// Writes one captioned photo under `dir/photos` and packs it into `dir/photos.tar` with the
/// binary under test. Returns (archive, SHA-256 printed by `dataset pack`).
pub fn pack_dataset(dir: &Path) -> (PathBuf, String) {
    let folder = dir.join("photos");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("a.jpg"), [0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3, 4]).unwrap();
    std::fs::write(folder.join("a.txt"), "a photo of sks dog").unwrap();
    let archive = dir.join("photos.tar");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpu-trainer"))
        .args(["dataset", "pack", "--no-validate", "-o"])
        .arg(&archive)
        .arg(&folder)
        .output()
        .unwrap();
    assert!(out.status.success(), "dataset pack: {}", String::from_utf8_lossy(&out.stderr));
    let sha256 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (archive, sha256)
}

/// The packed dataset served over HTTP from this process on 127.0.0.1: (URL, SHA-256).
pub async fn serve_dataset(dir: &Path) -> (String, String) {
    let (archive, sha256) = pack_dataset(dir);
    let bytes = bytes::Bytes::from(std::fs::read(&archive).unwrap());
    let app =
        axum::Router::new().route("/photos.tar", axum::routing::get(move || async move { bytes.clone() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/photos.tar"), sha256)
}
