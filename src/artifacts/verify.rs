//! Is the object in storage what the machine sent? Pure: a HEAD response against the machine's
//! report. The size must match; the ETag must equal the MD5 (single PUT) or the S3 multipart
//! formula over the part MD5s, unless the bucket encrypts with KMS or SSE-C (then the ETag is no
//! MD5); a stored SHA-256 checksum, when the server has one, must match too.

use base64::Engine as _;

use super::plan::multipart_etag;
use super::script::FileReport;
use super::{ArtifactError, ObjectHead};

/// Checks `head` (None: the object is missing) against `report` for the object at `uri`.
pub fn verify_object(uri: &str, head: Option<&ObjectHead>, report: &FileReport) -> Result<(), ArtifactError> {
    let fail = |message: String| Err(ArtifactError::Verification { uri: uri.to_string(), message });
    let Some(head) = head else {
        return fail("the object does not exist".into());
    };
    if head.size != report.size {
        return fail(format!("storage holds {} bytes, the machine sent {}", head.size, report.size));
    }
    let etag_is_md5 = !head.customer_encryption
        && !head.server_side_encryption.as_deref().is_some_and(|s| s.starts_with("aws:kms"));
    if let Some(etag) = head.etag.as_deref().filter(|_| etag_is_md5) {
        // Only ETags shaped like an MD5 (single PUT) or `<md5>-<parts>` (multipart) are compared;
        // other servers' ETags say nothing about the content.
        let looks_multipart =
            etag.rsplit_once('-').is_some_and(|(h, n)| h.len() == 32 && n.parse::<u32>().is_ok());
        let looks_md5 = etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit());
        let expected = match &report.md5 {
            Some(md5) if looks_md5 => Some(md5.clone()),
            None if !report.parts.is_empty() && looks_multipart => {
                let md5s: Vec<String> = report.parts.values().map(|(m, _)| m.clone()).collect();
                Some(multipart_etag(&md5s)?)
            }
            _ => None,
        };
        if let Some(expected) = expected
            && !etag.eq_ignore_ascii_case(&expected)
        {
            return fail(format!("ETag {etag} does not match the content sent ({expected})"));
        }
    }
    if let Some(stored) = &head.checksum_sha256
        && !stored.contains('-')
    {
        let sent = hex::decode(&report.sha256)
            .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
            .unwrap_or_default();
        if *stored != sent {
            return fail(format!("stored SHA-256 {stored} does not match the content sent"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(size: u64, md5: &str) -> FileReport {
        FileReport {
            size,
            sha256: "00".repeat(32),
            md5: Some(md5.into()),
            parts: Default::default(),
            complete: true,
        }
    }

    fn head(size: u64, etag: &str) -> ObjectHead {
        ObjectHead { size, etag: Some(etag.into()), ..Default::default() }
    }

    #[test]
    fn matching_size_and_md5_pass() {
        let md5 = "0cc175b9c0f1b6a831c399e269772661";
        assert!(verify_object("s3://b/k", Some(&head(1, md5)), &report(1, md5)).is_ok());
    }

    #[test]
    fn truncated_object_fails_on_size() {
        let md5 = "0cc175b9c0f1b6a831c399e269772661";
        let err = verify_object("s3://b/k", Some(&head(1, md5)), &report(2, md5)).unwrap_err();
        assert!(err.to_string().contains("1 bytes"), "{err}");
    }

    #[test]
    fn different_content_of_same_size_fails_on_etag_unless_kms() {
        let r = report(1, "0cc175b9c0f1b6a831c399e269772661");
        assert!(verify_object("s3://b/k", Some(&head(1, "92eb5ffee6ae2fec3ad71c777531578f")), &r).is_err());
        let mut kms = head(1, "92eb5ffee6ae2fec3ad71c777531578f");
        kms.server_side_encryption = Some("aws:kms".into());
        assert!(verify_object("s3://b/k", Some(&kms), &r).is_ok());
    }

    #[test]
    fn missing_object_fails() {
        assert!(verify_object("s3://b/k", None, &report(1, "00")).is_err());
    }

    #[test]
    fn multipart_etag_is_checked_from_part_md5s() {
        let parts: std::collections::BTreeMap<u64, (String, bool)> =
            [(1, ("0cc175b9c0f1b6a831c399e269772661".to_string(), true))].into();
        let r = FileReport { size: 1, sha256: "00".repeat(32), md5: None, parts, complete: true };
        let expected = multipart_etag(&["0cc175b9c0f1b6a831c399e269772661".into()]).unwrap();
        assert!(verify_object("u", Some(&head(1, &expected)), &r).is_ok());
        assert!(verify_object("u", Some(&head(1, "0cc175b9c0f1b6a831c399e269772662-1")), &r).is_err());
    }
}
