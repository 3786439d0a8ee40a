//! Fault paths on librdkafka's in-process mock cluster: a retry/DLQ copy whose
//! produce fails leaves the original uncommitted and it is routed again; the
//! broker going down mid-stream loses nothing.

mod common;

backstop_test::conformance_fault_tests!(
    tokio::test(flavor = "multi_thread", worker_threads = 2),
    common::KafkaBackend::mock(2)
);
