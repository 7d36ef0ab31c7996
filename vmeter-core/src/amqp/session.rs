//! The broker session loop that the consuming services share: connect (with back-off),
//! open a confirming publisher, declare the topology, run the service's session; when the
//! session fails, log it, pause, and start again on a new connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{BrokerConfig, Publisher, connect_retrying, declare_topology};
use crate::shutdown::Shutdown;
use crate::signing::Signer;

/// Pause after a failed session before reconnecting (the broker may be restarting: the
/// reconnect itself then backs off further).
const AFTER_FAILURE: Duration = Duration::from_millis(500);

/// Runs broker sessions until shutdown. Each session gets a fresh connection and a
/// publisher (confirms on) over the declared topology. `session` returns `Ok` only when
/// shutdown was requested (the connection is then closed cleanly); an `Err` ends the
/// session: logged, and the loop reconnects. Whatever the session did not ack is
/// redelivered by the broker to the next session. `up` (the service's `broker` health
/// part) is cleared when a session ends; the session sets it once it consumes.
pub async fn run_sessions(
    cfg: &BrokerConfig,
    client: &str,
    signer: &Signer,
    up: &AtomicBool,
    shutdown: &mut Shutdown,
    mut session: impl AsyncFnMut(&lapin::Connection, &Publisher, &mut Shutdown) -> anyhow::Result<()>,
) {
    while !*shutdown.borrow() {
        let Some(conn) = connect_retrying(cfg, client, shutdown).await else {
            break;
        };
        let result = async {
            let publisher = Publisher::open(&conn, signer.clone()).await?;
            declare_topology(publisher.channel(), cfg).await?;
            session(&conn, &publisher, shutdown).await
        }
        .await;
        up.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => {
                let _ = conn.close(200, "shutdown".into()).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Broker session ended; reconnecting (what was not acked comes again).");
                tokio::time::sleep(AFTER_FAILURE).await;
            }
        }
    }
}
