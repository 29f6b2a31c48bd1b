//! The narrow storage interface the upload engine needs: presign (PUT, GET, multipart part),
//! multipart create/list/complete/abort, and HEAD. Implemented by `s3::S3Store` (aws-sdk-s3)
//! and, for tests, an in-memory fake; nothing outside `s3.rs` sees an SDK type.

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::ArtifactError;

/// One object: bucket and key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub bucket: String,
    pub key: String,
}

impl ObjectRef {
    pub fn new(bucket: impl Into<String>, key: impl Into<String>) -> Self {
        Self { bucket: bucket.into(), key: key.into() }
    }

    /// `s3://bucket/key`, as reported in status.
    pub fn uri(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

/// A presigned request: whoever holds it may perform exactly this request until it expires.
/// `Debug` hides the query string, which carries the signature.
#[derive(Clone, PartialEq, Eq)]
pub struct PresignedRequest {
    pub method: String,
    pub url: String,
    /// Headers that were signed into the URL and must be sent exactly: for PUTs,
    /// `content-length` (which curl derives from the file it sends, see `script`).
    pub headers: Vec<(String, String)>,
    pub expires_at: SystemTime,
}

impl fmt::Debug for PresignedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PresignedRequest")
            .field("method", &self.method)
            .field("url", &super::redact_url(&self.url))
            .field("headers", &self.headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// When a presigned URL starts being valid and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub start: SystemTime,
    pub expires_in: Duration,
}

impl Validity {
    /// Valid from now on for `expires_in`.
    pub fn from_now(expires_in: Duration) -> Self {
        Self { start: SystemTime::now(), expires_in }
    }
}

/// What HEAD says about an object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectHead {
    pub size: u64,
    /// Without quotes.
    pub etag: Option<String>,
    /// `x-amz-checksum-sha256` (base64) when the server stored one.
    pub checksum_sha256: Option<String>,
    /// `x-amz-server-side-encryption` (`aws:kms` means the ETag is not an MD5).
    pub server_side_encryption: Option<String>,
    /// SSE-C also makes the ETag something other than an MD5.
    pub customer_encryption: bool,
}

/// One uploaded part of a multipart upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartInfo {
    pub number: i32,
    /// Without quotes.
    pub etag: String,
    pub size: u64,
}

/// S3-compatible storage as the upload engine needs it.
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// A presigned PUT of one whole object of exactly `content_length` bytes: the length is
    /// signed in (`content-length` among the signed headers), so storage refuses a body of any
    /// other size and a URL handed to the machine cannot store more than was planned. No checksum
    /// headers are signed in (R2 rejects them, and a checksum of the empty body would be baked in).
    async fn presign_put(
        &self,
        object: &ObjectRef,
        content_length: u64,
        validity: Validity,
    ) -> Result<PresignedRequest, ArtifactError>;

    /// A presigned GET (datasets).
    async fn presign_get(
        &self,
        object: &ObjectRef,
        validity: Validity,
    ) -> Result<PresignedRequest, ArtifactError>;

    /// Starts a multipart upload; returns its upload id.
    async fn create_multipart(&self, object: &ObjectRef) -> Result<String, ArtifactError>;

    /// A presigned PUT of one part (`part_number` from 1) of exactly `content_length` bytes
    /// (signed in, as for [`ObjectStore::presign_put`]).
    async fn presign_part(
        &self,
        object: &ObjectRef,
        upload_id: &str,
        part_number: i32,
        content_length: u64,
        validity: Validity,
    ) -> Result<PresignedRequest, ArtifactError>;

    /// The parts uploaded so far, by number.
    async fn list_parts(&self, object: &ObjectRef, upload_id: &str) -> Result<Vec<PartInfo>, ArtifactError>;

    /// Completes a multipart upload from `(part number, etag)` in order.
    async fn complete_multipart(
        &self,
        object: &ObjectRef,
        upload_id: &str,
        parts: &[(i32, String)],
    ) -> Result<(), ArtifactError>;

    /// Abandons a multipart upload (its parts stop costing storage). Unknown uploads are fine.
    async fn abort_multipart(&self, object: &ObjectRef, upload_id: &str) -> Result<(), ArtifactError>;

    /// HEAD; `None` when the object does not exist.
    async fn head(&self, object: &ObjectRef) -> Result<Option<ObjectHead>, ArtifactError>;

    /// Every object whose key starts with `prefix`, with its size, in key order (a checkpoint
    /// folder to bring back onto a new machine).
    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<(ObjectRef, u64)>, ArtifactError>;
}
