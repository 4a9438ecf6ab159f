//! Checkpoint files: one safetensors file holding named tensors and JSON metadata, written to
//! a temporary file in the same folder, flushed to disk, then renamed over the old one, so a
//! save killed half-way leaves the previous checkpoint intact and loadable.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// Metadata key of the format tag.
pub const FORMAT_KEY: &str = "format";
pub const FORMAT: &str = "ferrodiff";

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::BadFile {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Writes `bytes` to `path` atomically (temporary file + fsync + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::Value(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })?;
    remove_stale_temporaries(&dir, &name.to_string_lossy());
    Ok(())
}

/// Removes the temporaries `.<name>.tmp-<pid>` that saves of `name` in `dir` left behind when
/// their process was killed half-way. Only files whose process no longer exists are removed, so
/// a save in progress in another live process is never touched. Best effort: errors are ignored.
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(unix)]
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    // Signal 0 checks existence only; EPERM means it exists under another user.
    // SAFETY: kill with signal 0 sends nothing and has no memory effects.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(not(unix))]
fn process_alive(_pid: u32) -> bool {
    // Without a portable liveness check, leave every temporary alone.
    true
}

/// Saves tensors and string metadata (a `format` tag is added).
pub fn save(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    write_atomic(path, &to_bytes(tensors, metadata)?)
}

/// The bytes of a safetensors file holding `tensors` and `metadata` (plus the format tag).
pub fn to_bytes(
    tensors: &HashMap<String, Tensor>,
    mut metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    metadata.insert(FORMAT_KEY.into(), FORMAT.into());
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let contiguous: Vec<(String, Tensor)> = sorted
        .into_iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize(
        contiguous.iter().map(|(k, t)| (k.as_str(), t)),
        Some(metadata),
    )
    .map_err(|e| Error::Value(format!("cannot serialise the checkpoint: {e}")))
}

/// Loads tensors and metadata; a file that is not a ferrodiff safetensors checkpoint is an
/// error naming the file.
pub fn load(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    from_bytes(&bytes, path, device)
}

/// Parses checkpoint bytes; `path` names their source in errors.
pub fn from_bytes(
    bytes: &[u8],
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(path, format!("not a readable safetensors file ({e})")))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    if metadata.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT) {
        return Err(bad(
            path,
            "a safetensors file, but not one written by ferrodiff (no format tag)",
        ));
    }
    let tensors = candle_core::safetensors::load_buffer(bytes, device)
        .map_err(|e| bad(path, format!("corrupt tensor data ({e})")))?;
    Ok((tensors, metadata))
}

/// The tensors whose names start with `prefix.`, with the prefix removed.
pub fn with_prefix(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    let p = format!("{prefix}.");
    tensors
        .iter()
        .filter_map(|(k, t)| k.strip_prefix(&p).map(|s| (s.to_string(), t.clone())))
        .collect()
}

/// Inserts `tensors` under `prefix.`.
pub fn add_prefixed(
    into: &mut HashMap<String, Tensor>,
    prefix: &str,
    tensors: HashMap<String, Tensor>,
) {
    for (k, t) in tensors {
        into.insert(format!("{prefix}.{k}"), t);
    }
}

/// Parses a JSON metadata entry.
pub fn json_entry<T: serde::de::DeserializeOwned>(
    path: &Path,
    metadata: &HashMap<String, String>,
    key: &str,
) -> Result<T> {
    let s = metadata
        .get(key)
        .ok_or_else(|| bad(path, format!("the checkpoint has no '{key}' entry")))?;
    serde_json::from_str(s).map_err(|e| {
        bad(
            path,
            format!("the checkpoint's '{key}' entry is invalid: {e}"),
        )
    })
}

pub fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Value(format!("cannot serialise to JSON: {e}")))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn a_save_removes_temporaries_of_dead_processes_only() {
        let dir = std::env::temp_dir().join(format!("ferrodiff-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = dir.join(format!(".ckpt.safetensors.tmp-{dead}"));
        // pid 1 is always alive: its temporary may belong to a save in progress.
        let live = dir.join(".ckpt.safetensors.tmp-1");
        let other = dir.join(".other.safetensors.tmp-999999999");
        for f in [&stale, &live, &other] {
            std::fs::write(f, b"partial").unwrap();
        }
        write_atomic(&dir.join("ckpt.safetensors"), b"complete").unwrap();
        assert!(!stale.exists(), "the dead process's temporary is left");
        assert!(live.exists(), "a live process's temporary was removed");
        assert!(other.exists(), "another file's temporary was removed");
        assert_eq!(
            std::fs::read(dir.join("ckpt.safetensors")).unwrap(),
            b"complete"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
