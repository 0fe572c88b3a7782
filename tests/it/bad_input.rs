//! Bad input has a rule, never a crash or a stall: each case is retried with
//! a delay, parked with its reason after `relay.max_attempts`, and good
//! events keep flowing past it.

use crate::support::*;

/// A relay that parks after 3 attempts, 50 ms apart at first.
async fn setup(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> (TestEnv, Consumer, Relay) {
    let mut env = TestEnv::new(tag).await;
    env.config["relay"]["max_attempts"] = 3.into();
    env.config["relay"]["attempt_delay_ms"] = 50.into();
    edit(&mut env.config);
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    (env, consumer, relay)
}

/// Good events still flow: a fresh batch arrives exactly as sent.
async fn good_events_flow(env: &TestEnv, consumer: &Consumer) -> Vec<String> {
    let ids = env.insert_many(20, 10).await;
    consumer.wait_for_all(&ids).await;
    ids
}

async fn wait_parked(env: &TestEnv, id: &str) -> (i32, String) {
    wait_until(&format!("{id} is parked"), || async {
        env.row_state(id).await.2
    })
    .await;
    let (attempts, reason, parked, transferred) = env.row_state(id).await;
    assert!(parked && !transferred);
    (attempts, reason.unwrap_or_default())
}

#[tokio::test]
async fn notification_payloads_that_are_not_ids_are_ignored() {
    let (env, consumer, mut relay) = setup("garbage", |_| {}).await;
    let known = env.insert_many(1, 1).await;
    for payload in [
        "",
        "garbage",
        "{\"message_id\": 1}",
        " ",
        &known[0].to_uppercase(),
        &"x".repeat(7999),
    ] {
        env.pg
            .execute("SELECT pg_notify($1, $2)", &[&env.name, &payload])
            .await
            .unwrap();
    }
    let ids = good_events_flow(&env, &consumer).await;
    assert!(relay.is_running());
    let all: Vec<String> = known.into_iter().chain(ids).collect();
    assert_exactly_once(&consumer, &all);
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn a_log_row_without_data_is_retried_then_parked_and_late_data_is_delivered() {
    let (env, consumer, relay) = setup("nodata", |_| {}).await;
    let orphan = uuid(1);
    env.insert_status_row(&orphan).await;
    // A producer that commits the data row apart, after the relay saw the log row.
    let late = uuid(2);
    env.insert_status_row(&late).await;
    wait_until("the relay tried the late row", || async {
        env.row_state(&late).await.0 >= 1
    })
    .await;
    env.pg
        .execute(
            &format!(
                "INSERT INTO \"{}\".message_queue_log_data VALUES ('{late}', '\\x6c617465')",
                env.name
            ),
            &[],
        )
        .await
        .unwrap();
    consumer.wait_for_all(std::slice::from_ref(&late)).await;
    assert_eq!(consumer.get(&late).body, b"late");

    let (attempts, reason) = wait_parked(&env, &orphan).await;
    assert_eq!(attempts, 3);
    assert!(reason.contains("no data row"), "{reason}");
    // The line follows the commit that parked the row.
    relay.wait_log("row parked after repeated failures").await;
    let good = good_events_flow(&env, &consumer).await;
    let mut expected = good.clone();
    expected.push(late);
    assert_exactly_once(&consumer, &expected);
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn a_null_body_is_parked_and_requeued_once_fixed() {
    let (env, consumer, relay) = setup("nullbody", |_| {}).await;
    let id = uuid(3);
    env.insert_event(&id, "NULL", true).await;
    let (_, reason) = wait_parked(&env, &id).await;
    assert!(reason.contains("NULL"), "{reason}");

    let config = env.write_config();
    let out = pushoccurrence(&config, &["parked"]).output().await.unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listing.contains(&id) && listing.contains("attempts=3"),
        "{listing}"
    );

    env.pg
        .execute(
            &format!("UPDATE \"{}\".message_queue_log_data SET message_body = '\\x6f6b' WHERE message_id = '{id}'", env.name),
            &[],
        )
        .await
        .unwrap();
    let out = pushoccurrence(&config, &["requeue", &id, "no-such-id"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("requeued 1 row") && text.contains("no-such-id"),
        "{text}"
    );
    consumer.wait_for_all(std::slice::from_ref(&id)).await;
    assert_eq!(consumer.get(&id).body, b"ok");
    let good = good_events_flow(&env, &consumer).await;
    assert_exactly_once(&consumer, &[good, vec![id]].concat());
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn several_data_rows_publish_once_when_identical_and_park_when_not() {
    let (env, consumer, relay) = setup("dupdata", |_| {}).await;
    let (same, differ) = (uuid(4), uuid(5));
    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO \"{s}\".message_queue_log (message_id) VALUES ('{same}'), ('{differ}');
             INSERT INTO \"{s}\".message_queue_log_data VALUES
                 ('{same}', '\\x01'), ('{same}', '\\x01'), ('{differ}', '\\x01'), ('{differ}', '\\x02');
             NOTIFY \"{s}\";
             COMMIT;"
        ))
        .await
        .unwrap();
    consumer.wait_for_all(std::slice::from_ref(&same)).await;
    let (_, reason) = wait_parked(&env, &differ).await;
    assert!(reason.contains("several data rows"), "{reason}");
    let good = good_events_flow(&env, &consumer).await;
    assert_exactly_once(&consumer, &[good, vec![same]].concat());
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn oversized_bodies_are_parked_and_large_legal_ones_arrive_intact() {
    let (env, consumer, relay) = setup("oversize", |c| {
        c["relay"]["max_message_bytes"] = 1_500_000.into();
        c["relay"]["max_batch_bytes"] = 1_000_000.into();
    })
    .await;
    let (big, legal, legal2) = (uuid(6), uuid(7), uuid(8));
    env.insert_event(&big, "convert_to(repeat('b', 2000000), 'UTF8')", true)
        .await;
    // Two 1 MiB bodies: more than one batch's byte budget, so they also
    // prove a withheld row simply goes in the next batch.
    env.insert_event(&legal, "decode(repeat('ab', 1048576), 'hex')", true)
        .await;
    env.insert_event(&legal2, "decode(repeat('cd', 1048576), 'hex')", true)
        .await;
    consumer
        .wait_for_all(&[legal.clone(), legal2.clone()])
        .await;
    assert_eq!(consumer.get(&legal).body, vec![0xab; 1_048_576]);
    assert_eq!(consumer.get(&legal2).body, vec![0xcd; 1_048_576]);
    let (_, reason) = wait_parked(&env, &big).await;
    assert!(
        reason.contains("2000000 bytes exceeds relay.max_message_bytes"),
        "{reason}"
    );
    let good = good_events_flow(&env, &consumer).await;
    assert_exactly_once(&consumer, &[good, vec![legal, legal2]].concat());
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn a_body_the_claim_withheld_is_fetched_apart_and_published_in_the_same_batch() {
    // The claim reads bodies while its byte count stays within
    // max_batch_bytes; the plan counts only bodies it publishes. A body
    // under an id too long for AMQP counts for the claim but not the plan,
    // so the claim withholds "c-" while the plan publishes it.
    let env = TestEnv::new("withheld").await;
    env.create_seed_tables("text", "bytea").await;
    let mut env = env;
    env.config["relay"]["max_message_bytes"] = 2000.into();
    env.config["relay"]["max_batch_bytes"] = 3000.into();
    let s = &env.name;
    let long = format!("a-{}", "L".repeat(300));
    env.pg
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO \"{s}\".message_queue_log (message_id) VALUES ('{long}'), ('b-1'), ('c-1');
             INSERT INTO \"{s}\".message_queue_log_data VALUES
                 ('{long}', decode(repeat('aa', 1500), 'hex')),
                 ('b-1', decode(repeat('bb', 1500), 'hex')),
                 ('c-1', decode(repeat('cc', 1500), 'hex'));
             COMMIT;"
        ))
        .await
        .unwrap();
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let published = ["b-1".to_owned(), "c-1".to_owned()];
    consumer.wait_for_all(&published).await;
    assert_eq!(consumer.get("b-1").body, vec![0xbb; 1500]);
    assert_eq!(consumer.get("c-1").body, vec![0xcc; 1500]);
    // Published at its first attempt: never held for a missing body.
    wait_until("c-1 is marked", || async { env.row_state("c-1").await.3 }).await;
    assert_eq!(env.row_state("c-1").await, (0, None, false, true));
    let (attempts, reason, _, transferred) = env.row_state(&long).await;
    assert!(attempts >= 1 && !transferred, "{attempts} {transferred}");
    assert!(reason.unwrap().contains("longer than 255 bytes"));
    assert_exactly_once(&consumer, &published);
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn an_id_too_long_for_amqp_is_parked_not_crashing_the_relay() {
    let env = TestEnv::new("longid").await;
    env.create_seed_tables("text", "bytea").await;
    let mut env = env;
    env.config["relay"]["max_attempts"] = 2.into();
    env.config["relay"]["attempt_delay_ms"] = 50.into();
    let consumer = env.consumer().await;
    let mut relay = env.relay().await;
    let long = "L".repeat(300);
    env.insert_event(&long, "'\\x01'::bytea", true).await;
    let (_, reason) = wait_parked(&env, &long).await;
    assert!(reason.contains("longer than 255 bytes"), "{reason}");
    env.insert_event("short-id", "'\\x02'::bytea", true).await;
    consumer.wait_for_all(&["short-id".to_owned()]).await;
    assert!(relay.is_running());
    assert_exactly_once(&consumer, &["short-id".to_owned()]);
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn a_row_with_null_transferred_is_still_pending_and_delivered() {
    let (env, consumer, relay) = setup("nulltransferred", |_| {}).await;
    let id = uuid(9);
    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "INSERT INTO \"{s}\".message_queue_log (message_id, transferred) VALUES ('{id}', NULL);
             INSERT INTO \"{s}\".message_queue_log_data VALUES ('{id}', '\\x03');
             NOTIFY \"{s}\";"
        ))
        .await
        .unwrap();
    consumer.wait_for_all(std::slice::from_ref(&id)).await;
    wait_until("the row is marked", || async { env.row_state(&id).await.3 }).await;
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn a_deleted_queue_is_declared_again_and_its_rows_wait_uncharged() {
    let (env, consumer, relay) = setup("noroute", |_| {}).await;
    let before = good_events_flow(&env, &consumer).await;
    drop(consumer);
    env.cleanup_queue_only().await;
    let id = uuid(10);
    env.insert_event(&id, "'\\x04'::bytea", true).await;
    // The consumer would declare the queue too: wait for the relay's.
    wait_until("the relay declared the queue again", || async {
        queue_exists(&env.name).await
    })
    .await;
    let consumer = env.consumer().await;
    consumer.wait_for_all(std::slice::from_ref(&id)).await;
    wait_until("nothing is pending", || async { env.pending().await == 0 }).await;
    // A configured route that routes nowhere is the topology's fault, not
    // the row's: no attempt is charged.
    assert_eq!(env.row_state(&id).await, (0, None, false, true));
    let after = good_events_flow(&env, &consumer).await;
    assert_exactly_once(&consumer, &[after, vec![id]].concat());
    drop(before);
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

/// The row-level log lines keep the `target` operators filter and alert on
/// (`pushoccurrence::worker`: a text line's prefix, JSON's `target` field), wherever in
/// the worker the line is written.
#[tokio::test]
async fn a_failed_and_a_parked_row_are_logged_under_the_worker_s_target() {
    let (env, _consumer, relay) = setup("logtarget", |_| {}).await;
    let id = uuid(1);
    env.insert_event(&id, "NULL", true).await;
    wait_parked(&env, &id).await;
    // The batch logs its rows once it has committed: just after the row
    // reads as parked.
    let logged = |message: &str| {
        relay
            .log_text()
            .lines()
            .any(|line| line.contains(&id) && line.contains(message))
    };
    for message in [
        "pushoccurrence::worker: row failed; it will be retried after a delay",
        "pushoccurrence::worker: row parked after repeated failures",
    ] {
        wait_until(&format!("a line '{message}'"), || async { logged(message) }).await;
    }
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}
