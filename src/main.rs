use std::process::ExitCode;

fn main() -> ExitCode {
    gpu_trainer::cli::main()
}
