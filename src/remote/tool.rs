//! Declarative training tools: `config/tools/<name>/tool.yaml` plus its templates, referenced
//! from a TrainingJob as `<name>@<version>`.
//!
//! A tool lists its parameters (type, default, range, required), the files to write into the
//! work dir (copied, or rendered from templates), bootstrap commands, the run command, an optional
//! resume command, a health check, cleanup commands, the outputs it leaves (final model,
//! checkpoints, samples) and the secrets its process needs.
//!
//! Rendering uses minijinja with strict undefined variables. Every value printed into a command
//! (`run`, `resume`, `bootstrap`, ...) is shell-quoted automatically, so a parameter such as
//! `x; rm -rf /` stays text. Values printed into `.yaml`/`.yml`/`.json` files are written as JSON
//! scalars (valid YAML), so they cannot add keys or lines. Secrets are never template values:
//! they reach only the environment of the process that needs them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::launch::RemoteLayout;
use super::{RemoteError, RemoteExec, RunOptions, shell_quote};

/// Errors of loading, validating and rendering tools.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid tool definition: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("tool reference {0:?} is not of the form NAME@VERSION")]
    BadReference(String),
    #[error("unknown tool {reference}; available: {available}")]
    UnknownTool { reference: String, available: String },
    #[error("unknown parameter {name:?} for tool {tool}; known parameters: {known}")]
    UnknownParameter { tool: String, name: String, known: String },
    #[error("parameter {name:?} of tool {tool} is required")]
    MissingParameter { tool: String, name: String },
    #[error("parameter {name:?} of tool {tool}: {message}")]
    InvalidParameter { tool: String, name: String, message: String },
    #[error("tool {tool} needs the secret environment variable {name}")]
    MissingSecret { tool: String, name: String },
    #[error("failed to render {template} of tool {tool}")]
    Render {
        tool: String,
        template: String,
        #[source]
        source: minijinja::Error,
    },
    #[error("{what} of tool {tool} failed with exit code {exit_code:?}: {stderr}")]
    StepFailed { tool: String, what: String, exit_code: Option<i32>, stderr: String },
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

/// Log format the monitor parses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Parser {
    Tqdm,
    AiToolkit,
    Kohya,
    Diffusers,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    String,
    Integer,
    Number,
    Boolean,
}

/// One parameter a tool accepts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParamSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ParamType,
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Json>,
    /// Without a default, a parameter that is not required renders as `none`.
    #[serde(default)]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Allowed values of a string parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choices: Option<Vec<String>>,
    /// Regular expression a string parameter must match (whole value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
}

/// A file written into the work dir before the run: either copied (`source`) or rendered
/// (`template`), both relative to the tool's folder.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSpec {
    /// Destination, relative to the work dir.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default)]
    pub executable: bool,
}

/// A secret the tool's process needs, passed as an environment variable.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretSpec {
    pub name: String,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub description: String,
}

/// Where results appear, relative to the work dir (globs allowed; templates allowed).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Outputs {
    pub final_model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<String>,
}

/// The content of `tool.yaml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToolSpec {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    /// Container image to rent the machine with (a TrainingJob can override it).
    pub image: String,
    pub parser: Parser,
    #[serde(default)]
    pub parameters: Vec<ParamSpec>,
    #[serde(default)]
    pub secrets: Vec<SecretSpec>,
    #[serde(default)]
    pub files: Vec<FileSpec>,
    #[serde(default)]
    pub bootstrap: Vec<String>,
    pub run: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
    pub outputs: Outputs,
    #[serde(default)]
    pub cleanup: Vec<String>,
}

/// A tool read from disk, with its templates compiled.
#[derive(Debug)]
pub struct Tool {
    pub spec: ToolSpec,
    pub dir: PathBuf,
    env: Environment<'static>,
    /// Copied files: destination and content.
    sources: Vec<(FileSpec, Vec<u8>)>,
}

/// How values are escaped, chosen by template name.
fn escape_for(name: &str) -> AutoEscape {
    if name.starts_with("cmd:") || name.ends_with(".sh") {
        AutoEscape::Custom("shell")
    } else if [".yaml", ".yml", ".json"].iter().any(|ext| name.ends_with(ext)) || name.starts_with("path:") {
        AutoEscape::Custom(if name.starts_with("path:") { "path" } else { "json" })
    } else {
        AutoEscape::None
    }
}

fn format_value(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &Value,
) -> Result<(), minijinja::Error> {
    let fail = |msg: &str| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg.to_string());
    match state.auto_escape() {
        AutoEscape::Custom("shell") if !value.is_safe() => {
            let text = if value.is_none() { String::new() } else { value.to_string() };
            let quoted = shlex::try_quote(&text).map_err(|_| fail("a value contains a NUL byte"))?;
            out.write_str(&quoted).map_err(|_| fail("write failed"))
        }
        AutoEscape::Custom("json") if !value.is_safe() => {
            let text = serde_json::to_string(value)
                .map_err(|e| fail(&format!("cannot write a value as JSON: {e}")))?;
            out.write_str(&text).map_err(|_| fail("write failed"))
        }
        AutoEscape::Custom("path") => {
            // Output paths come back to us as globs: no separators or parent references from values.
            let text = value.to_string();
            if !value.is_safe() && (text.contains('/') || text.contains("..") || text.contains('\0')) {
                return Err(fail("a value placed into an output path contains '/' or '..'"));
            }
            out.write_str(&text).map_err(|_| fail("write failed"))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> ToolError {
    ToolError::Invalid { path: path.to_path_buf(), message: message.into() }
}

fn relative_ok(p: &str) -> bool {
    !p.is_empty() && !p.starts_with('/') && !p.split('/').any(|c| c == "..")
}

impl Tool {
    /// Reads `dir/tool.yaml` and the files it refers to, and compiles every template.
    pub fn load(dir: &Path) -> Result<Self, ToolError> {
        let path = dir.join("tool.yaml");
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ToolError::Read { path: path.clone(), source })?;
        let spec: ToolSpec = serde_yaml::from_str(&text).map_err(|e| invalid(&path, e.to_string()))?;
        Self::from_spec(spec, dir, &path)
    }

    fn from_spec(spec: ToolSpec, dir: &Path, path: &Path) -> Result<Self, ToolError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(escape_for);
        env.set_formatter(format_value);
        // `"a,b" | split(",")`: list-valued settings arrive as comma-separated strings.
        env.add_filter("split", |s: String, sep: String| {
            s.split(sep.as_str()).map(str::to_string).collect::<Vec<_>>()
        });
        let mut add = |name: String, source: String| {
            env.add_template_owned(name.clone(), source)
                .map_err(|e| invalid(path, format!("template {name}: {e}")))
        };
        for (i, cmd) in spec.bootstrap.iter().enumerate() {
            add(format!("cmd:bootstrap[{i}]"), cmd.clone())?;
        }
        for (i, cmd) in spec.cleanup.iter().enumerate() {
            add(format!("cmd:cleanup[{i}]"), cmd.clone())?;
        }
        add("cmd:run".into(), spec.run.clone())?;
        if let Some(cmd) = &spec.resume {
            add("cmd:resume".into(), cmd.clone())?;
        }
        if let Some(cmd) = &spec.health_check {
            add("cmd:healthCheck".into(), cmd.clone())?;
        }
        add("path:finalModel".into(), spec.outputs.final_model.clone())?;
        if let Some(p) = &spec.outputs.checkpoints {
            add("path:checkpoints".into(), p.clone())?;
        }
        if let Some(p) = &spec.outputs.samples {
            add("path:samples".into(), p.clone())?;
        }
        let mut sources = Vec::new();
        for file in &spec.files {
            if !relative_ok(&file.path) {
                return Err(invalid(
                    path,
                    format!("file path {:?} must be relative, without '..'", file.path),
                ));
            }
            match (&file.source, &file.template) {
                (Some(src), None) | (None, Some(src)) if relative_ok(src) => {
                    let full = dir.join(src);
                    let bytes = std::fs::read(&full)
                        .map_err(|source| ToolError::Read { path: full.clone(), source })?;
                    if file.template.is_some() {
                        let text =
                            String::from_utf8(bytes).map_err(|_| invalid(&full, "template is not UTF-8"))?;
                        // The template is registered under its destination, which picks the escaping.
                        add(format!("file:{}", file.path), text)?;
                    } else {
                        sources.push((file.clone(), bytes));
                    }
                }
                _ => {
                    return Err(invalid(
                        path,
                        format!("file {:?} needs exactly one relative `source` or `template`", file.path),
                    ));
                }
            }
        }
        let tool = Self { spec, dir: dir.to_path_buf(), env, sources };
        tool.check_spec(path)?;
        Ok(tool)
    }

    fn check_spec(&self, path: &Path) -> Result<(), ToolError> {
        let s = &self.spec;
        if s.name.is_empty() || s.version.is_empty() || s.name.contains('@') || s.version.contains('@') {
            return Err(invalid(path, "name and version must be non-empty and without '@'"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &s.parameters {
            if !seen.insert(p.name.as_str()) {
                return Err(invalid(path, format!("parameter {:?} is listed twice", p.name)));
            }
            if let Some(pattern) = &p.pattern {
                regex::Regex::new(pattern)
                    .map_err(|e| invalid(path, format!("parameter {:?}: bad pattern: {e}", p.name)))?;
            }
            if let Some(default) = &p.default {
                self.check_value(p, default).map_err(|e| invalid(path, format!("default: {e}")))?;
            }
        }
        for secret in &s.secrets {
            super::check_env_name(&secret.name).map_err(|e| invalid(path, e.to_string()))?;
        }
        Ok(())
    }

    /// `name@version`.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.spec.name, self.spec.version)
    }

    fn param_error(&self, name: &str, message: impl Into<String>) -> ToolError {
        ToolError::InvalidParameter {
            tool: self.reference(),
            name: name.to_string(),
            message: message.into(),
        }
    }

    fn check_value(&self, p: &ParamSpec, value: &Json) -> Result<Json, ToolError> {
        let err = |m: String| self.param_error(&p.name, m);
        let number = |v: &Json| -> Result<f64, ToolError> {
            let n = v.as_f64().ok_or_else(|| err(format!("expected a number, got {v}")))?;
            if !n.is_finite() {
                return Err(err("must be finite".into()));
            }
            if let Some(min) = p.min
                && n < min
            {
                return Err(err(format!("{n} is below the minimum {min}")));
            }
            if let Some(max) = p.max
                && n > max
            {
                return Err(err(format!("{n} is above the maximum {max}")));
            }
            Ok(n)
        };
        match p.kind {
            ParamType::Integer => {
                let n = number(value)?;
                if n.fract() != 0.0 || !value.is_number() {
                    return Err(err(format!("expected an integer, got {value}")));
                }
                Ok(Json::from(n as i64))
            }
            ParamType::Number => {
                number(value)?;
                Ok(value.clone())
            }
            ParamType::Boolean => match value {
                Json::Bool(_) => Ok(value.clone()),
                _ => Err(err(format!("expected true or false, got {value}"))),
            },
            ParamType::String => {
                let s = value.as_str().ok_or_else(|| err(format!("expected a string, got {value}")))?;
                if let Some(max) = p.max_length.or(Some(4096))
                    && s.chars().count() > max
                {
                    return Err(err(format!("longer than {max} characters")));
                }
                if let Some(choices) = &p.choices
                    && !choices.iter().any(|c| c == s)
                {
                    return Err(err(format!("{s:?} is not one of {}", choices.join(", "))));
                }
                if let Some(pattern) = &p.pattern {
                    let re =
                        regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| err(e.to_string()))?;
                    if !re.is_match(s) {
                        return Err(err(format!("{s:?} does not match {pattern}")));
                    }
                }
                Ok(value.clone())
            }
        }
    }

    /// Checks `given` against the parameter list and fills in defaults. Unknown keys, missing
    /// required values, wrong types and out-of-range values are errors naming the parameter.
    pub fn resolve_params(
        &self,
        given: &BTreeMap<String, Json>,
    ) -> Result<BTreeMap<String, Json>, ToolError> {
        for name in given.keys() {
            if !self.spec.parameters.iter().any(|p| &p.name == name) {
                let known: Vec<&str> = self.spec.parameters.iter().map(|p| p.name.as_str()).collect();
                return Err(ToolError::UnknownParameter {
                    tool: self.reference(),
                    name: name.clone(),
                    known: known.join(", "),
                });
            }
        }
        let mut out = BTreeMap::new();
        for p in &self.spec.parameters {
            let value = match (given.get(&p.name), &p.default) {
                (Some(Json::Null), _) | (None, _) if p.required && p.default.is_none() => {
                    return Err(ToolError::MissingParameter { tool: self.reference(), name: p.name.clone() });
                }
                (Some(v), _) if !v.is_null() => self.check_value(p, v)?,
                (_, Some(default)) => default.clone(),
                _ => Json::Null,
            };
            out.insert(p.name.clone(), value);
        }
        Ok(out)
    }

    /// Checks that every required secret is present among `env_names`.
    pub fn check_secrets<'a>(&self, env_names: impl IntoIterator<Item = &'a str>) -> Result<(), ToolError> {
        let names: Vec<&str> = env_names.into_iter().collect();
        for s in self.spec.secrets.iter().filter(|s| s.required) {
            if !names.contains(&s.name.as_str()) {
                return Err(ToolError::MissingSecret { tool: self.reference(), name: s.name.clone() });
            }
        }
        Ok(())
    }

    /// Renders everything for one job. `params` are the job's raw parameters (validated here).
    pub fn render(
        &self,
        params: &BTreeMap<String, Json>,
        job: &JobContext,
    ) -> Result<RenderedTool, ToolError> {
        let params = self.resolve_params(params)?;
        let ctx = minijinja::context! {
            params => Value::from_serialize(&params),
            job => minijinja::context! { name => job.name.clone(), uid => job.uid.clone() },
            paths => minijinja::context! {
                work => job.layout.work_dir(),
                dataset => job.layout.dataset_dir(),
                output => job.layout.output_dir(),
                log => job.layout.log(),
            },
            tool => minijinja::context! { name => self.spec.name.clone(), version => self.spec.version.clone() },
        };
        let render = |name: &str| -> Result<String, ToolError> {
            self.env.get_template(name).and_then(|t| t.render(&ctx)).map_err(|source| ToolError::Render {
                tool: self.reference(),
                template: name.to_string(),
                source,
            })
        };
        let mut files = Vec::new();
        for (spec, bytes) in &self.sources {
            files.push(RenderedFile {
                path: spec.path.clone(),
                content: bytes.clone(),
                executable: spec.executable,
            });
        }
        for spec in self.spec.files.iter().filter(|f| f.template.is_some()) {
            let content = render(&format!("file:{}", spec.path))?;
            files.push(RenderedFile {
                path: spec.path.clone(),
                content: content.into_bytes(),
                executable: spec.executable,
            });
        }
        let mut rendered_paths = Vec::new();
        for name in ["path:finalModel", "path:checkpoints", "path:samples"] {
            rendered_paths.push(if self.env.get_template(name).is_ok() { Some(render(name)?) } else { None });
        }
        let [final_model, checkpoints, samples]: [Option<String>; 3] =
            rendered_paths.try_into().unwrap_or([None, None, None]);
        let outputs = Outputs { final_model: final_model.unwrap_or_default(), checkpoints, samples };
        for p in [Some(&outputs.final_model), outputs.checkpoints.as_ref(), outputs.samples.as_ref()]
            .into_iter()
            .flatten()
        {
            if !relative_ok(p) {
                return Err(ToolError::Invalid {
                    path: self.dir.join("tool.yaml"),
                    message: format!("output path {p:?} must be relative"),
                });
            }
        }
        Ok(RenderedTool {
            tool: self.reference(),
            image: self.spec.image.clone(),
            parser: self.spec.parser,
            params,
            files,
            bootstrap: (0..self.spec.bootstrap.len())
                .map(|i| render(&format!("cmd:bootstrap[{i}]")))
                .collect::<Result<_, _>>()?,
            run: render("cmd:run")?,
            resume: self.spec.resume.as_ref().map(|_| render("cmd:resume")).transpose()?,
            health_check: self.spec.health_check.as_ref().map(|_| render("cmd:healthCheck")).transpose()?,
            cleanup: (0..self.spec.cleanup.len())
                .map(|i| render(&format!("cmd:cleanup[{i}]")))
                .collect::<Result<_, _>>()?,
            outputs,
            secrets: self.spec.secrets.clone(),
        })
    }
}

/// What templates know about the job.
#[derive(Clone, Debug)]
pub struct JobContext {
    pub name: String,
    pub uid: String,
    pub layout: RemoteLayout,
}

/// A file to write into the work dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedFile {
    pub path: String,
    pub content: Vec<u8>,
    pub executable: bool,
}

/// A tool rendered for one job: everything the job engine runs, all values quoted.
#[derive(Clone, Debug)]
pub struct RenderedTool {
    pub tool: String,
    pub image: String,
    pub parser: Parser,
    /// Parameters after validation and defaults.
    pub params: BTreeMap<String, Json>,
    pub files: Vec<RenderedFile>,
    pub bootstrap: Vec<String>,
    pub run: String,
    pub resume: Option<String>,
    pub health_check: Option<String>,
    pub cleanup: Vec<String>,
    pub outputs: Outputs,
    pub secrets: Vec<SecretSpec>,
}

impl RenderedTool {
    /// Writes the tool's files into the work dir (through temporary local files and uploads).
    pub async fn install_files(&self, exec: &dyn RemoteExec, layout: &RemoteLayout) -> Result<(), ToolError> {
        let tmp = std::env::temp_dir()
            .join(format!("gpu-trainer-files-{}", hex::encode(rand::random::<[u8; 8]>())));
        tokio::fs::create_dir_all(&tmp).await.map_err(|e| RemoteError::io("create a temporary folder", e))?;
        let result = self.install_from(exec, layout, &tmp).await;
        let _ = tokio::fs::remove_dir_all(&tmp).await;
        result
    }

    async fn install_from(
        &self,
        exec: &dyn RemoteExec,
        layout: &RemoteLayout,
        tmp: &Path,
    ) -> Result<(), ToolError> {
        for (i, file) in self.files.iter().enumerate() {
            let local = tmp.join(format!("f{i}"));
            tokio::fs::write(&local, &file.content)
                .await
                .map_err(|e| RemoteError::io("write a temporary file", e))?;
            let dest = layout.join(&file.path);
            exec.upload(&local, &dest).await?;
            if file.executable {
                self.step(
                    exec,
                    layout,
                    &format!("chmod +x {}", shell_quote(&dest)?),
                    &[],
                    &format!("chmod {}", file.path),
                    Duration::from_secs(60),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Runs one rendered command in the work dir, failing with the step's name and stderr.
    pub async fn step(
        &self,
        exec: &dyn RemoteExec,
        layout: &RemoteLayout,
        command: &str,
        env: &[(String, String)],
        what: &str,
        timeout: Duration,
    ) -> Result<super::ExecOutput, ToolError> {
        let wd = shell_quote(layout.work_dir())?;
        let full = format!("mkdir -p {wd} && cd {wd} && {command}");
        let out = exec.run(&full, RunOptions { timeout, env: env.to_vec(), ..Default::default() }).await?;
        if !out.success() {
            let stderr = out.stderr_lossy();
            let tail: String =
                stderr.chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
            return Err(ToolError::StepFailed {
                tool: self.tool.clone(),
                what: what.to_string(),
                exit_code: out.exit_code,
                stderr: tail.trim().to_string(),
            });
        }
        Ok(out)
    }

    /// Runs the bootstrap commands in order, then the health check.
    pub async fn bootstrap(
        &self,
        exec: &dyn RemoteExec,
        layout: &RemoteLayout,
        env: &[(String, String)],
        timeout: Duration,
    ) -> Result<(), ToolError> {
        for (i, cmd) in self.bootstrap.iter().enumerate() {
            self.step(exec, layout, cmd, env, &format!("bootstrap step {}", i + 1), timeout).await?;
        }
        if let Some(check) = &self.health_check {
            self.step(exec, layout, check, env, "health check", Duration::from_secs(300)).await?;
        }
        Ok(())
    }

    /// The launch spec of the run (or resume) command with the process's environment.
    pub fn launch_spec(&self, resume: bool, env: Vec<(String, String)>) -> super::launch::LaunchSpec {
        let command = match (&self.resume, resume) {
            (Some(resume), true) => resume.clone(),
            _ => self.run.clone(),
        };
        super::launch::LaunchSpec { command, env }
    }
}

/// All tools under a folder (`<dir>/<name>/tool.yaml`).
#[derive(Debug)]
pub struct ToolRegistry {
    pub dir: PathBuf,
    tools: Vec<Tool>,
}

/// Environment variable naming the tools folder.
pub const TOOLS_DIR_ENV: &str = "GPU_TRAINER_TOOLS_DIR";

impl ToolRegistry {
    pub fn load(dir: &Path) -> Result<Self, ToolError> {
        let entries =
            std::fs::read_dir(dir).map_err(|source| ToolError::Read { path: dir.to_path_buf(), source })?;
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.join("tool.yaml").is_file())
            .collect();
        dirs.sort();
        let mut tools = Vec::new();
        for d in dirs {
            let tool = Tool::load(&d)?;
            if tools.iter().any(|t: &Tool| t.reference() == tool.reference()) {
                return Err(invalid(&d, format!("{} is defined twice", tool.reference())));
            }
            tools.push(tool);
        }
        Ok(Self { dir: dir.to_path_buf(), tools })
    }

    pub fn tools(&self) -> &[Tool] {
        &self.tools
    }

    /// Looks up `name@version`.
    pub fn get(&self, reference: &str) -> Result<&Tool, ToolError> {
        let (name, version) =
            reference.split_once('@').ok_or_else(|| ToolError::BadReference(reference.to_string()))?;
        self.tools.iter().find(|t| t.spec.name == name && t.spec.version == version).ok_or_else(|| {
            ToolError::UnknownTool {
                reference: reference.to_string(),
                available: self.tools.iter().map(Tool::reference).collect::<Vec<_>>().join(", "),
            }
        })
    }

    /// The tools folder: the given one, else `$GPU_TRAINER_TOOLS_DIR`, else `config/tools` in the
    /// current folder, else `config/tools` of the source tree the executable was built in
    /// (`target/<profile>/gpu-trainer` → `../../config/tools`), else `config/tools`.
    pub fn default_dir(explicit: Option<&Path>) -> PathBuf {
        if let Some(dir) = explicit {
            return dir.to_path_buf();
        }
        if let Some(dir) = std::env::var_os(TOOLS_DIR_ENV).filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        let here = PathBuf::from("config/tools");
        if here.is_dir() {
            return here;
        }
        if let Ok(exe) = std::env::current_exe()
            && let Some(repo) = exe.ancestors().nth(3)
            && repo.join("config/tools").is_dir()
        {
            return repo.join("config/tools");
        }
        // A development build run from elsewhere: the source tree it was built from.
        let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tools");
        if built_from.is_dir() {
            return built_from;
        }
        here
    }
}

#[cfg(test)]
mod tests;
