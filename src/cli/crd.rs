//! `gpu-trainer crd`: print or write the CustomResourceDefinitions, or their reference pages.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::api;

/// Print both CRDs as one multi-document YAML stream, ready for `kubectl apply -f -`.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  gpu-trainer crd | kubectl apply --server-side -f -\n  gpu-trainer crd --output-dir crds/\n  \
    gpu-trainer crd --docs-dir docs/"
)]
pub struct CrdArgs {
    /// Write one file per CRD (`<plural>.<group>.yaml`) into this folder instead of printing.
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Write the Markdown reference page of each resource (`<kind>.md`: every field with its type,
    /// default, validation and meaning; phases, conditions, reasons) into this folder instead.
    #[arg(long, value_name = "DIR", conflicts_with = "output_dir")]
    docs_dir: Option<PathBuf>,
}

pub fn run(args: CrdArgs) -> anyhow::Result<()> {
    if let Some(dir) = args.docs_dir {
        std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
        for (file_name, markdown) in api::docs::reference_pages() {
            let path = dir.join(&file_name);
            std::fs::write(&path, markdown).with_context(|| format!("failed to write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        return Ok(());
    }
    match args.output_dir {
        None => {
            let yaml = api::crds_yaml().context("failed to render the CRDs as YAML")?;
            std::io::stdout().lock().write_all(yaml.as_bytes()).context("failed to write to stdout")?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
            for (file_name, yaml) in api::crd_files().context("failed to render the CRDs as YAML")? {
                let path = dir.join(&file_name);
                std::fs::write(&path, yaml).with_context(|| format!("failed to write {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
