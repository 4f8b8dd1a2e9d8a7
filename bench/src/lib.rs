//! hetkv's benchmarks, workloads, trainers and the embedded demo, as a library: the
//! `hetkv-bench` binary is a thin command line over it, and the bench's tests call it directly.
//!
//! - [`workload`], [`criteo`], [`movielens`]: key streams and data sets;
//! - [`train`]: CTR models trained through the caches, and their evaluation ([`metrics`]);
//! - [`throughput`], [`transport_bench`], [`cache_bench`], [`compare`], [`attack`]: the
//!   benchmarks;
//! - [`demo`]: the README's main job; [`plots`] and [`progress`]: reports and progress bars.
#![forbid(unsafe_code)]

pub mod attack;
pub mod cache_bench;
pub mod checkpoint_bench;
pub mod compare;
pub mod core_bench;
pub mod criteo;
pub mod demo;
pub mod dynamic_bench;
pub mod metrics;
pub mod movielens;
pub mod plots;
pub mod progress;
pub mod throughput;
pub mod train;
pub mod transport_bench;
pub mod workload;
