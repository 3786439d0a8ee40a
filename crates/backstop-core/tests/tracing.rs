//! One `backstop.handle` span per delivery, with the fields OBSERVABILITY.md names.

use backstop_core::memory::MemoryBroker;
use backstop_core::{Context, HandlerError, Message, Publisher, Runner, handler_fn};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context as LayerCtx, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

type Fields = BTreeMap<String, String>;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(String, Fields)>>>);

struct Visitor<'a>(&'a mut Fields);

impl Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerCtx<'_, S>) {
        let mut fields = Fields::new();
        attrs.record(&mut Visitor(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: LayerCtx<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<Fields>()
        {
            values.record(&mut Visitor(fields));
        }
    }
    fn on_close(&self, id: Id, ctx: LayerCtx<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            let fields = span
                .extensions()
                .get::<Fields>()
                .cloned()
                .unwrap_or_default();
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((span.name().to_owned(), fields));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn one_span_per_delivery_with_the_documented_fields() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(Registry::default().with(capture.clone()));

    let broker = MemoryBroker::new();
    let ok = Message::new("ok");
    let bad = Message::new("bad");
    let (ok_id, bad_id) = (ok.id().unwrap().to_owned(), bad.id().unwrap().to_owned());
    broker.publish("orders", ok).await.unwrap();
    broker.publish("orders", bad).await.unwrap();
    let handler = handler_fn(|p: Bytes, ctx: Context| async move {
        match &p[..] {
            b"ok" if ctx.attempt() == 1 => Err(HandlerError::transient("blip")),
            b"ok" => Ok(()),
            _ => Err(HandlerError::permanent("bad")),
        }
    });
    let runner = Runner::builder(broker.clone())
        .with_handler("orders", handler)
        .build()
        .unwrap();
    let idle = broker.clone();
    runner.run(async move { idle.wait_idle().await }).await;

    let spans = capture.0.lock().unwrap().clone();
    let handle: Vec<_> = spans
        .iter()
        .filter(|(name, _)| name == "backstop.handle")
        .map(|(_, f)| f)
        .collect();
    assert_eq!(handle.len(), 2, "one span per delivery: {spans:?}");
    let by_id = |id: &str| {
        *handle
            .iter()
            .find(|f| f.get("messaging.message.id").map(String::as_str) == Some(id))
            .unwrap_or_else(|| panic!("no span for {id}: {handle:?}"))
    };
    let ok_span = by_id(&ok_id);
    assert_eq!(ok_span["messaging.system"], "memory");
    assert_eq!(ok_span["messaging.destination.name"], "orders");
    assert_eq!(ok_span["backstop.attempt"], "2");
    assert_eq!(ok_span["backstop.outcome"], "ok");
    let bad_span = by_id(&bad_id);
    assert_eq!(bad_span["backstop.attempt"], "1");
    assert_eq!(bad_span["backstop.outcome"], "dead_lettered");
}
