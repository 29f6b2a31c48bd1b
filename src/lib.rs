//! gpu-trainer: a Kubernetes operator that runs model training on GPUs rented from the Vast.ai
//! marketplace. See `shared/design.md` in the project for the contract.

pub mod api;
pub mod artifacts;
pub mod cli;
pub mod controller;
pub mod crash;
pub mod engine;
pub mod error;
pub mod launch;
pub mod machine;
pub mod metrics;
pub mod monitor;
pub mod provider;
pub mod remote;
pub mod telemetry;
