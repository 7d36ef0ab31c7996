//! Graceful shutdown: SIGINT or SIGTERM flips a watch channel that every loop selects on.

use tokio::sync::watch;

/// Receiver side: `*rx.borrow()` is `true` once shutdown was requested.
pub type Shutdown = watch::Receiver<bool>;

/// Spawns a task that waits for SIGINT/SIGTERM and returns the receiver it signals.
/// A second signal exits the process at once (an operator who insists).
pub fn on_signals() -> Shutdown {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        for round in 0..2 {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if round == 0 {
                tracing::info!("Shutdown requested; finishing in-flight work.");
                let _ = tx.send(true);
            } else {
                tracing::warn!("Second signal; exiting immediately.");
                std::process::exit(130);
            }
        }
    });
    rx
}

/// Resolves when `rx` says shutdown (or its sender is gone).
pub async fn wait(rx: &mut Shutdown) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
