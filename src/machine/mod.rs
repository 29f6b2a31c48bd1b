//! A rented machine's lifecycle, once for both front ends (the GpuInstance controller and
//! `gpu-trainer launch --provider vastai`): its provider label, the key it is rented with, the
//! script it boots with, the offer it came from, what its provider state means and when its
//! boot deadline passes, and the SSH check that says it is ready.

pub mod adopt;
pub mod decide;
pub mod destroy;
pub mod key;
pub mod label;
pub mod offer;
pub mod onstart;
pub mod probe;
pub mod rent;

pub use label::{instance_label, parse_instance_label};
pub use probe::SshProbe;
