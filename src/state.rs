//! The state file: weights set at run time (admin API, SIGHUP) survive a restart.
//!
//! Rule: at start, weights from the state file win over the configuration's, for every backend
//! both name; a backend the state file does not know keeps its configured weight. The file is
//! rewritten (atomically: temp file + rename) after every applied change. To return to the
//! configured weights, delete the file or send SIGHUP (which applies the file's weights and
//! records them here).
//!
//! With `--control`, the file also keeps the fleet record this agent last applied (`control`:
//! version and weights). It is the stale marker's source: an agent that starts while the control
//! Redis is unreachable serves that version, reported stale (API, metrics, logs) until the
//! control Redis answers; the file is what lets it start from the fleet's last known weights
//! rather than the configured ones.
//!
//! Writing is safe against a hostile or careless directory: the new content goes to a fresh
//! temp file created exclusively (`O_EXCL`, random name, mode 0600) in the same directory, is
//! fsynced, renamed over the state file, and the directory is fsynced. A state path that is a
//! symlink is refused, for reading and writing: redtap never writes through a link.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the state file holds.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedState {
    /// Weight per backend name.
    pub weights: BTreeMap<String, u32>,
    /// With `--control`: the fleet record (version and weights) these weights came from.
    /// Absent in files written without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<crate::control::FleetWeights>,
}

/// Why the state file could not be read. The caller keeps the configured weights.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The path is a symbolic link, which redtap never follows.
    #[error("state file {} is a symbolic link; refusing to follow it", .0.display())]
    Symlink(PathBuf),
    /// The file is not the JSON redtap writes.
    #[error("state file {} is not valid: {source}", path.display())]
    Invalid {
        /// The state file.
        path: PathBuf,
        /// What the parser said.
        source: serde_json::Error,
    },
    /// The file exists but cannot be read.
    #[error("cannot read state file {}: {source}", path.display())]
    Read {
        /// The state file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Read the saved weights; `Ok(None)` when there is no file yet.
pub fn load(path: &Path) -> Result<Option<SavedState>, StateError> {
    if is_symlink(path) {
        return Err(StateError::Symlink(path.to_path_buf()));
    }
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| StateError::Invalid {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Save `weights`, replacing the file atomically (see the module doc). The file is mode 0600.
pub fn save(path: &Path, weights: BTreeMap<String, u32>) -> std::io::Result<()> {
    save_state(
        path,
        &SavedState {
            weights,
            control: None,
        },
    )
}

/// Save `state` (weights and, with `--control`, the fleet record), as [`save`] does.
pub fn save_state(path: &Path, state: &SavedState) -> std::io::Result<()> {
    use std::io::Write as _;
    if is_symlink(path) {
        return Err(std::io::Error::other(format!(
            "{} is a symbolic link; refusing to write through it",
            path.display()
        )));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = serde_json::to_string_pretty(state).expect("serializable");
    // O_EXCL with a random name: an existing file or link at the temp path is never opened.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // The rename is durable once the directory is.
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        assert!(matches!(load(&path), Ok(None)));
        let w = BTreeMap::from([("A".to_string(), 5), ("B".to_string(), 0)]);
        save(&path, w.clone()).unwrap();
        assert_eq!(load(&path).unwrap().unwrap().weights, w);
        std::fs::write(&path, "{").unwrap();
        let e = load(&path).unwrap_err();
        assert!(matches!(e, StateError::Invalid { .. }), "{e}");
        assert!(e.to_string().starts_with("state file "), "{e}");
    }

    #[test]
    fn written_0600_and_never_through_a_symlink() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let w = BTreeMap::from([("A".to_string(), 5)]);
        save(&path, w.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // A link at the old fixed temp path is not followed: the file it points to is untouched.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        symlink(&victim, dir.path().join("s.json.tmp")).unwrap();
        save(&path, w.clone()).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(load(&path).unwrap().unwrap().weights, w);

        // A state path that is a link is refused, for writing and reading.
        let link = dir.path().join("link.json");
        symlink(&victim, &link).unwrap();
        assert!(save(&link, w).is_err());
        assert!(matches!(load(&link), Err(StateError::Symlink(_))));
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        // No temp file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .filter(|e| !e.file_type().unwrap().is_symlink())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
