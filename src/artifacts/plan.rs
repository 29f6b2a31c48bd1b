//! Pure decisions of an upload: where each result goes in the bucket, whether a file goes up in
//! one PUT or in parts, and what the storage should report afterwards.

use md5::{Digest, Md5};

use super::{ArtifactError, ObjectRef};
use crate::api::S3Output;

/// S3's smallest part (except the last) and the largest single PUT (S3 and R2).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
pub const MAX_SINGLE_PUT: u64 = 5 * 1024 * 1024 * 1024;
/// S3's largest part count.
pub const MAX_PARTS: u64 = 10_000;
const MIB: u64 = 1024 * 1024;

/// The key prefix of one job: `<prefix>/<job name>-<job uid>` (no trailing slash).
pub fn job_prefix(output: &S3Output, job_name: &str, job_uid: &str) -> String {
    let job = format!("{job_name}-{job_uid}");
    match output.prefix.as_deref().map(|p| p.trim_matches('/')).filter(|p| !p.is_empty()) {
        Some(prefix) => format!("{prefix}/{job}"),
        None => job,
    }
}

/// Where one job's results go: a bucket and the job's key prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub bucket: String,
    pub job_prefix: String,
}

impl Destination {
    pub fn for_job(output: &S3Output, job_name: &str, job_uid: &str) -> Self {
        Self { bucket: output.bucket.clone(), job_prefix: job_prefix(output, job_name, job_uid) }
    }

    /// The object at `rel` below the job prefix.
    pub fn object(&self, rel: &str) -> ObjectRef {
        ObjectRef::new(&self.bucket, join_key(&self.job_prefix, rel))
    }
}

/// Joins key segments with single slashes.
pub fn join_key(prefix: &str, rel: &str) -> String {
    let rel = rel.trim_start_matches('/');
    if prefix.is_empty() { rel.to_string() } else { format!("{}/{rel}", prefix.trim_end_matches('/')) }
}

/// How one file goes up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transfer {
    /// One presigned PUT.
    Single,
    /// Multipart: `parts` parts of `part_size` bytes (the last one shorter).
    Multipart { part_size: u64, parts: u64 },
}

/// Single PUT up to `threshold`, parts of `part_size` above it (grown when the file would need
/// more than 10,000 parts). `part_size` is rounded up to whole MiB, because the machine cuts
/// parts with `dd bs=1M`.
pub fn choose_transfer(size: u64, threshold: u64, part_size: u64) -> Result<Transfer, ArtifactError> {
    let threshold = threshold.min(MAX_SINGLE_PUT);
    if size <= threshold {
        return Ok(Transfer::Single);
    }
    let mut part_size = part_size.max(MIN_PART_SIZE).div_ceil(MIB) * MIB;
    if size.div_ceil(part_size) > MAX_PARTS {
        part_size = size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    }
    let parts = size.div_ceil(part_size);
    if part_size > MAX_SINGLE_PUT {
        return Err(ArtifactError::Invalid(format!("a file of {size} bytes is larger than S3 allows")));
    }
    Ok(Transfer::Multipart { part_size, parts })
}

/// Bytes in part `number` (from 1) of a file of `size` bytes cut into `part_size` parts: the
/// length signed into that part's URL.
pub fn part_length(size: u64, part_size: u64, number: u64) -> u64 {
    size.saturating_sub(number.saturating_sub(1).saturating_mul(part_size)).min(part_size)
}

/// The ETag S3 gives a completed multipart upload: MD5 of the concatenated binary part MD5s,
/// a dash, and the part count.
pub fn multipart_etag(part_md5s: &[String]) -> Result<String, ArtifactError> {
    let mut hasher = Md5::new();
    for md5 in part_md5s {
        let bytes = hex::decode(md5).map_err(|_| ArtifactError::Invalid(format!("not an MD5: {md5:?}")))?;
        hasher.update(&bytes);
    }
    Ok(format!("{}-{}", hex::encode(hasher.finalize()), part_md5s.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(prefix: Option<&str>) -> S3Output {
        S3Output {
            bucket: "models".into(),
            prefix: prefix.map(str::to_string),
            sync_checkpoints: true,
            endpoint: None,
            region: None,
            force_path_style: None,
            credentials_secret_ref: None,
        }
    }

    #[test]
    fn job_prefix_puts_jobs_under_the_configured_prefix() {
        assert_eq!(job_prefix(&output(None), "lora", "u1"), "lora-u1");
        assert_eq!(job_prefix(&output(Some("/runs/")), "lora", "u1"), "runs/lora-u1");
        assert_eq!(
            join_key("runs/lora-u1", "/checkpoints/a.safetensors"),
            "runs/lora-u1/checkpoints/a.safetensors"
        );
    }

    #[test]
    fn small_files_go_in_one_put_and_large_ones_in_whole_mib_parts() {
        assert_eq!(choose_transfer(10, 64 * MIB, 16 * MIB).unwrap(), Transfer::Single);
        assert_eq!(
            choose_transfer(100 * MIB + 1, 64 * MIB, 16 * MIB).unwrap(),
            Transfer::Multipart { part_size: 16 * MIB, parts: 7 }
        );
        // Below S3's minimum part size the part size is raised.
        assert_eq!(
            choose_transfer(12 * MIB, 8 * MIB, 1).unwrap(),
            Transfer::Multipart { part_size: 5 * MIB, parts: 3 }
        );
        // Never more than 10,000 parts.
        match choose_transfer(200_000 * MIB, 64 * MIB, 5 * MIB).unwrap() {
            Transfer::Multipart { part_size, parts } => {
                assert!(parts <= MAX_PARTS);
                assert_eq!(part_size % MIB, 0);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parts_are_whole_except_the_last() {
        let size = 12 * MIB + 123;
        let lengths: Vec<u64> = (1..=3).map(|n| part_length(size, 5 * MIB, n)).collect();
        assert_eq!(lengths, [5 * MIB, 5 * MIB, 2 * MIB + 123]);
        assert_eq!(lengths.iter().sum::<u64>(), size);
        assert_eq!(part_length(10 * MIB, 5 * MIB, 2), 5 * MIB);
    }

    #[test]
    fn multipart_etag_matches_the_s3_formula() {
        // Two parts of "a" and "b": md5("a"), md5("b").
        let a = hex::encode(Md5::digest(b"a"));
        let b = hex::encode(Md5::digest(b"b"));
        let mut both = Md5::digest(b"a").to_vec();
        both.extend_from_slice(&Md5::digest(b"b"));
        assert_eq!(multipart_etag(&[a, b]).unwrap(), format!("{}-2", hex::encode(Md5::digest(&both))));
        assert!(multipart_etag(&["zz".into()]).is_err());
    }
}
