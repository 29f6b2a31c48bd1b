//! The status store of `launch`: the whole state of a run in one JSON file next to the job file
//! (`<state dir>/<name>.json`), written atomically after every pass and before every step that
//! cannot be undone, so Ctrl-C and a second `launch` continue where the first stopped.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::LocalError;
use super::rent::RentedMachine;
use crate::api::TrainingJobStatus;

/// What is kept between invocations.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalState {
    /// Stands in for the Kubernetes UID: names the work dir.
    pub uid: String,
    pub status: TrainingJobStatus,
    /// SSH host key seen on first contact (`--provider ssh`, `vastai`); later connections must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    /// The machine rented for the job (`--provider vastai`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rented: Option<RentedMachine>,
}

fn state_err(path: &Path) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> LocalError + '_ {
    move |source| LocalError::State { path: path.to_path_buf(), source }
}

/// The state of job `name` in `path`, or a new one (with a fresh UID) when there is none.
pub fn load(path: &Path, name: &str) -> Result<LocalState, LocalError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let mut state: LocalState =
                serde_json::from_slice(&bytes).map_err(|e| state_err(path)(Box::new(e)))?;
            if let Some(rented) = state.rented.as_mut() {
                rented.upgrade(chrono::Utc::now());
            }
            Ok(state)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(LocalState { uid: format!("{name}-{:08x}", rand::random::<u32>()), ..LocalState::default() })
        }
        Err(e) => Err(state_err(path)(Box::new(e))),
    }
}

/// Writes `state` to `path` atomically (a temporary file renamed over it).
pub fn save(path: &Path, state: &LocalState) -> Result<(), LocalError> {
    let err = state_err(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(Box::new(e)))?;
    }
    let json = serde_json::to_vec_pretty(state).map_err(|e| err(Box::new(e)))?;
    let tmp: PathBuf = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).map_err(|e| err(Box::new(e)))?;
    std::fs::rename(&tmp, path).map_err(|e| err(Box::new(e)))
}
