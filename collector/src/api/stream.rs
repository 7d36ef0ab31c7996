//! Answers written and sent in chunks as rows arrive.

use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::error::ApiError;

/// A piece of a streamed answer: bytes and whether they are the last, or why it stopped.
pub(super) type Chunk = Result<(Vec<u8>, bool), ApiError>;

/// The answer made of the chunks `rx` brings. An error (or the writer stopping) before the
/// first chunk is answered with its status; after it, the body is aborted, so the client
/// sees a cut answer, never a short valid one.
pub(super) async fn chunked(
    mut rx: tokio::sync::mpsc::Receiver<Chunk>,
) -> Result<Response, ApiError> {
    let stopped = || ApiError::Internal("the answer's writer stopped".into());
    let (first, last) = rx.recv().await.ok_or_else(stopped)??;
    let rest = futures::stream::unfold((rx, last), |(mut rx, done)| async move {
        if done {
            return None;
        }
        let next = match rx.recv().await {
            Some(Ok((chunk, last))) => return Some((Ok(chunk), (rx, last))),
            Some(Err(e)) => format!("{e:?}"),
            None => "the answer's writer stopped".to_string(),
        };
        tracing::error!(error = %next, "Answer cut short.");
        Some((Err(std::io::Error::other(next)), (rx, true)))
    });
    let body = futures::stream::once(async move { Ok(first) }).chain(rest);
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// A JSON response from bytes already written.
pub(super) fn json_bytes(body: Vec<u8>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// Bytes of JSON per chunk of a streamed answer.
pub(super) const CHUNK: usize = 256 * 1024;

/// Bytes of JSON gathered before a chunk of a streamed list is sent.
pub(super) const LIST_CHUNK: usize = 64 << 10;

/// Answers the rows of `qb` as a JSON array, each row made a value by `to_json`, written
/// and sent in chunks as PostgreSQL sends the rows: memory stays a chunk whatever `limit`
/// asked for. Errors before the first chunk keep their status; later ones cut the body.
pub(super) async fn stream_list(
    pool: PgPool,
    mut qb: QueryBuilder<Postgres>,
    to_json: impl Fn(&sqlx::postgres::PgRow) -> Result<Value, sqlx::Error> + Send + 'static,
) -> Result<Response, ApiError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(2);
    tokio::spawn(async move {
        let mut rows = qb.build().fetch(&pool);
        let mut buf = Vec::with_capacity(LIST_CHUNK + 1024);
        buf.push(b'[');
        let mut first = true;
        loop {
            let value = match rows.next().await {
                None => break,
                Some(row) => row.and_then(|r| to_json(&r)),
            };
            let value = match value {
                Ok(v) => v,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            if !first {
                buf.push(b',');
            }
            first = false;
            // Writing a Value into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut buf, &value);
            if buf.len() >= LIST_CHUNK
                && tx
                    .send(Ok((
                        std::mem::replace(&mut buf, Vec::with_capacity(LIST_CHUNK + 1024)),
                        false,
                    )))
                    .await
                    .is_err()
            {
                return;
            }
        }
        buf.push(b']');
        let _ = tx.send(Ok((buf, true))).await;
    });
    chunked(rx).await
}
