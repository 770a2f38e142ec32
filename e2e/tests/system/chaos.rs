//! A short chaos run, as CI runs it: the `chaos` driver with a fixed seed
//! for 75 seconds (faults every one to three seconds on one auth, two
//! order, two payment and three orchestrator replicas, a durable
//! PostgreSQL and a broker of the run's own), then the audit of every
//! invariant. The driver exits non-zero if one is broken or the system
//! did not quiesce; its table and everything it wrote (schedule, load
//! record, logs, table dumps) are in the `target/chaos/seed-17-...`
//! folder it names.
//!
//! The run has its own PostgreSQL and broker, not the test run's, since
//! it restarts the one and pauses the other.

use std::process::Stdio;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_a_fixed_seed_keeps_every_invariant() {
    // Builds the service binaries if needed (`cargo xtask test` has).
    let binaries = e2e::binaries_folder().await.unwrap();
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args(["--seed", "17", "--duration", "75", "--rate", "8"])
        .arg("--binaries")
        .arg(binaries)
        .stdin(Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(
        status.success(),
        "the chaos run failed ({status}): its table, and the folder of its files, are above"
    );
}
