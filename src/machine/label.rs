//! The label every rented machine carries at the provider: it names the installation that rented
//! it and the object it was rented for, so a lost rent is found again and the sweeper knows
//! which machines are its own.

/// The provider label of a GpuInstance: `gputrainer:<installation id>:<uid>` (at most 60
/// characters: 11 + 8 + 1 + 36 = 56).
pub fn instance_label(installation_id: &str, uid: &str) -> String {
    format!("gputrainer:{installation_id}:{uid}")
}

/// Parses a label made by [`instance_label`] into (installation id, uid).
pub fn parse_instance_label(label: &str) -> Option<(&str, &str)> {
    let rest = label.strip_prefix("gputrainer:")?;
    let (installation, uid) = rest.split_once(':')?;
    (installation.len() == 8 && !uid.is_empty()).then_some((installation, uid))
}

/// The label of a machine `gpu-trainer launch` rents: `gputrainer:<installation id>:<uid>-<attempt>`, at most 60 characters
/// (the end of a long uid, its random part, is kept).
pub fn launch_label(installation_id: &str, uid: &str, attempt: i32) -> String {
    let suffix = format!("-{attempt}");
    let room = 60usize.saturating_sub("gputrainer:".len() + installation_id.len() + 1 + suffix.len());
    let chars: Vec<char> = uid.chars().collect();
    let kept: String = chars[chars.len().saturating_sub(room)..].iter().collect();
    instance_label(installation_id, &format!("{}{suffix}", kept.trim_start_matches('-')))
}

/// A fresh random installation id (8 hex characters).
pub fn random_installation_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_fits_vast_limit_and_parses_back() {
        let uid = "0f8fad5b-d9cb-469f-a165-70867728950e";
        let label = instance_label("1a2b3c4d", uid);
        assert!(label.len() <= 60, "{label}");
        assert_eq!(parse_instance_label(&label), Some(("1a2b3c4d", uid)));
        assert_eq!(parse_instance_label("someone-else:1a2b3c4d:x"), None);
        assert_eq!(parse_instance_label("gputrainer:short:x"), None);
    }

    #[test]
    fn labels_fit_the_provider_limit_and_keep_the_random_part() {
        let label = launch_label("1a2b3c4d", "lora-0badcafe", 1);
        assert_eq!(label, "gputrainer:1a2b3c4d:lora-0badcafe-1");
        let long = format!("{}-0badcafe", "x".repeat(200));
        let label = launch_label("1a2b3c4d", &long, 12);
        assert_eq!(label.len(), 60, "{label}");
        assert!(label.ends_with("-0badcafe-12"), "{label}");
        assert!(label.starts_with("gputrainer:1a2b3c4d:"), "{label}");
        assert_eq!(parse_instance_label(&label).map(|(i, _)| i), Some("1a2b3c4d"));
    }
}
