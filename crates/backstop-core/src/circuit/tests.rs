//! The breakers on the paused clock: opening, probes, doubling, rates,
//! named dependencies, late results.

use super::*;
use std::time::Duration;

fn quick() -> CircuitBreaker {
    CircuitBreaker::default()
        .with_consecutive_failures(Some(3))
        .with_failure_rate(None)
        .with_open_for(Duration::from_secs(1), Duration::from_secs(4))
}

async fn fail(c: &Circuits, dep: Option<&str>) -> bool {
    let p = c.permit().await;
    c.record(p, Verdict::Failure(dep))
}

#[tokio::test(start_paused = true)]
async fn opens_after_consecutive_failures_and_a_success_resets_the_count() {
    let c = Circuits::new(quick(), "h".into(), Default::default());
    assert!(!fail(&c, None).await);
    assert!(!fail(&c, None).await);
    let p = c.permit().await;
    c.record(p, Verdict::Success);
    assert!(!fail(&c, None).await);
    assert!(!fail(&c, None).await);
    assert_eq!(c.state(), CircuitState::Closed);
    assert!(fail(&c, None).await, "the third failure in a row holds");
    assert_eq!(c.state(), CircuitState::Open);
    assert_eq!(c.opened(), 1);
}

#[tokio::test(start_paused = true)]
async fn ignored_failures_never_open_it() {
    let c = Circuits::new(quick(), "h".into(), Default::default());
    for _ in 0..20 {
        let p = c.permit().await;
        assert!(!c.record(p, Verdict::Ignored));
    }
    assert_eq!(c.state(), CircuitState::Closed);
    assert!(!counts(ErrorClass::Permanent));
    assert!(!counts(ErrorClass::Poison));
    assert!(!counts(ErrorClass::Panic));
    assert!(counts(ErrorClass::Timeout));
}

#[tokio::test(start_paused = true)]
async fn half_open_probe_failure_doubles_the_interval_up_to_the_cap() {
    let c = Circuits::new(quick(), "h".into(), Default::default());
    for _ in 0..3 {
        fail(&c, None).await;
    }
    let opened = Instant::now();
    // Open for 1 s: the permit waits for half-open.
    let probe = c.permit().await;
    assert_eq!(opened.elapsed(), Duration::from_secs(1));
    assert_eq!(c.state(), CircuitState::HalfOpen);
    // A second caller waits: one probe at a time.
    let second = tokio::time::timeout(Duration::from_millis(10), c.permit()).await;
    assert!(second.is_err(), "only one probe while half-open");
    assert!(c.record(probe, Verdict::Failure(None)));
    assert_eq!(c.state(), CircuitState::Open);
    let reopened = Instant::now();
    let probe = c.permit().await;
    assert_eq!(reopened.elapsed(), Duration::from_secs(2), "doubled");
    c.record(probe, Verdict::Failure(None));
    let t = Instant::now();
    let probe = c.permit().await;
    assert_eq!(t.elapsed(), Duration::from_secs(4));
    c.record(probe, Verdict::Failure(None));
    let t = Instant::now();
    let probe = c.permit().await;
    assert_eq!(t.elapsed(), Duration::from_secs(4), "capped");
    assert!(!c.record(probe, Verdict::Success));
    assert_eq!(c.state(), CircuitState::Closed);
    // Closed again: the interval starts from the beginning.
    for _ in 0..3 {
        fail(&c, None).await;
    }
    let t = Instant::now();
    let _ = c.permit().await;
    assert_eq!(t.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn failure_rate_needs_the_minimum_calls_and_forgets_old_calls() {
    let config = CircuitBreaker::default()
        .with_consecutive_failures(None)
        .with_failure_rate(Some(FailureRate {
            threshold: 0.5,
            window: Duration::from_secs(10),
            minimum_calls: 10,
        }));
    let c = Circuits::new(config, "h".into(), Default::default());
    // Alternate: 50 % failures, but the minimum is reached only at call 10.
    for i in 0..9 {
        let p = c.permit().await;
        let v = if i % 2 == 0 {
            Verdict::Failure(None)
        } else {
            Verdict::Success
        };
        assert!(!c.record(p, v), "call {i}");
    }
    // Old calls leave the window.
    tokio::time::advance(Duration::from_secs(11)).await;
    let p = c.permit().await;
    assert!(!c.record(p, Verdict::Failure(None)));
    assert_eq!(c.state(), CircuitState::Closed);
    for i in 0..9 {
        assert_eq!(c.state(), CircuitState::Closed, "call {i}");
        let p = c.permit().await;
        let v = if i % 2 == 0 {
            Verdict::Failure(None)
        } else {
            Verdict::Success
        };
        c.record(p, v);
    }
    assert_eq!(c.state(), CircuitState::Open, "6 of the last 10 failed");
}

#[tokio::test(start_paused = true)]
async fn a_named_dependency_has_its_own_breaker_and_pauses_the_handler() {
    let c = Circuits::new(quick(), "h".into(), Default::default());
    fail(&c, Some("inventory")).await;
    fail(&c, None).await;
    fail(&c, Some("inventory")).await;
    assert_eq!(c.state(), CircuitState::Closed, "2 + 1: neither reached 3");
    assert!(fail(&c, Some("inventory")).await);
    assert_eq!(c.state(), CircuitState::Open);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), c.intake_ready())
            .await
            .is_err(),
        "intake paused"
    );
    let probe = c.permit().await;
    c.record(probe, Verdict::Success);
    assert_eq!(c.state(), CircuitState::Closed);
    c.intake_ready().await;
}

#[tokio::test(start_paused = true)]
async fn a_late_result_from_before_the_opening_does_not_count() {
    let c = Circuits::new(quick(), "h".into(), Default::default());
    let late = c.permit().await;
    for _ in 0..3 {
        fail(&c, None).await;
    }
    let probe = c.permit().await;
    // The slow call that started while closed fails now: not a probe.
    assert!(c.record(late, Verdict::Failure(None)), "held: not closed");
    assert_eq!(c.state(), CircuitState::HalfOpen);
    c.record(probe, Verdict::Success);
    assert_eq!(c.state(), CircuitState::Closed);
}

#[test]
fn bad_settings_are_named() {
    let e = CircuitBreaker::default()
        .with_consecutive_failures(Some(0))
        .validate()
        .unwrap_err();
    assert_eq!(e.field, "circuit_breaker.consecutive_failures");
    let e = CircuitBreaker::default()
        .with_open_for(Duration::from_secs(10), Duration::from_secs(1))
        .validate()
        .unwrap_err();
    assert_eq!(e.field, "circuit_breaker.max_open_for");
    let e = CircuitBreaker::default()
        .with_half_open_probes(0)
        .validate()
        .unwrap_err();
    assert_eq!(e.field, "circuit_breaker.half_open_probes");
    let e = CircuitBreaker::default()
        .with_failure_rate(Some(FailureRate {
            threshold: 1.5,
            window: Duration::from_secs(10),
            minimum_calls: 5,
        }))
        .validate()
        .unwrap_err();
    assert_eq!(e.field, "circuit_breaker.failure_rate.threshold");
}
