//! Feature `otel`: spans exported with OpenTelemetry OTLP (HTTP/protobuf) and
//! W3C trace context across messages: a delivery's `backstop.handle` span is
//! a child of the producer's span (`traceparent` on consume), and every copy
//! the runner publishes (delay tier, DLQ, park) carries that span as parent.

use super::config::{WorkerConfig, WorkerConfigError};
use backstop_core::{Headers, TracePropagation};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::Mutex;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The provider to flush at the end of the run.
static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// The tracing layer exporting spans to `tracing.otlp_endpoint`, when set.
pub(crate) fn layer<S>(
    config: &WorkerConfig,
) -> Result<
    Option<tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>>,
    WorkerConfigError,
>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let Some(endpoint) = &config.tracing.otlp_endpoint else {
        return Ok(None);
    };
    // OTLP/HTTP: the traces path, unless the endpoint names one.
    let url = match endpoint.trim_end_matches('/').split_once("://") {
        Some((_, rest)) if rest.contains('/') => endpoint.clone(),
        _ => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
    };
    let exporter = SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()
        .map_err(|e| WorkerConfigError::new("tracing.otlp_endpoint", e.to_string()))?;
    let service = config
        .tracing
        .service_name
        .clone()
        .unwrap_or_else(|| config.group());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    let tracer = provider.tracer("backstop");
    *PROVIDER.lock().unwrap_or_else(|p| p.into_inner()) = Some(provider);
    Ok(Some(tracing_opentelemetry::layer().with_tracer(tracer)))
}

/// Exports what is still buffered (blocking: call off the runtime's workers).
pub(crate) fn shutdown() {
    let provider = PROVIDER.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(p) = provider
        && let Err(e) = p.shutdown()
    {
        tracing::warn!(error = %e, "flushing spans to the OTLP endpoint failed");
    }
}

/// W3C trace context through Backstop headers.
#[derive(Debug, Default)]
pub(crate) struct Propagation(TraceContextPropagator);

struct Read<'a>(&'a Headers);

impl Extractor for Read<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get_str(key)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|h| h.key.as_str()).collect()
    }
}

struct Write<'a>(&'a mut Headers);

impl Injector for Write<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

impl TracePropagation for Propagation {
    fn on_consume(&self, headers: &Headers, span: &tracing::Span) {
        let cx = self.0.extract(&Read(headers));
        let _ = span.set_parent(cx);
    }

    fn on_publish(&self, headers: &mut Headers, span: &tracing::Span) {
        self.0.inject_context(&span.context(), &mut Write(headers));
    }
}
