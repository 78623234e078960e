//! The metrics endpoint's connections, kept from exhausting the agent: a
//! client gets [`HEADER_TIMEOUT`] to send its request's headers (and a kept
//! connection as long to send the next), and at most [`MAX_CONNECTIONS`]
//! are open at once: one more closes the oldest. A slow or idle client
//! therefore holds a descriptor for seconds, never for good, and a real
//! scrape (which connects and asks at once) is answered however many hang
//! on. Without this, 6,000 clients that sent half a request were all still
//! open, each holding one of the agent's descriptors, 33 s later.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper::{Request, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::task::AbortHandle;

use crate::serve::reader::Reader;

/// How long a client may take to send a request's headers, or to start the
/// next request on a kept connection (Prometheus scrapes every 15 s or more
/// by default and reconnects when a connection was closed).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections open at once; one more closes the oldest.
pub const MAX_CONNECTIONS: usize = 512;

/// The open connections, oldest first.
#[derive(Default)]
struct Open {
    next: u64,
    conns: VecDeque<(u64, AbortHandle)>,
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, reader: Arc<Reader>) -> std::io::Result<()> {
    let open = Arc::new(Mutex::new(Open::default()));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            // Out of descriptors (or another passing error): the endpoint
            // stays, and tries again when some are free.
            Err(e) => {
                tracing::warn!("metrics endpoint: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let reader = Arc::clone(&reader);
        let done = Arc::clone(&open);
        // Held until the connection is listed, so its end always finds it.
        let mut o = open.lock().expect("connections lock");
        o.next += 1;
        let id = o.next;
        let task = tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let reader = Arc::clone(&reader);
                async move { Ok::<_, std::convert::Infallible>(super::respond(&req, &reader)) }
            });
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
            done.lock()
                .expect("connections lock")
                .conns
                .retain(|(i, _)| *i != id);
        });
        o.conns.push_back((id, task.abort_handle()));
        while o.conns.len() > MAX_CONNECTIONS {
            if let Some((_, oldest)) = o.conns.pop_front() {
                oldest.abort();
            }
        }
    }
}
