//! The job engine shared by the TrainingJob controller and `gpu-trainer launch`: the phase
//! machine `Pending → Provisioning → Staging → Training → Uploading → Succeeded` (with `Failed`
//! and `Suspended`) as a pure decision over the spec, the status and what was just observed,
//! taking `now`. Drivers execute the step it returns and record the result in status, so every
//! step is resumable from status alone.

pub mod cost;
pub mod decide;
pub mod driver;
pub mod env;
pub mod finish;
pub mod notify;
pub mod outcome;
pub mod outputs;
pub mod progress;
pub mod results;
pub mod stage;
pub mod suspend;
pub mod validate;

pub use decide::{MachineObservation, Observations, Step, TrainingObservation, next_step};
