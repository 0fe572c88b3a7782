//! Retention: what it deletes and what it must never touch, in outboxes as
//! users have them (ids that repeat, a `TimeZone` with daylight saving), and
//! that a run reads the expired rows, not the history.

use crate::support::*;

/// The seed's tables with a text `message_id` and no unique constraint,
/// as some users have them (`migrate` and `check` accept it), migrated.
async fn outbox_whose_ids_can_repeat(env: &TestEnv) {
    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "CREATE SCHEMA \"{s}\";
             CREATE TABLE \"{s}\".message_queue_log (message_id text,
                 transferred BOOLEAN DEFAULT FALSE, transfer_time TIMESTAMP);
             CREATE TABLE \"{s}\".message_queue_log_data (message_id text, message_body bytea);"
        ))
        .await
        .unwrap();
    env.migrate().await;
}

/// Writes one event with a text body, transferred `ago` ago (an interval)
/// in the session's time zone as the relay writes it, or pending.
async fn write_event(env: &TestEnv, id: &str, body: &str, transferred_ago: Option<&str>) {
    let s = &env.name;
    let (transferred, time) = match transferred_ago {
        Some(ago) => ("true", format!("now() - interval '{ago}'")),
        None => ("false", "NULL".to_owned()),
    };
    env.pg
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO \"{s}\".message_queue_log (message_id, transferred, transfer_time)
                 VALUES ('{id}', {transferred}, {time});
             INSERT INTO \"{s}\".message_queue_log_data VALUES ('{id}', convert_to('{body}', 'UTF8'));
             COMMIT;"
        ))
        .await
        .unwrap();
}

/// `(transferred, parked)` of every status row with `id`, and its bodies, sorted.
async fn rows_and_bodies(env: &TestEnv, id: &str) -> (Vec<String>, Vec<String>) {
    let s = &env.name;
    let rows = env
        .texts(
            &format!(
                "SELECT format('transferred=%s parked=%s', transferred::text, (relay_parked_at IS NOT NULL)::text)
                   FROM \"{s}\".message_queue_log WHERE message_id = $1 ORDER BY 1"
            ),
            &[&id],
        )
        .await;
    let bodies = env
        .texts(
            &format!(
                "SELECT convert_from(message_body, 'UTF8') FROM \"{s}\".message_queue_log_data
                  WHERE message_id = $1 ORDER BY 1"
            ),
            &[&id],
        )
        .await;
    (rows, bodies)
}

/// `order-42` was sent two days ago; a producer whose ids repeat wrote a
/// new `order-42` now. Retention deletes the old row only (by its row
/// identity, not its id), keeps both bodies while a row has their id, and
/// the new event is not lost: it is parked as ambiguous (two bodies), and
/// once the operator removes the stale body and requeues it, it arrives.
/// `run` warns at start that ids can repeat.
#[tokio::test]
async fn retention_keeps_a_pending_row_whose_id_repeats_an_expired_one() {
    let mut env = TestEnv::new("retrepeat").await;
    outbox_whose_ids_can_repeat(&env).await;
    write_event(&env, "order-42", "yesterday", Some("2 days")).await;
    write_event(&env, "order-7", "seven", Some("2 days")).await;
    write_event(&env, "order-42", "today", None).await;
    env.config["retention"] =
        serde_json::json!({"transferred_after_sec": 3600, "interval_sec": 0.2});
    env.config["relay"]["max_attempts"] = 1.into();
    let consumer = env.consumer().await;
    let relay = env.relay().await;

    wait_until("retention deletes order-7", || async {
        rows_and_bodies(&env, "order-7").await == (vec![], vec![])
    })
    .await;
    let (rows, bodies) = rows_and_bodies(&env, "order-42").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].starts_with("transferred=false"), "{rows:?}");
    assert_eq!(bodies, ["today", "yesterday"]);

    wait_until("order-42 is parked as ambiguous", || async {
        rows_and_bodies(&env, "order-42").await.0 == ["transferred=false parked=true"]
    })
    .await;
    let reason = env
        .texts(
            &format!(
                "SELECT relay_last_error FROM \"{}\".message_queue_log WHERE message_id = 'order-42'",
                env.name
            ),
            &[],
        )
        .await;
    assert_eq!(reason, ["several data rows with different bodies"]);
    env.pg
        .execute(
            &format!(
                "DELETE FROM \"{}\".message_queue_log_data
                  WHERE message_id = 'order-42' AND message_body = convert_to('yesterday', 'UTF8')",
                env.name
            ),
            &[],
        )
        .await
        .unwrap();
    let out = pushoccurrence(&env.write_config(), &["requeue", "order-42"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    consumer.wait_for_all(&["order-42".to_owned()]).await;
    assert_eq!(consumer.get("order-42").body, b"today");
    assert!(
        relay
            .log_text()
            .contains("message_id has no unique constraint, so ids can repeat"),
        "{}",
        relay.log_text()
    );
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

/// `check` warns (and still passes) when `message_id` has no unique
/// constraint, counts the ids that already repeat and gives the statement
/// that fixes it; on the seed's tables (a primary key) it says nothing.
#[tokio::test]
async fn check_warns_about_an_outbox_whose_ids_can_repeat() {
    let env = TestEnv::new("checkrepeat").await;
    outbox_whose_ids_can_repeat(&env).await;
    write_event(&env, "order-42", "yesterday", Some("2 days")).await;
    write_event(&env, "order-42", "today", None).await;
    write_event(&env, "order-7", "seven", None).await;
    let out = pushoccurrence(&env.write_config(), &["check"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let warning = stdout
        .lines()
        .find(|l| l.starts_with("WARN"))
        .unwrap_or_else(|| panic!("no warning in: {stdout}"));
    let s = &env.name;
    for part in [
        format!("outbox schema {s}: message_id has no unique constraint, so ids can repeat"),
        "1 id already repeats".to_owned(),
        format!("CREATE UNIQUE INDEX CONCURRENTLY ON \"{s}\".\"message_queue_log\" (message_id)"),
    ] {
        assert!(warning.contains(&part), "{part} not in: {warning}");
    }
    assert!(stdout.contains("ok    rabbitmq"), "{stdout}");
    env.cleanup().await;

    let env = TestEnv::new("checkunique").await;
    env.create_seed_tables("text", "bytea").await;
    env.migrate().await;
    let out = pushoccurrence(&env.write_config(), &["check"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(!stdout.contains("WARN"), "{stdout}");
    env.cleanup().await;
}

/// A time zone whose daylight saving time began 30 minutes ago: standard
/// time is UTC, summer time one hour ahead. A POSIX rule (which PostgreSQL
/// accepts as a `TimeZone`) places the change at a moment of the test's
/// choosing, whatever the date; a named zone would change on its own days.
async fn zone_whose_dst_began_half_an_hour_ago(env: &TestEnv) -> String {
    let row = env
        .pg
        .query_one(
            "SELECT (extract(doy FROM t)::int - 1), to_char(t, 'HH24:MI:SS')
               FROM (SELECT (now() - interval '30 minutes') AT TIME ZONE 'UTC' AS t) x",
            &[],
        )
        .await
        .unwrap();
    let (day, time): (i32, String) = (row.get(0), row.get(1));
    // Zero-based days count February 29; summer time lasts half a year.
    format!("POT0PODT,{day}/{time},{}/0", (day + 182) % 365)
}

/// The relay's role with `TimeZone` set to `zone` (as an operator might
/// set a role's, a database's or the server's), under the grants of
/// deploy/relay-role.sql; returns the role.
async fn relay_role_in_zone(env: &mut TestEnv, zone: &str) -> String {
    let role = format!("{}_relay", env.name);
    let grants = include_str!("../../deploy/relay-role.sql")
        .replace("pushoccurrence_relay", &format!("\"{role}\""))
        .replace("data_exchange", &format!("\"{}\"", env.name));
    env.pg.batch_execute(&grants).await.unwrap();
    env.pg
        .batch_execute(&format!("ALTER ROLE \"{role}\" SET TimeZone = '{zone}'"))
        .await
        .unwrap();
    env.config["postgres"]["user"] = role.clone().into();
    env.config["postgres"]["auto_migrate"] = false.into();
    role
}

/// `transfer_time` is local time in the relay's `TimeZone`. Daylight saving
/// time began 30 minutes ago: a row sent 45 minutes ago reads one hour
/// older than it is in local time. Retention (one hour) deletes the row
/// sent 75 minutes ago and keeps the one sent 45 minutes ago, and `status`
/// counts both recent rows in the last hour.
#[tokio::test]
async fn retention_and_status_read_transfer_time_across_a_daylight_saving_change() {
    let mut env = TestEnv::new("retdst").await;
    env.migrate().await;
    let zone = zone_whose_dst_began_half_an_hour_ago(&env).await;
    let role = relay_role_in_zone(&mut env, &zone).await;
    let [old, before_change, after_change]: [String; 3] =
        env.insert_many(3, 3).await.try_into().unwrap();
    let s = &env.name;
    for (id, ago) in [
        (&old, "75 minutes"),
        (&before_change, "45 minutes"),
        (&after_change, "10 minutes"),
    ] {
        // What the relay writes: now() as local time in its session's zone.
        env.pg
            .execute(
                &format!(
                    "UPDATE \"{s}\".message_queue_log
                        SET transferred = true, transfer_time = (now() - interval '{ago}') AT TIME ZONE $2
                      WHERE message_id::text = $1"
                ),
                &[id, &zone],
            )
            .await
            .unwrap();
    }
    env.config["retention"] =
        serde_json::json!({"transferred_after_sec": 3600, "interval_sec": 0.2});
    let relay = env.relay().await;
    let left = || async {
        env.texts(
            &format!(
                "SELECT message_id::text FROM \"{s}\".message_queue_log ORDER BY transfer_time"
            ),
            &[],
        )
        .await
    };
    wait_until("retention deletes the row sent 75 minutes ago", || async {
        !left().await.contains(&old)
    })
    .await;
    assert_eq!(left().await, [before_change.clone(), after_change.clone()]);
    let bodies: i64 = env
        .pg
        .query_one(
            &format!("SELECT count(*) FROM \"{s}\".message_queue_log_data"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bodies, 2);

    let out = pushoccurrence(&env.write_config(), &["status"])
        .output()
        .await
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{status}");
    assert!(
        status.contains("transferred, last minute  0\n")
            && status.contains("transferred, last hour    2\n"),
        "{status}"
    );
    assert!(relay.terminate().await.success());
    env.pg
        .batch_execute(&format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\""))
        .await
        .unwrap();
    env.cleanup().await;
}

/// A retention batch reads the expired rows through the transfer-time
/// index and stops there: no sequential scan of either table, with the
/// planner's first (custom) plan and with the generic plan a prepared
/// statement switches to, on a history much larger than what expired.
#[tokio::test]
async fn a_retention_batch_walks_the_transfer_time_index_not_the_history() {
    let env = TestEnv::new("retplan").await;
    env.migrate().await;
    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "INSERT INTO \"{s}\".message_queue_log (message_id, transferred, transfer_time)
                 SELECT gen_random_uuid(), true, now() - i * interval '100 milliseconds' FROM generate_series(1, 20000) i;
             UPDATE \"{s}\".message_queue_log SET transfer_time = transfer_time - interval '2 days'
              WHERE transfer_time < now() - interval '1995 seconds';
             INSERT INTO \"{s}\".message_queue_log_data SELECT message_id, '\\x00' FROM \"{s}\".message_queue_log;
             ANALYZE \"{s}\".message_queue_log; ANALYZE \"{s}\".message_queue_log_data;"
        ))
        .await
        .unwrap();
    let outbox = pushoccurrence::db::outbox::Outbox::inspect(&env.pg, s)
        .await
        .unwrap();
    let sql = outbox
        .retention_sql()
        .replace("$1::float8", "$1")
        .replace("$1", "$1::float8");
    for mode in ["auto", "force_generic_plan"] {
        let plan: Vec<String> = env
            .pg
            .simple_query(&format!(
                "SET plan_cache_mode = {mode};
                 DEALLOCATE ALL;
                 PREPARE retention(float8, int8) AS {sql};
                 EXPLAIN (COSTS OFF) EXECUTE retention(3600, 1000);"
            ))
            .await
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index Scan using message_queue_log_transfer_time_idx"),
            "{mode}: {plan}"
        );
        assert!(!plan.contains("Seq Scan"), "{mode}: {plan}");
    }
    // And it deletes exactly the 50 expired rows with their bodies.
    let deleted = env
        .pg
        .execute(&outbox.retention_sql(), &[&3600.0_f64, &1000_i64])
        .await
        .unwrap();
    assert_eq!(deleted, 50);
    let bodies: i64 = env
        .pg
        .query_one(
            &format!("SELECT count(*) FROM \"{s}\".message_queue_log_data"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bodies, 19950);
    env.cleanup().await;
}
