//! Datasets in S3-compatible storage (`spec.dataset.s3`): which storage connection reads them,
//! and the short-lived presigned GET the machine downloads the archive with. The credentials stay
//! with whoever presigns (the operator, or `gpu-trainer launch`); the machine receives only the
//! URL, in the environment of the download command.
//!
//! Which connection reads the dataset (decided by [`choose_connection`], pure):
//! 1. `spec.output.s3` when it names the same bucket: one bucket, one connection;
//! 2. otherwise the operator's own settings (`AWS_*` environment) when it has them;
//! 3. otherwise `spec.output.s3`'s connection (endpoint, region, path style, credentials
//!    Secret), the only storage connection the job names;
//! 4. with neither, the dataset cannot be read and the job fails naming `spec.dataset.s3`.

use std::collections::BTreeMap;
use std::time::Duration;

use super::store::Validity;
use super::{ArtifactError, ObjectRef, ObjectStore, PresignedRequest, S3Settings};
use crate::api::{S3Dataset, S3Output};

/// Lifetime of the presigned GET. curl starts the download at once; S3 checks the signature
/// when a request starts, so a long download outlives it.
pub const DATASET_URL_TTL: Duration = Duration::from_secs(15 * 60);

/// The storage connection that reads `spec.dataset.s3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetConnection {
    /// `spec.output.s3`'s endpoint, region, path style and `credentialsSecretRef`, each unset
    /// field from the operator's defaults.
    Output,
    /// The operator's own settings (`AWS_*` environment).
    Operator,
}

/// Chooses the connection (see the module documentation); `None` when there is none.
pub fn choose_connection(
    dataset: &S3Dataset,
    output: Option<&S3Output>,
    operator_configured: bool,
) -> Option<DatasetConnection> {
    match output {
        Some(o) if o.bucket == dataset.bucket => Some(DatasetConnection::Output),
        _ if operator_configured => Some(DatasetConnection::Operator),
        Some(_) => Some(DatasetConnection::Output),
        None => None,
    }
}

/// The settings that read the dataset. `output_secret` is the content of
/// `spec.output.s3.credentialsSecretRef` when the caller read it (the operator does; the CLI
/// has no cluster and uses its own credentials).
pub fn dataset_settings(
    dataset: &S3Dataset,
    output: Option<&S3Output>,
    output_secret: Option<&BTreeMap<String, Vec<u8>>>,
    operator: Option<&S3Settings>,
) -> Result<S3Settings, ArtifactError> {
    match (choose_connection(dataset, output, operator.is_some()), output, operator) {
        (Some(DatasetConnection::Output), Some(output), _) => {
            S3Settings::for_output(output, output_secret, operator)
        }
        (Some(DatasetConnection::Operator), _, Some(operator)) => Ok(operator.clone()),
        _ => Err(ArtifactError::Settings(format!(
            "no storage connection reads s3://{}/{}: set the operator's AWS_ACCESS_KEY_ID, \
             AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL_S3, AWS_REGION for non-AWS storage), or \
             spec.output.s3 with its endpoint and credentialsSecretRef",
            dataset.bucket, dataset.key
        ))),
    }
}

/// `s3://bucket/key` of the dataset, for messages.
pub fn dataset_uri(dataset: &S3Dataset) -> String {
    ObjectRef::new(&dataset.bucket, &dataset.key).uri()
}

/// A presigned GET of the dataset archive, valid for [`DATASET_URL_TTL`].
pub async fn presign(
    store: &dyn ObjectStore,
    dataset: &S3Dataset,
) -> Result<PresignedRequest, ArtifactError> {
    store
        .presign_get(&ObjectRef::new(&dataset.bucket, &dataset.key), Validity::from_now(DATASET_URL_TTL))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SecretRef;
    use crate::artifacts::S3Credentials;
    use crate::artifacts::s3::S3Store;

    fn dataset(bucket: &str) -> S3Dataset {
        S3Dataset { bucket: bucket.into(), key: "sets/dogs.tar".into(), sha256: None }
    }

    fn output(bucket: &str) -> S3Output {
        S3Output {
            bucket: bucket.into(),
            prefix: None,
            sync_checkpoints: true,
            endpoint: Some("http://127.0.0.1:3900".into()),
            region: Some("garage".into()),
            force_path_style: Some(true),
            credentials_secret_ref: Some(SecretRef { name: "garage".into() }),
        }
    }

    fn operator() -> S3Settings {
        S3Settings {
            endpoint: Some("https://acct.r2.cloudflarestorage.com".into()),
            region: "auto".into(),
            force_path_style: false,
            credentials: S3Credentials {
                access_key_id: "OPERATOR".into(),
                secret_access_key: "OPERATOR-SECRET".into(),
                session_token: None,
            },
        }
    }

    #[test]
    fn the_output_connection_reads_its_own_bucket_the_operator_reads_others() {
        use DatasetConnection::*;
        let data = dataset("data");
        assert_eq!(choose_connection(&data, Some(&output("data")), true), Some(Output));
        assert_eq!(choose_connection(&data, Some(&output("data")), false), Some(Output));
        assert_eq!(choose_connection(&data, Some(&output("models")), true), Some(Operator));
        assert_eq!(choose_connection(&data, None, true), Some(Operator));
        // The job's only storage connection is better than none.
        assert_eq!(choose_connection(&data, Some(&output("models")), false), Some(Output));
        assert_eq!(choose_connection(&data, None, false), None);
    }

    #[test]
    fn settings_follow_the_chosen_connection() {
        let secret: BTreeMap<String, Vec<u8>> = [
            ("AWS_ACCESS_KEY_ID".to_string(), b"JOB".to_vec()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), b"JOB-SECRET".to_vec()),
        ]
        .into();
        let same =
            dataset_settings(&dataset("data"), Some(&output("data")), Some(&secret), Some(&operator()))
                .unwrap();
        assert_eq!(same.credentials.access_key_id, "JOB");
        assert_eq!(same.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert!(same.force_path_style);
        let other =
            dataset_settings(&dataset("data"), Some(&output("models")), Some(&secret), Some(&operator()))
                .unwrap();
        assert_eq!(other, operator());
        let err = dataset_settings(&dataset("data"), None, None, None).unwrap_err().to_string();
        assert!(err.contains("s3://data/sets/dogs.tar") && err.contains("AWS_ACCESS_KEY_ID"), "{err}");
        assert!(err.contains("spec.output.s3"), "{err}");
    }

    #[tokio::test]
    async fn the_presigned_get_names_the_object_and_expires_soon() {
        let store = S3Store::new(&operator());
        let data = dataset("data");
        let request = presign(&store, &data).await.unwrap();
        assert_eq!(request.method, "GET");
        assert!(request.url.contains("/sets/dogs.tar?"), "{}", super::super::redact_url(&request.url));
        assert!(request.url.contains("X-Amz-Expires=900"), "{}", super::super::redact_url(&request.url));
        assert!(!format!("{request:?}").contains("X-Amz-Signature"), "Debug hides the signature");
        assert_eq!(dataset_uri(&data), "s3://data/sets/dogs.tar");
    }
}
