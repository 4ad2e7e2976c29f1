//! Files that survive a crash whole: the counter file (`persist`) and the policy
//! file (`policy_store::file`) share how they are written and checked.
//!
//! A file is a JSON envelope: a format version, the SHA-256 of the body, and the body
//! (itself JSON, as text, so the checksum covers exactly the bytes read back). It is
//! written to a temporary file in the same directory, synced, renamed over the old
//! one, and the directory is synced so the rename itself survives a power loss. A
//! crash mid-write leaves the previous file whole; a torn, edited or truncated file
//! fails its checksum or its parse when read.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: u32,
    sha256: String,
    body: String,
}

/// The bytes of a file holding `body` in an envelope of `format`.
pub(crate) fn seal(format: u32, body: String) -> Vec<u8> {
    let envelope = Envelope {
        format,
        sha256: hex::encode(Sha256::digest(body.as_bytes())),
        body,
    };
    serde_json::to_vec_pretty(&envelope).expect("an envelope of strings serialises")
}

/// The body of a file written by [`seal`] with `format`, or what is wrong with it.
pub(crate) fn unseal(text: &[u8], format: u32, what: &str) -> Result<String, String> {
    let envelope: Envelope =
        serde_json::from_slice(text).map_err(|e| format!("not a {what}: {e}"))?;
    if envelope.format != format {
        return Err(format!(
            "format {} (this version reads {format})",
            envelope.format
        ));
    }
    let digest = hex::encode(Sha256::digest(envelope.body.as_bytes()));
    if !digest.eq_ignore_ascii_case(&envelope.sha256) {
        return Err("checksum mismatch: the body was changed or torn".into());
    }
    Ok(envelope.body)
}

/// Replace `path` by `bytes` so that a crash at any point leaves either the old file
/// or the new one, whole: temp file in the same directory, sync, rename, sync the
/// directory.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Unique per process and call, so two writers never share a temp file.
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let file_name = path
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let temp = path.with_file_name(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    let write = || -> std::io::Result<()> {
        let mut file = fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        sync_directory(path)
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&temp);
    })
}

/// Make a rename in `path`'s directory durable (a directory entry is only on disk
/// once the directory is synced). Windows cannot open a directory this way, and its
/// renames are journaled by NTFS.
fn sync_directory(path: &Path) -> std::io::Result<()> {
    if cfg!(windows) {
        return Ok(());
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::File::open(dir)?.sync_all()
}
