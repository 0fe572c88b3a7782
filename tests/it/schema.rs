//! The user's own schema under a running relay: a row the database refuses
//! to update (a CHECK constraint, an audit trigger), a body column whose
//! type changes, a row whose attempts count is far past the usual. Each is
//! handled by the bad-input rule or by reading the outbox again, and the
//! rows beside it are delivered and marked once.

use crate::support::*;

fn uuid(n: u32) -> String {
    format!("{:08x}-3333-4000-8000-{n:012x}", fastrand::u32(..))
}

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
