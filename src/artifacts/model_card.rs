//! The model card (`README.md`) uploaded with a model. A run that stopped before its target
//! step count (stall, deadline, budget, suspension) is marked incomplete: the `incomplete` tag in
//! the YAML front matter, and a warning naming target steps, completed steps, the percentage and
//! the reason, so nobody mistakes a partial LoRA for a finished one.

use std::fmt::Write as _;

use super::ArtifactError;
use crate::remote::RemoteExec;

/// What the card says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelCard {
    /// Title, e.g. the job or repository name.
    pub title: String,
    /// Tool reference, e.g. `flux-lora@1`.
    pub tool: String,
    /// Base model repository, when known (`black-forest-labs/FLUX.1-dev`).
    pub base_model: Option<String>,
    /// Tags besides the ones derived here (`lora`, `flux` for FLUX tools, `incomplete`).
    pub extra_tags: Vec<String>,
    pub target_steps: Option<u64>,
    pub completed_steps: u64,
    /// Why training stopped early; `None` for a run that reached its target.
    pub stop_reason: Option<String>,
    /// Training parameters, shown as a table.
    pub params: Vec<(String, String)>,
    /// Files of the model, relative to the repository.
    pub files: Vec<String>,
}

impl ModelCard {
    /// True when the run stopped early: a stop reason, or fewer steps than the target.
    pub fn incomplete(&self) -> bool {
        self.stop_reason.is_some() || self.target_steps.is_some_and(|t| self.completed_steps < t)
    }

    pub fn tags(&self) -> Vec<String> {
        let mut tags = Vec::new();
        if self.tool.starts_with("flux") || self.base_model.as_deref().is_some_and(|b| b.contains("FLUX")) {
            tags.push("flux".to_string());
        }
        tags.push("lora".to_string());
        if self.incomplete() {
            tags.push("incomplete".to_string());
        }
        for t in &self.extra_tags {
            if !tags.contains(t) {
                tags.push(t.clone());
            }
        }
        tags
    }

    /// The README.md text.
    pub fn render(&self) -> String {
        let mut out = String::from("---\ntags:\n");
        for tag in self.tags() {
            let _ = writeln!(out, "- {}", yaml_scalar(&tag));
        }
        if let Some(base) = &self.base_model {
            let _ = writeln!(out, "base_model: {}", yaml_scalar(base));
        }
        out.push_str("---\n\n");
        let _ = writeln!(out, "# {}\n", one_line(&self.title));
        if self.incomplete() {
            let completed = self.completed_steps;
            let reason = self.stop_reason.as_deref().map(one_line).unwrap_or_else(|| "unknown".into());
            match self.target_steps {
                Some(target) if target > 0 => {
                    let percent = completed as f64 * 100.0 / target as f64;
                    let _ = writeln!(
                        out,
                        "> **Warning: incomplete training.** This run stopped early at step {completed} of \
                         {target} target steps ({percent:.1}% complete). Reason: {reason}.\n"
                    );
                }
                _ => {
                    let _ = writeln!(
                        out,
                        "> **Warning: incomplete training.** This run stopped early after {completed} steps \
                         (target unknown). Reason: {reason}.\n"
                    );
                }
            }
        }
        let _ = writeln!(out, "LoRA trained with `{}` by gpu-trainer.\n", one_line(&self.tool));
        let _ = writeln!(out, "- Completed steps: {}", self.completed_steps);
        if let Some(target) = self.target_steps {
            let _ = writeln!(out, "- Target steps: {target}");
        }
        if !self.files.is_empty() {
            out.push_str("\n## Files\n\n");
            for f in &self.files {
                let _ = writeln!(out, "- `{}`", one_line(f));
            }
        }
        if !self.params.is_empty() {
            out.push_str("\n## Parameters\n\n| name | value |\n| --- | --- |\n");
            for (k, v) in &self.params {
                let _ = writeln!(out, "| {} | {} |", table_cell(k), table_cell(v));
            }
        }
        out
    }
}

/// Writes `text` to `remote_path` on the machine (through a local temporary file), so the card
/// can be uploaded with the model.
pub async fn write_to_machine(
    remote: &dyn RemoteExec,
    text: &str,
    remote_path: &str,
) -> Result<(), ArtifactError> {
    let dir = tempfile_dir()?;
    let local = dir.join("README.md");
    let result = async {
        tokio::fs::write(&local, text)
            .await
            .map_err(|e| ArtifactError::Invalid(format!("cannot write the model card locally: {e}")))?;
        remote.upload(&local, remote_path).await.map_err(|e| ArtifactError::remote("model card", e))?;
        Ok(())
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    result
}

fn tempfile_dir() -> Result<std::path::PathBuf, ArtifactError> {
    let dir = std::env::temp_dir().join(format!("gpu-trainer-card-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| ArtifactError::Invalid(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn table_cell(s: &str) -> String {
    one_line(s).replace('|', "\\|")
}

/// A YAML scalar: plain when safe, double-quoted otherwise.
fn yaml_scalar(s: &str) -> String {
    let plain = !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if plain { s.to_string() } else { serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card() -> ModelCard {
        ModelCard {
            title: "my-lora".into(),
            tool: "flux-lora@1".into(),
            base_model: Some("black-forest-labs/FLUX.1-dev".into()),
            target_steps: Some(4000),
            completed_steps: 1200,
            stop_reason: Some("StallDetected: the loss stopped improving".into()),
            params: vec![("rank".into(), "32".into())],
            files: vec!["my-lora.safetensors".into()],
            ..Default::default()
        }
    }

    #[test]
    fn early_stopped_run_is_marked_incomplete_in_front_matter_and_warning() {
        let text = card().render();
        let front: serde_yaml::Value =
            serde_yaml::from_str(text.trim_start_matches("---\n").split("\n---\n").next().unwrap()).unwrap();
        let tags: Vec<&str> =
            front["tags"].as_sequence().unwrap().iter().filter_map(|t| t.as_str()).collect();
        assert_eq!(tags, ["flux", "lora", "incomplete"]);
        assert_eq!(front["base_model"].as_str(), Some("black-forest-labs/FLUX.1-dev"));
        assert!(text.contains("step 1200 of 4000 target steps (30.0% complete)"), "{text}");
        assert!(text.contains("Reason: StallDetected: the loss stopped improving."), "{text}");
    }

    #[test]
    fn finished_run_has_no_incomplete_tag_or_warning() {
        let mut c = card();
        c.completed_steps = 4000;
        c.stop_reason = None;
        let text = c.render();
        assert!(!text.contains("incomplete"), "{text}");
        assert!(!text.contains("Warning"));
    }

    #[tokio::test]
    async fn card_is_written_to_the_machine() {
        let dir = tempfile::tempdir().unwrap();
        let remote = crate::remote::local::LocalExec::new(dir.path()).unwrap();
        write_to_machine(&remote, &card().render(), "output/README.md").await.unwrap();
        let text = std::fs::read_to_string(dir.path().join("output/README.md")).unwrap();
        assert!(text.starts_with("---\ntags:\n- flux\n- lora\n- incomplete\n"), "{text}");
    }

    #[test]
    fn fewer_steps_than_target_is_incomplete_even_without_a_reason() {
        let mut c = card();
        c.stop_reason = None;
        assert!(c.incomplete());
        assert!(c.render().contains("Reason: unknown."));
    }
}
