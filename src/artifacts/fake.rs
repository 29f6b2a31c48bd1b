//! An [`ObjectStore`] on the local disk for tests without S3: presigned URLs are `file://` URLs
//! that `curl -T` writes to, so the real upload script runs end to end on `LocalExec`. ETags are
//! MD5s (multipart: the S3 formula), as on S3.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use md5::{Digest, Md5};

use super::plan::multipart_etag;
use super::store::Validity;
use super::{ArtifactError, ObjectHead, ObjectRef, ObjectStore, PartInfo, PresignedRequest};

#[derive(Debug, Default)]
struct State {
    next_upload: u32,
    /// Part numbers whose first presign points somewhere unwritable (a failed part).
    fail_parts_once: Vec<i32>,
    /// Multipart ETags of completed objects.
    etags: BTreeMap<ObjectRef, String>,
    presigned_parts: Vec<i32>,
    /// `(key, part number or 0 for a single PUT, signed length)` of every presigned PUT.
    signed_lengths: Vec<(String, i32, u64)>,
    aborted: Vec<String>,
}

#[derive(Debug)]
pub struct FakeObjectStore {
    root: PathBuf,
    state: Mutex<State>,
}

impl FakeObjectStore {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf(), state: Mutex::default() }
    }

    pub fn object_path(&self, object: &ObjectRef) -> PathBuf {
        self.root.join(&object.bucket).join(&object.key)
    }

    pub fn fail_part_once(&self, part: i32) {
        self.state.lock().unwrap().fail_parts_once.push(part);
    }

    pub fn presigned_parts(&self) -> Vec<i32> {
        self.state.lock().unwrap().presigned_parts.clone()
    }

    /// `(key, part number or 0 for a single PUT, signed length)` of every presigned PUT.
    pub fn signed_lengths(&self) -> Vec<(String, i32, u64)> {
        self.state.lock().unwrap().signed_lengths.clone()
    }

    /// Whether anything at all was presigned or started (no URL reached the machine).
    pub fn nothing_presigned(&self) -> bool {
        let state = self.state.lock().unwrap();
        state.signed_lengths.is_empty() && state.presigned_parts.is_empty() && state.next_upload == 0
    }

    pub fn aborted(&self) -> Vec<String> {
        self.state.lock().unwrap().aborted.clone()
    }

    fn part_dir(&self, upload_id: &str) -> PathBuf {
        self.root.join(".multipart").join(upload_id)
    }

    fn request(path: &Path, validity: Validity) -> PresignedRequest {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        PresignedRequest {
            method: "PUT".into(),
            url: format!("file://{}?X-Amz-Signature=fake", path.display()),
            headers: vec![],
            expires_at: validity.start + validity.expires_in,
        }
    }
}

fn md5_file(path: &Path) -> String {
    hex::encode(Md5::digest(std::fs::read(path).unwrap_or_default()))
}

#[async_trait]
impl ObjectStore for FakeObjectStore {
    async fn presign_put(
        &self,
        object: &ObjectRef,
        content_length: u64,
        validity: Validity,
    ) -> Result<PresignedRequest, ArtifactError> {
        self.state.lock().unwrap().signed_lengths.push((object.key.clone(), 0, content_length));
        let mut r = Self::request(&self.object_path(object), validity);
        r.headers = vec![("content-length".into(), content_length.to_string())];
        // curl's file:// upload ignores the query; strip it so the file name stays the key.
        r.url = r.url.replace("?X-Amz-Signature=fake", "");
        Ok(r)
    }

    async fn presign_get(
        &self,
        object: &ObjectRef,
        validity: Validity,
    ) -> Result<PresignedRequest, ArtifactError> {
        let mut r = Self::request(&self.object_path(object), validity);
        r.method = "GET".into();
        Ok(r)
    }

    async fn create_multipart(&self, _object: &ObjectRef) -> Result<String, ArtifactError> {
        let mut state = self.state.lock().unwrap();
        state.next_upload += 1;
        Ok(format!("upload-{}", state.next_upload))
    }

    async fn presign_part(
        &self,
        object: &ObjectRef,
        upload_id: &str,
        part_number: i32,
        content_length: u64,
        validity: Validity,
    ) -> Result<PresignedRequest, ArtifactError> {
        let mut state = self.state.lock().unwrap();
        state.presigned_parts.push(part_number);
        state.signed_lengths.push((object.key.clone(), part_number, content_length));
        let mut path = self.part_dir(upload_id).join(part_number.to_string());
        if let Some(pos) = state.fail_parts_once.iter().position(|p| *p == part_number) {
            state.fail_parts_once.remove(pos);
            path = PathBuf::from("/nonexistent-gpu-trainer-dir/part");
            let mut r = Self::request(Path::new("/tmp/x"), validity);
            r.url = format!("file://{}", path.display());
            return Ok(r);
        }
        let mut r = Self::request(&path, validity);
        r.url = r.url.replace("?X-Amz-Signature=fake", "");
        r.headers = vec![("content-length".into(), content_length.to_string())];
        Ok(r)
    }

    async fn list_parts(&self, _object: &ObjectRef, upload_id: &str) -> Result<Vec<PartInfo>, ArtifactError> {
        let mut parts = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.part_dir(upload_id)) {
            for entry in entries.flatten() {
                if let Ok(number) = entry.file_name().to_string_lossy().parse::<i32>() {
                    let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                    parts.push(PartInfo { number, etag: md5_file(&entry.path()), size });
                }
            }
        }
        parts.sort_by_key(|p| p.number);
        Ok(parts)
    }

    async fn complete_multipart(
        &self,
        object: &ObjectRef,
        upload_id: &str,
        parts: &[(i32, String)],
    ) -> Result<(), ArtifactError> {
        let mut data = Vec::new();
        for (n, _) in parts {
            data.extend(std::fs::read(self.part_dir(upload_id).join(n.to_string())).unwrap());
        }
        let path = self.object_path(object);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
        let etag = multipart_etag(&parts.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>())?;
        self.state.lock().unwrap().etags.insert(object.clone(), etag);
        Ok(())
    }

    async fn abort_multipart(&self, _object: &ObjectRef, upload_id: &str) -> Result<(), ArtifactError> {
        self.state.lock().unwrap().aborted.push(upload_id.to_string());
        Ok(())
    }

    async fn head(&self, object: &ObjectRef) -> Result<Option<ObjectHead>, ArtifactError> {
        let path = self.object_path(object);
        let Ok(meta) = std::fs::metadata(&path) else { return Ok(None) };
        let etag = self.state.lock().unwrap().etags.get(object).cloned().unwrap_or_else(|| md5_file(&path));
        Ok(Some(ObjectHead { size: meta.len(), etag: Some(etag), ..Default::default() }))
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<(ObjectRef, u64)>, ArtifactError> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() { walk(&path, out) } else { out.push(path) }
            }
        }
        let root = self.root.join(bucket);
        let mut files = Vec::new();
        walk(&root, &mut files);
        let mut out: Vec<(ObjectRef, u64)> = files
            .into_iter()
            .filter_map(|p| {
                let key = p.strip_prefix(&root).ok()?.to_string_lossy().into_owned();
                let size = std::fs::metadata(&p).ok()?.len();
                key.starts_with(prefix).then(|| (ObjectRef::new(bucket, key), size))
            })
            .collect();
        out.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        Ok(out)
    }
}
