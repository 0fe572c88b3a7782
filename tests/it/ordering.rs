//! Per-key ordering: rows with an `ordering_key` reach the consumer in
//! their insert order (first deliveries), with several relays and
//! concurrent producers; a row that cannot go holds back its key only, until
//! an operator requeues or discards it; what the broker can still break
//! (an earlier row returned after a later one was confirmed) is counted.

use std::time::Duration;

use crate::chaos::{Chaos, KILL_CUT_TERMINATE, assert_written_in_table_order, produce_keyed};
use crate::support::{
    TestEnv, assert_keys_in_order, check_key_order, pg, report_key_order, tally, wait_until,
};

/// Producers write rows of a few keys per transaction (in key order, as
/// the README asks of writers of several keys), one hot key among them,
/// while three relays with small batches share the work.
#[tokio::test]
async fn three_relays_and_concurrent_producers_keep_every_key_in_order() {
    let mut env = TestEnv::new("order3").await;
    env.config["relay"]["batch_size"] = 20.into();
    env.migrate().await;
    let consumer = env.consumer().await;
    let relays = env.relays_at_once(3).await;
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let schema = env.name.clone();
            tokio::spawn(async move {
                let mut client = pg().await;
                let mut ids = Vec::new();
                for t in 0..40 {
                    // The hot key, one of 30 others, and an unkeyed row,
                    // locked in key order.
                    let mut keys = vec![
                        Some("hot".to_owned()),
                        Some(format!("k{:02}", fastrand::u32(0..30))),
                        None,
                    ];
                    keys.sort();
                    let tx = client.transaction().await.unwrap();
                    for key in &keys {
                        for i in 0..3 {
                            let id: String = tx
                                .query_one(
                                    &format!(
                                        "SELECT \"{schema}\".push_occurrence(convert_to($1::text, 'UTF8'), p_ordering_key => $2::text)::text"
                                    ),
                                    &[&format!("p{p} t{t} {key:?} {i}"), key],
                                )
                                .await
                                .unwrap()
                                .get(0);
                            ids.push(id);
                        }
                    }
                    tx.commit().await.unwrap();
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for producer in producers {
        ids.extend(producer.await.unwrap());
    }
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    let orders = env.key_orders().await;
    assert_eq!(orders["hot"].len(), 4 * 40 * 3);
    let tally = assert_keys_in_order(&consumer, &orders);
    assert_eq!(tally.keyed_rows, 4 * 40 * 3 * 2);
    for relay in relays {
        assert_eq!(relay.failed_batches().await, 0.0);
        relay.terminate().await;
    }
    env.cleanup().await;
}

/// The checker under the faults of issue 14's proof, kept short for CI:
/// three relays with small batches (so a key's rows span batches and
/// relays) share the work while two producers write a hot key, 50 others
/// and unkeyed rows; a relay is killed, the broker connection cut and the
/// relays' sessions terminated, in turn and then at random, every 1-2 s for
/// 10 s. Every key's first deliveries must be in order and nothing lost;
/// duplicates are counted.
#[tokio::test]
async fn keys_stay_in_order_while_relays_are_killed_cut_off_and_terminated() {
    let mut env = TestEnv::new("orderchaos").await;
    env.config["relay"]["batch_size"] = 20.into();
    env.migrate().await;
    let consumer = env.consumer().await;
    let mut chaos = Chaos::start(&mut env, 3).await;
    let length = Duration::from_secs(10);
    let until = std::time::Instant::now() + length;
    let producers = [
        produce_keyed(&env, 50, 20, until),
        produce_keyed(&env, 50, 20, until),
    ];
    chaos
        .run(&env, &KILL_CUT_TERMINATE, length, 1000..2000)
        .await;
    let mut written = Vec::new();
    for producer in producers {
        written.push(producer.await.unwrap());
    }
    let ids: Vec<String> = written.iter().flatten().map(|(_, id)| id.clone()).collect();
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    for fault in KILL_CUT_TERMINATE {
        assert!(chaos.faults.contains_key(fault), "{:?}", chaos.faults);
    }
    let t = tally(&consumer, &ids);
    eprintln!("faults {:?}: {t:?}", chaos.faults);
    assert_eq!((t.lost, t.unexpected), (0, 0), "{t:?}");
    let orders = env.key_orders().await;
    for rows in &written {
        assert_written_in_table_order(rows, &orders);
    }
    let order = check_key_order(&consumer, &orders);
    assert!(order.keys > 1 && orders["hot"].len() >= 3, "{order:?}");
    report_key_order("ordering under faults", &order);
    chaos.stop().await;
    env.cleanup().await;
}

/// A claim probes each window row for an earlier untransferred row of its
/// key walking the ordering index backwards from the row: forwards, from
/// the key's first entry, it stepped over every row of the key transferred
/// since the last vacuum, once per window row, and a hot key's claims grew
/// with the drain (250 ms after 4 000 rows; docs/benchmarks.md).
#[tokio::test]
async fn a_claim_probes_a_key_backwards_from_each_row() {
    let env = TestEnv::new("orderplan").await;
    env.migrate().await;
    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "INSERT INTO \"{s}\".message_queue_log (message_id, ordering_key, transferred)
                  SELECT gen_random_uuid(), 'hot', i <= 4000 FROM generate_series(1, 5000) i ORDER BY i"
        ))
        .await
        .unwrap();
    let outbox = pushoccurrence::db::outbox::Outbox::inspect(&env.pg, s)
        .await
        .unwrap();
    for (setting, value) in pushoccurrence::db::CLAIM_SESSION_SETTINGS {
        env.pg
            .batch_execute(&format!("SET {setting} = {value}"))
            .await
            .unwrap();
    }
    env.pg
        .batch_execute(&format!(
            "PREPARE claim(int8, int8, int8, text[]) AS {}",
            outbox.claim_sql(false)
        ))
        .await
        .unwrap();
    let plan = env
        .texts(
            "EXPLAIN EXECUTE claim(128, 1000000, 16000000, '{hot}')",
            &[],
        )
        .await
        .join("\n");
    assert!(
        plan.contains("Scan Backward using message_queue_log_ordering_key_idx"),
        "{plan}"
    );
    env.cleanup().await;
}

/// Transactions on one key that stay open a while after writing: without
/// the producer helper's key lock, one that wrote first could commit last,
/// after the relay sent a later row of the key.
#[tokio::test]
async fn producers_holding_their_transactions_open_on_one_key_still_deliver_in_order() {
    let env = TestEnv::new("orderopen").await;
    env.migrate().await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let producers: Vec<_> = (0..6)
        .map(|p| {
            let schema = env.name.clone();
            tokio::spawn(async move {
                let mut client = pg().await;
                let mut ids = Vec::new();
                for t in 0..15 {
                    let tx = client.transaction().await.unwrap();
                    let id: String = tx
                        .query_one(
                            &format!(
                                "SELECT \"{schema}\".push_occurrence(convert_to($1::text, 'UTF8'), p_ordering_key => 'one')::text"
                            ),
                            &[&format!("p{p} t{t}")],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..15))).await;
                    tx.commit().await.unwrap();
                    ids.push(id);
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for producer in producers {
        ids.extend(producer.await.unwrap());
    }
    consumer.wait_for_all(&ids).await;
    let orders = env.key_orders().await;
    assert_eq!(orders["one"].len(), 6 * 15);
    assert_keys_in_order(&consumer, &orders);
    relay.terminate().await;
    env.cleanup().await;
}

/// A head's run (its key's following rows, claimed with it) stops at the
/// first row that is not due or that another session holds locked: a row
/// after it must not go out before it.
#[tokio::test]
async fn a_run_stops_at_a_row_not_yet_due_or_locked_elsewhere() {
    let env = TestEnv::new("orderrun").await;
    env.migrate().await;
    let consumer = env.consumer().await;
    let mut a = Vec::new();
    let mut b = Vec::new();
    for i in 1..=3 {
        a.push(env.push_keyed(&env.pg, Some("A"), &format!("a{i}")).await);
    }
    for i in 1..=4 {
        b.push(env.push_keyed(&env.pg, Some("B"), &format!("b{i}")).await);
    }
    let s = &env.name;
    env.pg
        .execute(
            &format!(
                "UPDATE \"{s}\".message_queue_log SET relay_next_attempt_at = now() + interval '1 hour'
                  WHERE message_id::text = $1"
            ),
            &[&a[1]],
        )
        .await
        .unwrap();
    let mut holder = pg().await;
    let held = holder.transaction().await.unwrap();
    held.execute(
        &format!("SELECT 1 FROM \"{s}\".message_queue_log WHERE message_id::text = $1 FOR UPDATE"),
        &[&b[2]],
    )
    .await
    .unwrap();
    let relay = env.relay().await;
    consumer
        .wait_for_all(&[a[0].clone(), b[0].clone(), b[1].clone()])
        .await;
    wait_until("a1, b1 and b2 are marked", || async {
        env.pending().await <= 4
    })
    .await;
    assert_eq!(env.pending().await, 4, "a2, a3, b3 and b4 wait");
    let received = consumer.ids();
    assert!(
        !received.contains(&a[2]) && !received.contains(&b[3]),
        "a row behind one not due or locked went out: {received:?}"
    );

    held.rollback().await.unwrap();
    env.pg
        .execute(
            &format!(
                "UPDATE \"{s}\".message_queue_log SET relay_next_attempt_at = NULL WHERE message_id::text = $1"
            ),
            &[&a[1]],
        )
        .await
        .unwrap();
    // The relay sweeps every idle_sleep_ms; no notification is needed.
    consumer
        .wait_for_all(&[a.clone(), b.clone()].concat())
        .await;
    assert_keys_in_order(&consumer, &env.key_orders().await);
    relay.terminate().await;
    env.cleanup().await;
}

/// Inserts a status row of `key` without a data row: bad input the relay
/// retries, then parks.
async fn insert_bodiless(env: &TestEnv, id: &str, key: &str) {
    env.pg
        .execute(
            &format!(
                "INSERT INTO \"{}\".message_queue_log (message_id, ordering_key) VALUES ('{id}', $1)",
                env.name
            ),
            &[&key],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_parked_row_holds_back_its_key_and_only_its_key_until_it_is_requeued() {
    let mut env = TestEnv::new("orderheld").await;
    env.config["relay"]["max_attempts"] = 2.into();
    env.config["relay"]["attempt_delay_ms"] = 50.into();
    env.migrate().await;
    let consumer = env.consumer().await;
    let a1 = crate::support::uuid(1);
    insert_bodiless(&env, &a1, "A").await;
    let b1 = env.push_keyed(&env.pg, Some("B"), "b1").await;
    let a2 = env.push_keyed(&env.pg, Some("A"), "a2").await;
    let u1 = env.push_keyed(&env.pg, None, "u1").await;
    let b2 = env.push_keyed(&env.pg, Some("B"), "b2").await;
    let a3 = env.push_keyed(&env.pg, Some("A"), "a3").await;
    let relay = env.relay().await;
    consumer
        .wait_for_all(&[b1.clone(), b2.clone(), u1.clone()])
        .await;
    wait_until("a1 is parked", || async { env.row_state(&a1).await.2 }).await;
    // A row written after the parking goes: the relay claimed again, and
    // a2 and a3 are still held.
    let u2 = env.push_keyed(&env.pg, None, "u2").await;
    consumer.wait_for_all(std::slice::from_ref(&u2)).await;
    let received = consumer.ids();
    assert!(
        !received.contains(&a2) && !received.contains(&a3),
        "{received:?}"
    );
    assert_eq!(env.pending().await, 3, "a1, a2 and a3");

    let (code, status) = env.command(&["status"]).await;
    assert_eq!(code, Some(0), "{status}");
    assert!(
        status.contains("held ordering keys        1 (a parked row holds back the rest of its key"),
        "{status}"
    );
    let (code, parked) = env.command(&["parked"]).await;
    assert_eq!(code, Some(0), "{parked}");
    assert!(
        parked.contains(&format!("{a1}\tattempts=2\tparked_at=")),
        "{parked}"
    );
    assert!(
        parked.contains("\tordering_key=A\tholds_back=2\treason=no data row"),
        "{parked}"
    );

    // Fixed and requeued: the key goes on, in order.
    env.pg
        .execute(
            &format!(
                "INSERT INTO \"{}\".message_queue_log_data VALUES ('{a1}', 'a1')",
                env.name
            ),
            &[],
        )
        .await
        .unwrap();
    let (code, out) = env.command(&["requeue", &a1]).await;
    assert_eq!(code, Some(0), "{out}");
    consumer
        .wait_for_all(&[a1.clone(), a2.clone(), a3.clone()])
        .await;
    assert_keys_in_order(&consumer, &env.key_orders().await);
    let (_, status) = env.command(&["status"]).await;
    assert!(status.contains("held ordering keys        0\n"), "{status}");
    relay.terminate().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_discarded_row_lets_its_key_go_on_and_stays_marked_as_never_sent() {
    let mut env = TestEnv::new("orderdiscard").await;
    env.config["relay"]["max_attempts"] = 1.into();
    env.migrate().await;
    let consumer = env.consumer().await;
    let c1 = crate::support::uuid(1);
    insert_bodiless(&env, &c1, "C").await;
    let c2 = env.push_keyed(&env.pg, Some("C"), "c2").await;
    let relay = env.relay().await;
    wait_until("c1 is parked", || async { env.row_state(&c1).await.2 }).await;
    let (code, out) = env.command(&["discard", &c2]).await;
    assert_eq!(code, Some(1), "a pending row is not discarded: {out}");
    assert!(
        out.contains("not parked (still pending; the relay sends it), left alone"),
        "{out}"
    );
    let (code, out) = env.command(&["discard", &c1]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("discarded 1 row(s)"), "{out}");
    consumer.wait_for_all(std::slice::from_ref(&c2)).await;
    assert!(!consumer.ids().contains(&c1));
    let (_, error, parked_at_kept, transferred) = env.row_state(&c1).await;
    assert!(transferred && parked_at_kept, "transferred, never sent");
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.starts_with("discarded by an operator; no data row")),
        "{error:?}"
    );
    let (_, parked) = env.command(&["parked"]).await;
    assert!(parked.contains("no parked rows"), "{parked}");
    relay.terminate().await;
    env.cleanup().await;
}

/// Rows of a key go out together; when the broker returns an earlier one as
/// unroutable and confirms a later one, the consumer sees the later one
/// first. That cannot be undone, so it is counted and logged.
#[tokio::test]
async fn a_later_row_confirmed_after_an_earlier_one_came_back_unroutable_is_counted() {
    let env = TestEnv::new("orderbreak").await;
    env.migrate().await;
    let consumer = env.consumer().await;
    let s = &env.name;
    let first: String = env
        .pg
        .query_one(
            &format!(
                "SELECT \"{s}\".push_occurrence('\\x01', p_exchange => 'amq.direct',
                        p_routing_key => 'nowhere-{s}', p_ordering_key => 'K')::text"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let second = env.push_keyed(&env.pg, Some("K"), "second").await;
    let relay = env.relay().await;
    consumer.wait_for_all(std::slice::from_ref(&second)).await;
    wait_until("the break is counted", || async {
        relay
            .metric("pushoccurrence_ordering_breaks_total")
            .await
            .unwrap_or(0.0)
            == 1.0
    })
    .await;
    let log = relay.log_text();
    assert!(
        log.contains("consumers may see the earlier one after it")
            && log.contains(&first)
            && log.contains("returned as unroutable"),
        "{log}"
    );
    relay.terminate().await;
    env.cleanup().await;
}
