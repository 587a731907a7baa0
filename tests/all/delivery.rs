//! Delivery through the real component, SQLite and HTTP: batching, ordering, ids, answers.

use std::time::Duration;

use asched_tests::{Receiver, Reply, TestHost, event, fast_retries, ids, registration, temp_dir};

const WAIT: Duration = Duration::from_secs(20);

/// The first event to an idle appservice goes out alone; events that arrive while it is in
/// flight follow in one batch; every event arrives once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn first_event_goes_alone_and_the_rest_batch_behind_it() {
    let receiver = Receiver::start(|requests| {
        let delay = if requests.len() == 1 {
            Duration::from_millis(300)
        } else {
            Duration::ZERO
        };
        Reply::Respond {
            status: 200,
            content_type: Some("application/json"),
            body: "{}",
            delay,
        }
    })
    .await;
    let dir = temp_dir("batching");
    let host = TestHost::start(
        &dir,
        vec![registration("as1", Some(&receiver.url()))],
        fast_retries(),
    );
    host.enqueue_each("as1", (1..=10).map(event)).await;
    let seen = receiver.wait_for_events(10, WAIT).await;
    assert_eq!(seen, ids(1, 10));
    let batches: Vec<Vec<String>> = receiver
        .requests()
        .into_iter()
        .map(|r| r.event_ids)
        .collect();
    assert_eq!(batches, vec![ids(1, 1), ids(2, 10)]);
    assert_eq!(receiver.max_concurrent(), 1);
    host.stop().await;
}

/// Two hosts on one data folder would interleave their writes and lose events, so the second
/// is refused, naming the folder and the holder; once the first stops, the folder is free.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_host_on_the_same_data_folder_is_refused() {
    let receiver = Receiver::healthy().await;
    let dir = temp_dir("lock");
    let regs = || vec![registration("as1", Some(&receiver.url()))];
    let first = TestHost::start(&dir, regs(), fast_retries());
    let config = asched_host::HostConfig {
        data_dir: dir.to_path_buf(),
        registrations: regs(),
        plugin_path: None,
        scheduler: fast_retries(),
        http: Default::default(),
        legacy_query_auth: Vec::new(),
        sandbox: Default::default(),
        probation: asched_host::engine::DEFAULT_PROBATION,
        store: Default::default(),
    };
    let refusal = asched_host::Host::start(config)
        .expect_err("the folder is in use")
        .to_string();
    let expected = format!(
        "the data folder {} is in use by another asched host (pid {}); two hosts on one store would lose events",
        dir.display(),
        std::process::id()
    );
    assert_eq!(refusal, expected);
    first.enqueue_each("as1", [event(1)]).await;
    assert_eq!(receiver.wait_for_events(1, WAIT).await, ids(1, 1));
    first.stop().await;
    let second = TestHost::start(&dir, regs(), fast_retries());
    second.enqueue_each("as1", [event(2)]).await;
    assert_eq!(receiver.wait_for_events(2, WAIT).await, ids(1, 2));
    second.stop().await;
}
