//! The policy document in one file, replaced atomically on every change.
//!
//! The file is a checksummed envelope (`durable`) around `{"version": N,
//! "document": {...}}`: the version counts saves, and the document is the policy as
//! JSON (secrets only as digests, as in any policy file). A torn or edited file, or
//! one whose policy no longer validates, is refused at load with
//! [`PolicyStoreError::Corrupt`]: a gateway never silently starts from its seed
//! policy again and forgets the changes made since.

use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::durable;
use crate::policy::{Policy, PolicyDocument, PolicyError};
use crate::policy_store::{PolicyStore, PolicyStoreError};

const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body<D> {
    version: u64,
    document: D,
}

/// A [`PolicyStore`] in one file: every accepted change is written to a temporary
/// file in the same directory, synced, renamed over the old one, and the directory
/// synced, before the engine acknowledges it.
///
/// ```
/// use std::sync::Arc;
/// use tollgate::{Engine, FilePolicyStore, NewKey, Policy};
///
/// # let dir = std::env::temp_dir().join(format!("tollgate-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// let seed = || Policy::from_toml_str(r#"
///     [org]
///     id = "acme"
///     [[workspaces]]
///     id = "ws1"
///     name = "one"
/// "#);
/// // First start: the seed is saved. Later starts: the saved policy, with every change.
/// let (store, policy) = FilePolicyStore::open_or_seed(dir.join("policy.json"), seed)?;
/// let engine = Engine::builder(policy).policy_store(Arc::new(store)).build();
/// let issued = engine.create_key(NewKey::new("k1", "ws1"), Some("alice"))?; // saved, then applied
///
/// let (_, reloaded) = FilePolicyStore::open_or_seed(dir.join("policy.json"), seed)?;
/// assert_eq!(reloaded.document().keys[0].id, "k1");
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct FilePolicyStore {
    path: PathBuf,
    /// The version of the document in the file (0: none written yet).
    version: Mutex<u64>,
}

impl FilePolicyStore {
    /// A store at `path`; nothing is read or written yet.
    #[must_use]
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FilePolicyStore {
            path: path.into(),
            version: Mutex::new(0),
        }
    }

    /// The store at `path` and its policy: the one saved there, or, when the file
    /// does not exist yet, `seed()`, saved there first (version 1).
    ///
    /// # Errors
    /// [`PolicyError::Persist`] if the file cannot be read or written, or is torn or
    /// corrupt (never a silent fall back to the seed); the seed's own errors.
    pub fn open_or_seed(
        path: impl Into<PathBuf>,
        seed: impl FnOnce() -> Result<Policy, PolicyError>,
    ) -> Result<(Self, Policy), PolicyError> {
        let store = FilePolicyStore::new(path);
        if let Some(policy) = store.load()? {
            return Ok((store, policy));
        }
        let policy = seed()?;
        store.save(policy.document())?;
        Ok((store, policy))
    }

    /// Read and validate the stored policy; `None` if the file does not exist.
    ///
    /// # Errors
    /// [`PolicyStoreError::Io`] if it cannot be read; [`PolicyStoreError::Corrupt`] if
    /// it is torn, edited, of another format, or its policy no longer validates.
    pub fn load(&self) -> Result<Option<Policy>, PolicyStoreError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(self.io(source)),
        };
        let corrupt = |detail: String| PolicyStoreError::Corrupt {
            path: self.path.clone(),
            detail,
        };
        let body = durable::unseal(&text, FORMAT, "policy state file").map_err(corrupt)?;
        let body: Body<PolicyDocument> =
            serde_json::from_str(&body).map_err(|e| corrupt(format!("body: {e}")))?;
        let policy = Policy::new(body.document).map_err(|e| corrupt(e.to_string()))?;
        *self.version.lock() = body.version;
        Ok(Some(policy))
    }

    /// The file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many documents have been saved to the file (0: none yet): the version of
    /// the one in it.
    #[must_use]
    pub fn version(&self) -> u64 {
        *self.version.lock()
    }

    fn io(&self, source: std::io::Error) -> PolicyStoreError {
        PolicyStoreError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

impl PolicyStore for FilePolicyStore {
    fn save(&self, document: &PolicyDocument) -> Result<(), PolicyStoreError> {
        // Held across the write: saves land in order, each with the next version.
        let mut version = self.version.lock();
        let next = *version + 1;
        let body = serde_json::to_string(&Body {
            version: next,
            document,
        })
        .expect("a policy document serialises");
        durable::write_atomically(&self.path, &durable::seal(FORMAT, body))
            .map_err(|source| self.io(source))?;
        *version = next;
        Ok(())
    }
}
