//! The state file: weights set at run time (admin API, SIGHUP) survive a restart.
//!
//! Rule: at start, weights from the state file win over the configuration's, for every backend
//! both name; a backend the state file does not know keeps its configured weight. The file is
//! rewritten (atomically: temp file + rename) after every applied change. To return to the
//! configured weights, delete the file or send SIGHUP (which applies the file's weights and
//! records them here).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What the state file holds.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedState {
    /// Weight per backend name.
    pub weights: BTreeMap<String, u32>,
}

/// Read the saved weights; `Ok(None)` when there is no file yet.
pub fn load(path: &Path) -> Result<Option<SavedState>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("state file {} is not valid: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read state file {}: {e}", path.display())),
    }
}

/// Save `weights`, replacing the file atomically.
pub fn save(path: &Path, weights: BTreeMap<String, u32>) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(&SavedState { weights }).expect("serializable");
    std::fs::write(&tmp, text + "\n")?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        assert_eq!(load(&path), Ok(None));
        let w = BTreeMap::from([("A".to_string(), 5), ("B".to_string(), 0)]);
        save(&path, w.clone()).unwrap();
        assert_eq!(load(&path).unwrap().unwrap().weights, w);
        std::fs::write(&path, "{").unwrap();
        assert!(load(&path).is_err());
    }
}
