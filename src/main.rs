//! The mplug-search command line.
fn main() {}
