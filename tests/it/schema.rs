//! The user's own schema under a running relay: a row the database refuses
//! to update (a CHECK constraint, an audit trigger), a body column whose
//! type changes, a row whose attempts count is far past the usual. Each is
//! handled by the bad-input rule or by reading the outbox again, and the
//! rows beside it are delivered and marked once.

use std::collections::HashMap;

use crate::support::*;

/// Writes rows in one transaction (so the first claim takes them
/// together): `(id, Some(body SQL))` is an event, `(id, None)` a log row
/// without a data row.
async fn insert_rows(env: &TestEnv, rows: &[(&str, Option<&str>)]) {
    let s = &env.name;
    let mut sql = String::from("BEGIN;");
    for (id, body) in rows {
        sql.push_str(&format!(
            "INSERT INTO \"{s}\".message_queue_log (message_id) VALUES ('{id}');"
        ));
        if let Some(body) = body {
            sql.push_str(&format!(
                "INSERT INTO \"{s}\".message_queue_log_data (message_id, message_body) VALUES ('{id}', {body});"
            ));
        }
    }
    sql.push_str("COMMIT;");
    env.pg.batch_execute(&sql).await.unwrap();
}

/// Asserts how often each id arrived (and that nothing else did).
fn assert_counts(consumer: &Consumer, expected: &[(&str, usize)]) {
    let counts = consumer.counts();
    let want: HashMap<String, usize> = expected
        .iter()
        .map(|(id, n)| ((*id).to_owned(), *n))
        .collect();
    assert_eq!(counts, want);
}

/// A relay that parks after 3 attempts, 50 ms apart at first.
async fn env_with_attempts(tag: &str) -> TestEnv {
    let mut env = TestEnv::new(tag).await;
    env.config["relay"]["max_attempts"] = 3.into();
    env.config["relay"]["attempt_delay_ms"] = 50.into();
    env.migrate().await;
    env
}

#[tokio::test]
async fn a_row_whose_mark_is_refused_is_charged_and_parked_while_its_batch_is_marked_once() {
    let env = env_with_attempts("markrefused").await;
    let s = &env.name;
    let (good1, bad, good2) = (uuid(1), uuid(2), uuid(3));
    // Refuses only marking the one row: recording its failure still works.
    env.pg
        .batch_execute(&format!(
            "ALTER TABLE \"{s}\".message_queue_log ADD CONSTRAINT audit_refuses
                 CHECK (transferred IS NOT TRUE OR message_id <> '{bad}')"
        ))
        .await
        .unwrap();
    insert_rows(
        &env,
        &[
            (&good1, Some("'\\x01'")),
            (&bad, Some("'\\x02'")),
            (&good2, Some("'\\x03'")),
        ],
    )
    .await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;

    wait_until(&format!("{bad} is parked"), || async {
        env.row_state(&bad).await.2
    })
    .await;
    let (attempts, reason, _, transferred) = env.row_state(&bad).await;
    let reason = reason.unwrap_or_default();
    assert_eq!(attempts, 3);
    assert!(!transferred);
    assert!(
        reason.contains("audit_refuses") && reason.contains("23514"),
        "{reason}"
    );
    env.wait_all_transferred_but(1).await;
    // Each attempt published the row and the broker confirmed it.
    wait_until("the refused row arrived three times", || async {
        consumer.counts().get(&bad).copied() == Some(3)
    })
    .await;
    let fresh = env.insert_many(5, 5).await;
    consumer.wait_for_all(&fresh).await;
    env.wait_all_transferred_but(1).await;
    let mut expected = vec![(good1.as_str(), 1), (bad.as_str(), 3), (good2.as_str(), 1)];
    expected.extend(fresh.iter().map(|id| (id.as_str(), 1)));
    assert_counts(&consumer, &expected);
    assert!(
        relay
            .log_text()
            .contains("row parked after repeated failures")
    );
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

/// Creates `trigger` (SQL given the schema and the bad row's id) on a
/// fresh outbox holding a good row, the bad row and another good row, runs
/// the relay, and checks what every update the database refuses or skips
/// must come to: the bad row is published `max_attempts` (3) times and held
/// in memory, its bookkeeping untouched, while the other rows and later
/// ones go out once. Returns the relay's log.
async fn a_row_no_update_reaches(tag: &str, trigger: impl Fn(&str, &str) -> String) -> String {
    let env = env_with_attempts(tag).await;
    let (good1, bad, good2) = (uuid(4), uuid(5), uuid(6));
    env.pg
        .batch_execute(&trigger(&env.name, &bad))
        .await
        .unwrap();
    insert_rows(
        &env,
        &[
            (&good1, Some("'\\x01'")),
            (&bad, Some("'\\x02'")),
            (&good2, Some("'\\x03'")),
        ],
    )
    .await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;

    relay
        .wait_log("row held in memory after repeated failures")
        .await;
    env.wait_all_transferred_but(1).await;
    wait_until("the bad row arrived three times", || async {
        consumer.counts().get(&bad).copied() == Some(3)
    })
    .await;
    // Later claims pass over the held row without publishing it.
    let fresh = env.insert_many(5, 5).await;
    consumer.wait_for_all(&fresh).await;
    env.wait_all_transferred_but(1).await;
    let mut expected = vec![(good1.as_str(), 1), (bad.as_str(), 3), (good2.as_str(), 1)];
    expected.extend(fresh.iter().map(|id| (id.as_str(), 1)));
    assert_counts(&consumer, &expected);
    // The table could not be written: its bookkeeping is untouched.
    assert_eq!(env.row_state(&bad).await, (0, None, false, false));
    let log = relay.log_text();
    assert!(relay.terminate().await.success());
    env.cleanup().await;
    log
}

#[tokio::test]
async fn a_row_the_database_refuses_any_update_of_is_sent_max_attempts_times_and_its_batch_once() {
    // Fires on every UPDATE of that row: marking it and recording its
    // failure are both refused.
    let log = a_row_no_update_reaches("updrefused", |s, bad| {
        format!(
            "CREATE FUNCTION \"{s}\".audit() RETURNS trigger LANGUAGE plpgsql AS $f$
                 BEGIN RAISE EXCEPTION 'audit log refuses row %', NEW.message_id; END $f$;
             CREATE TRIGGER audit AFTER UPDATE ON \"{s}\".message_queue_log FOR EACH ROW
                 WHEN (NEW.message_id = '{bad}') EXECUTE FUNCTION \"{s}\".audit();"
        )
    })
    .await;
    assert!(
        log.contains("audit log refuses row") && log.contains("P0001"),
        "{log}"
    );
}

#[tokio::test]
async fn a_row_a_trigger_silently_skips_is_sent_max_attempts_times_and_its_batch_once() {
    // No error: the trigger makes every UPDATE of that row do nothing.
    let log = a_row_no_update_reaches("skipped", |s, bad| {
        format!(
            "CREATE FUNCTION \"{s}\".skip() RETURNS trigger LANGUAGE plpgsql AS $f$
                 BEGIN RETURN NULL; END $f$;
             CREATE TRIGGER skip BEFORE UPDATE ON \"{s}\".message_queue_log FOR EACH ROW
                 WHEN (OLD.message_id = '{bad}') EXECUTE FUNCTION \"{s}\".skip();"
        )
    })
    .await;
    assert!(log.contains("updated no row"), "{log}");
}

#[tokio::test]
async fn a_row_past_a_thousand_attempts_gets_a_capped_delay_and_its_batch_is_marked_once() {
    let mut env = TestEnv::new("attempts").await;
    env.config["relay"]["max_attempts"] = 100_000.into();
    env.config["relay"]["attempt_delay_ms"] = 50.into();
    env.config["relay"]["max_retry_delay_sec"] = 30.into();
    env.migrate().await;
    let s = &env.name;
    let (good1, bad, good2) = (uuid(7), uuid(8), uuid(9));
    // A log row without a data row fails on its own; it has failed 1100 times.
    insert_rows(
        &env,
        &[
            (&good1, Some("'\\x01'")),
            (&bad, None),
            (&good2, Some("'\\x03'")),
        ],
    )
    .await;
    env.pg
        .execute(
            &format!(
                "UPDATE \"{s}\".message_queue_log SET relay_attempts = 1100 WHERE message_id = '{bad}'"
            ),
            &[],
        )
        .await
        .unwrap();
    let before: String = env
        .pg
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .unwrap()
        .get(0);
    let consumer = env.consumer().await;
    let relay = env.relay().await;

    wait_until(&format!("{bad} is charged its attempt 1101"), || async {
        env.row_state(&bad).await.0 == 1101
    })
    .await;
    let row = env
        .pg
        .query_one(
            &format!(
                "SELECT relay_parked_at IS NULL, relay_last_error,
                        relay_next_attempt_at >= $1::text::timestamptz + interval '30 s',
                        relay_next_attempt_at <= clock_timestamp() + interval '30 s'
                   FROM \"{s}\".message_queue_log WHERE message_id = '{bad}'"
            ),
            &[&before],
        )
        .await
        .unwrap();
    let (unparked, reason): (bool, Option<String>) = (row.get(0), row.get(1));
    assert!(unparked);
    assert!(reason.unwrap_or_default().contains("no data row"));
    // The delay is relay.max_retry_delay_sec, counted from the failure.
    assert!(row.get::<_, bool>(2) && row.get::<_, bool>(3));
    env.wait_all_transferred_but(1).await;
    let good = vec![good1, good2];
    consumer.wait_for_all(&good).await;
    let fresh = env.insert_many(5, 5).await;
    consumer.wait_for_all(&fresh).await;
    assert_exactly_once(&consumer, &[good, fresh].concat());
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn a_body_column_retyped_under_a_running_relay_is_read_by_its_new_type_both_ways() {
    let env = TestEnv::new("retype").await;
    env.create_seed_tables("uuid", "text").await;
    env.migrate().await;
    let s = &env.name;
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let text_type = Some("text/plain; charset=utf-8".to_owned());
    let bytes_type = Some("application/octet-stream".to_owned());

    let first = uuid(10);
    env.insert_event(&first, "'héllo \\x41'", true).await;
    consumer.wait_for_all(std::slice::from_ref(&first)).await;
    let got = consumer.get(&first);
    assert_eq!(got.body, "héllo \\x41".as_bytes());
    assert_eq!(got.content_type, text_type);

    // text -> bytea while the relay runs.
    env.pg
        .batch_execute(&format!(
            "ALTER TABLE \"{s}\".message_queue_log_data
                 ALTER message_body TYPE bytea USING convert_to(message_body, 'UTF8')"
        ))
        .await
        .unwrap();
    let second = uuid(11);
    env.insert_event(&second, "'\\x68c3a95c00ff'::bytea", true)
        .await;
    consumer.wait_for_all(std::slice::from_ref(&second)).await;
    let got = consumer.get(&second);
    assert_eq!(got.body, b"h\xc3\xa9\\\x00\xff");
    assert_eq!(got.content_type, bytes_type);

    // bytea -> text while the relay runs (the bytes are made UTF-8 first).
    env.pg
        .batch_execute(&format!(
            "UPDATE \"{s}\".message_queue_log_data SET message_body = '\\x6f6b' WHERE message_id = '{second}';
             ALTER TABLE \"{s}\".message_queue_log_data
                 ALTER message_body TYPE text USING convert_from(message_body, 'UTF8')"
        ))
        .await
        .unwrap();
    let third = uuid(12);
    env.insert_event(&third, "'zurück \\x42'", true).await;
    consumer.wait_for_all(std::slice::from_ref(&third)).await;
    let got = consumer.get(&third);
    assert_eq!(got.body, "zurück \\x42".as_bytes());
    assert_eq!(got.content_type, text_type);

    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &[first, second, third]);
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}
