//! The controllers that `gpu-trainer run` starts, and what they share.

pub mod context;
pub mod gpuinstance;
pub mod http;
pub mod kube_requests;
pub mod leader;
pub mod listing;
pub mod metered;
pub mod pass_limit;
pub mod patch;
pub mod sweeper;
pub mod trainingjob;
pub mod watch_backoff;

pub use context::{Context, OperatorConfig};
