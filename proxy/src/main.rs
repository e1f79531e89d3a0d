//! `pimesh-proxy`: the node's mesh data plane (see the library's documentation).

fn main() -> std::process::ExitCode {
    pimesh_proxy::main()
}
