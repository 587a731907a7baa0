//! The `asched` command line, built inside the test package so the tests can start it as a
//! child process (and kill it) by its known path.

fn main() -> std::process::ExitCode {
    asched_host::cli::main()
}
