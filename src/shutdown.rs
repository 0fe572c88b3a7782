//! The stop signal: a future that completes on SIGINT or SIGTERM, and the
//! process-wide flag that says the relay is closing its connections.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set once the relay closes its connections on purpose; the log filter uses
/// it to drop the client libraries' own error lines about that close.
static CLOSING: AtomicBool = AtomicBool::new(false);

/// Marks the process as closing its connections on purpose.
pub fn mark_closing() {
    CLOSING.store(true, Ordering::Relaxed);
}

/// Whether the relay is closing its connections on purpose.
pub fn is_closing() -> bool {
    CLOSING.load(Ordering::Relaxed)
}

/// Completes when the process receives SIGINT (Ctrl-C in a terminal) or
/// SIGTERM (systemd, Kubernetes and `kill` ask a service to stop this way).
///
/// # Errors
/// Fails only if the signal handlers cannot be installed.
pub async fn signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = interrupt.recv() => Ok("SIGINT"),
        _ = terminate.recv() => Ok("SIGTERM"),
    }
}
