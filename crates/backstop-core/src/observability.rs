//! Metric names (OBSERVABILITY.md) and the per-route handles the runner records into.
//! Libraries only talk to the `metrics` facade; binaries install an exporter.

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

/// Metric names, exactly as OBSERVABILITY.md lists them.
pub mod names {
    /// counter {source, handler, outcome}
    pub const MESSAGES_TOTAL: &str = "backstop_messages_total";
    /// counter {source, handler, class}
    pub const HANDLER_ERRORS_TOTAL: &str = "backstop_handler_errors_total";
    /// histogram {source, handler}
    pub const HANDLER_DURATION_SECONDS: &str = "backstop_handler_duration_seconds";
    /// histogram {source}
    pub const END_TO_END_SECONDS: &str = "backstop_end_to_end_seconds";
    /// gauge {handler}
    pub const INFLIGHT: &str = "backstop_inflight";
    /// gauge {source, partition}
    pub const CONSUMER_LAG: &str = "backstop_consumer_lag";
    /// gauge {source}
    pub const QUEUE_DEPTH: &str = "backstop_queue_depth";
    /// gauge {dlq}
    pub const DLQ_DEPTH: &str = "backstop_dlq_depth";
    /// gauge {dlq}
    pub const DLQ_OLDEST_AGE_SECONDS: &str = "backstop_dlq_oldest_age_seconds";
    /// gauge {source, tier}
    pub const RETRY_BACKLOG: &str = "backstop_retry_backlog";
    /// gauge {handler}
    pub const CIRCUIT_STATE: &str = "backstop_circuit_state";
    /// counter {handler}
    pub const RETRY_BUDGET_EXHAUSTED_TOTAL: &str = "backstop_retry_budget_exhausted_total";
    /// gauge {outbox}
    pub const OUTBOX_PENDING: &str = "backstop_outbox_pending";
    /// gauge {outbox}
    pub const OUTBOX_OLDEST_AGE_SECONDS: &str = "backstop_outbox_oldest_age_seconds";
    /// counter {outbox}
    pub const OUTBOX_PUBLISH_FAILURES_TOTAL: &str = "backstop_outbox_publish_failures_total";
    /// counter {source, header}
    pub const MALFORMED_HEADERS_TOTAL: &str = "backstop_malformed_headers_total";
}

use crate::error::ErrorClass;
use crate::message::Headers;
use names::*;

/// Counts a header that a backend could not carry or read as it came (an
/// AMQP header key over 255 bytes, a Kafka header key that is not UTF-8) in
/// `backstop_malformed_headers_total`, for `source` (the topic or queue the
/// message came from or goes to). `header` names the kind of defect, since
/// the key itself is what is broken.
pub fn count_malformed_header(source: &str, header: &'static str) {
    counter!(MALFORMED_HEADERS_TOTAL, "source" => source.to_owned(), "header" => header)
        .increment(1);
}

/// Trace context across messages (W3C `traceparent`/`tracestate`): how a
/// delivery's `backstop.handle` span joins the producer's trace, and how the
/// copies the runner publishes (delay tier, DLQ, park) carry it on. Without
/// one ([`RunnerBuilder::with_trace_propagation`](crate::RunnerBuilder::with_trace_propagation))
/// the headers are copied as they came and the span records `trace_id`.
/// The worker's `otel` feature installs an OpenTelemetry one.
pub trait TracePropagation: Send + Sync + std::fmt::Debug + 'static {
    /// Before handling: make `span` a child of the context in `headers`.
    fn on_consume(&self, headers: &Headers, span: &tracing::Span);
    /// On every copy the runner publishes, with the delivery's span: write
    /// the span's context into `headers` (same trace, this span as parent).
    fn on_publish(&self, headers: &mut Headers, span: &tracing::Span);
}

/// Final and intermediate outcomes, the `outcome` label of `backstop_messages_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OutcomeLabel {
    Ok,
    Retried,
    Delayed,
    DeadLettered,
    FailedToRoute,
    Duplicate,
    Parked,
    Skipped,
    Unroutable,
}

impl OutcomeLabel {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Retried => "retried",
            Self::Delayed => "delayed",
            Self::DeadLettered => "dead_lettered",
            Self::FailedToRoute => "failed_to_route",
            Self::Duplicate => "duplicate",
            Self::Parked => "parked",
            Self::Skipped => "skipped",
            Self::Unroutable => "unroutable",
        }
    }
}

/// Handles resolved once per route when the runner starts, so the hot path does
/// not build label sets per message.
#[derive(Debug)]
pub(crate) struct RouteMetrics {
    source: String,
    ok: Counter,
    retried: Counter,
    delayed: Counter,
    dead_lettered: Counter,
    failed_to_route: Counter,
    duplicate: Counter,
    parked: Counter,
    skipped: Counter,
    unroutable: Counter,
    errors: Vec<(ErrorClass, Counter)>,
    pub(crate) duration: Histogram,
    pub(crate) end_to_end: Histogram,
    pub(crate) inflight: Gauge,
    pub(crate) budget_exhausted: Counter,
}

impl RouteMetrics {
    pub(crate) fn new(source: &str, handler: &str) -> Self {
        let outcome = |o: OutcomeLabel| counter!(MESSAGES_TOTAL, "source" => source.to_owned(), "handler" => handler.to_owned(), "outcome" => o.as_str());
        Self {
            source: source.to_owned(),
            ok: outcome(OutcomeLabel::Ok),
            retried: outcome(OutcomeLabel::Retried),
            delayed: outcome(OutcomeLabel::Delayed),
            dead_lettered: outcome(OutcomeLabel::DeadLettered),
            failed_to_route: outcome(OutcomeLabel::FailedToRoute),
            duplicate: outcome(OutcomeLabel::Duplicate),
            parked: outcome(OutcomeLabel::Parked),
            skipped: outcome(OutcomeLabel::Skipped),
            unroutable: outcome(OutcomeLabel::Unroutable),
            errors: ErrorClass::ALL
                .iter()
                .map(|c| {
                    let counter = counter!(HANDLER_ERRORS_TOTAL, "source" => source.to_owned(), "handler" => handler.to_owned(), "class" => c.as_str());
                    (*c, counter)
                })
                .collect(),
            duration: histogram!(HANDLER_DURATION_SECONDS, "source" => source.to_owned(), "handler" => handler.to_owned()),
            end_to_end: histogram!(END_TO_END_SECONDS, "source" => source.to_owned()),
            inflight: gauge!(INFLIGHT, "handler" => handler.to_owned()),
            budget_exhausted: counter!(RETRY_BUDGET_EXHAUSTED_TOTAL, "handler" => handler.to_owned()),
        }
    }

    pub(crate) fn outcome(&self, o: OutcomeLabel) {
        match o {
            OutcomeLabel::Ok => &self.ok,
            OutcomeLabel::Retried => &self.retried,
            OutcomeLabel::Delayed => &self.delayed,
            OutcomeLabel::DeadLettered => &self.dead_lettered,
            OutcomeLabel::FailedToRoute => &self.failed_to_route,
            OutcomeLabel::Duplicate => &self.duplicate,
            OutcomeLabel::Parked => &self.parked,
            OutcomeLabel::Skipped => &self.skipped,
            OutcomeLabel::Unroutable => &self.unroutable,
        }
        .increment(1);
    }

    pub(crate) fn error(&self, class: ErrorClass) {
        if let Some((_, c)) = self.errors.iter().find(|(k, _)| *k == class) {
            c.increment(1);
        }
    }

    pub(crate) fn malformed_header(&self, header: &'static str) {
        counter!(MALFORMED_HEADERS_TOTAL, "source" => self.source.clone(), "header" => header)
            .increment(1);
    }
}
