//! The `dataset` and `tools` subcommands, run as the real binary.

use std::path::Path;
use std::process::{Command, Output};

fn gpu_trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpu-trainer"))
        .args(args)
        .env_remove("GPU_TRAINER_TOOLS_DIR")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run gpu-trainer")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn write(dir: &Path, rel: &str, data: &[u8]) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

#[test]
fn dataset_pack_prints_the_same_sha256_for_the_same_content() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let jpg: &[u8] = &[0xFF, 0xD8, 0xFF, 0xE0, 9, 9];
    // Same content, created in the opposite order.
    write(a.path(), "one.jpg", jpg);
    write(a.path(), "one.txt", b"caption one");
    write(a.path(), "two/two.jpg", jpg);
    write(a.path(), "two/two.txt", b"caption two");
    write(b.path(), "two/two.txt", b"caption two");
    write(b.path(), "two/two.jpg", jpg);
    write(b.path(), "one.txt", b"caption one");
    write(b.path(), "one.jpg", jpg);
    let out = tempfile::tempdir().unwrap();
    let mut hashes = Vec::new();
    for (dir, name) in [(a.path(), "a.tar"), (b.path(), "b.tar")] {
        let file = out.path().join(name);
        let run = gpu_trainer(&["dataset", "pack", dir.to_str().unwrap(), "-o", file.to_str().unwrap()]);
        assert!(run.status.success(), "{}", text(&run.stderr));
        let sha = text(&run.stdout).trim().to_string();
        assert_eq!(sha.len(), 64, "{sha}");
        hashes.push(sha);
    }
    assert_eq!(hashes[0], hashes[1]);
    assert_eq!(
        std::fs::read(out.path().join("a.tar")).unwrap(),
        std::fs::read(out.path().join("b.tar")).unwrap()
    );

    let ok = gpu_trainer(&["dataset", "validate", a.path().to_str().unwrap()]);
    assert!(ok.status.success(), "{}", text(&ok.stdout));
    write(a.path(), "lonely.png", b"\x89PNG\r\n\x1a\nxxxx");
    let bad = gpu_trainer(&["dataset", "validate", a.path().to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stdout).contains("error: lonely.png: no caption file lonely.txt"),
        "{}",
        text(&bad.stdout)
    );
}

#[test]
fn tools_list_and_show_the_shipped_tools() {
    let list = gpu_trainer(&["tools", "list"]);
    assert!(list.status.success(), "{}", text(&list.stderr));
    let list = text(&list.stdout);
    assert!(list.contains("demo@1") && list.contains("flux-lora@1"), "{list}");
    let show = gpu_trainer(&["tools", "show", "flux-lora@1"]);
    assert!(show.status.success(), "{}", text(&show.stderr));
    let show = text(&show.stdout);
    assert!(show.contains("name: steps") && show.contains("default: 4000"), "{show}");
    let missing = gpu_trainer(&["tools", "show", "nope@1"]);
    assert!(!missing.status.success());
    assert!(text(&missing.stderr).contains("unknown tool nope@1"), "{}", text(&missing.stderr));
}
