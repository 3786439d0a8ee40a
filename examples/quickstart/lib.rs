//! The quickstart scenario: 1,000 orders through the in-memory broker, some
//! failing transiently (they recover), some permanently, some undecodable.
//! One concern a file: [`handler`] (what a user writes), [`scenario`] (the
//! orders published), [`report`] (the table printed), and here the run.

pub mod handler;
pub mod report;
pub mod scenario;

pub use handler::{Fulfil, Order, policy};
pub use report::{Summary, render};
pub use scenario::{Kind, kind};

use backstop::memory::MemoryBroker;
use backstop::{HandlerOptions, Publisher, Runner};
use std::collections::HashSet;
use std::time::Duration;

/// The source queue.
pub const SOURCE: &str = "orders";

/// Publishes `count` orders, runs a worker until every message is settled, and
/// reports what happened.
pub async fn run(count: u32) -> Result<Summary, backstop::ConfigError> {
    let broker = MemoryBroker::new();
    let mut ids = Vec::with_capacity(count as usize);
    for i in 0..count {
        let m = scenario::message(i);
        ids.push(m.id().expect("new messages have an id").to_owned());
        broker
            .publish(SOURCE, m)
            .await
            .expect("the in-memory broker confirms every publish");
    }
    let handler = Fulfil::default();
    let handled = handler.handled.clone();
    let runner = Runner::builder(broker.clone())
        .with_group("fulfilment")
        .with_handler_options(
            SOURCE,
            handler,
            HandlerOptions::default()
                .with_name("fulfil")
                .with_timeout(Duration::from_secs(2))
                .with_concurrency(64)
                .with_policy(policy()),
        )
        .build()?;
    let idle = broker.clone();
    let report = runner.run(async move { idle.wait_idle().await }).await;

    let dlq = broker.messages(&MemoryBroker::dlq(SOURCE));
    let handled = handled.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let dead: HashSet<String> = dlq
        .iter()
        .filter_map(|m| m.id().map(str::to_owned))
        .collect();
    let lost = ids
        .iter()
        .filter(|id| !handled.contains(*id) && !dead.contains(*id))
        .count();
    Ok(Summary {
        published: ids.len(),
        ok: handled.len(),
        dead_lettered: dead.len(),
        lost,
        stats: report.stats,
        dlq,
    })
}
