//! Resident memory over many logins, sequential and concurrent: argon2's
//! memory blocks must not pile up, whatever threads the logins land on.

use std::time::Instant;

use crate::{PASSWORD, login, start};

/// The resident set of process `pid` now, and at its peak, in KiB.
fn resident_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The budget the auth service's memory must stay within (64 MB).
const BUDGET_KIB: u64 = 64 * 1000 * 1000 / 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resident_memory_stays_bounded_over_many_logins() {
    // Every login of the concurrent rounds is let in at once, so that they
    // really run on whatever threads the service has.
    let mut auth = start(&[
        ("PASSWORD_MAX_IN_FLIGHT", "64"),
        ("PASSWORD_MAX_IN_FLIGHT_PER_SOURCE", "64"),
    ])
    .await;
    let pid = auth._service.process.process().pid();
    auth.register("ada@example.com").await;
    let (started_rss, _) = resident_kib(pid);

    let mut client = auth.client_from("127.0.11.1").await;
    let sequential = Instant::now();
    for _ in 0..50 {
        login(&mut client, "ada@example.com", PASSWORD)
            .await
            .unwrap();
    }
    let sequential = sequential.elapsed();
    let (after_sequential, _) = resident_kib(pid);

    let concurrent = Instant::now();
    for _ in 0..3 {
        let mut clients = Vec::new();
        for _ in 0..50 {
            clients.push(auth.client_from("127.0.11.2").await);
        }
        let logins = clients
            .into_iter()
            .map(|mut client| async move { login(&mut client, "ada@example.com", PASSWORD).await });
        for result in futures::future::join_all(logins).await {
            result.unwrap();
        }
    }
    let concurrent = concurrent.elapsed();
    let (after_concurrent, peak) = resident_kib(pid);

    eprintln!(
        "VmRSS: {started_rss} KiB started, {after_sequential} KiB after 50 sequential logins \
         ({sequential:?}), {after_concurrent} KiB after 3 x 50 concurrent ({concurrent:?}); \
         VmHWM {peak} KiB"
    );
    assert!(
        peak <= BUDGET_KIB,
        "peak resident memory {peak} KiB is over the {BUDGET_KIB} KiB budget"
    );
    assert!(
        after_concurrent <= started_rss + 8 * 1024,
        "logins left memory behind: {started_rss} KiB at start, {after_concurrent} KiB after"
    );
}
