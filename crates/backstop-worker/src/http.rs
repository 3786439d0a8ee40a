//! `/healthz`, `/readyz` and `/metrics` (axum, HTTP/1).

use super::probe::Readiness;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct AppState {
    readiness: Arc<Readiness>,
    exporter: Option<PrometheusHandle>,
}

/// Serves until `stop`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    readiness: Arc<Readiness>,
    exporter: Option<PrometheusHandle>,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            readiness,
            exporter,
        });
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "health server failed");
    }
}

fn answer(r: Result<(), String>, ok: &'static str) -> Response {
    match r {
        Ok(()) => (StatusCode::OK, ok).into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn healthz(State(s): State<AppState>) -> Response {
    answer(s.readiness.live(), "ok\n")
}

async fn readyz(State(s): State<AppState>) -> Response {
    answer(s.readiness.ready(), "ready\n")
}

async fn metrics(State(s): State<AppState>) -> Response {
    match &s.exporter {
        Some(h) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            h.render(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are off (metrics.enabled = false)\n",
        )
            .into_response(),
    }
}
