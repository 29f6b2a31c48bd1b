//! `gpu-trainer tools list` and `gpu-trainer tools show NAME@VERSION`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::remote::tool::{TOOLS_DIR_ENV, ToolRegistry};

/// List or show the declarative training tools.
#[derive(Args, Debug)]
pub struct ToolsArgs {
    /// Folder with `<name>/tool.yaml` files [default: config/tools, or the source tree's].
    #[arg(long, global = true, env = TOOLS_DIR_ENV, value_name = "DIR")]
    tools_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: ToolsCommand,
}

#[derive(Subcommand, Debug)]
enum ToolsCommand {
    /// One line per tool: reference, parser, image and description.
    List,
    /// Print a tool's definition (YAML) with its parameters and defaults.
    Show {
        /// For example `flux-lora@1`.
        reference: String,
    },
}

pub fn run(args: ToolsArgs) -> anyhow::Result<()> {
    let dir = ToolRegistry::default_dir(args.tools_dir.as_deref());
    let registry =
        ToolRegistry::load(&dir).with_context(|| format!("failed to load the tools in {}", dir.display()))?;
    match args.command {
        ToolsCommand::List => {
            println!("{:<16} {:<11} {:<44} DESCRIPTION", "TOOL", "PARSER", "IMAGE");
            for tool in registry.tools() {
                let parser = serde_yaml::to_string(&tool.spec.parser).unwrap_or_default();
                println!(
                    "{:<16} {:<11} {:<44} {}",
                    tool.reference(),
                    parser.trim(),
                    tool.spec.image,
                    tool.spec.description
                );
            }
        }
        ToolsCommand::Show { reference } => {
            let tool = registry.get(&reference)?;
            let yaml = serde_yaml::to_string(&tool.spec).context("failed to print the tool as YAML")?;
            println!("# {} from {}", tool.reference(), tool.dir.display());
            print!("{yaml}");
        }
    }
    Ok(())
}
