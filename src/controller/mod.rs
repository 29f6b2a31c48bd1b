//! The controllers that `gpu-trainer run` starts, and what they share.

pub mod http;
pub mod leader;
