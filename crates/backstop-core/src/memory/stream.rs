//! Consuming from the in-memory broker: a stream per subscription and
//! the handles that settle its deliveries.

use super::*;

/// A subscription's deliveries from the in-memory broker.
pub struct MemoryStream {
    broker: MemoryBroker,
    source: String,
    generation: u64,
    ended: bool,
    paused: bool,
}

impl fmt::Debug for MemoryStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStream")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Subscriber for MemoryBroker {
    type Stream = MemoryStream;

    fn system(&self) -> &'static str {
        "memory"
    }

    async fn subscribe(&self, subscription: &Subscription) -> Result<MemoryStream, TransportError> {
        let generation = self.inner.lock().generation;
        Ok(MemoryStream {
            broker: self.clone(),
            source: subscription.source.clone(),
            generation,
            ended: false,
            paused: false,
        })
    }
}

impl DeliveryStream for MemoryStream {
    async fn next_delivery(&mut self) -> Option<Result<Delivery, TransportError>> {
        if self.ended {
            return None;
        }
        if self.paused {
            // Paused: the messages stay ready in the broker.
            return std::future::pending().await;
        }
        let kind = |s: &Stored| match &s.via_tier {
            Some(t) => SourceKind::RetryTier(t.clone()),
            None => SourceKind::Main,
        };
        loop {
            let notify = self.broker.inner.lock().queue(&self.source).notify.clone();
            let notified = notify.notified();
            tokio::pin!(notified);
            // Register before looking, so a push between the look and the wait
            // still wakes us.
            notified.as_mut().enable();
            // Cancel-safe: the pop and the return happen with no await between.
            match self
                .broker
                .deliver(&self.source, kind, &self.source, Some(self.generation))
            {
                Some(Err(e)) => {
                    self.ended = true;
                    return Some(Err(e));
                }
                Some(Ok(d)) => return Some(Ok(d)),
                None => notified.await,
            }
        }
    }

    fn pause(&mut self) {
        self.paused = true;
    }

    fn resume(&mut self) {
        self.paused = false;
    }

    async fn close(self) {
        let ms = self.broker.inner.close_delay_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        self.broker.inner.closed.fetch_add(1, Ordering::SeqCst);
    }
}

pub(super) struct MemoryAck {
    pub(super) inner: Arc<Inner>,
    pub(super) queue: String,
    pub(super) tag: u64,
    pub(super) generation: u64,
    pub(super) settled: bool,
}

impl MemoryAck {
    fn settle(&mut self, ack: bool) -> Result<(), TransportError> {
        self.settled = true;
        let mut st = self.inner.lock();
        if st.generation != self.generation {
            return Err(TransportError::new(
                TransportErrorKind::ConnectionLost,
                "connection dropped before the ack; the message was requeued",
            ));
        }
        let q = st.queue(&self.queue);
        let stored = q.unacked.remove(&self.tag);
        if !ack && let Some(mut s) = stored {
            s.redelivered = true;
            q.ready.push_back(s);
            q.notify.notify_waiters();
        }
        Ok(())
    }
}

impl Acknowledge for MemoryAck {
    fn ack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        let r = self.settle(true);
        Box::pin(std::future::ready(r))
    }

    fn nack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        let r = self.settle(false);
        Box::pin(std::future::ready(r))
    }
}

impl Drop for MemoryAck {
    fn drop(&mut self) {
        if !self.settled {
            // Dropped unsettled: like a closed channel, the message comes back.
            let _ = self.settle(false);
        }
    }
}
