//! `hetkv._hetkv._run_cli`: the store's command line (`hetkv serve`, `stats`, `checkpoint`,
//! `export`, `import`) in this process, for the wheel's `hetkv` console script and
//! `python -m hetkv`.

use pyo3::prelude::*;

/// Runs the `hetkv` command line `argv` (the program's name first) to its end, the GIL released,
/// and returns its exit status: 0, or 1 after printing the error and its causes to stderr. Help
/// and usage errors print and exit the process, as a command line does.
#[pyfunction]
#[pyo3(name = "_run_cli")]
pub(crate) fn run_cli(py: Python<'_>, argv: Vec<String>) -> i32 {
    match py.detach(move || hetkv_store::cli::run(argv)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {e:?}");
            1
        }
    }
}
