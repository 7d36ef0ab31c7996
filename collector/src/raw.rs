//! Publishing samples posted to the API (`POST /v2/meters/{meter}` without `direct=true`)
//! to the raw queue, so that the pipeline sees them like an agent's.

use std::future::Future;
use std::pin::Pin;

use lapin::Connection;
use tokio::sync::Mutex;
use vmeter_core::Sample;
use vmeter_core::amqp::{self, BrokerConfig, Publisher};
use vmeter_core::signing::Signer;

/// A lazily connected publisher (connects on first use, reconnects after a failure).
pub struct RawPublisher {
    cfg: BrokerConfig,
    signer: Signer,
    link: Mutex<Option<(Connection, Publisher)>>,
}

impl RawPublisher {
    pub fn new(cfg: BrokerConfig, signer: Signer) -> Self {
        RawPublisher {
            cfg,
            signer,
            link: Mutex::new(None),
        }
    }

    async fn send(&self, samples: Vec<Sample>) -> Result<(), String> {
        let mut link = self.link.lock().await;
        if link.as_ref().is_none_or(|(c, _)| !c.status().connected()) {
            let conn = amqp::connect(&self.cfg, "vmeter-collector-api")
                .await
                .map_err(|e| format!("broker unreachable: {e}"))?;
            let p = Publisher::open(&conn, self.signer.clone())
                .await
                .map_err(|e| format!("broker channel: {e}"))?;
            *link = Some((conn, p));
        }
        let (_, p) = link.as_ref().expect("just connected");
        let result = p
            .publish_batch(&self.cfg.exchange, &self.cfg.raw_routing_key, &samples)
            .await
            .map_err(|e| format!("publishing to the raw queue failed: {e}"));
        if result.is_err() {
            *link = None;
        }
        result
    }
}

impl crate::api::RawPublish for RawPublisher {
    fn publish(
        &self,
        samples: Vec<Sample>,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(self.send(samples))
    }
}
