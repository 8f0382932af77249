use std::process::ExitCode;

fn main() -> ExitCode {
    archy_agent::cli::main()
}
