//! Controller benchmarks (issue #11). Work in progress.
fn main() {}
