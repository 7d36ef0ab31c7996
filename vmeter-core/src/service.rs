//! The skeleton every vmeter service runs in: configuration (a bad one is exit code 2),
//! the runtime, signals, and the HTTP endpoint (`/health`, `/metrics`, and the collector's
//! API) next to the service's work.
//!
//! A service's `main` loads its config with [`load_config`], starts logging, and on the
//! [`runtime`] binds its listener with [`bind`] *before* its work starts (an address in use
//! stops the service at once, with a log line naming it), then hands the listener, its
//! router and its work to [`serve_with`], which runs both until shutdown and turns the
//! outcome into the exit code.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use axum::Router;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

/// Exit code of a service whose configuration is unusable.
pub const EXIT_CONFIG: u8 = 2;

/// Loads `binary`'s configuration (`explicit`, else `/etc/vmeter/<binary>.yaml` if it
/// exists, then `VMETER_*` overrides). A bad one is printed (file, line and key) and is
/// exit code 2.
pub fn load_config<T>(explicit: Option<&Path>, binary: &str) -> Result<T, ExitCode>
where
    T: DeserializeOwned + Serialize + Default,
{
    crate::config::load::<T>(explicit, &crate::config::default_path(binary))
        .map(|(c, _)| c)
        .map_err(config_error)
}

/// Prints a configuration error and gives exit code 2.
pub fn config_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

/// The services' runtime: multi-threaded, one worker per core.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Binds the HTTP endpoint's address, or takes the listening socket the service was started
/// with ([`inherited_listener`]: systemd socket activation, or a test that bound port 0).
/// Failure (address in use, not permitted, an inherited descriptor that is not a listening
/// TCP socket) is logged with the address and is the service's end: exit code 1.
pub async fn bind(listen: SocketAddr) -> Result<TcpListener, ExitCode> {
    match inherited_listener() {
        Ok(Some(l)) => {
            let at = l.local_addr().ok();
            if at.is_some_and(|a| a != listen) {
                tracing::info!(configured = %listen, inherited = ?at, "HTTP endpoint on the inherited socket; http.listen is not used.");
            }
            return Ok(l);
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!(error = %e, "The inherited HTTP socket (LISTEN_FDS) cannot be used; stopping.");
            return Err(ExitCode::FAILURE);
        }
    }
    match TcpListener::bind(listen).await {
        Ok(l) => Ok(l),
        Err(e) => {
            tracing::error!(%listen, error = %e, "Cannot listen for HTTP; stopping.");
            Err(ExitCode::FAILURE)
        }
    }
}

/// First descriptor passed by the socket-activation protocol (`sd_listen_fds(3)`).
const LISTEN_FDS_START: std::os::fd::RawFd = 3;

/// The listening socket passed as descriptor 3 with `LISTEN_FDS` ≥ 1 (and `LISTEN_PID` this
/// process, when set), as systemd's socket activation passes it: the HTTP endpoint is then
/// bound before the service starts (no port to race for, no privilege to bind). `None`
/// without `LISTEN_FDS`. Call once: the descriptor is taken over.
pub fn inherited_listener() -> std::io::Result<Option<TcpListener>> {
    use std::os::fd::FromRawFd;
    let fds = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok());
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .is_none_or(|p| p.parse::<u32>().ok() == Some(std::process::id()));
    if fds.unwrap_or(0) < 1 || !for_us {
        return Ok(None);
    }
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Ok(None);
    }
    // Descriptor 3 must be a listening socket before it is taken over: without the socket
    // it is whatever this process opened first (the runtime's epoll), which must stay open.
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`, which we own; on a
    // descriptor that is closed or not a socket it fails without side effects.
    let r = unsafe {
        libc::getsockopt(
            LISTEN_FDS_START,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("LISTEN_FDS is set but descriptor 3 is not a socket: {e}"),
        ));
    }
    if accepting == 0 {
        return Err(std::io::Error::other(
            "LISTEN_FDS is set but descriptor 3 is not a listening socket",
        ));
    }
    // SAFETY: descriptor 3 is a listening socket passed to this process by the protocol; it
    // is taken over once (TAKEN).
    let std = unsafe { std::net::TcpListener::from_raw_fd(LISTEN_FDS_START) };
    std.local_addr()?;
    std.set_nonblocking(true)?;
    TcpListener::from_std(std).map(Some)
}

/// Serves `app` on `listener` and runs `work` until shutdown or until either ends:
///
/// - `work` ends well (after shutdown): exit 0;
/// - `work` fails: logged as `"<name> failed."`, exit 1;
/// - the HTTP server stops while the service is not shutting down: logged, exit 1 (a
///   service without `/health` and `/metrics` must not go on unseen).
pub async fn serve_with<F, L>(
    name: &str,
    listener: L,
    app: Router,
    stop: Shutdown,
    work: F,
) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    let listen = axum::serve::Listener::local_addr(&listener).ok();
    let mut web = tokio::spawn(crate::http::serve_on(listener, app, stop.clone()));
    tokio::pin!(work);
    let result = tokio::select! {
        r = &mut work => r,
        w = &mut web => {
            if *stop.borrow() && matches!(w, Ok(Ok(()))) {
                // Graceful shutdown: the server finished first; let the work finish too.
                work.await
            } else {
                let msg = match w {
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(())) => "stopped".to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::error!(?listen, error = %msg, "HTTP endpoint failed; stopping.");
                return ExitCode::FAILURE;
            }
        }
    };
    web.abort();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "{name} failed.");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_address_in_use_is_the_end_not_a_silent_server_less_service() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        assert!(bind(addr).await.is_err());
    }

    #[tokio::test]
    async fn work_and_endpoint_on_a_bound_listener() {
        let (tx, stop) = tokio::sync::watch::channel(false);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = crate::http::router(crate::http::Health::default());
        let work = async move {
            // The endpoint answers while the work runs.
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"GET /health HTTP/1.0\r\n\r\n").await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            anyhow::ensure!(
                buf.starts_with(b"HTTP/1.0 200"),
                "{:?}",
                String::from_utf8_lossy(&buf)
            );
            let _ = tx.send(true);
            Ok(())
        };
        assert_eq!(
            serve_with("test", listener, app, stop, work).await,
            ExitCode::SUCCESS
        );
    }

    #[tokio::test]
    async fn failed_work_is_exit_code_one() {
        let (_tx, stop) = tokio::sync::watch::channel(false);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = Router::new();
        let code = serve_with("test", listener, app, stop, async {
            anyhow::bail!("broken")
        })
        .await;
        assert_eq!(code, ExitCode::FAILURE);
    }
}
