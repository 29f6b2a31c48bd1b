//! [`ObjectStore`] over aws-sdk-s3, configured by hand (no aws-config): static credentials,
//! custom endpoint, region, path-style, and checksums only when an operation requires them. The
//! last point matters for presigned PUTs: with the SDK's default ("when supported") a presigned
//! PUT carries an `x-amz-checksum-crc32` of the empty body and an `x-amz-sdk-checksum-algorithm`
//! that R2 rejects; "when required" leaves both out.
//!
//! Every call the operator makes is bounded: connect, read, per-attempt and whole-operation
//! timeouts ([`S3Timeouts`]), and listings stop with an error after a number of pages
//! (`pages`). The endpoint is checked against the operator's address policy (`endpoint`): at
//! [`S3Store::connect`] for a clear message, and by the client's DNS resolver on every
//! connection. The client is the SDK's own hyper client with that resolver; unlike the SDK's
//! default, it does not read `HTTPS_PROXY` (a proxy would resolve names the policy cannot see).

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::presigning::{PresignedRequest as SdkPresigned, PresigningConfig};
use aws_sdk_s3::types::{ChecksumMode, CompletedMultipartUpload, CompletedPart};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

use super::address::EndpointPolicy;
use super::endpoint::{self, EndpointError, GuardedResolver};
use super::pages::{ListingFailure, Page, collect_pages};
use super::store::Validity;
use super::{ArtifactError, ObjectHead, ObjectRef, ObjectStore, PartInfo, PresignedRequest, S3Settings};

/// Presigned URLs live at most this long (the S3 limit is 7 days).
const MAX_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Pages of ListObjectsV2 followed at most: 100,000 keys at S3's 1,000 per page, far more than
/// a checkpoint folder holds.
pub const LIST_PAGE_LIMIT: usize = 100;

/// Pages of ListParts followed at most: an upload has at most 10,000 parts, 10 pages at S3's
/// 1,000 per page; the margin is for servers with smaller pages.
pub const PART_PAGE_LIMIT: usize = 100;

/// Time limits of the operator's S3 calls. The SDK sets none of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct S3Timeouts {
    /// Establishing a connection (TCP and TLS).
    pub connect: Duration,
    /// Waiting for data on an open connection. CompleteMultipartUpload of a large object can
    /// take minutes, but S3 sends whitespace meanwhile, so this bounds silence, not work.
    pub read: Duration,
    /// One attempt of an operation.
    pub attempt: Duration,
    /// An operation with all its retries.
    pub operation: Duration,
}

impl Default for S3Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            read: Duration::from_secs(60),
            attempt: Duration::from_secs(120),
            operation: Duration::from_secs(300),
        }
    }
}

/// S3, R2, Garage, MinIO... through aws-sdk-s3.
#[derive(Clone, Debug)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
}

impl S3Store {
    /// A store whose endpoint is trusted: the CLI (`gpu-trainer launch`, run by its user with
    /// their own settings), tests, and presigning only (no request is made; the machine
    /// connects). The operator's own calls go through [`S3Store::connect`].
    pub fn new(settings: &S3Settings) -> Self {
        Self::build(settings, EndpointPolicy::AllowPrivate, S3Timeouts::default())
    }

    /// A store for the operator: the endpoint (named by `field` in messages, e.g.
    /// `spec.output.s3.endpoint`) is refused when `policy` refuses its address. A name that
    /// does not resolve now is not refused: the resolver checks it when it does.
    pub async fn connect(
        settings: &S3Settings,
        policy: EndpointPolicy,
        field: &str,
    ) -> Result<Self, ArtifactError> {
        if let Some(endpoint) = &settings.endpoint {
            let url = url::Url::parse(endpoint)
                .map_err(|_| ArtifactError::Settings(format!("{field} is not a URL")))?;
            match endpoint::check_url(&url, policy, &format!("the S3 endpoint in {field}")).await {
                Ok(_) | Err(EndpointError::Unresolved { .. }) => {}
                Err(refused) => return Err(refused.into()),
            }
        }
        Ok(Self::build(settings, policy, S3Timeouts::default()))
    }

    fn build(settings: &S3Settings, policy: EndpointPolicy, timeouts: S3Timeouts) -> Self {
        let creds = &settings.credentials;
        let credentials = Credentials::new(
            creds.access_key_id.clone(),
            creds.secret_access_key.clone(),
            creds.session_token.clone(),
            None,
            "gpu-trainer",
        );
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(timeouts.connect)
            .read_timeout(timeouts.read)
            .operation_attempt_timeout(timeouts.attempt)
            .operation_timeout(timeouts.operation)
            .build();
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
            .build_with_resolver(GuardedResolver::new(policy));
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .credentials_provider(credentials)
            .region(Region::new(settings.region.clone()))
            .force_path_style(settings.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(timeouts)
            .http_client(http_client);
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
        let client = &self.client;
        let fetch = |marker: Option<String>| async move {
            let out = client
                .list_parts()
                .bucket(&object.bucket)
                .key(&object.key)
                .upload_id(upload_id)
                .set_part_number_marker(marker)
                .send()
                .await
                .map_err(|e| storage("list the parts of", object, e))?;
            let items = out
                .parts()
                .iter()
                .filter_map(|part| {
                    Some(PartInfo {
                        number: part.part_number()?,
                        etag: unquote(part.e_tag()?),
                        size: part.size().unwrap_or(0).max(0) as u64,
                    })
                })
                .collect();
            Ok::<_, ArtifactError>(Page {
                items,
                truncated: out.is_truncated().unwrap_or(false),
                next: out.next_part_number_marker().map(str::to_string),
            })
        };
        let mut parts = collect_pages(PART_PAGE_LIMIT, fetch).await.map_err(|failure| match failure {
            ListingFailure::Fetch(e) => e,
            ListingFailure::Paging(e) => storage("list the parts of", object, e),
        })?;
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
        let client = &self.client;
        let fetch = |token: Option<String>| async move {
            let out = client
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| storage("list", &ObjectRef::new(bucket, prefix), e))?;
            let items = out
                .contents()
                .iter()
                .filter_map(|o| Some((ObjectRef::new(bucket, o.key()?), o.size().unwrap_or(0).max(0) as u64)))
                .collect();
            Ok::<_, ArtifactError>(Page {
                items,
                truncated: out.is_truncated().unwrap_or(false),
                next: out.next_continuation_token().map(str::to_string),
            })
        };
        collect_pages(LIST_PAGE_LIMIT, fetch).await.map_err(|failure| match failure {
            ListingFailure::Fetch(e) => e,
            ListingFailure::Paging(e) => storage("list", &ObjectRef::new(bucket, prefix), e),
        })
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
        let store = S3Store::new(&local("http://127.0.0.1:3900"));
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

    fn local(endpoint: &str) -> S3Settings {
        S3Settings {
            endpoint: Some(endpoint.into()),
            region: "garage".into(),
            force_path_style: true,
            credentials: S3Credentials {
                access_key_id: "GK1".into(),
                secret_access_key: "s".into(),
                session_token: None,
            },
        }
    }

    /// A server that accepts connections and never answers; returns its endpoint and how many
    /// connections it got.
    async fn silent_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(socket);
            }
        });
        (endpoint, accepted)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// HEAD against a silent server with `timeouts` ends, with an error, well within a generous
    /// limit; without the timeout under test it would wait for ever.
    async fn head_ends_in_time(timeouts: S3Timeouts) -> String {
        let (endpoint, _) = silent_server().await;
        let store = S3Store::build(&local(&endpoint), EndpointPolicy::AllowPrivate, timeouts);
        let outcome = tokio::time::timeout(Duration::from_secs(60), store.head(&ObjectRef::new("b", "k")))
            .await
            .expect("the S3 call must end by its own timeout");
        crate::error::error_chain(&outcome.expect_err("a silent server is an error"))
    }

    #[tokio::test]
    async fn a_silent_server_ends_in_a_read_timeout() {
        let timeouts =
            S3Timeouts { connect: HOUR, read: Duration::from_millis(300), attempt: HOUR, operation: HOUR };
        let error = head_ends_in_time(timeouts).await;
        assert!(error.to_ascii_lowercase().contains("timeout"), "{error}");
    }

    #[tokio::test]
    async fn each_attempt_has_a_time_limit() {
        let timeouts =
            S3Timeouts { connect: HOUR, read: HOUR, attempt: Duration::from_millis(300), operation: HOUR };
        let error = head_ends_in_time(timeouts).await;
        assert!(error.to_ascii_lowercase().contains("timeout"), "{error}");
    }

    #[tokio::test]
    async fn the_whole_operation_has_a_time_limit() {
        let timeouts =
            S3Timeouts { connect: HOUR, read: HOUR, attempt: HOUR, operation: Duration::from_millis(500) };
        let error = head_ends_in_time(timeouts).await;
        assert!(error.to_ascii_lowercase().contains("timeout"), "{error}");
    }

    #[test]
    fn every_store_has_every_timeout() {
        let store = S3Store::new(&local("http://127.0.0.1:3900"));
        let config = store.client.config().timeout_config().expect("a timeout config").clone();
        let defaults = S3Timeouts::default();
        assert_eq!(config.connect_timeout(), Some(defaults.connect));
        assert_eq!(config.read_timeout(), Some(defaults.read));
        assert_eq!(config.operation_attempt_timeout(), Some(defaults.attempt));
        assert_eq!(config.operation_timeout(), Some(defaults.operation));
        assert!(defaults.connect <= defaults.attempt && defaults.attempt <= defaults.operation);
    }

    #[tokio::test]
    async fn the_operator_refuses_a_private_endpoint_and_names_the_field() {
        let err = S3Store::connect(
            &local("http://127.0.0.1:3900"),
            EndpointPolicy::PublicOnly,
            "spec.output.s3.endpoint",
        )
        .await
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "the S3 endpoint in spec.output.s3.endpoint (http://127.0.0.1:3900) points at 127.0.0.1, a loopback \
             address; start the operator with --allow-private-endpoints to allow it"
        );
        let internal = S3Store::connect(
            &local("https://minio.storage.svc.cluster.local"),
            EndpointPolicy::PublicOnly,
            "spec.output.s3.endpoint",
        )
        .await;
        assert!(matches!(internal, Err(ArtifactError::Endpoint(e)) if e.is_refusal()));
        assert!(
            S3Store::connect(&local("http://127.0.0.1:3900"), EndpointPolicy::AllowPrivate, "x")
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn the_client_resolves_names_through_the_policy() {
        // Built without the check at `connect`, as if the name had resolved to a public address
        // then: the connection itself is refused, and the server never sees one.
        let (endpoint, accepted) = silent_server().await;
        let port = url::Url::parse(&endpoint).unwrap().port().unwrap();
        let store = S3Store::build(
            &local(&format!("http://localhost:{port}")),
            EndpointPolicy::PublicOnly,
            S3Timeouts { operation: Duration::from_secs(20), ..S3Timeouts::default() },
        );
        let err = store.head(&ObjectRef::new("b", "k")).await.unwrap_err();
        let chain = crate::error::error_chain(&err);
        assert!(chain.contains("--allow-private-endpoints"), "{chain}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn an_endless_listing_stops_at_the_page_limit_with_an_error() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let served = std::sync::Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        // Every page says more follow, with a new token each time.
        let app = axum::Router::new().fallback(move || {
            let page = count.fetch_add(1, Ordering::SeqCst);
            async move {
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
                     <ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                     <Name>b</Name><Prefix>p/</Prefix><KeyCount>1</KeyCount><MaxKeys>1</MaxKeys>\
                     <IsTruncated>true</IsTruncated><Contents><Key>p/{page}</Key><Size>1</Size></Contents>\
                     <NextContinuationToken>t{page}</NextContinuationToken></ListBucketResult>"
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let store = S3Store::new(&local(&endpoint));
        let listed = tokio::time::timeout(Duration::from_secs(60), store.list("b", "p/"));
        let err = listed.await.expect("the listing must stop by itself").unwrap_err();
        let chain = crate::error::error_chain(&err);
        assert!(chain.contains(&format!("past {LIST_PAGE_LIMIT} pages")), "{chain}");
        assert_eq!(served.load(Ordering::SeqCst), LIST_PAGE_LIMIT);
    }
}
