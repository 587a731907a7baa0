fn main() -> std::process::ExitCode {
    asched_host::cli::main()
}
