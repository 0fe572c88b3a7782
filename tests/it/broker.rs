//! What the broker may do to a running relay besides failing: refuse one
//! message or one exchange by closing a channel, nack into a full queue,
//! block publishing for a long time, lose a configured queue. Each fault
//! belongs to its owner: a row is charged only for its own, a channel fault
//! never takes the connection or the other workers down.

use serde_json::json;

use crate::support::*;

/// Writes one event through the producer helper with extra named arguments
/// and returns its id.
async fn send(env: &TestEnv, body: &str, args: &str) -> String {
    env.pg
        .query_one(
            &format!(
                "SELECT \"{}\".push_occurrence(convert_to($1, 'UTF8'), {args})::text",
                env.name
            ),
            &[&body],
        )
        .await
        .unwrap()
        .get(0)
}

/// The relay's metrics text.
async fn metrics(relay: &Relay) -> String {
    http_get(&relay.admin().await, "/metrics").await.1
}

#[tokio::test]
async fn a_row_naming_a_missing_exchange_leaves_the_connection_and_the_other_rows_alone() {
    let mut env = TestEnv::new("chanfault").await;
    // The seed's back-off: a reconnection would stall every worker for 5 s.
    env.config["rabbitmq"]["retry"]["retry_delay_sec"] = 5.into();
    env.config["relay"]["max_retry_delay_sec"] = 60.into();
    env.config["relay"]["max_attempts"] = 4.into();
    env.config["relay"]["attempt_delay_ms"] = 50.into();
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let bad = send(
        &env,
        "nowhere",
        &format!("p_exchange => '{}.gone'", env.name),
    )
    .await;
    let good = env.insert_many(50, 5).await;
    wait_until("the bad row is parked", || async {
        env.row_state(&bad).await.2
    })
    .await;
    consumer.wait_for_all(&good).await;
    env.wait_all_transferred_but(1).await;
    assert_exactly_once(&consumer, &good);
    let (attempts, reason, _, _) = env.row_state(&bad).await;
    assert_eq!(attempts, 4);
    assert!(reason.unwrap_or_default().contains("does not exist"));
    // Every attempt of the bad row closed a channel of its own; none of
    // them may look like, or be treated as, the connection failing.
    assert_eq!(
        relay.log_count("connected to rabbitmq"),
        1,
        "{}",
        relay.log_text()
    );
    assert_eq!(
        relay.log_count("connection lost"),
        0,
        "{}",
        relay.log_text()
    );
    let text = metrics(&relay).await;
    assert_eq!(
        metric(
            &text,
            "pushoccurrence_reconnections_total{connection=\"rabbitmq\"}"
        ),
        Some(0.0)
    );
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn a_message_the_broker_refuses_is_found_charged_and_parked_while_its_batch_flows() {
    // RabbitMQ 3.10 takes up to 128 MiB; this node takes 1 MiB.
    let broker = PrivateBroker::start_with(|_| "max_message_size = 1048576\n".into()).await;
    let mut env = TestEnv::new("refusedmsg").await;
    env.config["rabbitmq"]["url"] = broker.url().into();
    env.config["relay"]["max_attempts"] = 2.into();
    env.config["relay"]["attempt_delay_ms"] = 50.into();
    let consumer = Consumer::start(&broker.url(), &env.name).await;
    let relay = env.relay().await;
    // One transaction: the big body sits in the middle of one batch.
    let ids: Vec<String> = env
        .pg
        .query(
            &format!(
                "SELECT \"{}\".push_occurrence(CASE WHEN i = 10 THEN convert_to(repeat('x', 2000000), 'UTF8')
                                                  ELSE convert_to('small ' || i, 'UTF8') END)::text
                   FROM generate_series(1, 30) AS i",
                env.name
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let big = ids[9].clone();
    let small: Vec<String> = ids.iter().filter(|id| **id != big).cloned().collect();
    wait_until("the refused row is parked", || async {
        env.row_state(&big).await.2
    })
    .await;
    let (attempts, reason, _, transferred) = env.row_state(&big).await;
    let reason = reason.unwrap_or_default();
    assert!(!transferred && attempts == 2, "{attempts}");
    assert!(
        reason.starts_with("the broker refused the message: 406") && reason.contains("max size"),
        "{reason}"
    );
    consumer.wait_for_all(&small).await;
    env.wait_all_transferred_but(1).await;
    // Messages published beside the refused one may go out twice.
    assert_no_loss(&consumer, &small, 29);
    assert_eq!(consumer.counts().get(&big), None);
    assert_eq!(
        relay.log_count("connection lost"),
        0,
        "{}",
        relay.log_text()
    );
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn a_full_reject_publish_queue_nacks_and_its_rows_wait_uncharged_for_room() {
    let mut env = TestEnv::new("fullqueue").await;
    env.config["rabbitmq"]["queue"]["arguments"] =
        json!({"x-max-length": 3, "x-overflow": "reject-publish"});
    let relay = env.relay().await;
    let ids = env.insert_many(10, 10).await;
    // The queue takes 3; the broker nacks the rest, which stay pending.
    wait_until("three rows are marked", || async {
        env.pending().await == 7
    })
    .await;
    wait_until("the relay tried again", || async {
        let text = metrics(&relay).await;
        metric(&text, "pushoccurrence_messages_nacked_total").unwrap_or(0.0) >= 14.0
    })
    .await;
    assert_eq!(env.pending().await, 7);
    assert_eq!(env.charged().await, 0, "a nack is not the row's fault");
    let consumer = Consumer::attach(&env.name).await;
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &ids);
    assert_eq!(env.charged().await, 0);
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn messages_to_a_durable_queue_are_persistent_whatever_the_seed_queue_says() {
    let mut env = TestEnv::new("persist").await;
    let durable = format!("{}.durable", env.name);
    let mq = &mut env.config["rabbitmq"];
    mq["queue"]["durable"] = false.into();
    mq["queue"]["allow_unsafe"] = true.into();
    mq["queues"] = json!([{"name": durable}]);
    let relay = env.relay().await;
    let consumer = Consumer::attach(&durable).await;
    let id = send(&env, "keep me", &format!("p_routing_key => '{durable}'")).await;
    consumer.wait_for_all(std::slice::from_ref(&id)).await;
    assert_eq!(consumer.get(&id).delivery_mode, Some(2));
    assert!(relay.terminate().await.success());
    delete_from_broker(&[&durable], &[]).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_missing_configured_queue_is_reported_once_and_its_rows_wait_uncharged() {
    let mut env = TestEnv::new("noqueue").await;
    // The queue is the operator's: the relay may not declare it again.
    env.config["rabbitmq"]["queue"]["passive"] = true.into();
    env.config["relay"]["max_attempts"] = 2.into();
    env.config["relay"]["attempt_delay_ms"] = 50.into();
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let admin = relay.admin().await;
    let before = env.insert_many(10, 10).await;
    consumer.wait_for_all(&before).await;
    env.wait_all_transferred().await;

    drop(consumer);
    env.cleanup_queue_only().await;
    let mut during = env.insert_many(10, 10).await;
    // Rows that name the configured queue themselves are on the configured
    // route too: its loss is not their fault either.
    for i in 0..5 {
        during.push(
            send(
                &env,
                &format!("named {i}"),
                &format!("p_routing_key => '{}'", env.name),
            )
            .await,
        );
    }
    wait_until("the rows were returned several times", || async {
        let text = metrics(&relay).await;
        metric(&text, "pushoccurrence_messages_returned_total").unwrap_or(0.0) >= 45.0
    })
    .await;
    let (code, body) = http_get(&admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("rabbitmq topology") && body.contains(&env.name),
        "{body}"
    );
    assert_eq!(
        metric(&metrics(&relay).await, "pushoccurrence_topology_broken"),
        Some(1.0)
    );
    assert_eq!(env.pending().await, 15);
    assert_eq!(
        env.charged().await,
        0,
        "a missing queue is not the rows' fault"
    );
    assert_eq!(
        relay.log_count("the configured topology is broken"),
        1,
        "{}",
        relay.log_text()
    );

    // The operator puts the queue back: the rows go out, uncharged.
    let consumer = env.consumer().await;
    consumer.wait_for_all(&during).await;
    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &during);
    assert_eq!(env.charged().await, 0);
    wait_until("the relay is ready again", || async {
        http_get(&admin, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(
        metric(&metrics(&relay).await, "pushoccurrence_topology_broken"),
        Some(0.0)
    );
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn a_long_broker_alarm_duplicates_nothing_in_flight() {
    // Alarms are node-wide: this test brings its own RabbitMQ node.
    let broker = PrivateBroker::start().await;
    // Its claim transactions stay open for the whole alarm.
    let mut env = TestEnv::in_own_database("longalarm").await;
    env.config["rabbitmq"]["url"] = broker.url().into();
    // PostgreSQL ends a claim session idle in transaction after the confirm
    // timeout + 30 s: 32 s here, well inside the alarm.
    env.config["relay"]["confirm_timeout_ms"] = 2000.into();
    // Small batches: the drain lasts long enough for the alarm to land in it.
    env.config["rabbitmq"]["retry"]["buffer_size"] = 10.into();
    let consumer = Consumer::start(&broker.url(), &env.name).await;
    env.migrate().await;
    // Enough for the alarm to land mid-drain, few enough to drain within
    // the tests' patience on a loaded machine once it is over.
    let ids = env.insert_many(10_000, 5000).await;
    let relay = env.relay().await;
    wait_until("the drain is under way", || async {
        consumer.count() >= 1000
    })
    .await;
    // A memory alarm while batches are in flight: their confirms are held.
    assert!(broker.ctl(&["set_vm_memory_high_watermark", "0.0000001"]));
    wait_until("the relay knows it is blocked", || async {
        relay.metric("pushoccurrence_rabbitmq_blocked").await == Some(1.0)
    })
    .await;
    assert!(
        env.pending().await > 0,
        "the alarm came after the drain; the test proves nothing"
    );
    // The alarm's length is the point: it must outlast the idle timeout.
    tokio::time::sleep(std::time::Duration::from_secs(45)).await;
    assert!(broker.ctl(&["set_vm_memory_high_watermark", "0.4"]));
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    assert_eq!(relay.failed_batches().await, 0.0, "{}", relay.log_text());
    assert_exactly_once(&consumer, &ids);
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

/// A broker alarm pauses the relay but loses no connection: it is not a
/// reconnection, and the metrics say blocked, not down.
#[tokio::test]
async fn a_broker_alarm_is_reported_as_blocked_and_never_counted_as_a_reconnection() {
    let broker = PrivateBroker::start().await;
    let mut env = TestEnv::new("alarmmetric").await;
    env.config["rabbitmq"]["url"] = broker.url().into();
    let consumer = Consumer::start(&broker.url(), &env.name).await;
    let relay = env.relay().await;
    let admin = relay.admin().await;
    let series = |text: &str, name: &str| metric(text, name).unwrap_or(-1.0);
    let up = "pushoccurrence_connection_up{connection=\"rabbitmq\"}";
    let reconnections = "pushoccurrence_reconnections_total{connection=\"rabbitmq\"}";
    let blocked = "pushoccurrence_rabbitmq_blocked";

    for round in 0..2 {
        assert!(broker.ctl(&["set_vm_memory_high_watermark", "0.0000001"]));
        // Publishing is what makes the broker block a connection.
        let ids = env.insert_many(10, 10).await;
        wait_until("/readyz and the metrics say blocked", || async {
            let text = http_get(&admin, "/metrics").await.1;
            http_get(&admin, "/readyz").await.1 == "not ready: rabbitmq blocked publishing\n"
                && series(&text, blocked) == 1.0
        })
        .await;
        let text = http_get(&admin, "/metrics").await.1;
        assert_eq!(series(&text, up), 1.0, "round {round}: {text}");
        assert!(broker.ctl(&["set_vm_memory_high_watermark", "0.4"]));
        consumer.wait_for_all(&ids).await;
        wait_until("ready again", || async {
            http_get(&admin, "/readyz").await.0 == 200
        })
        .await;
        let text = http_get(&admin, "/metrics").await.1;
        assert_eq!(series(&text, blocked), 0.0, "round {round}: {text}");
        assert_eq!(series(&text, up), 1.0, "round {round}: {text}");
        assert_eq!(series(&text, reconnections), 0.0, "round {round}: {text}");
    }
    assert_eq!(
        relay.log_count("connection lost"),
        0,
        "{}",
        relay.log_text()
    );
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

/// Accepts TCP connections and never says a word: a node (or server) that
/// is frozen but still completes TCP handshakes. Returns its port.
pub async fn silent_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    port
}

#[tokio::test]
async fn a_node_that_accepts_and_never_answers_is_passed_over_for_the_next() {
    let mut env = TestEnv::new("silentnode").await;
    let silent = silent_server().await;
    let mq = &mut env.config["rabbitmq"];
    mq.as_object_mut().unwrap().remove("url");
    mq["urls"] = json!([
        format!("amqp://guest:guest@127.0.0.1:{silent}/?connection_timeout=1000"),
        amqp_url()
    ]);
    mq["shuffle_urls"] = false.into();
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let ids = env.insert_many(20, 10).await;
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &ids);
    // Connected once, to the node that answers.
    let log = relay.log_text();
    let connected: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connected to rabbitmq"))
        .collect();
    assert!(
        connected.len() == 1 && !connected[0].contains(&format!(":{silent}/")),
        "{log}"
    );
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}
