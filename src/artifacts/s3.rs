//! [`ObjectStore`] over aws-sdk-s3, configured by hand (no aws-config): static credentials,
//! custom endpoint, region, path-style, and checksums only when an operation requires them. The
//! last point matters for presigned PUTs: with the SDK's default ("when supported") a presigned
//! PUT carries an `x-amz-checksum-crc32` of the empty body and an `x-amz-sdk-checksum-algorithm`
//! that R2 rejects; "when required" leaves both out.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::presigning::{PresignedRequest as SdkPresigned, PresigningConfig};
use aws_sdk_s3::types::{ChecksumMode, CompletedMultipartUpload, CompletedPart};

use super::store::Validity;
use super::{ArtifactError, ObjectHead, ObjectRef, ObjectStore, PartInfo, PresignedRequest, S3Settings};

/// Presigned URLs live at most this long (the S3 limit is 7 days).
const MAX_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

/// S3, R2, Garage, MinIO... through aws-sdk-s3.
#[derive(Clone, Debug)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
}

impl S3Store {
    pub fn new(settings: &S3Settings) -> Self {
        let creds = &settings.credentials;
        let credentials = Credentials::new(
            creds.access_key_id.clone(),
            creds.secret_access_key.clone(),
            creds.session_token.clone(),
            None,
            "gpu-trainer",
        );
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .credentials_provider(credentials)
            .region(Region::new(settings.region.clone()))
            .force_path_style(settings.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.endpoint_url(endpoint.clone());
        }
        Self { client: aws_sdk_s3::Client::from_conf(builder.build()) }
    }
}

fn presigning_config(object: &ObjectRef, validity: Validity) -> Result<PresigningConfig, ArtifactError> {
    if validity.expires_in > MAX_VALIDITY || validity.expires_in.is_zero() {
        return Err(ArtifactError::Invalid(format!(
            "presigned URL validity {:?} for {} is outside 1 s to 7 days",
            validity.expires_in,
            object.uri()
        )));
    }
    PresigningConfig::builder()
        .start_time(validity.start)
        .expires_in(validity.expires_in)
        .build()
        .map_err(|e| ArtifactError::Invalid(format!("presigning config: {e}")))
}

/// The `Content-Length` to sign into a PUT. SigV4 signs the header like any other, so the
/// server recomputes the signature with the length it receives and refuses any other body size
/// (the SDK leaves the header out of presigned requests unless it is set on the input).
fn signed_length(object: &ObjectRef, content_length: u64) -> Result<i64, ArtifactError> {
    i64::try_from(content_length).map_err(|_| {
        ArtifactError::Invalid(format!("{content_length} bytes for {} is too large", object.uri()))
    })
}

fn convert(presigned: SdkPresigned, validity: Validity) -> PresignedRequest {
    PresignedRequest {
        method: presigned.method().to_string(),
        url: presigned.uri().to_string(),
        headers: presigned.headers().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        expires_at: validity.start + validity.expires_in,
    }
}

fn storage(
    operation: &'static str,
    object: &ObjectRef,
    e: impl std::error::Error + Send + Sync + 'static,
) -> ArtifactError {
    ArtifactError::Storage { operation, uri: object.uri(), source: Box::new(e) }
}

fn presign_error(
    operation: &'static str,
    object: &ObjectRef,
    e: impl std::error::Error + Send + Sync + 'static,
) -> ArtifactError {
    ArtifactError::Presign { operation, uri: object.uri(), source: Box::new(e) }
}

fn unquote(etag: &str) -> String {
    etag.trim_matches('"').to_string()
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn presign_put(
        &self,
        object: &ObjectRef,
        content_length: u64,
        validity: Validity,
    ) -> Result<PresignedRequest, ArtifactError> {
        let config = presigning_config(object, validity)?;
        let presigned = self
            .client
            .put_object()
            .bucket(&object.bucket)
            .key(&object.key)
            .content_length(signed_length(object, content_length)?)
            .presigned(config)
            .await
            .map_err(|e| presign_error("PUT", object, e))?;
        Ok(convert(presigned, validity))
    }

    async fn presign_get(
        &self,
        object: &ObjectRef,
        validity: Validity,
    ) -> Result<PresignedRequest, ArtifactError> {
        let config = presigning_config(object, validity)?;
        let presigned = self
            .client
            .get_object()
            .bucket(&object.bucket)
            .key(&object.key)
            .presigned(config)
            .await
            .map_err(|e| presign_error("GET", object, e))?;
        Ok(convert(presigned, validity))
    }

    async fn create_multipart(&self, object: &ObjectRef) -> Result<String, ArtifactError> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&object.bucket)
            .key(&object.key)
            .send()
            .await
            .map_err(|e| storage("start a multipart upload of", object, e))?;
        out.upload_id().map(str::to_string).ok_or_else(|| ArtifactError::Storage {
            operation: "start a multipart upload of",
            uri: object.uri(),
            source: "the response has no upload id".into(),
        })
    }

    async fn presign_part(
        &self,
        object: &ObjectRef,
        upload_id: &str,
        part_number: i32,
        content_length: u64,
        validity: Validity,
    ) -> Result<PresignedRequest, ArtifactError> {
        let config = presigning_config(object, validity)?;
        let presigned = self
            .client
            .upload_part()
            .bucket(&object.bucket)
            .key(&object.key)
            .upload_id(upload_id)
            .part_number(part_number)
            .content_length(signed_length(object, content_length)?)
            .presigned(config)
            .await
            .map_err(|e| presign_error("UploadPart", object, e))?;
        Ok(convert(presigned, validity))
    }

    async fn list_parts(&self, object: &ObjectRef, upload_id: &str) -> Result<Vec<PartInfo>, ArtifactError> {
        let mut parts = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let out = self
                .client
                .list_parts()
                .bucket(&object.bucket)
                .key(&object.key)
                .upload_id(upload_id)
                .set_part_number_marker(marker.clone())
                .send()
                .await
                .map_err(|e| storage("list the parts of", object, e))?;
            for part in out.parts() {
                if let (Some(number), Some(etag)) = (part.part_number(), part.e_tag()) {
                    parts.push(PartInfo {
                        number,
                        etag: unquote(etag),
                        size: part.size().unwrap_or(0).max(0) as u64,
                    });
                }
            }
            match (out.is_truncated(), out.next_part_number_marker()) {
                (Some(true), Some(next)) if marker.as_deref() != Some(next) => {
                    marker = Some(next.to_string())
                }
                _ => break,
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
        let completed = parts
            .iter()
            .map(|(n, etag)| CompletedPart::builder().part_number(*n).e_tag(format!("\"{etag}\"")).build())
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(&object.bucket)
            .key(&object.key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(completed)).build())
            .send()
            .await
            .map_err(|e| storage("complete the multipart upload of", object, e))?;
        Ok(())
    }

    async fn abort_multipart(&self, object: &ObjectRef, upload_id: &str) -> Result<(), ArtifactError> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&object.bucket)
            .key(&object.key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(()),
            Err(e) => Err(storage("abort the multipart upload of", object, e)),
        }
    }

    async fn head(&self, object: &ObjectRef) -> Result<Option<ObjectHead>, ArtifactError> {
        let result = self
            .client
            .head_object()
            .bucket(&object.bucket)
            .key(&object.key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await;
        match result {
            Ok(out) => Ok(Some(ObjectHead {
                size: out.content_length().unwrap_or(0).max(0) as u64,
                etag: out.e_tag().map(unquote),
                checksum_sha256: out.checksum_sha256().map(str::to_string),
                server_side_encryption: out.server_side_encryption().map(|s| s.as_str().to_string()),
                customer_encryption: out.sse_customer_algorithm().is_some(),
            })),
            Err(e)
                if e.as_service_error().is_some_and(|s| s.is_not_found())
                    || e.raw_response().is_some_and(|r| r.status().as_u16() == 404) =>
            {
                Ok(None)
            }
            Err(e) => Err(storage("HEAD", object, e)),
        }
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<(ObjectRef, u64)>, ArtifactError> {
        let mut out = Vec::new();
        let mut pages = self.client.list_objects_v2().bucket(bucket).prefix(prefix).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| storage("list", &ObjectRef::new(bucket, prefix), e))?;
            for object in page.contents() {
                if let Some(key) = object.key() {
                    out.push((ObjectRef::new(bucket, key), object.size().unwrap_or(0).max(0) as u64));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::artifacts::S3Credentials;

    fn r2_like() -> S3Store {
        S3Store::new(&S3Settings {
            endpoint: Some("https://acct.r2.cloudflarestorage.com".into()),
            region: "auto".into(),
            force_path_style: false,
            credentials: S3Credentials {
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: "wJalrXUtnFEMI-secret".into(),
                session_token: None,
            },
        })
    }

    #[tokio::test]
    async fn presigned_put_has_no_checksum_headers_or_parameters() {
        let store = r2_like();
        let validity = Validity { start: SystemTime::now(), expires_in: Duration::from_secs(900) };
        let p = store
            .presign_put(&ObjectRef::new("models", "job/model.safetensors"), 11, validity)
            .await
            .unwrap();
        assert_eq!(p.method, "PUT");
        let lower = p.url.to_ascii_lowercase();
        assert!(!lower.contains("x-amz-checksum"), "{}", p.url);
        assert!(!lower.contains("x-amz-sdk-checksum-algorithm"), "{}", p.url);
        assert!(
            p.headers.iter().all(|(k, _)| !k.to_ascii_lowercase().contains("checksum")),
            "{:?}",
            p.headers
        );
        assert!(lower.contains("x-amz-expires=900"), "{}", p.url);
        // Virtual-hosted style unless path-style is forced.
        assert!(p.url.starts_with("https://models.acct.r2.cloudflarestorage.com/job/model.safetensors?"));
        assert!(!p.url.contains("wJalrXUtnFEMI-secret"));
        let part =
            store.presign_part(&ObjectRef::new("models", "k"), "upload-1", 2, 5, validity).await.unwrap();
        let lower = part.url.to_ascii_lowercase();
        assert!(!lower.contains("x-amz-checksum") && !lower.contains("x-amz-sdk-checksum"), "{}", part.url);
        assert!(part.url.contains("partNumber=2") && part.url.contains("uploadId=upload-1"), "{}", part.url);
    }

    #[tokio::test]
    async fn path_style_puts_the_bucket_in_the_path() {
        let store = S3Store::new(&S3Settings {
            endpoint: Some("http://127.0.0.1:3900".into()),
            region: "garage".into(),
            force_path_style: true,
            credentials: S3Credentials {
                access_key_id: "GK1".into(),
                secret_access_key: "s".into(),
                session_token: None,
            },
        });
        let p = store
            .presign_get(&ObjectRef::new("data", "sets/a.tar"), Validity::from_now(Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(p.url.starts_with("http://127.0.0.1:3900/data/sets/a.tar?"), "{}", p.url);
        assert!(!format!("{p:?}").contains("X-Amz-Signature"));
    }

    #[tokio::test]
    async fn validity_outside_limits_is_refused() {
        let store = r2_like();
        let too_long = Validity { start: SystemTime::now(), expires_in: Duration::from_secs(8 * 24 * 3600) };
        assert!(store.presign_put(&ObjectRef::new("b", "k"), 1, too_long).await.is_err());
    }

    /// The length is part of the signature: among `X-Amz-SignedHeaders`, and the one header the
    /// request must carry. (Garage refusing another length: `garage_tests`.)
    #[tokio::test]
    async fn presigned_puts_sign_their_content_length() {
        let store = r2_like();
        let validity = Validity::from_now(Duration::from_secs(60));
        let object = ObjectRef::new("models", "job/m.safetensors");
        let put = store.presign_put(&object, 12_345, validity).await.unwrap();
        let part = store.presign_part(&object, "upload-1", 3, 5 * 1024 * 1024, validity).await.unwrap();
        for (p, length) in [(&put, "12345"), (&part, "5242880")] {
            let signed = p
                .url
                .split(['?', '&'])
                .find_map(|kv| kv.strip_prefix("X-Amz-SignedHeaders="))
                .unwrap_or_default()
                .to_string();
            assert!(signed.split("%3B").any(|h| h == "content-length"), "{signed} in {}", p.url);
            assert_eq!(p.headers, [("content-length".to_string(), length.to_string())]);
        }
        // Another length is another signature.
        let other = store.presign_put(&object, 12_346, validity).await.unwrap();
        let signature = |url: &str| url.split("X-Amz-Signature=").nth(1).map(str::to_string);
        assert_ne!(signature(&put.url), signature(&other.url));
    }
}
