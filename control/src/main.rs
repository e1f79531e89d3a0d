//! `pimesh-control --replica N`: a control replica (see the library's documentation).

fn main() -> std::process::ExitCode {
    pimesh_control::main()
}
