//! `hetkv`: the store daemon and its operator commands (the command line is
//! `hetkv_store::cli`, which the Python wheel's `hetkv` runs too).
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    hetkv_store::cli::run(std::env::args_os())
}
