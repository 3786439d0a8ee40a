//! Worker configuration: the documented example loads, every section refuses
//! a bad value naming the field, the environment overrides the file, and
//! secrets are refused in the file and never shown by `Debug`.
//!
//! figment's `Jail` gives each test its own directory and environment.
#![allow(
    clippy::result_large_err,
    reason = "figment::Jail closures return figment::Error"
)]

use backstop::worker::{BrokerKind, LogFormat, WorkerConfig, WorkerConfigError};
use figment::Jail;
use std::path::Path;
use std::time::Duration;

fn load(jail: &mut Jail, toml: &str) -> Result<WorkerConfig, WorkerConfigError> {
    jail.create_file("worker.toml", toml).expect("write config");
    WorkerConfig::load(Some(Path::new("worker.toml")))
}

/// The field a bad config is refused for.
fn refused(toml: &str) -> WorkerConfigError {
    let mut out = None;
    Jail::expect_with(|jail| {
        out = Some(load(jail, toml).expect_err("must be refused"));
        Ok(())
    });
    out.expect("ran")
}

#[test]
fn the_documented_example_config_loads_with_every_option() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/worker.toml"
    ))
    .expect("examples/worker.toml");
    Jail::expect_with(|jail| {
        let c = load(jail, &text).expect("the example config is valid");
        assert_eq!(c.broker, Some(BrokerKind::Rabbitmq));
        assert_eq!(c.max_in_flight, 64);
        let h = c.handlers.get("orders").expect("[handlers.orders]");
        assert_eq!(h.timeout.map(|d| d.0), Some(Duration::from_secs(10)));
        let tiers: Vec<Duration> = h
            .retry
            .as_ref()
            .and_then(|r| r.tiers.clone())
            .expect("tiers")
            .into_iter()
            .map(|d| d.0)
            .collect();
        assert_eq!(
            tiers,
            [5, 30, 300].map(Duration::from_secs).to_vec(),
            "durations are read from text"
        );
        assert!(h.circuit_breaker.is_some() && h.retry_budget.is_some());
        c.handler_options("orders").expect("options build");
        assert_eq!(c.http.listen.port(), 9464);
        Ok(())
    });
}

#[test]
fn an_empty_config_takes_every_default() {
    Jail::expect_with(|jail| {
        let c = load(jail, "").expect("valid");
        assert_eq!(c.broker, None, "the broker has no default: run refuses it");
        assert_eq!(c.shutdown_deadline.0, Duration::from_secs(30));
        assert_eq!(c.health.stall_after.0, Duration::from_secs(60));
        assert_eq!(c.logging.format, LogFormat::Text);
        assert!(c.metrics.enabled && c.http.enabled);
        Ok(())
    });
}

#[test]
fn a_bad_value_in_each_section_is_refused_naming_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("max_in_flight = 0", "max_in_flight", "at least 1"),
        (
            r#"shutdown_deadline = "5 parsecs""#,
            "shutdown_deadline",
            "not a duration",
        ),
        (r#"broker = "activemq""#, "broker", "unknown variant"),
        ("colour = 1", "colour", "unknown field"),
        (
            "[kafka]\nbrokers = \"\"",
            "kafka.brokers",
            "must not be empty",
        ),
        (
            "[rabbitmq]\nurl = \"http://rabbit\"",
            "rabbitmq.url",
            "not an AMQP URL",
        ),
        (
            "[handlers.orders]\ntimeout = \"0s\"",
            "handlers.orders.timeout",
            "greater than zero",
        ),
        (
            "[handlers.orders]\ntimout = \"5s\"",
            "handlers.orders.timout",
            "unknown field",
        ),
        (
            "[handlers.orders]\nconcurrency = 0",
            "handlers.orders.concurrency",
            "at least 1",
        ),
        (
            "[handlers.orders.retry]\ntiers = [\"5m\", \"5s\"]",
            "handlers.orders.retry.tiers[1].delay",
            "shortest first",
        ),
        (
            "[handlers.orders.retry]\nbackoff_min = \"10s\"\nbackoff_max = \"1s\"",
            "handlers.orders.retry.backoff_",
            "",
        ),
        (
            "[handlers.orders.retry.on]\nflaky = \"retry\"",
            "handlers.orders.retry.on.flaky",
            "unknown error class",
        ),
        (
            "[handlers.orders]\npriority = \"urgent\"",
            "handlers.orders.priority",
            "unknown variant",
        ),
        (
            "[handlers.orders.retry.on]\ntimeout = \"later\"",
            "handlers.orders.retry.on.timeout",
            "unknown variant",
        ),
        (
            "[handlers.orders.retry_budget]\nwindw = \"5s\"",
            "handlers.orders.retry_budget.windw",
            "unknown field",
        ),
        (
            "[handlers.orders.rate_limit]\nper_second = 5.0\nbust = 3",
            "handlers.orders.rate_limit.bust",
            "unknown field",
        ),
        (
            "[handlers.orders.retry_budget]\nwindow = \"5m\"",
            "handlers.orders.retry_budget.window",
            "between 1 s and 60 s",
        ),
        (
            "[handlers.orders.circuit_breaker]\nfailure_rate = 2.0",
            "handlers.orders.circuit_breaker.failure_rate",
            "",
        ),
        (
            "[handlers.orders.rate_limit]\nper_second = 0.0",
            "handlers.orders.rate_limit.per_second",
            "at least 0.001",
        ),
        (
            "[handlers.orders.dedupe]\nstore = \"sqlite\"",
            "handlers.orders.dedupe.path",
            "file path",
        ),
        ("[http]\nlisten = \"everywhere\"", "http.listen", "invalid"),
        (
            "[health]\nstall_after = \"1s\"",
            "health.stall_after",
            "at least 2s",
        ),
        (
            "[metrics]\nhandler_buckets = [1.0, 0.5]",
            "metrics.handler_buckets",
            "increasing",
        ),
        (
            "[logging]\nformat = \"xml\"",
            "logging.format",
            "unknown variant",
        ),
        (
            // Without the `otel` feature any endpoint is refused; with it, this one.
            "[tracing]\notlp_endpoint = \"collector:4318\"",
            "tracing.otlp_endpoint",
            "",
        ),
    ];
    for (toml, field, reason) in cases {
        let e = refused(toml);
        assert!(
            e.field.starts_with(field),
            "{toml:?}: refused for `{}` ({}), expected `{field}`",
            e.field,
            e.reason
        );
        assert!(
            e.reason.contains(reason),
            "{toml:?}: reason {:?} should say {reason:?}",
            e.reason
        );
        assert!(
            e.to_string().contains(&e.field),
            "the message names the field: {e}"
        );
    }
}

#[test]
fn the_environment_overrides_the_file() {
    Jail::expect_with(|jail| {
        jail.set_env("BACKSTOP_HANDLERS__ORDERS__TIMEOUT", "5s");
        jail.set_env("BACKSTOP_LOGGING__FORMAT", "json");
        jail.set_env("BACKSTOP_KAFKA__BROKERS", "kafka-1:9092,kafka-2:9092");
        jail.set_env("BACKSTOP_MAX_IN_FLIGHT", "7"); // one underscore: not a config field
        jail.set_env("BACKSTOP_AMQP_URL", "amqp://elsewhere"); // the examples' own variable
        let c = load(
            jail,
            r#"
            broker = "kafka"
            max_in_flight = 32
            [kafka]
            brokers = "127.0.0.1:9092"
            [handlers.orders]
            timeout = "10s"
            concurrency = 4
            "#,
        )
        .expect("valid");
        let h = c.handlers.get("orders").expect("orders");
        assert_eq!(
            h.timeout.map(|d| d.0),
            Some(Duration::from_secs(5)),
            "env wins"
        );
        assert_eq!(h.concurrency, Some(4), "the file's other fields stay");
        assert_eq!(c.logging.format, LogFormat::Json);
        assert_eq!(c.kafka.brokers, "kafka-1:9092,kafka-2:9092");
        assert_eq!(c.max_in_flight, 32);
        Ok(())
    });
}

#[test]
fn a_bad_environment_value_names_the_field_and_the_variable_source() {
    Jail::expect_with(|jail| {
        jail.set_env("BACKSTOP_HEALTH__CHECK_INTERVAL", "often");
        let e = load(jail, "").expect_err("refused");
        assert_eq!(e.field, "health.check_interval");
        assert!(e.reason.contains("environment"), "{}", e.reason);
        Ok(())
    });
}

#[test]
fn secrets_are_refused_in_the_file_and_taken_from_env_or_files() {
    for (toml, field) in [
        (
            "[rabbitmq]\nurl = \"amqp://svc:hunter2@rabbit:5672/%2f\"",
            "rabbitmq.url",
        ),
        ("[rabbitmq]\npassword = \"hunter2\"", "rabbitmq.password"),
        ("[kafka]\npassword = \"hunter2\"", "kafka.password"),
        (
            "[kafka.properties]\n\"sasl.password\" = \"hunter2\"",
            "kafka.properties",
        ),
        (
            "[kafka.properties]\n\"ssl.key.pem\" = \"hunter2\"",
            "kafka.properties",
        ),
        (
            "[kafka.properties]\n\"sasl.oauthbearer.client.secret\" = \"hunter2\"",
            "kafka.properties",
        ),
        (
            "[kafka.properties]\n\"sasl.oauthbearer.config\" = \"hunter2\"",
            "kafka.properties",
        ),
        (
            "[kafka.properties]\n\"ssl.keystore.password\" = \"hunter2\"",
            "kafka.properties",
        ),
        (
            "[handlers.orders.dedupe]\nstore = \"redis\"\nurl = \"redis://:hunter2@cache:6379\"",
            "handlers.orders.dedupe.url",
        ),
    ] {
        let e = refused(toml);
        assert!(e.field.starts_with(field), "{toml}: {e}");
        assert!(e.reason.contains("secrets may not"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "never shown: {e}");
    }
    Jail::expect_with(|jail| {
        jail.set_env(
            "BACKSTOP_RABBITMQ__URL",
            "amqp://svc:hunter2@rabbit:5672/%2f",
        );
        jail.set_env("BACKSTOP_KAFKA__PASSWORD", "hunter3");
        let c = load(jail, "broker = \"rabbitmq\"").expect("valid");
        assert!(c.rabbitmq.url.contains("hunter2"), "from env: accepted");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("hunter3"),
            "Debug hides secrets: {shown}"
        );
        Ok(())
    });
}

#[test]
fn dead_letter_retention_and_connect_timeout_are_read() {
    Jail::expect_with(|jail| {
        let c = load(
            jail,
            "[kafka]\ndead_letter_retention = \"90d\"\n[rabbitmq]\nconnect_timeout = \"2s\"",
        )
        .expect("valid");
        assert_eq!(
            c.kafka.dead_letter_retention.map(|d| d.0),
            Some(Duration::from_secs(90 * 24 * 3600))
        );
        assert_eq!(
            c.rabbitmq.connect_timeout.map(|d| d.0),
            Some(Duration::from_secs(2))
        );
        Ok(())
    });
}
