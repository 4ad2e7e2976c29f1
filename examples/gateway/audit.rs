//! The audit log: JSON lines of admin actions and key events.

/// Where audit lines go.
#[derive(Default)]
pub struct Audit {}

impl Audit {
    /// Write out anything buffered.
    pub fn flush(&self) {}
}
