//! The metrics endpoint's connections: TLS and basic auth where the web
//! config asks for them (`web_config.rs`), and kept from exhausting the
//! agent: a
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

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::Semaphore, task::AbortHandle};
use tokio_rustls::TlsAcceptor;

use super::web_config::WebConfig;
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

/// Serves `/metrics` on `listener` until the task is dropped, with TLS and
/// basic auth where `web` configures them.
pub async fn serve(
    listener: tokio::net::TcpListener,
    reader: Arc<Reader>,
    web: Arc<WebConfig>,
) -> std::io::Result<()> {
    let open = Arc::new(Mutex::new(Open::default()));
    // bcrypt is slow by design: a few checks at a time, whatever is asked.
    let checks = Arc::new(Semaphore::new(2));
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
        let ctx = Ctx {
            reader: Arc::clone(&reader),
            web: Arc::clone(&web),
            checks: Arc::clone(&checks),
        };
        let done = Arc::clone(&open);
        // Held until the connection is listed, so its end always finds it.
        let mut o = open.lock().expect("connections lock");
        o.next += 1;
        let id = o.next;
        let task = tokio::spawn(async move {
            connection(stream, ctx).await;
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

/// What answering a request needs.
#[derive(Clone)]
struct Ctx {
    reader: Arc<Reader>,
    web: Arc<WebConfig>,
    checks: Arc<Semaphore>,
}

/// One connection: TLS first where configured (plain HTTP refused), then
/// HTTP/1.1.
async fn connection(stream: TcpStream, ctx: Ctx) {
    let Some(tls) = ctx.web.tls.clone() else {
        return http(TokioIo::new(stream), ctx).await;
    };
    let mut first = [0u8; 1];
    match tokio::time::timeout(HEADER_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0].is_ascii_alphabetic() => return refuse_plain(stream).await,
        Ok(Ok(1)) => {}
        _ => return,
    }
    match tokio::time::timeout(HEADER_TIMEOUT, TlsAcceptor::from(tls).accept(stream)).await {
        Ok(Ok(s)) => http(TokioIo::new(s), ctx).await,
        Ok(Err(e)) => tracing::debug!("metrics connection: TLS: {e}"),
        Err(_) => tracing::debug!("metrics connection: no TLS handshake within {HEADER_TIMEOUT:?}"),
    }
}

/// A plain HTTP request to the TLS endpoint: told so, as exporter-toolkit
/// tells it, and closed.
async fn refuse_plain(mut stream: TcpStream) {
    let body = "Client sent an HTTP request to an HTTPS server.\n";
    let reply = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn http<I>(io: I, ctx: Ctx)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(req, ctx).await) }
    });
    if let Err(e) = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, service)
        .await
    {
        tracing::debug!("metrics connection: {e}");
    }
}

/// 401 without the right user and password (where basic auth is on), else
/// the answer.
async fn answer(req: Request<Incoming>, ctx: Ctx) -> Response<Full<Bytes>> {
    if ctx.web.auth.is_some() {
        let header = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let Ok(_permit) = ctx.checks.acquire().await else {
            return unauthorized();
        };
        let web = Arc::clone(&ctx.web);
        let ok = tokio::task::spawn_blocking(move || {
            web.auth
                .as_ref()
                .is_some_and(|a| a.allows(header.as_deref()))
        })
        .await
        .unwrap_or(false);
        if !ok {
            return unauthorized();
        }
    }
    super::respond(&req, &ctx.reader)
}

fn unauthorized() -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header(WWW_AUTHENTICATE, "Basic realm=\"tcpstate\"")
        .header(CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from_static(b"Unauthorized\n")))
        .expect("a valid response")
}
