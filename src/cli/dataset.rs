//! `gpu-trainer dataset validate DIR` and `gpu-trainer dataset pack DIR -o FILE`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::remote::dataset::{self, Limits};

/// Check or pack a dataset folder (images with caption files next to them).
#[derive(Args, Debug)]
pub struct DatasetArgs {
    #[command(subcommand)]
    command: DatasetCommand,
}

#[derive(Subcommand, Debug)]
enum DatasetCommand {
    /// Check images and captions: formats, matching caption files, unreadable or empty files,
    /// size and count limits. Exits non-zero when there are errors.
    Validate {
        dir: PathBuf,
        /// Largest number of images.
        #[arg(long, default_value_t = Limits::default().max_images)]
        max_images: usize,
        /// Largest image file, in MiB.
        #[arg(long, default_value_t = Limits::default().max_image_bytes / (1024 * 1024))]
        max_image_mib: u64,
    },
    /// Pack the folder into a deterministic tar (sorted paths, fixed times, owners and modes) and
    /// print its SHA-256: the same folder always gives the same archive.
    #[command(after_help = "Example:\n  gpu-trainer dataset pack ./photos -o photos.tar")]
    Pack {
        dir: PathBuf,
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Pack even when validation finds errors.
        #[arg(long)]
        no_validate: bool,
    },
}

pub fn run(args: DatasetArgs) -> anyhow::Result<()> {
    match args.command {
        DatasetCommand::Validate { dir, max_images, max_image_mib } => {
            let limits =
                Limits { max_images, max_image_bytes: max_image_mib * 1024 * 1024, ..Limits::default() };
            let report = dataset::validate(&dir, &limits)
                .with_context(|| format!("failed to validate {}", dir.display()))?;
            println!("{report}");
            if !report.is_ok() {
                anyhow::bail!("{} has {} errors", dir.display(), report.errors());
            }
            Ok(())
        }
        DatasetCommand::Pack { dir, output, no_validate } => {
            if !no_validate {
                let report = dataset::validate(&dir, &Limits::default())
                    .with_context(|| format!("failed to validate {}", dir.display()))?;
                if !report.is_ok() {
                    eprintln!("{report}");
                    anyhow::bail!(
                        "{} has {} errors (use --no-validate to pack anyway)",
                        dir.display(),
                        report.errors()
                    );
                }
            }
            let packed =
                dataset::pack(&dir, &output).with_context(|| format!("failed to pack {}", dir.display()))?;
            eprintln!("packed {} files, {} bytes into {}", packed.files, packed.bytes, output.display());
            println!("{}", packed.sha256);
            Ok(())
        }
    }
}
