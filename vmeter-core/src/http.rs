//! `/health` and `/metrics`, served by every vmeter service.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::{Json, Router, http::StatusCode, response::IntoResponse, routing::get};

use crate::shutdown::Shutdown;

/// Defines the `http:` section of a service without an API (agent-compute 9101,
/// notification 9102): `listen`, the address of `/health` and `/metrics`, on loopback at
/// `$port` by default. A macro rather than one generic type: serde derives no const
/// generics, and each service has its own default port.
#[macro_export]
macro_rules! endpoint_config {
    ($name:ident, $port:expr) => {
        #[doc = concat!("`http:` section: `/health` and `/metrics`, on 127.0.0.1:", stringify!($port), " by default.")]
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            /// Address of `/health` and `/metrics`.
            pub listen: std::net::SocketAddr,
        }

        impl Default for $name {
            fn default() -> Self {
                $name {
                    listen: std::net::SocketAddr::from(([127, 0, 0, 1], $port)),
                }
            }
        }
    };
}

/// Named readiness flags (e.g. `broker`, `database`, `libvirt`); healthy when all are up.
#[derive(Clone, Default)]
pub struct Health {
    parts: Arc<Mutex<BTreeMap<&'static str, Arc<AtomicBool>>>>,
}

impl Health {
    /// A flag for `part`, initially down.
    pub fn part(&self, part: &'static str) -> Arc<AtomicBool> {
        self.parts
            .lock()
            .expect("health poisoned")
            .entry(part)
            .or_default()
            .clone()
    }

    fn report(&self) -> (bool, BTreeMap<&'static str, bool>) {
        let parts = self.parts.lock().expect("health poisoned");
        let m: BTreeMap<_, _> = parts
            .iter()
            .map(|(k, v)| (*k, v.load(Ordering::Relaxed)))
            .collect();
        (m.values().all(|v| *v), m)
    }
}

/// Router with `/health` (200 when every part is up, else 503, JSON body) and `/metrics`.
pub fn router(health: Health) -> Router {
    Router::new()
        .route(
            "/health",
            get(move || {
                let h = health.clone();
                async move {
                    let (ok, parts) = h.report();
                    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                    (code, Json(serde_json::json!({"status": if ok {"ok"} else {"degraded"}, "parts": parts})))
                }
            }),
        )
        .route(
            "/metrics",
            get(|| async { ([("content-type", crate::telemetry::CONTENT_TYPE)], crate::telemetry::render()).into_response() }),
        )
}

/// Serves `app` on an already bound `listener` until shutdown (see
/// [`crate::service::serve_with`], which every service uses).
/// `listener` is plain TCP or [`crate::tls_server::TlsListener`].
pub async fn serve_on<L>(listener: L, app: Router, mut shutdown: Shutdown) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    if let Ok(listen) = listener.local_addr() {
        tracing::info!(%listen, "HTTP endpoint listening.");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { crate::shutdown::wait(&mut shutdown).await })
        .await
}
