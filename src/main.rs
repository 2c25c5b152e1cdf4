use std::process::ExitCode;

fn main() -> ExitCode {
    lessnat::cli::main()
}
