//! The Vast.ai implementation of [`GpuProvider`](crate::provider::GpuProvider).
//!
//! - `client.rs`: reqwest client, auth, retries, error mapping, the operations.
//! - `wire.rs`: serde types for the API's JSON, tolerant of its quirks.
//! - `convert.rs`: wire types to domain types.
//! - `retry.rs`, `limiter.rs`: backoff policy and per-endpoint spacing.
//!
//! Reference: `shared/reference/vastai-api.md` (what the official `vastai` CLI sends and reads).

pub mod client;
pub mod convert;
pub mod limiter;
pub mod retry;
pub mod wire;

pub use client::{ClientOptions, VastClient};
pub use retry::RetryPolicy;
