//! The quickstart scenario end to end, in process: every published message is
//! either handled or dead-lettered with the right reason, none lost.

use backstop::message::names;
use backstop_quickstart::{self as quickstart, Kind, kind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_accounts_for_every_message() {
    let summary = quickstart::run(1_000).await.expect("valid config");
    let count = |k: Kind| (0..1_000).filter(|i| kind(*i) == k).count();
    let failing = count(Kind::Invalid) + count(Kind::Garbage) + count(Kind::Down);

    assert_eq!(summary.published, 1_000);
    assert_eq!(summary.lost, 0);
    assert_eq!(summary.dead_lettered, failing);
    assert_eq!(summary.ok, 1_000 - failing);
    assert_eq!(summary.ok + summary.dead_lettered, summary.published);

    let reasons = |r: &str| {
        summary
            .dlq
            .iter()
            .filter(|m| m.headers().get_str(names::DEAD_LETTER_REASON) == Some(r))
            .count()
    };
    assert_eq!(reasons("permanent"), count(Kind::Invalid));
    assert_eq!(reasons("poison"), count(Kind::Garbage));
    assert_eq!(reasons("exhausted"), count(Kind::Down));

    // Blips retry twice in process; outages fail 3 times, hop one tier, fail
    // once more and succeed; "down" messages fail 3 times on each of 3 visits.
    let tiers = quickstart::policy().tiers().len() as u64;
    let retried = 2 * count(Kind::Blip) as u64
        + 3 * count(Kind::Outage) as u64
        + 2 * (tiers + 1) * count(Kind::Down) as u64;
    assert_eq!(summary.stats.retried, retried);
    assert_eq!(
        summary.stats.delayed,
        count(Kind::Outage) as u64 + tiers * count(Kind::Down) as u64
    );

    let line = summary.line();
    assert!(
        line.starts_with("summary: published=1000 ok=") && line.ends_with(" lost=0"),
        "{line}"
    );
    let table = quickstart::render(&summary, 3);
    assert!(table.contains("dead-lettered"));
    assert_eq!(table.matches("backstop-dead-letter-reason").count(), 3);
}
