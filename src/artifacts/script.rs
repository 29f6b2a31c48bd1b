//! The shell steps run on the machine, and parsers for what they print. Pure: rendering takes
//! plans, parsing takes bytes.
//!
//! The upload script is POSIX sh and needs only `curl`, `dd`, `wc` and `sha256sum`/`md5sum`
//! (or `shasum`/`md5`). It never contains a URL: each presigned request is handed over as a
//! curl config snippet (`url = "…"`, signed headers) in an environment variable of the command
//! and piped into `curl -K -`, so signatures are neither in the script text (which may be
//! logged) nor on any command line (`ps`). For each file it prints its size, SHA-256 and MD5
//! (per part for multipart), which the operator checks against HEAD afterwards.

use std::collections::BTreeMap;

use super::plan::Transfer;
use super::{ArtifactError, PresignedRequest};
use crate::monitor::remote_names::{self, records};
use crate::remote::shell_quote;

const MIB: u64 = 1024 * 1024;

/// Lists every regular file under each path (a path that is a file lists itself):
/// `<index>\t<size>\t<path relative to it>` per file, `missing\t<index>` for a missing path, each
/// record ending with NUL (a file name may hold a newline; see `monitor::remote_names::records`).
pub fn render_inspect(paths: &[String]) -> Result<String, ArtifactError> {
    let mut script = String::from("set -u\n");
    for (i, path) in paths.iter().enumerate() {
        let p = quote(path)?;
        script.push_str(&format!(
            "if [ -e {p} ]; then find {p} -type f -printf '{i}\\t%s\\t%P\\0' || exit 1; else printf 'missing\\t{i}\\0'; fi\n"
        ));
    }
    Ok(script)
}

/// One file found by the inspect step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InspectedFile {
    /// Index of the path it was found under.
    pub index: usize,
    pub size: u64,
    /// Relative to that path; empty when the path is the file itself.
    pub rel: String,
}

/// Parses the inspect output: the files, and the indexes of missing paths.
pub fn parse_inspect(stdout: &str) -> Result<(Vec<InspectedFile>, Vec<usize>), ArtifactError> {
    let mut files = Vec::new();
    let mut missing = Vec::new();
    for line in records(stdout) {
        let fields: Vec<&str> = line.splitn(3, '\t').collect();
        let bad = || ArtifactError::Report {
            step: "inspect",
            message: format!("unexpected line {}", remote_names::quoted(line)),
        };
        match fields.as_slice() {
            ["missing", i] => missing.push(i.parse().map_err(|_| bad())?),
            [i, size, rel] => files.push(InspectedFile {
                index: i.parse().map_err(|_| bad())?,
                size: size.parse().map_err(|_| bad())?,
                rel: rel.to_string(),
            }),
            _ => return Err(bad()),
        }
    }
    Ok((files, missing))
}

/// One file of an upload script.
#[derive(Clone, Debug)]
pub struct ScriptFile {
    /// Path on the machine (relative paths are relative to the command's directory).
    pub path: String,
    pub size: u64,
    pub transfer: Transfer,
    /// Single: the PUT. Multipart: part number → part PUT, only for parts still to send.
    pub requests: BTreeMap<u64, PresignedRequest>,
}

/// The rendered step: a script without secrets, and the environment that carries the URLs.
#[derive(Clone)]
pub struct RenderedUpload {
    pub script: String,
    pub env: Vec<(String, String)>,
}

impl std::fmt::Debug for RenderedUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenderedUpload")
            .field("script", &self.script)
            .field("env", &self.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
            .finish()
    }
}

const PRELUDE: &str = r#"set -u
gt_tmp="${TMPDIR:-/tmp}/gpu-trainer-upload.$$"
mkdir -p "$gt_tmp" || exit 1
trap 'rm -rf "$gt_tmp"' EXIT
gt_fail() { printf 'gt-error\t%s\n' "$*" >&2; exit 1; }
gt_hash() {
  case $1 in
    sha256) if command -v sha256sum >/dev/null 2>&1; then sha256sum "$2"; else shasum -a 256 "$2"; fi ;;
    md5) if command -v md5sum >/dev/null 2>&1; then md5sum "$2"; else md5 -r "$2"; fi ;;
  esac | { read -r gt_h _ && printf '%s' "$gt_h"; }
}
gt_size() { wc -c < "$1" | tr -d ' '; }
gt_put() {
  eval "gt_cfg=\${$1:-}"
  [ -n "$gt_cfg" ] || gt_fail "no upload URL in $1"
  gt_code=$(printf '%s\n' "$gt_cfg" | curl -K - --globoff --fail --silent --show-error \
    --retry 5 --retry-connrefused --connect-timeout 30 -o /dev/null -w '%{http_code}' -T "$2") \
    || gt_fail "upload of $3 failed (HTTP ${gt_code:-000})"
}
gt_single() {
  [ -f "$2" ] || gt_fail "$2 is missing"
  gt_s=$(gt_size "$2")
  [ "$gt_s" = "$3" ] || gt_fail "$2 changed size since it was planned ($3 then $gt_s bytes)"
  gt_sha=$(gt_hash sha256 "$2"); gt_md5=$(gt_hash md5 "$2")
  [ -n "$gt_sha" ] && [ -n "$gt_md5" ] || gt_fail "cannot hash $2"
  gt_put "GT_PUT_$1" "$2" "$2"
  printf 'gt-file\t%s\t%s\t%s\t%s\n' "$1" "$gt_s" "$gt_sha" "$gt_md5"
}
gt_multi() {
  [ -f "$2" ] || gt_fail "$2 is missing"
  gt_s=$(gt_size "$2")
  [ "$gt_s" = "$3" ] || gt_fail "$2 changed size since it was planned ($3 then $gt_s bytes)"
  gt_sha=$(gt_hash sha256 "$2")
  [ -n "$gt_sha" ] || gt_fail "cannot hash $2"
  gt_n=1
  while [ "$gt_n" -le "$5" ]; do
    dd if="$2" of="$gt_tmp/part" bs=1048576 skip=$(( (gt_n - 1) * $4 )) count="$4" 2>/dev/null \
      || gt_fail "cannot read part $gt_n of $2"
    gt_md5=$(gt_hash md5 "$gt_tmp/part")
    gt_var="GT_PUT_$1_$gt_n"
    eval "gt_has=\${$gt_var:+yes}"
    if [ -n "$gt_has" ]; then
      gt_put "$gt_var" "$gt_tmp/part" "part $gt_n of $2"; gt_state=uploaded
    else
      gt_state=skipped
    fi
    printf 'gt-part\t%s\t%s\t%s\t%s\n' "$1" "$gt_n" "$gt_md5" "$gt_state"
    gt_n=$((gt_n + 1))
  done
  printf 'gt-file\t%s\t%s\t%s\t-\n' "$1" "$gt_s" "$gt_sha"
}
"#;

/// Name of the variable holding a single PUT (`part` None) or one part.
pub fn env_name(index: usize, part: Option<u64>) -> String {
    match part {
        None => format!("GT_PUT_{index}"),
        Some(n) => format!("GT_PUT_{index}_{n}"),
    }
}

/// A curl config snippet for one request (curl config strings escape `\` and `"`). The signed
/// `content-length` is left to curl, which sends the size of the file it uploads: were the file
/// another size than planned, storage sees another length than the one signed and refuses it
/// (sending the planned length with a different body would corrupt the request instead).
fn curl_config(request: &PresignedRequest) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut cfg = format!("url = \"{}\"\n", esc(&request.url));
    for (name, value) in request.headers.iter().filter(|(n, _)| !n.eq_ignore_ascii_case("content-length")) {
        cfg.push_str(&format!("header = \"{}: {}\"\n", esc(name), esc(value)));
    }
    cfg
}

/// Renders the upload step for `files` (indexes are positions in the slice).
pub fn render_upload(files: &[ScriptFile]) -> Result<RenderedUpload, ArtifactError> {
    let mut script = String::from(PRELUDE);
    let mut env = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let path = quote(&file.path)?;
        match &file.transfer {
            Transfer::Single => {
                let request = file
                    .requests
                    .get(&1)
                    .ok_or_else(|| ArtifactError::Invalid(format!("no presigned PUT for {}", file.path)))?;
                env.push((env_name(i, None), curl_config(request)));
                script.push_str(&format!("gt_single {i} {path} {}\n", file.size));
            }
            Transfer::Multipart { part_size, parts } => {
                if part_size % MIB != 0 {
                    return Err(ArtifactError::Invalid(format!("part size {part_size} is not whole MiB")));
                }
                for (n, request) in &file.requests {
                    env.push((env_name(i, Some(*n)), curl_config(request)));
                }
                script.push_str(&format!("gt_multi {i} {path} {} {} {parts}\n", file.size, part_size / MIB));
            }
        }
    }
    Ok(RenderedUpload { script, env })
}

/// What the machine reported for one file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileReport {
    pub size: u64,
    pub sha256: String,
    /// Whole-file MD5 (single PUT only).
    pub md5: Option<String>,
    /// Part number → (MD5, uploaded in this run).
    pub parts: BTreeMap<u64, (String, bool)>,
    /// The file's closing line came: every part was handled. A script that died half way
    /// leaves the parts it did report, so a retry resends only the rest.
    pub complete: bool,
}

/// Parses the upload report: file index → report.
pub fn parse_upload(stdout: &str) -> Result<BTreeMap<usize, FileReport>, ArtifactError> {
    let mut reports: BTreeMap<usize, FileReport> = BTreeMap::new();
    for line in stdout.lines().filter(|l| l.starts_with("gt-")) {
        let fields: Vec<&str> = line.split('\t').collect();
        let bad = || ArtifactError::Report { step: "upload", message: format!("unexpected line {line:?}") };
        let hex = |s: &str, len: usize| {
            (s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| s.to_ascii_lowercase())
        };
        match fields.as_slice() {
            ["gt-part", i, n, md5, state] => {
                let entry = reports.entry(i.parse().map_err(|_| bad())?).or_default();
                entry.parts.insert(
                    n.parse().map_err(|_| bad())?,
                    (hex(md5, 32).ok_or_else(bad)?, *state == "uploaded"),
                );
            }
            ["gt-file", i, size, sha, md5] => {
                let index = i.parse().map_err(|_| bad())?;
                let entry = reports.entry(index).or_default();
                entry.size = size.parse().map_err(|_| bad())?;
                entry.sha256 = hex(sha, 64).ok_or_else(bad)?;
                entry.md5 = if *md5 == "-" { None } else { Some(hex(md5, 32).ok_or_else(bad)?) };
                entry.complete = true;
            }
            _ => return Err(bad()),
        }
    }
    Ok(reports)
}

/// The `gt-error` message of a failed step, or the tail of its stderr.
pub fn failure_message(stderr: &str) -> String {
    let errors: Vec<&str> = stderr.lines().filter_map(|l| l.strip_prefix("gt-error\t")).collect();
    let message = if errors.is_empty() {
        let lines: Vec<&str> = stderr.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    } else {
        errors.join("; ")
    };
    // curl prints the URL in some errors; never let a signature into a status message or log.
    redact_signatures(&message)
}

/// Replaces every query string in `text` that carries an `X-Amz-Signature` with `<redacted>`.
pub fn redact_signatures(text: &str) -> String {
    let re = regex::Regex::new(r"\?[^\s]*X-Amz-[^\s]*").ok();
    match re {
        Some(re) => re.replace_all(text, "?<redacted>").into_owned(),
        None => text.to_string(),
    }
}

fn quote(path: &str) -> Result<String, ArtifactError> {
    if path.contains('\n') || path.contains('\t') {
        return Err(ArtifactError::Invalid(format!("path {path:?} contains a tab or newline")));
    }
    shell_quote(path).map_err(|e| ArtifactError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn request(url: &str) -> PresignedRequest {
        PresignedRequest {
            method: "PUT".into(),
            url: url.into(),
            headers: vec![],
            expires_at: SystemTime::now(),
        }
    }

    #[test]
    fn urls_go_to_the_environment_never_into_the_script() {
        let files = vec![
            ScriptFile {
                path: "output/model file.safetensors".into(),
                size: 10,
                transfer: Transfer::Single,
                requests: [(1, request("https://h/b/k?X-Amz-Signature=abc"))].into(),
            },
            ScriptFile {
                path: "output/big".into(),
                size: 12 * MIB,
                transfer: Transfer::Multipart { part_size: 5 * MIB, parts: 3 },
                requests: [(2, request("https://h/b/big?partNumber=2&X-Amz-Signature=def"))].into(),
            },
        ];
        let r = render_upload(&files).unwrap();
        assert!(!r.script.contains("X-Amz-Signature"));
        assert!(r.script.contains("gt_single 0 'output/model file.safetensors' 10"), "{}", r.script);
        assert!(r.script.contains("gt_multi 1 output/big 12582912 5 3"), "{}", r.script);
        let names: Vec<&str> = r.env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["GT_PUT_0", "GT_PUT_1_2"]);
        assert_eq!(r.env[0].1, "url = \"https://h/b/k?X-Amz-Signature=abc\"\n");
        assert!(!format!("{r:?}").contains("X-Amz-Signature"));
    }

    #[test]
    fn report_is_parsed_per_file_and_part() {
        let sha = "a".repeat(64);
        let md5 = "b".repeat(32);
        let out = format!(
            "noise\ngt-file\t0\t10\t{sha}\t{md5}\ngt-part\t1\t1\t{md5}\tuploaded\ngt-part\t1\t2\t{md5}\tskipped\ngt-file\t1\t20\t{sha}\t-\n"
        );
        let r = parse_upload(&out).unwrap();
        assert_eq!(r[&0].size, 10);
        assert_eq!(r[&0].md5.as_deref(), Some(md5.as_str()));
        assert_eq!(r[&1].parts.len(), 2);
        assert!(r[&1].parts[&1].1 && !r[&1].parts[&2].1);
        assert!(parse_upload("gt-file\t0\tx\ty\tz\n").is_err());
        assert!(r[&0].complete && r[&1].complete);
        // A file whose gt-file line never came (the script died) is reported incomplete.
        let partial = parse_upload(&format!("gt-part\t3\t1\t{md5}\tuploaded\n")).unwrap();
        assert!(!partial[&3].complete && partial[&3].parts.len() == 1);
    }

    #[test]
    fn inspect_lists_files_and_missing_paths() {
        let script = render_inspect(&["output/m.safetensors".into(), "output/ckpt dir".into()]).unwrap();
        assert!(script.contains("'output/ckpt dir'"));
        assert!(script.contains("-printf '1\\t%s\\t%P\\0'"), "{script}");
        let (files, missing) = parse_inspect("0\t10\t\x001\t5\ta/b\nc.bin\0missing\t2\0").unwrap();
        assert_eq!(files[0], InspectedFile { index: 0, size: 10, rel: String::new() });
        assert_eq!(files[1].rel, "a/b\nc.bin", "a newline stays in its record");
        assert_eq!(missing, [2]);
    }

    #[test]
    fn the_signed_length_is_left_to_curl() {
        let mut put = request("https://h/b/k?X-Amz-Signature=abc");
        put.headers = vec![("content-length".into(), "10".into()), ("x-amz-acl".into(), "private".into())];
        let files = vec![ScriptFile {
            path: "m".into(),
            size: 10,
            transfer: Transfer::Single,
            requests: [(1, put)].into(),
        }];
        let r = render_upload(&files).unwrap();
        assert_eq!(
            r.env[0].1,
            "url = \"https://h/b/k?X-Amz-Signature=abc\"\nheader = \"x-amz-acl: private\"\n"
        );
    }

    #[test]
    fn failure_messages_never_carry_signatures() {
        let m = failure_message("curl: (22) https://h/b/k?X-Amz-Signature=abc&x=1 returned 403\n");
        assert!(!m.contains("abc"), "{m}");
        assert_eq!(
            failure_message("x\ngt-error\tupload of a failed (HTTP 403)\n"),
            "upload of a failed (HTTP 403)"
        );
    }
}
