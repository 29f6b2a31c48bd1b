//! Datasets: checking a folder of images and captions, packing it into a deterministic tar (the
//! same folder always gives the same bytes and SHA-256, whatever the file order, times, owners or
//! modes), and staging it on the machine, where the archive's SHA-256 is verified before it is
//! unpacked. For `s3`/`url` datasets the machine downloads the archive itself with curl (the URL
//! travels as an environment variable, never on a command line) and verifies it the same way.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest;

use super::launch::RemoteLayout;
use super::{RemoteError, RemoteExec, RunOptions, shell_quote};

/// Image formats trainers read.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp"];
/// Captions sit next to their image with this extension (`img.jpg` + `img.txt`).
pub const CAPTION_EXTENSION: &str = "txt";
/// Fixed modification time of every archive entry (2000-01-01T00:00:00Z).
const FIXED_MTIME: u64 = 946_684_800;

/// Errors of dataset handling.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is a symbolic link or special file; datasets hold regular files only")]
    NotRegular { path: PathBuf },
    #[error("{0} is not a folder")]
    NotADir(PathBuf),
    #[error("the dataset archive on the machine does not match: expected SHA-256 {expected}, got {actual}")]
    ChecksumMismatch { expected: String, actual: String },
    #[error("failed to stage the dataset on the machine: {0}")]
    Stage(String),
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

/// Size and count limits checked by [`validate`].
#[derive(Clone, Debug)]
pub struct Limits {
    pub min_images: usize,
    pub max_images: usize,
    pub max_image_bytes: u64,
    pub max_caption_bytes: u64,
    pub max_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            min_images: 1,
            max_images: 10_000,
            max_image_bytes: 50 * 1024 * 1024,
            max_caption_bytes: 64 * 1024,
            max_total_bytes: 20 * 1024 * 1024 * 1024,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One finding about one file (or the whole folder when `path` is empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub path: String,
    pub message: String,
}

/// What [`validate`] found.
#[derive(Clone, Debug, Default)]
pub struct ValidationReport {
    pub images: usize,
    pub captions: usize,
    pub total_bytes: u64,
    pub problems: Vec<Problem>,
}

impl ValidationReport {
    /// True when nothing is an error (warnings are fine).
    pub fn is_ok(&self) -> bool {
        self.problems.iter().all(|p| p.severity == Severity::Warning)
    }

    pub fn errors(&self) -> usize {
        self.problems.iter().filter(|p| p.severity == Severity::Error).count()
    }

    fn push(&mut self, severity: Severity, path: &str, message: impl Into<String>) {
        self.problems.push(Problem { severity, path: path.to_string(), message: message.into() });
    }
}

impl std::fmt::Display for ValidationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.problems {
            let level = match p.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            if p.path.is_empty() {
                writeln!(f, "{level}: {}", p.message)?;
            } else {
                writeln!(f, "{level}: {}: {}", p.path, p.message)?;
            }
        }
        write!(
            f,
            "{} images, {} captions, {} bytes; {} errors, {} warnings",
            self.images,
            self.captions,
            self.total_bytes,
            self.errors(),
            self.problems.len() - self.errors()
        )
    }
}

/// Regular files under `dir` (hidden ones left out), as sorted `/`-separated relative paths.
fn dataset_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, DatasetError> {
    if !dir.is_dir() {
        return Err(DatasetError::NotADir(dir.to_path_buf()));
    }
    let mut files = Vec::new();
    let walker = walkdir::WalkDir::new(dir)
        .follow_links(false)
        .into_iter()
        // Hidden files and folders (.DS_Store, .git, editor swap files) are never training data.
        .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
    for entry in walker {
        let entry = entry.map_err(|e| DatasetError::Read {
            path: e.path().map(Path::to_path_buf).unwrap_or_else(|| dir.to_path_buf()),
            source: e.into_io_error().unwrap_or_else(|| std::io::Error::other("walk failed")),
        })?;
        let ft = entry.file_type();
        if ft.is_dir() {
            continue;
        }
        if !ft.is_file() {
            return Err(DatasetError::NotRegular { path: entry.path().to_path_buf() });
        }
        let rel = entry.path().strip_prefix(dir).unwrap_or(entry.path());
        let rel: Vec<String> =
            rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
        files.push((rel.join("/"), entry.path().to_path_buf()));
    }
    // Byte order of the relative path: independent of the file system's directory order.
    files.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(files)
}

fn extension(rel: &str) -> Option<String> {
    Path::new(rel).extension().map(|e| e.to_string_lossy().to_ascii_lowercase())
}

fn image_signature_ok(ext: &str, head: &[u8]) -> bool {
    match ext {
        "jpg" | "jpeg" => head.starts_with(&[0xFF, 0xD8, 0xFF]),
        "png" => head.starts_with(b"\x89PNG\r\n\x1a\n"),
        "webp" => head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP",
        "bmp" => head.starts_with(b"BM"),
        _ => false,
    }
}

/// Checks a dataset folder: supported image formats whose content matches the extension, a
/// caption next to each image, no unreadable or zero-byte files, size and count limits.
pub fn validate(dir: &Path, limits: &Limits) -> Result<ValidationReport, DatasetError> {
    let files = dataset_files(dir)?;
    let mut report = ValidationReport::default();
    let stems: std::collections::BTreeSet<String> = files
        .iter()
        .filter(|(rel, _)| extension(rel).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())))
        .map(|(rel, _)| rel.rsplit_once('.').map(|(s, _)| s.to_string()).unwrap_or_default())
        .collect();
    let captions: std::collections::BTreeSet<String> = files
        .iter()
        .filter(|(rel, _)| extension(rel).as_deref() == Some(CAPTION_EXTENSION))
        .map(|(rel, _)| rel.rsplit_once('.').map(|(s, _)| s.to_string()).unwrap_or_default())
        .collect();
    for (rel, path) in &files {
        let ext = extension(rel).unwrap_or_default();
        let is_image = IMAGE_EXTENSIONS.contains(&ext.as_str());
        let is_caption = ext == CAPTION_EXTENSION;
        if !is_image && !is_caption {
            report.push(
                Severity::Warning,
                rel,
                "not an image or caption file; it is packed but trainers ignore it",
            );
        }
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => {
                report.push(Severity::Error, rel, format!("unreadable: {e}"));
                continue;
            }
        };
        report.total_bytes += meta.len();
        if meta.len() == 0 {
            report.push(Severity::Error, rel, "empty file (0 bytes)");
            continue;
        }
        let mut head = [0u8; 16];
        let read = std::fs::File::open(path).and_then(|mut f| f.read(&mut head));
        let n = match read {
            Ok(n) => n,
            Err(e) => {
                report.push(Severity::Error, rel, format!("unreadable: {e}"));
                continue;
            }
        };
        let stem = rel.rsplit_once('.').map(|(s, _)| s.to_string()).unwrap_or_default();
        if is_image {
            report.images += 1;
            if !image_signature_ok(&ext, &head[..n]) {
                report.push(Severity::Error, rel, format!("content is not a valid {ext} image"));
            }
            if meta.len() > limits.max_image_bytes {
                report.push(
                    Severity::Error,
                    rel,
                    format!("{} bytes, more than the limit of {}", meta.len(), limits.max_image_bytes),
                );
            }
            if !captions.contains(&stem) {
                report.push(Severity::Error, rel, format!("no caption file {stem}.{CAPTION_EXTENSION}"));
            }
        } else if is_caption {
            report.captions += 1;
            if meta.len() > limits.max_caption_bytes {
                report.push(
                    Severity::Error,
                    rel,
                    format!(
                        "caption of {} bytes, more than the limit of {}",
                        meta.len(),
                        limits.max_caption_bytes
                    ),
                );
            } else if let Err(e) = std::fs::read(path).map(String::from_utf8) {
                report.push(Severity::Error, rel, format!("unreadable: {e}"));
            } else if std::fs::read_to_string(path).is_err() {
                report.push(Severity::Error, rel, "caption is not UTF-8 text");
            }
            if !stems.contains(&stem) {
                report.push(Severity::Warning, rel, "caption without an image");
            }
        }
    }
    if report.images < limits.min_images {
        report.push(
            Severity::Error,
            "",
            format!("{} images, at least {} needed", report.images, limits.min_images),
        );
    }
    if report.images > limits.max_images {
        report.push(
            Severity::Error,
            "",
            format!("{} images, more than the limit of {}", report.images, limits.max_images),
        );
    }
    if report.total_bytes > limits.max_total_bytes {
        report.push(
            Severity::Error,
            "",
            format!(
                "{} bytes in total, more than the limit of {}",
                report.total_bytes, limits.max_total_bytes
            ),
        );
    }
    Ok(report)
}

/// Outcome of [`pack`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackReport {
    pub sha256: String,
    pub files: usize,
    pub bytes: u64,
}

struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Packs `dir` into a deterministic tar at `out`: entries sorted by path, every entry a regular
/// file with mode 0644, owner 0:0, no owner names and a fixed mtime; hidden files left out.
pub fn pack(dir: &Path, out: &Path) -> Result<PackReport, DatasetError> {
    let files = dataset_files(dir)?;
    let werr = |source| DatasetError::Write { path: out.to_path_buf(), source };
    let file = std::fs::File::create(out).map_err(werr)?;
    let writer =
        HashingWriter { inner: std::io::BufWriter::new(file), hasher: sha2::Sha256::new(), written: 0 };
    let mut builder = tar::Builder::new(writer);
    for (rel, path) in &files {
        let rerr = |source| DatasetError::Read { path: path.clone(), source };
        let f = std::fs::File::open(path).map_err(rerr)?;
        let len = f.metadata().map_err(rerr)?.len();
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(len);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(FIXED_MTIME);
        // A file that changes size while being packed would corrupt the archive; `take` plus the
        // size check below turn that into an error.
        builder.append_data(&mut header, rel, f.take(len)).map_err(werr)?;
    }
    let mut writer = builder.into_inner().map_err(werr)?;
    writer.flush().map_err(werr)?;
    Ok(PackReport {
        sha256: hex::encode(writer.hasher.finalize()),
        files: files.len(),
        bytes: writer.written,
    })
}

/// Outcome of staging a dataset on the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageReport {
    pub sha256: String,
    /// True when the dataset dir already held this archive's content.
    pub already_staged: bool,
}

/// Name of the archive in the work dir.
pub const ARCHIVE_NAME: &str = "dataset.tar";
/// Name of the marker (next to `dataset/`) holding the SHA-256 of the unpacked archive.
pub const MARKER_NAME: &str = "dataset.sha256";
/// Exit code of the staging script when the archive does not match.
const EXIT_MISMATCH: i32 = 65;

/// Shell script that verifies `archive` against `sha256` (when given; otherwise prints it) and
/// only then unpacks it into `dest` (replacing it atomically) and writes the marker.
pub fn verify_and_unpack_script(
    archive: &str,
    sha256: Option<&str>,
    dest: &str,
    marker: &str,
) -> Result<String, RemoteError> {
    if let Some(sha) = sha256
        && !(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(RemoteError::InvalidRequest(format!("{sha:?} is not a SHA-256 in hex")));
    }
    let want = sha256.map(str::to_ascii_lowercase).unwrap_or_default();
    Ok(format!(
        "set -e\narchive={archive}\ndest={dest}\nmarker={marker}\nwant={want}\n\
         got=$({hash})\n\
         if [ -n \"$want\" ] && [ \"$got\" != \"$want\" ]; then echo \"CHECKSUM_MISMATCH $got\"; exit {EXIT_MISMATCH}; fi\n\
         rm -rf \"$dest.tmp\"\nmkdir -p \"$dest.tmp\"\n\
         tar -xf \"$archive\" -C \"$dest.tmp\" --no-same-owner\n\
         rm -rf \"$dest\"\nmv \"$dest.tmp\" \"$dest\"\n\
         echo \"$got\" > \"$marker\"\necho \"SHA256 $got\"\n",
        archive = shell_quote(archive)?,
        dest = shell_quote(dest)?,
        marker = shell_quote(marker)?,
        want = shell_quote(&want)?,
        hash = super::sha256_shell("\"$archive\""),
    ))
}

/// Name of the environment variable that carries a dataset URL to the download script, so a
/// presigned URL (a credential for its lifetime) is never on a command line.
pub const URL_ENV: &str = "GPU_TRAINER_DATASET_URL";

/// Shell script that downloads `$GPU_TRAINER_DATASET_URL` to `archive` with curl (retrying
/// transient failures), then verifies and unpacks it like [`verify_and_unpack_script`].
pub fn download_script(
    archive: &str,
    sha256: Option<&str>,
    dest: &str,
    marker: &str,
) -> Result<String, RemoteError> {
    let a = shell_quote(archive)?;
    Ok(format!(
        "set -e\ncommand -v curl >/dev/null || {{ echo 'curl is missing on the machine' >&2; exit 3; }}\n\
         curl --fail --silent --show-error --location --retry 5 --retry-connrefused --connect-timeout 30 \
         -o {a}.part \"${URL_ENV}\"\nmv -f {a}.part {a}\n{}",
        verify_and_unpack_script(archive, sha256, dest, marker)?
    ))
}

async fn marker_matches(
    exec: &dyn RemoteExec,
    layout: &RemoteLayout,
    sha256: &str,
) -> Result<bool, RemoteError> {
    let marker = shell_quote(&layout.join(MARKER_NAME))?;
    let out = exec.run(&format!("cat {marker} 2>/dev/null || true"), RunOptions::default()).await?;
    out.require_complete("reading the dataset marker")?;
    Ok(out.stdout_lossy().trim() == sha256)
}

async fn run_stage_script(
    exec: &dyn RemoteExec,
    script: &str,
    env: Vec<(String, String)>,
    expected: Option<&str>,
) -> Result<String, DatasetError> {
    let out = exec
        .run(script, RunOptions { timeout: Duration::from_secs(3600), env, ..Default::default() })
        .await?;
    out.require_complete("the staging script")?;
    let stdout = out.stdout_lossy();
    if out.exit_code == Some(EXIT_MISMATCH) {
        let actual = stdout.split_whitespace().nth(1).unwrap_or_default().to_string();
        return Err(DatasetError::ChecksumMismatch {
            expected: expected.unwrap_or_default().to_string(),
            actual,
        });
    }
    if !out.success() {
        return Err(DatasetError::Stage(format!(
            "exit code {:?}: {}",
            out.exit_code,
            out.stderr_lossy().trim()
        )));
    }
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("SHA256 "))
        .map(|s| s.trim().to_string())
        .ok_or_else(|| DatasetError::Stage("the staging script reported no checksum".into()))
}

/// Uploads a packed archive (skipped when the machine already has it), verifies its SHA-256 on
/// the machine and unpacks it into `dataset/`. Nothing happens when `dataset/` already holds
/// this archive. A mismatch is an error, not a retry.
pub async fn stage_archive(
    exec: &dyn RemoteExec,
    layout: &RemoteLayout,
    archive: &Path,
    sha256: &str,
) -> Result<StageReport, DatasetError> {
    let sha256 = sha256.to_ascii_lowercase();
    if marker_matches(exec, layout, &sha256).await? {
        return Ok(StageReport { sha256, already_staged: true });
    }
    let remote_archive = layout.join(ARCHIVE_NAME);
    exec.upload(archive, &remote_archive).await?;
    let script = verify_and_unpack_script(
        &remote_archive,
        Some(&sha256),
        &layout.dataset_dir(),
        &layout.join(MARKER_NAME),
    )?;
    let got = run_stage_script(exec, &script, Vec::new(), Some(&sha256)).await?;
    Ok(StageReport { sha256: got, already_staged: false })
}

/// Has the machine download the archive from `url` (a presigned S3 GET or any URL), verify it
/// against `sha256` when known, and unpack it. The operator never proxies dataset bytes.
pub async fn stage_url(
    exec: &dyn RemoteExec,
    layout: &RemoteLayout,
    url: &str,
    sha256: Option<&str>,
) -> Result<StageReport, DatasetError> {
    let sha256 = sha256.map(str::to_ascii_lowercase);
    if let Some(sha) = &sha256
        && marker_matches(exec, layout, sha).await?
    {
        return Ok(StageReport { sha256: sha.clone(), already_staged: true });
    }
    exec.run(&format!("mkdir -p {}", shell_quote(layout.work_dir())?), RunOptions::default()).await?;
    let script = download_script(
        &layout.join(ARCHIVE_NAME),
        sha256.as_deref(),
        &layout.dataset_dir(),
        &layout.join(MARKER_NAME),
    )?;
    let got =
        run_stage_script(exec, &script, vec![(URL_ENV.to_string(), url.to_string())], sha256.as_deref())
            .await
            .map_err(|err| match err {
                // curl names the URL in some of its messages; a presigned query is a credential.
                DatasetError::Stage(message) => DatasetError::Stage(redact_in(&message, url)),
                other => other,
            })?;
    Ok(StageReport { sha256: got, already_staged: false })
}

/// `text` with every occurrence of `url`'s query (and the whole URL) replaced by a redacted form.
fn redact_in(text: &str, url: &str) -> String {
    let redacted = crate::artifacts::redact_url(url);
    let mut out = text.replace(url, &redacted);
    if let Some((_, query)) = url.split_once('?')
        && !query.is_empty()
    {
        out = out.replace(query, "<redacted>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::local::LocalExec;

    fn write(dir: &Path, rel: &str, data: &[u8]) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    const JPG: &[u8] = &[0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3, 4];
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n0000";

    fn fill(dir: &Path, order: &[usize]) {
        let files: [(&str, &[u8]); 5] = [
            ("a.jpg", JPG),
            ("a.txt", b"a photo of sks dog"),
            ("sub/b.png", PNG),
            ("sub/b.txt", b"another"),
            ("z.txt", b"stray caption"),
        ];
        for &i in order {
            let (rel, data) = files[i];
            write(dir, rel, data);
        }
    }

    #[test]
    fn pack_is_byte_identical_whatever_the_order_times_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        fill(one.path(), &[0, 1, 2, 3, 4]);
        fill(two.path(), &[4, 3, 2, 1, 0]);
        // Different modification times and permissions, and junk that is left out.
        let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        std::fs::File::options()
            .write(true)
            .open(two.path().join("a.jpg"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        std::fs::set_permissions(two.path().join("a.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
        write(two.path(), ".DS_Store", b"junk");
        let out = tempfile::tempdir().unwrap();
        let r1 = pack(one.path(), &out.path().join("1.tar")).unwrap();
        let r2 = pack(two.path(), &out.path().join("2.tar")).unwrap();
        let r3 = pack(one.path(), &out.path().join("3.tar")).unwrap();
        assert_eq!(r1, r2);
        assert_eq!(r1, r3);
        assert_eq!(r1.files, 5);
        let b1 = std::fs::read(out.path().join("1.tar")).unwrap();
        assert_eq!(b1, std::fs::read(out.path().join("2.tar")).unwrap());
        assert_eq!(hex::encode(sha2::Sha256::digest(&b1)), r1.sha256);
        // Entries are sorted, owned by 0:0, mode 0644, fixed mtime.
        let mut archive = tar::Archive::new(b1.as_slice());
        let mut names = Vec::new();
        for e in archive.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!(
                (h.uid().unwrap(), h.gid().unwrap(), h.mode().unwrap(), h.mtime().unwrap()),
                (0, 0, 0o644, FIXED_MTIME)
            );
            names.push(e.path().unwrap().display().to_string());
        }
        assert_eq!(names, ["a.jpg", "a.txt", "sub/b.png", "sub/b.txt", "z.txt"]);
    }

    #[test]
    fn validate_reports_each_problem_clearly() {
        let dir = tempfile::tempdir().unwrap();
        fill(dir.path(), &[0, 1, 2, 3, 4]);
        let ok = validate(dir.path(), &Limits::default()).unwrap();
        assert!(ok.is_ok(), "{ok}");
        assert_eq!((ok.images, ok.captions), (2, 3));
        assert!(ok.problems.iter().any(|p| p.path == "z.txt" && p.severity == Severity::Warning));

        write(dir.path(), "nocap.jpg", JPG);
        write(dir.path(), "fake.png", b"GIF89a....");
        write(dir.path(), "fake.txt", b"x");
        write(dir.path(), "empty.jpg", b"");
        write(dir.path(), "empty.txt", b"c");
        write(dir.path(), "notes.md", b"hi");
        let bad = validate(dir.path(), &Limits { max_images: 3, ..Default::default() }).unwrap();
        assert!(!bad.is_ok());
        let has =
            |path: &str, text: &str| bad.problems.iter().any(|p| p.path == path && p.message.contains(text));
        assert!(has("nocap.jpg", "no caption file nocap.txt"), "{bad}");
        assert!(has("fake.png", "not a valid png"), "{bad}");
        assert!(has("empty.jpg", "empty file"), "{bad}");
        assert!(has("notes.md", "not an image"), "{bad}");
        assert!(has("", "more than the limit of 3"), "{bad}");
        let text = bad.to_string();
        assert!(text.contains("error: nocap.jpg: no caption file"), "{text}");

        let none = tempfile::tempdir().unwrap();
        assert!(!validate(none.path(), &Limits::default()).unwrap().is_ok());
        assert!(matches!(
            validate(&none.path().join("x"), &Limits::default()),
            Err(DatasetError::NotADir(_))
        ));
    }

    #[tokio::test]
    async fn staging_verifies_before_unpacking_and_skips_when_done() {
        let src = tempfile::tempdir().unwrap();
        fill(src.path(), &[0, 1, 2, 3]);
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("ds.tar");
        let packed = pack(src.path(), &archive).unwrap();
        let machine = tempfile::tempdir().unwrap();
        let exec = LocalExec::new(machine.path()).unwrap();
        let layout = RemoteLayout::new(&machine.path().display().to_string(), "job").unwrap();

        // A wrong expected checksum is refused before anything is unpacked.
        let wrong = "0".repeat(64);
        let err = stage_archive(&exec, &layout, &archive, &wrong).await.unwrap_err();
        match err {
            DatasetError::ChecksumMismatch { expected, actual } => {
                assert_eq!(expected, wrong);
                assert_eq!(actual, packed.sha256);
            }
            other => panic!("{other:?}"),
        }
        assert!(!Path::new(&layout.dataset_dir()).join("a.jpg").exists());

        let report = stage_archive(&exec, &layout, &archive, &packed.sha256).await.unwrap();
        assert_eq!(report, StageReport { sha256: packed.sha256.clone(), already_staged: false });
        assert_eq!(std::fs::read(Path::new(&layout.dataset_dir()).join("sub/b.png")).unwrap(), PNG);
        let again = stage_archive(&exec, &layout, &archive, &packed.sha256).await.unwrap();
        assert!(again.already_staged);

        // The machine downloads URL datasets itself (file:// stands in for a presigned GET).
        let layout2 = RemoteLayout::new(&machine.path().display().to_string(), "job2").unwrap();
        let url = format!("file://{}", archive.display());
        let err = stage_url(&exec, &layout2, &url, Some(&wrong)).await.unwrap_err();
        assert!(matches!(err, DatasetError::ChecksumMismatch { .. }), "{err:?}");
        let got = stage_url(&exec, &layout2, &url, Some(&packed.sha256)).await.unwrap();
        assert_eq!(got.sha256, packed.sha256);
        assert!(Path::new(&layout2.dataset_dir()).join("a.txt").exists());
        // Without a known checksum it is computed and reported.
        let layout3 = RemoteLayout::new(&machine.path().display().to_string(), "job3").unwrap();
        assert_eq!(stage_url(&exec, &layout3, &url, None).await.unwrap().sha256, packed.sha256);
        // A failed download never reports the URL's query.
        let layout4 = RemoteLayout::new(&machine.path().display().to_string(), "job4").unwrap();
        let secret_url = format!("file://{}/missing.tar?X-Amz-Signature=s3cr3t", tmp.path().display());
        let err = stage_url(&exec, &layout4, &secret_url, None).await.unwrap_err();
        assert!(matches!(err, DatasetError::Stage(_)), "{err:?}");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        assert_eq!(redact_in("GET a?b=c failed, b=c", "a?b=c"), "GET a?<redacted> failed, <redacted>");
        let script = download_script("/w/d.tar", None, "/w/dataset", "/w/m").unwrap();
        assert!(script.contains("\"$GPU_TRAINER_DATASET_URL\"") && !script.contains("file://"));
    }
}
