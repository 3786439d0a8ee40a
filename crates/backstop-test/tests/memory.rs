//! The conformance suite against the in-memory transport, on tokio's paused clock.

backstop_test::conformance_tests!(
    tokio::test(start_paused = true),
    backstop_test::MemoryBackend::new()
);

mod faults {
    backstop_test::conformance_fault_tests!(
        tokio::test(start_paused = true),
        backstop_test::MemoryBackend::new()
    );
}
