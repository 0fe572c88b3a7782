//! The error of every phase of loading: a message that names the key (or
//! the variable) at fault and what is expected, never a secret.

/// A configuration problem; the message names the key and what is expected.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub(super) String);

impl ConfigError {
    pub(super) fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }

    /// The message with every occurrence of a secret replaced by `***`,
    /// longest first so a part never uncovers the rest of a whole.
    pub(super) fn scrubbed(self, secrets: &[String]) -> Self {
        let mut secrets: Vec<&String> = secrets.iter().filter(|s| !s.is_empty()).collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let mut msg = self.0;
        for secret in secrets {
            if msg.contains(secret.as_str()) {
                msg = msg.replace(secret.as_str(), "***");
            }
        }
        Self(msg)
    }
}
