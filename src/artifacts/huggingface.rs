//! Hugging Face upload: the machine runs `hf upload` (huggingface_hub >= 0.34; `huggingface-cli`
//! is gone in 1.x) with the token only as the `HF_TOKEN` environment variable of that one
//! command (`RunOptions.env`), never in the script text or on a command line. The files are
//! first gathered (hard links, or copies) into a staging folder so one commit holds the model,
//! the model card and whatever else is asked for; their size and SHA-256 are computed there.

use std::fmt;
use std::time::Duration;

use super::ArtifactError;
use super::script::failure_message;
use crate::api::ArtifactStatus;
use crate::monitor::remote_names::{self, check_relative_path};
use crate::remote::{RemoteExec, RunOptions, shell_quote};

/// A Hugging Face token. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct HfToken(String);

impl HfToken {
    /// Trims whitespace (Secrets often end with a newline); empty is refused.
    pub fn new(value: &str) -> Result<Self, ArtifactError> {
        let v = value.trim();
        if v.is_empty() {
            return Err(ArtifactError::Invalid("the Hugging Face token is empty".into()));
        }
        Ok(Self(v.to_string()))
    }
}

impl fmt::Debug for HfToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HfToken(<redacted>)")
    }
}

/// What to upload where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfUpload {
    /// `owner/name`.
    pub repo: String,
    pub private: bool,
    /// `(artifact name, path on the machine, path in the repository)`.
    pub files: Vec<(String, String, String)>,
    pub commit_message: String,
    /// Scratch folder on the machine (emptied first).
    pub staging_dir: String,
    /// The CLI to run; `hf` unless a test substitutes a fake.
    pub cli: String,
}

/// Renders the step. The text names no token.
pub fn render_hf_upload(upload: &HfUpload) -> Result<String, ArtifactError> {
    let q = |s: &str| shell_quote(s).map_err(|e| ArtifactError::Invalid(e.to_string()));
    let valid_repo = upload.repo.split('/').count() == 2
        && upload.repo.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if !valid_repo {
        return Err(ArtifactError::Invalid(format!("invalid Hugging Face repository {:?}", upload.repo)));
    }
    let stage = q(&upload.staging_dir)?;
    let mut s = String::from(
        "set -u\ngt_fail() { printf 'gt-error\\t%s\\n' \"$*\" >&2; exit 1; }\n\
         gt_sha() { if command -v sha256sum >/dev/null 2>&1; then sha256sum \"$1\"; else shasum -a 256 \"$1\"; fi | { read -r h _ && printf '%s' \"$h\"; }; }\n",
    );
    s.push_str(&format!(
        "rm -rf {stage} && mkdir -p {stage} || gt_fail 'cannot create the staging folder'\n"
    ));
    for (i, (_, src, dst)) in upload.files.iter().enumerate() {
        // Repository paths are built from names the machine reported (a checkpoint's name).
        check_relative_path(dst).map_err(|why| {
            ArtifactError::Invalid(format!("path in repository {} {why}", remote_names::quoted(dst)))
        })?;
        let (src, target) = (q(src)?, q(&format!("{}/{dst}", upload.staging_dir.trim_end_matches('/')))?);
        s.push_str(&format!(
            "[ -f {src} ] || gt_fail {missing}\nmkdir -p \"$(dirname {target})\" && {{ ln -f {src} {target} 2>/dev/null || cp {src} {target}; }} || gt_fail {copy}\n\
             printf 'gt-file\\t{i}\\t%s\\t%s\\n' \"$(wc -c < {target} | tr -d ' ')\" \"$(gt_sha {target})\"\n",
            missing = q(&format!("{} is missing", upload.files[i].1))?,
            copy = q(&format!("cannot stage {}", upload.files[i].1))?,
        ));
    }
    let cli = q(&upload.cli)?;
    s.push_str(&format!(
        "if ! command -v {cli} >/dev/null 2>&1 && [ {cli} = hf ]; then\n  \
         python3 -m pip install --quiet --disable-pip-version-check 'huggingface_hub>=0.34' >&2 || gt_fail 'cannot install huggingface_hub'\nfi\n\
         command -v {cli} >/dev/null 2>&1 || gt_fail 'the hf command is not installed'\n\
         [ -n \"${{HF_TOKEN:-}}\" ] || gt_fail 'HF_TOKEN is not set'\n\
         HF_HUB_DISABLE_PROGRESS_BARS=1 {cli} upload {repo} {stage} . --repo-type model{private} --commit-message {msg} --quiet || gt_fail 'hf upload failed'\n\
         rm -rf {stage}\n",
        repo = q(&upload.repo)?,
        private = if upload.private { " --private" } else { "" },
        msg = q(&upload.commit_message)?,
    ));
    Ok(s)
}

/// Runs the step on `remote` with the token as `HF_TOKEN` of that command only, and returns one
/// `ArtifactStatus` per file (`hf://owner/name/path`).
pub async fn upload_to_hub(
    remote: &dyn RemoteExec,
    upload: &HfUpload,
    token: &HfToken,
    timeout: Duration,
) -> Result<Vec<ArtifactStatus>, ArtifactError> {
    let script = render_hf_upload(upload)?;
    let out = remote
        .run(
            &script,
            RunOptions {
                timeout,
                env: vec![("HF_TOKEN".to_string(), token.0.clone())],
                ..Default::default()
            },
        )
        .await
        .map_err(|e| ArtifactError::remote("hf upload", e))?;
    // The CLI could echo the token in an error; scrub it before it reaches a status or log.
    let scrub = |text: String| text.replace(&token.0, "<redacted>");
    if !out.success() {
        return Err(ArtifactError::StepFailed {
            step: "hf upload",
            exit_code: out.exit_code,
            message: scrub(failure_message(&out.stderr_lossy())),
        });
    }
    let stdout = out.stdout_lossy();
    let mut statuses = Vec::new();
    for (i, (name, _, dst)) in upload.files.iter().enumerate() {
        let prefix = format!("gt-file\t{i}\t");
        let line = stdout.lines().find_map(|l| l.strip_prefix(&prefix)).ok_or_else(|| {
            ArtifactError::Report { step: "hf upload", message: format!("no report for {dst}") }
        })?;
        let (size, sha) = line.split_once('\t').ok_or_else(|| ArtifactError::Report {
            step: "hf upload",
            message: format!("unexpected line {line:?}"),
        })?;
        statuses.push(ArtifactStatus {
            name: name.clone(),
            uri: format!("hf://{}/{dst}", upload.repo),
            size_bytes: size.trim().parse().map_err(|_| ArtifactError::Report {
                step: "hf upload",
                message: format!("bad size in {line:?}"),
            })?,
            sha256: Some(sha.trim().to_string()).filter(|s| s.len() == 64),
        });
    }
    Ok(statuses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_passes_private_and_never_names_a_token() {
        let upload = HfUpload {
            repo: "me/my-lora".into(),
            private: true,
            files: vec![("model".into(), "output/m.safetensors".into(), "m.safetensors".into())],
            commit_message: "step 2000".into(),
            staging_dir: "/w/hf-upload".into(),
            cli: "hf".into(),
        };
        let s = render_hf_upload(&upload).unwrap();
        assert!(s.contains("hf upload me/my-lora /w/hf-upload . --repo-type model --private --commit-message 'step 2000' --quiet"), "{s}");
        assert!(!s.contains("hf_"), "{s}");
        assert_eq!(format!("{:?}", HfToken::new("hf_abc\n").unwrap()), "HfToken(<redacted>)");
    }

    #[test]
    fn bad_repository_or_path_is_refused() {
        let mut upload = HfUpload {
            repo: "me/x; rm -rf /".into(),
            private: false,
            files: vec![],
            commit_message: "m".into(),
            staging_dir: "/w/s".into(),
            cli: "hf".into(),
        };
        assert!(render_hf_upload(&upload).is_err());
        upload.repo = "me/x".into();
        for bad in ["../b", "/etc/x", "checkpoints/.gitattributes", "a\nb", "", "a//b"] {
            upload.files = vec![("m".into(), "a".into(), bad.into())];
            assert!(render_hf_upload(&upload).is_err(), "{bad:?}");
        }
        upload.files =
            vec![("m".into(), "a".into(), "checkpoints/my_lora/my_lora_000000250.safetensors".into())];
        assert!(render_hf_upload(&upload).is_ok());
    }
}

#[cfg(test)]
mod exec_tests {
    use super::*;
    use crate::artifacts::recording::RecordingExec;
    use crate::remote::local::LocalExec;

    const TOKEN: &str = "hf_TestTokenValue123";

    /// A stand-in for the `hf` CLI: records its arguments and whether it saw the token.
    const FAKE_HF: &str = "#!/bin/sh\nprintf '%s\\n' \"$@\" > hf-args.txt\n\
        [ \"$HF_TOKEN\" = 'hf_TestTokenValue123' ] && echo yes > hf-token-seen\n\
        ls \"$3\" > hf-staged.txt\necho \"https://huggingface.co/$2\"\n";

    #[tokio::test]
    async fn token_reaches_only_the_environment_of_the_upload_command() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let remote = RecordingExec::new(LocalExec::new(&work).unwrap());
        std::fs::create_dir_all(work.join("output")).unwrap();
        std::fs::write(work.join("output/m.safetensors"), b"weights").unwrap();
        std::fs::write(work.join("output/README.md"), b"card").unwrap();
        std::fs::write(work.join("fake-hf"), FAKE_HF).unwrap();
        std::process::Command::new("chmod").args(["+x"]).arg(work.join("fake-hf")).status().unwrap();
        let upload = HfUpload {
            repo: "me/my-lora".into(),
            private: true,
            files: vec![
                ("model".into(), "output/m.safetensors".into(), "m.safetensors".into()),
                ("model-card".into(), "output/README.md".into(), "README.md".into()),
            ],
            commit_message: "gpu-trainer: step 40".into(),
            staging_dir: "hf-upload".into(),
            cli: "./fake-hf".into(),
        };
        let token = HfToken::new(TOKEN).unwrap();
        let statuses = upload_to_hub(&remote, &upload, &token, Duration::from_secs(60)).await.unwrap();
        assert_eq!(statuses[0].uri, "hf://me/my-lora/m.safetensors");
        assert_eq!(statuses[0].size_bytes, 7);
        assert_eq!(statuses[1].name, "model-card");
        assert!(work.join("hf-token-seen").exists(), "the CLI did not get HF_TOKEN");
        let args = std::fs::read_to_string(work.join("hf-args.txt")).unwrap();
        assert!(args.starts_with("upload\nme/my-lora\nhf-upload\n.\n"), "{args}");
        assert!(args.contains("--private") && !args.contains(TOKEN), "{args}");
        // Exactly one command got the token, as HF_TOKEN, and no command text names it.
        let commands = remote.commands();
        let with_token: Vec<_> =
            commands.iter().filter(|c| c.env.iter().any(|(_, v)| v.contains(TOKEN))).collect();
        assert_eq!(with_token.len(), 1);
        assert_eq!(with_token[0].env, vec![("HF_TOKEN".to_string(), TOKEN.to_string())]);
        assert!(commands.iter().all(|c| !c.command.contains(TOKEN)));
    }

    #[tokio::test]
    async fn a_failing_cli_is_an_error_whose_message_never_shows_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let remote = LocalExec::new(&work).unwrap();
        std::fs::write(work.join("m.bin"), b"x").unwrap();
        std::fs::write(
            work.join("bad-hf"),
            "#!/bin/sh\necho \"401 Unauthorized for token $HF_TOKEN\" >&2\nexit 1\n",
        )
        .unwrap();
        std::process::Command::new("chmod").args(["+x"]).arg(work.join("bad-hf")).status().unwrap();
        let upload = HfUpload {
            repo: "me/x".into(),
            private: false,
            files: vec![("model".into(), "m.bin".into(), "m.bin".into())],
            commit_message: "m".into(),
            staging_dir: "stage".into(),
            cli: "./bad-hf".into(),
        };
        let err = upload_to_hub(&remote, &upload, &HfToken::new(TOKEN).unwrap(), Duration::from_secs(30))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("hf upload failed"), "{text}");
        assert!(!text.contains(TOKEN), "{text}");
    }
}
