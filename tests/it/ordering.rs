//! Per-key ordering: rows with an `ordering_key` reach the consumer in
//! their insert order (first deliveries), with several relays and
//! concurrent producers; a row that cannot go holds back its key only, until
//! an operator requeues or discards it; what the broker can still break
//! (an earlier row returned after a later one was confirmed) is counted.

use std::time::{Duration, Instant};

use tokio_postgres::GenericClient;

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
    env.prepare_claim_as_the_relay(false).await;
    let plan = env
        .texts(
            "EXPLAIN EXECUTE claim(128, 1000000, 16000000, '{}', 256)",
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

/// While no keyed row is left, the relay claims with a cheaper statement
/// that takes unkeyed rows only. Keyed rows written while it is in use are
/// passed over, never taken out of their key's order: here a follower is
/// due while its head waits out a retry delay, and a claim of unkeyed rows
/// that took keyed ones would send the follower first.
#[tokio::test]
async fn keyed_rows_written_to_an_outbox_without_keys_wait_for_their_head() {
    let env = TestEnv::new("orderlatekeys").await;
    env.migrate().await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let unkeyed = env.push_keyed(&env.pg, None, "unkeyed").await;
    consumer.wait_for_all(std::slice::from_ref(&unkeyed)).await;

    let mut producer = pg().await;
    let tx = producer.transaction().await.unwrap();
    let head = env.push_keyed(&tx, Some("K"), "k1").await;
    let follower = env.push_keyed(&tx, Some("K"), "k2").await;
    tx.execute(
        &format!(
            "UPDATE \"{}\".message_queue_log SET relay_next_attempt_at = now() + interval '1 hour'
              WHERE message_id::text = $1",
            env.name
        ),
        &[&head],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // Any claim that takes this row sees K's rows.
    let after = env.push_keyed(&env.pg, None, "after").await;
    consumer.wait_for_all(std::slice::from_ref(&after)).await;
    // A row reaches the consumer just before its batch marks it.
    wait_until("the unkeyed row is marked", || async {
        env.pending().await <= 2
    })
    .await;
    assert_eq!(env.pending().await, 2, "k1 and k2 wait");
    assert!(
        !consumer.ids().contains(&follower),
        "k2 went out while k1 waited: {:?}",
        consumer.ids()
    );

    let due = update_rows(
        &env,
        "relay_next_attempt_at = NULL",
        &format!("message_id::text = '{head}'"),
    )
    .await;
    assert_eq!(due, 1);
    consumer.wait_for_all(&[head, follower]).await;
    assert_keys_in_order(&consumer, &env.key_orders().await);
    relay.terminate().await;
    env.cleanup().await;
}

/// The first keyed row written to an outbox whose relay claims unkeyed rows
/// only goes on its own NOTIFY: the claim that passes over it is followed at
/// once by one that takes it (here no sweep would come for 10 minutes).
#[tokio::test]
async fn the_first_keyed_row_of_an_outbox_without_keys_goes_on_its_notify() {
    let mut env = TestEnv::new("orderfirstkey").await;
    env.config["rabbitmq"]["retry"]["idle_sleep_ms"] = 600_000.into();
    env.migrate().await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let unkeyed = env.push_keyed(&env.pg, None, "unkeyed").await;
    consumer.wait_for_all(std::slice::from_ref(&unkeyed)).await;
    let keyed = env.push_keyed(&env.pg, Some("K"), "keyed").await;
    consumer.wait_for_all(std::slice::from_ref(&keyed)).await;
    assert_eq!(consumer.count(), 2);
    relay.terminate().await;
    env.cleanup().await;
}

/// Once every keyed row is sent, claims stop reading the ordering index:
/// its entries of sent rows stay until VACUUM, and a claim that looked for
/// keyed rows there stepped over all of them (4 to 22 ms a claim after
/// 100 000 keyed rows on the benchmark's machine). Counted by PostgreSQL's own
/// statistics, flushed as the relay's sessions end; the backlog sampler
/// reads the index once at start and every 5 s, the claims never.
#[tokio::test]
async fn claims_of_an_outbox_whose_keyed_rows_are_all_sent_never_read_the_ordering_index() {
    const ROWS: usize = 30;
    let env = TestEnv::new("orderkeysgone").await;
    env.migrate().await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    push_many(&env, Some("K"), 20).await;
    env.wait_all_transferred().await;
    relay.terminate().await;
    let before = ordering_index_scans(&env).await;

    let started = Instant::now();
    let relay = env.relay().await;
    let mut ids = Vec::new();
    for n in 0..ROWS {
        // One at a time: each its own claim.
        ids.push(env.push_keyed(&env.pg, None, &format!("u{n}")).await);
        consumer.wait_for_all(&ids).await;
    }
    relay.terminate().await;
    let samples = 2 + started.elapsed().as_secs() / 5;
    let scans = ordering_index_scans(&env).await - before;
    assert!(
        scans <= samples as i64,
        "{ROWS} claims of unkeyed rows read the ordering index {scans} times (backlog samples: at most {samples})"
    );
    assert_eq!(consumer.count(), 20 + ROWS);
    env.cleanup().await;
}

/// Insert order is not commit order: a keyed row written before a backlog
/// of unkeyed rows, and committed while the relay drains that backlog with
/// claims of unkeyed rows, sorts before their position. Like any row
/// committed late, it goes when the claims reach the end of the backlog and
/// start over from the oldest row, and its key stays in order. (A release
/// that probed the ordering index for keyed rows found it at once, for
/// 4 to 22 ms a claim after 100 000 sent keyed rows.)
#[tokio::test]
async fn a_keyed_row_committed_behind_the_claims_position_goes_when_they_start_over() {
    let mut env = TestEnv::new("orderlatecommit").await;
    env.config["rabbitmq"]["retry"]["idle_sleep_ms"] = 600_000.into();
    env.config["relay"]["batch_size"] = 10.into();
    env.migrate().await;
    let consumer = env.consumer().await;
    let mut producer = pg().await;
    let tx = producer.transaction().await.unwrap();
    let late = env.push_keyed(&tx, Some("K"), "late").await;
    push_many(&env, None, 3000).await;
    let relay = env.relay().await;
    wait_until("the relay drains the backlog with plain claims", || async {
        consumer.count() >= 100
    })
    .await;
    tx.commit().await.unwrap();
    // Rows written after the keyed row committed: a marker, and more
    // backlog behind it, so the marker is not near the backlog's end.
    let mut writer = pg().await;
    let after = writer.transaction().await.unwrap();
    let marker = env
        .push_keyed(&after, None, "written after the keyed row committed")
        .await;
    push_many_on(&after, &env.name, None, 2000).await;
    after.commit().await.unwrap();
    consumer.wait_for_all(&[late, marker]).await;
    env.wait_all_transferred().await;
    assert_eq!(consumer.count(), 5002);
    assert_keys_in_order(&consumer, &env.key_orders().await);
    relay.terminate().await;
    env.cleanup().await;
}

/// How often the outbox's ordering index was read, once the relay's
/// sessions have ended (a session's counts reach the statistics when it
/// ends, at the latest).
async fn ordering_index_scans(env: &TestEnv) -> i64 {
    wait_until("the relay's sessions have ended", || async {
        env.relay_sessions().await == 0
    })
    .await;
    env.pg
        .query_one(
            "SELECT idx_scan FROM pg_stat_user_indexes
              WHERE schemaname = $1 AND indexrelname = 'message_queue_log_ordering_key_idx'",
            &[&env.name],
        )
        .await
        .unwrap()
        .get(0)
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
    // u2 is marked once its batch commits, just after the broker has it.
    env.wait_all_transferred_but(3).await;
    let received = consumer.ids();
    assert!(
        !received.contains(&a2) && !received.contains(&a3),
        "{received:?}"
    );

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

/// Rows held behind a parked row of their key cannot be claimed: they are
/// not claimable in the backlog sample, and a relay left with only them is
/// idle, not stalled.
#[tokio::test]
async fn rows_held_behind_a_parked_row_of_their_key_leave_the_relay_ready() {
    let mut env = TestEnv::new("orderready").await;
    env.config["admin"]["stall_after_sec"] = 1.into();
    env.config["relay"]["max_attempts"] = 1.into();
    env.migrate().await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let admin = relay.admin().await;
    let head = crate::support::uuid(1);
    insert_bodiless(&env, &head, "H").await;
    let behind = [
        env.push_keyed(&env.pg, Some("H"), "h2").await,
        env.push_keyed(&env.pg, Some("H"), "h3").await,
    ];
    let other = env.push_keyed(&env.pg, Some("O"), "o1").await;
    consumer.wait_for_all(std::slice::from_ref(&other)).await;
    wait_until("the head is parked", || async {
        env.row_state(&head).await.2
    })
    .await;
    let answers = std::cell::RefCell::new(Vec::new());
    // The oldest held row's age, as the relay samples it, is the clock:
    // three stall times after the parking.
    wait_until("the held rows have waited three stall times", || async {
        let answer = crate::support::http_get(&admin, "/readyz").await;
        answers.borrow_mut().push(answer);
        let text = crate::support::http_get(&admin, "/metrics").await.1;
        let metric = |name| crate::support::metric(&text, name);
        metric("pushoccurrence_pending_rows") == Some(2.0)
            && metric("pushoccurrence_claimable_rows") == Some(0.0)
            && metric("pushoccurrence_oldest_pending_age_seconds").is_some_and(|age| age >= 3.0)
    })
    .await;
    let mut answers = answers.into_inner();
    answers.push(crate::support::http_get(&admin, "/readyz").await);
    assert!(
        answers.iter().all(|a| *a == (200, "ready\n".to_owned())),
        "{answers:?}"
    );
    assert!(behind.iter().all(|id| !consumer.ids().contains(id)));
    relay.terminate().await;
    env.cleanup().await;
}

/// `UPDATE`s rows of this env's outbox: `set` and `filter` are SQL.
async fn update_rows(env: &TestEnv, set: &str, filter: &str) -> u64 {
    env.pg
        .execute(
            &format!(
                "UPDATE \"{}\".message_queue_log SET {set} WHERE {filter}",
                env.name
            ),
            &[],
        )
        .await
        .unwrap()
}

/// A producer that writes `relay_enqueued_at` itself may leave it NULL;
/// such a row sorts first in its key (`NULLS FIRST`), so when it is parked it
/// holds back every other row of the key, and `parked` must say how many.
#[tokio::test]
async fn a_parked_row_without_an_enqueued_time_counts_the_rows_it_holds_back() {
    let env = TestEnv::new("ordernulltime").await;
    env.migrate().await;
    let first = crate::support::uuid(1);
    insert_bodiless(&env, &first, "N").await;
    update_rows(
        &env,
        "relay_enqueued_at = NULL, relay_parked_at = now(), relay_attempts = 1, relay_last_error = 'no data row'",
        &format!("message_id = '{first}'"),
    )
    .await;
    env.push_keyed(&env.pg, Some("N"), "n2").await;
    env.push_keyed(&env.pg, Some("N"), "n3").await;
    let (code, parked) = env.command(&["parked"]).await;
    assert_eq!(code, Some(0), "{parked}");
    assert!(
        parked.contains("\tordering_key=N\tholds_back=2\treason=no data row"),
        "{parked}"
    );
    env.cleanup().await;
}

/// A key is stored in a btree index (with the row's time and id), whose
/// entries are at most 2704 bytes: a longer key that does not compress
/// failed the producer's insert with an error about an index row size.
#[tokio::test]
async fn push_occurrence_refuses_a_key_too_long_for_the_ordering_index_in_words() {
    let env = TestEnv::new("orderlongkey").await;
    env.migrate().await;
    let key_sql = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 100) i)";
    let error = env
        .pg
        .query_one(
            &format!(
                "SELECT \"{}\".push_occurrence('\\x01', p_ordering_key => {key_sql})::text",
                env.name
            ),
            &[],
        )
        .await
        .expect_err("a 3200-byte key cannot be indexed");
    let message = error.as_db_error().map(|e| e.message().to_owned());
    assert_eq!(
        message.as_deref(),
        Some("ordering_key is 3200 bytes long; at most 1024 bytes are allowed"),
        "{error:?}"
    );
    // A key within the limit goes, however little it compresses.
    let consumer = env.consumer().await;
    let key: String = env
        .pg
        .query_one(
            "SELECT string_agg(md5(i::text), '') FROM generate_series(1, 32) i",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key.len(), 1024);
    let id = env.push_keyed(&env.pg, Some(&key), "long key").await;
    let relay = env.relay().await;
    consumer.wait_for_all(std::slice::from_ref(&id)).await;
    relay.terminate().await;
    env.cleanup().await;
}

/// Writes `n` events of `key` (unkeyed when `None`) in one statement.
async fn push_many(env: &TestEnv, key: Option<&str>, n: i32) {
    push_many_on(&env.pg, &env.name, key, n).await;
}

/// [`push_many`] on `client`, inside its transaction if it has one.
async fn push_many_on(
    client: &(impl GenericClient + Sync),
    schema: &str,
    key: Option<&str>,
    n: i32,
) {
    client
        .execute(
            &format!(
                "SELECT \"{schema}\".push_occurrence(convert_to('many ' || i, 'UTF8'), p_ordering_key => $1::text)
                   FROM generate_series(1, $2::int) i"
            ),
            &[&key, &n],
        )
        .await
        .unwrap();
}

/// Rows waiting out a retry delay (an unroutable backlog, say) are not
/// claimable; a row written after them must still go on its NOTIFY, as it
/// did before ordering (the claim skipped rows not due in its scan). No
/// sweep runs during the test (`idle_sleep_ms` is 10 minutes).
#[tokio::test]
async fn a_row_behind_rows_waiting_out_a_retry_delay_goes_on_its_notify() {
    let mut env = TestEnv::new("orderdelayed").await;
    env.config["rabbitmq"]["retry"]["idle_sleep_ms"] = 600_000.into();
    env.config["relay"]["batch_size"] = 10.into();
    env.migrate().await;
    let consumer = env.consumer().await;
    push_many(&env, None, 2000).await;
    let delayed = update_rows(
        &env,
        "relay_attempts = 1, relay_next_attempt_at = now() + interval '1 hour'",
        "true",
    )
    .await;
    assert_eq!(delayed, 2000);
    let relay = env.relay().await;
    let after = env
        .push_keyed(&env.pg, None, "after the delayed ones")
        .await;
    consumer.wait_for_all(std::slice::from_ref(&after)).await;
    assert_eq!(consumer.count(), 1, "the delayed rows stay");
    relay.terminate().await;
    env.cleanup().await;
}

/// A parked head holds its key's backlog; rows of other keys written after
/// that backlog still go on their NOTIFY. A claim that finds nothing in a
/// full window doubles the next one's (up to 64 batch sizes), so the held
/// backlog is crossed in a few claims; with windows of a fixed size (16 per
/// wake-up) a row behind 2000 held rows was not sent within 60 s with no
/// sweep.
#[tokio::test]
async fn a_row_behind_a_parked_keys_backlog_goes_on_its_notify() {
    let mut env = TestEnv::new("orderheldlog").await;
    env.config["rabbitmq"]["retry"]["idle_sleep_ms"] = 600_000.into();
    env.config["relay"]["batch_size"] = 10.into();
    env.migrate().await;
    let consumer = env.consumer().await;
    let head = crate::support::uuid(1);
    insert_bodiless(&env, &head, "H").await;
    update_rows(
        &env,
        "relay_parked_at = now(), relay_attempts = 1, relay_last_error = 'no data row'",
        &format!("message_id = '{head}'"),
    )
    .await;
    push_many(&env, Some("H"), 2000).await;
    let relay = env.relay().await;
    let other = env.push_keyed(&env.pg, Some("O"), "other key").await;
    let unkeyed = env.push_keyed(&env.pg, None, "unkeyed").await;
    consumer.wait_for_all(&[other, unkeyed]).await;
    assert_eq!(consumer.count(), 2, "the held key stays held");
    relay.terminate().await;
    env.cleanup().await;
}

/// Two relays claim through PgBouncer in transaction mode (consecutive
/// transactions on other server sessions), and producers write through it
/// too (the key lock is transaction-level, so it works there): every key
/// still arrives in order.
#[tokio::test]
async fn keys_stay_in_order_through_a_transaction_pooler() {
    let bouncer =
        crate::pooler::PgBouncer::start_with("transaction", "server_round_robin = 1").await;
    let mut env = TestEnv::new("orderpgb").await;
    env.config["relay"]["batch_size"] = 10.into();
    env.migrate().await;
    env.config["postgres"]["port"] = bouncer.port.into();
    env.config["postgres"]["pooler"] = "transaction".into();
    env.config["postgres"]["auto_migrate"] = false.into();
    env.config["listener"]["host"] = "127.0.0.1".into();
    env.config["listener"]["port"] = crate::support::pg_port().into();
    let consumer = env.consumer().await;
    let relays = env.relays_at_once(2).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(bouncer.session("test").await);
    }
    let producers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(p, mut client)| {
            let schema = env.name.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for t in 0..60 {
                    let tx = client.transaction().await.unwrap();
                    let id: String = tx
                        .query_one(
                            &format!(
                                "SELECT \"{schema}\".push_occurrence(convert_to($1::text, 'UTF8'), p_ordering_key => $2::text)::text"
                            ),
                            &[&format!("p{p} t{t}"), &format!("k{}", t % 5)],
                        )
                        .await
                        .unwrap()
                        .get(0);
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
    let tally = assert_keys_in_order(&consumer, &env.key_orders().await);
    assert_eq!(tally.keyed_rows, 180);
    for relay in relays {
        assert_eq!(relay.failed_batches().await, 0.0);
        relay.terminate().await;
    }
    env.cleanup().await;
}

/// What the previous release's `migrate` (run by its relays at start-up,
/// `postgres.auto_migrate`) installs: its twelve-argument helper, replaced
/// by name and signature. Its body does not matter here.
const PREVIOUS_RELEASE_HELPER: &str = "CREATE OR REPLACE FUNCTION {s}.push_occurrence(
        p_message_body bytea, p_message_id uuid DEFAULT NULL, p_channel text DEFAULT NULL,
        p_routing_key text DEFAULT NULL, p_exchange text DEFAULT NULL, p_headers jsonb DEFAULT NULL,
        p_content_type text DEFAULT NULL, p_correlation_id text DEFAULT NULL, p_reply_to text DEFAULT NULL,
        p_message_type text DEFAULT NULL, p_expiration_ms bigint DEFAULT NULL, p_priority smallint DEFAULT NULL)
    RETURNS uuid LANGUAGE sql AS 'SELECT NULL::uuid'";

/// A relay of the previous release (c038d8b) that starts after this
/// release's `migrate` (a rolling upgrade, a rollback) installs its
/// twelve-argument helper again beside this release's thirteen-argument
/// one, and every producer call that does not name `p_ordering_key` fails:
/// observed `function push_occurrence(unknown) is not unique` (seen with
/// the c038d8b binary itself, and here with its helper's signature).
#[tokio::test]
#[ignore = "an earlier release's start-up migrate reinstalls its helper beside this one: unkeyed producer calls fail as ambiguous; documented in README, Ordering, not fixed"]
async fn producers_keep_working_after_a_previous_release_relay_reinstalls_its_helper() {
    let env = TestEnv::new("orderoldhelper").await;
    env.migrate().await;
    env.pg
        .batch_execute(&PREVIOUS_RELEASE_HELPER.replace("{s}", &format!("\"{}\"", env.name)))
        .await
        .unwrap();
    let unkeyed = env
        .pg
        .query_one(
            &format!("SELECT \"{}\".push_occurrence('\\x01')", env.name),
            &[],
        )
        .await;
    assert!(unkeyed.is_ok(), "{unkeyed:?}");
    env.cleanup().await;
}

/// Integer ids order a key by number within one instant (10 after 9, not
/// as text), and a batch's byte budget deferring rows in the middle of a
/// key's run leaves the rest for later, in order: rows written with equal
/// `relay_enqueued_at` (a producer writing the column itself), so only the
/// id orders them, and bodies of 100 bytes against a 250-byte budget.
#[tokio::test]
async fn integer_ids_with_equal_times_and_a_byte_budget_mid_run_keep_each_key_in_order() {
    let mut env = TestEnv::new("orderint").await;
    env.config["relay"]["max_batch_bytes"] = 250.into();
    env.config["relay"]["batch_size"] = 20.into();
    // Two workers per relay: with more, idle workers' walks of the held
    // rows slow the claims (see the ignored hot-key test): one run of this
    // test with 5 workers took 55 s, another 3 s.
    env.config["rabbitmq"]["retry"]["buffer_size"] = 40.into();
    env.create_seed_tables("bigint", "bytea").await;
    env.migrate().await;
    let consumer = env.consumer().await;
    let s = &env.name;
    // Ids 1..=60, keys a/b/c in turn, all at one instant: 9 before 10.
    env.pg
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO \"{s}\".message_queue_log (message_id, ordering_key, relay_enqueued_at)
               SELECT i, (ARRAY['a', 'b', 'c'])[i % 3 + 1], '2026-01-01 00:00:00+00' FROM generate_series(1, 60) i;
             INSERT INTO \"{s}\".message_queue_log_data (message_id, message_body)
               SELECT i, convert_to(rpad(i::text, 100, '.'), 'UTF8') FROM generate_series(1, 60) i;
             COMMIT;"
        ))
        .await
        .unwrap();
    let relays = env.relays_at_once(2).await;
    let ids: Vec<String> = (1..=60).map(|i: i32| i.to_string()).collect();
    consumer.wait_for_all(&ids).await;
    let orders = env.key_orders().await;
    assert_eq!(orders["a"][..4], ["3", "6", "9", "12"], "{orders:?}");
    let tally = assert_keys_in_order(&consumer, &orders);
    assert_eq!(tally.keyed_rows, 60);
    for relay in relays {
        relay.terminate().await;
    }
    env.cleanup().await;
}

/// A message in the middle of a key's run that the broker refuses by
/// closing the channel (its exchange does not exist): the run's later
/// message, published behind it on the closed channel, is not published
/// again ahead of it, and waits while it is parked; other keys go on.
#[tokio::test]
async fn a_message_refused_mid_run_holds_back_the_rest_of_its_run() {
    let mut env = TestEnv::new("orderrefused").await;
    env.config["relay"]["max_attempts"] = 1.into();
    env.migrate().await;
    let consumer = env.consumer().await;
    let s = &env.name;
    let k1 = env.push_keyed(&env.pg, Some("K"), "k1").await;
    let j1 = env.push_keyed(&env.pg, Some("J"), "j1").await;
    let k2: String = env
        .pg
        .query_one(
            &format!(
                "SELECT \"{s}\".push_occurrence('\\x02', p_exchange => 'missing-{s}', p_ordering_key => 'K')::text"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let k3 = env.push_keyed(&env.pg, Some("K"), "k3").await;
    let j2 = env.push_keyed(&env.pg, Some("J"), "j2").await;
    let relay = env.relay().await;
    consumer
        .wait_for_all(&[k1.clone(), j1.clone(), j2.clone()])
        .await;
    wait_until("k2 is parked", || async { env.row_state(&k2).await.2 }).await;
    // A row written after the parking goes: the relay claimed again.
    let u = env.push_keyed(&env.pg, None, "u").await;
    consumer.wait_for_all(std::slice::from_ref(&u)).await;
    assert!(!consumer.ids().contains(&k3), "k3 went before k2");
    assert_eq!(
        relay.metric("pushoccurrence_ordering_breaks_total").await,
        Some(0.0)
    );
    let (code, out) = env.command(&["discard", &k2]).await;
    assert_eq!(code, Some(0), "{out}");
    consumer.wait_for_all(std::slice::from_ref(&k3)).await;
    let received = consumer.ids();
    let at = |id: &String| received.iter().position(|r| r == id).unwrap();
    assert!(at(&k1) < at(&k3) && at(&j1) < at(&j2), "{received:?}");
    assert!(!received.contains(&k2));
    relay.terminate().await;
    env.cleanup().await;
}

/// A hot key's backlog does not hold back a key written after it: the
/// other key's row arrives while the hot key is still draining (counted by
/// the hot rows received before it, not by time). With `batch_size` 10 (10
/// workers) this once drained about 3 rows/s and kept the other row out for
/// over 60 s: idle workers walked windows of hot rows, probing each, under
/// the shared claim-cursor lock. The keys any worker continues are now
/// shared by the relay's claims, which pass over those keys' rows without
/// probing them.
#[tokio::test]
async fn a_row_of_another_key_behind_a_hot_keys_backlog_overtakes_the_backlog() {
    let mut env = TestEnv::new("orderhot").await;
    env.config["relay"]["batch_size"] = 10.into();
    env.migrate().await;
    let consumer = env.consumer().await;
    push_many(&env, Some("hot"), 5000).await;
    let other = env.push_keyed(&env.pg, Some("other"), "other").await;
    let relay = env.relay().await;
    consumer.wait_for_all(std::slice::from_ref(&other)).await;
    // In arrival order (`ids()` is sorted).
    let hot_before = consumer
        .received
        .lock()
        .unwrap()
        .iter()
        .position(|r| r.id == other)
        .unwrap();
    env.wait_all_transferred().await;
    let orders = env.key_orders().await;
    // A row is marked once its batch is confirmed; its delivery to the
    // consumer may come a moment later.
    let all: Vec<String> = orders.values().flatten().cloned().collect();
    consumer.wait_for_all(&all).await;
    assert_keys_in_order(&consumer, &orders);
    eprintln!("hot rows received before the other key's row: {hot_before} of 5000");
    assert!(hot_before < 5000, "{hot_before}");
    relay.terminate().await;
    env.cleanup().await;
}

/// A statement trigger that holds the mark of any batch whose transaction
/// locks `id` (still pending) until the outbox's other batches have marked
/// `rows` more rows, or until the backlog is down to `tail` rows: the
/// interleaving of two busy workers, made certain. One worker's batch
/// holding a row is open while the other worker claims twice.
async fn hold_batches_locking(env: &TestEnv, id: &str, rows: i64, tail: i64) {
    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "CREATE FUNCTION \"{s}\".hold_batches_locking() RETURNS trigger LANGUAGE plpgsql AS $f$
             DECLARE start bigint;
             BEGIN
               IF NOT EXISTS (SELECT 1 FROM \"{s}\".message_queue_log
                               WHERE message_id::text = '{id}' AND transferred IS NOT TRUE
                                 AND xmax::text = (pg_current_xact_id()::text::int8 % 4294967296)::text) THEN
                 RETURN NULL;
               END IF;
               SELECT count(*) INTO start FROM \"{s}\".message_queue_log WHERE transferred;
               WHILE (SELECT count(*) FROM \"{s}\".message_queue_log WHERE transferred) < start + {rows}
                 AND (SELECT count(*) FROM \"{s}\".message_queue_log WHERE transferred IS NOT TRUE) > {tail} LOOP
                 PERFORM pg_sleep(0.005);
               END LOOP;
               RETURN NULL;
             END $f$;
             CREATE TRIGGER hold_batches_locking BEFORE UPDATE ON \"{s}\".message_queue_log
                FOR EACH STATEMENT EXECUTE FUNCTION \"{s}\".hold_batches_locking();"
        ))
        .await
        .unwrap();
}

/// Two workers drain a backlog of unkeyed rows with plain claims; one keyed
/// row sits early in it. The claim of unkeyed rows that meets it hands its
/// worker a start-over, but while that worker's batch is open (publishing,
/// confirming, marking) the other worker's claims go on: the first is a
/// keyed claim from the position, past the keyed row (locked, and behind
/// the position), which takes no keyed row and hands the relay back to
/// plain claims. The start-over claim is then a plain one: it locks the
/// keyed row again, returns only unkeyed rows, and the cycle repeats while
/// the backlog lasts (as it did before the start-over claim was keyed
/// whatever the mode, and kept claims keyed while it waited). The trigger
/// only makes the overlap of two busy workers certain (the open batch
/// waits until the other worker marked two batches). The keyed row goes
/// within a few batches of being met, as with the release that probed for
/// keyed rows.
#[tokio::test]
async fn a_keyed_row_met_by_a_plain_claim_goes_while_another_worker_keeps_claiming() {
    const BATCH: i64 = 10;
    let mut env = TestEnv::new("orderstartover").await;
    env.config["rabbitmq"]["retry"]["idle_sleep_ms"] = 600_000.into();
    env.config["relay"]["batch_size"] = BATCH.into();
    env.config["relay"]["max_workers"] = 2.into();
    env.config["rabbitmq"]["retry"]["buffer_size"] = (2 * BATCH).into();
    env.migrate().await;
    let consumer = env.consumer().await;
    push_many(&env, None, 200).await;
    let keyed = env
        .push_keyed(&env.pg, Some("K"), "met by a plain claim")
        .await;
    push_many(&env, None, 1000).await;
    let after = env
        .texts(
            &format!(
                "SELECT message_id::text FROM \"{s}\".message_queue_log
                  WHERE relay_enqueued_at > (SELECT relay_enqueued_at FROM \"{s}\".message_queue_log
                                              WHERE message_id::text = $1)",
                s = env.name
            ),
            &[&keyed],
        )
        .await;
    assert_eq!(after.len(), 1000);
    hold_batches_locking(&env, &keyed, 2 * BATCH, 4 * BATCH).await;
    let relay = env.relay().await;
    env.wait_all_transferred().await;
    let mut all = after.clone();
    all.push(keyed.clone());
    consumer.wait_for_all(&all).await;
    let arrived: Vec<String> = consumer
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.id.clone())
        .collect();
    let at = arrived.iter().position(|id| *id == keyed).unwrap();
    let overtaken = arrived[..at].iter().filter(|id| after.contains(id)).count();
    assert!(
        overtaken < 200,
        "{overtaken} of the 1000 unkeyed rows written after the keyed row went before it"
    );
    relay.terminate().await;
    env.cleanup().await;
}
