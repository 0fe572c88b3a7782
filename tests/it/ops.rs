//! Operating the relay: the admin endpoint's metrics, health and readiness.

use crate::proxy::Proxy;
use crate::support::*;

#[tokio::test]
async fn metrics_count_what_was_sent_failed_and_parked() {
    let mut env = TestEnv::new("metrics").await;
    env.config["relay"]["max_attempts"] = 1.into();
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let admin = relay.admin().await;
    let ids = env.insert_many(120, 40).await;
    env.pg
        .batch_execute(&format!(
            "INSERT INTO \"{}\".message_queue_log (message_id) VALUES ('00000000-0000-4000-8000-00000000000a')",
            env.name
        ))
        .await
        .unwrap();
    consumer.wait_for_all(&ids).await;

    let scrape = || async {
        let (code, text) = http_get(&admin, "/metrics").await;
        assert_eq!(code, 200);
        text
    };
    let series = |text: &str, name: &str| metric(text, name).unwrap_or(-1.0);
    wait_until("the counters add up", || async {
        let text = scrape().await;
        series(&text, "pushoccurrence_messages_confirmed_total") == 120.0
            && series(&text, "pushoccurrence_rows_parked_total") == 1.0
            && series(&text, "pushoccurrence_pending_rows") == 0.0
    })
    .await;
    let text = scrape().await;
    assert_eq!(
        series(&text, "pushoccurrence_messages_published_total"),
        120.0
    );
    assert_eq!(series(&text, "pushoccurrence_rows_failed_total"), 1.0);
    assert_eq!(series(&text, "pushoccurrence_messages_nacked_total"), 0.0);
    assert_eq!(series(&text, "pushoccurrence_messages_returned_total"), 0.0);
    assert!(
        series(&text, "pushoccurrence_batches_total") >= 3.0,
        "{text}"
    );
    assert!(
        series(&text, "pushoccurrence_claim_duration_seconds_count") >= 3.0,
        "{text}"
    );
    assert_eq!(
        series(
            &text,
            "pushoccurrence_connection_up{connection=\"rabbitmq\"}"
        ),
        1.0
    );
    assert_eq!(
        series(
            &text,
            "pushoccurrence_connection_up{connection=\"postgres_listener\"}"
        ),
        1.0
    );
    assert!(text.ends_with("# EOF\n"), "not OpenMetrics text: {text}");
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn readyz_turns_unready_when_the_broker_is_cut_and_ready_after() {
    let mut env = TestEnv::new("readyz").await;
    let proxy = Proxy::start(5672).await;
    env.config["rabbitmq"]["url"] = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=2",
        proxy.port
    )
    .into();
    let relay = env.relay().await;
    let admin = relay.admin().await;
    wait_until("ready", || async {
        http_get(&admin, "/readyz").await.0 == 200
    })
    .await;

    proxy.down();
    proxy.cut();
    wait_until("unready", || async {
        http_get(&admin, "/readyz").await.0 == 503
    })
    .await;
    let (_, why) = http_get(&admin, "/readyz").await;
    assert_eq!(why, "not ready: rabbitmq not connected\n");
    // Alive all the same: an outage must not make an orchestrator restart it.
    assert_eq!(http_get(&admin, "/healthz").await, (200, "ok\n".to_owned()));

    proxy.pass();
    wait_until("ready again", || async {
        http_get(&admin, "/readyz").await.0 == 200
    })
    .await;
    let (_, text) = http_get(&admin, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "pushoccurrence_reconnections_total{connection=\"rabbitmq\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn the_backlog_sample_counts_pending_rows_and_ages_the_oldest() {
    let env = TestEnv::new("backlog").await;
    env.migrate().await;
    env.insert_many(3, 3).await;
    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "UPDATE \"{s}\".message_queue_log SET relay_enqueued_at = now() - interval '90 seconds'
              WHERE message_id = (SELECT message_id FROM \"{s}\".message_queue_log LIMIT 1);
             INSERT INTO \"{s}\".message_queue_log (message_id, transferred, relay_enqueued_at)
                  VALUES (gen_random_uuid(), true, now() - interval '1 day'),
                         (gen_random_uuid(), false, now() - interval '1 day');
             UPDATE \"{s}\".message_queue_log SET relay_parked_at = now()
              WHERE transferred IS NOT TRUE AND relay_enqueued_at < now() - interval '1 hour';"
        ))
        .await
        .unwrap();
    let outbox = pushoccurrence::db::outbox::Outbox::inspect(&env.pg, s)
        .await
        .unwrap();
    let row = env.pg.query_one(&outbox.backlog_sql(), &[]).await.unwrap();
    let (pending, oldest): (i64, f64) = (row.get(0), row.get(1));
    // Transferred and parked rows are not the backlog.
    assert_eq!(pending, 3);
    assert!((90.0..3600.0).contains(&oldest), "{oldest}");
    env.cleanup().await;
}

#[tokio::test]
async fn send_writes_a_test_event_and_status_follows_it_through() {
    let env = TestEnv::new("sendstatus").await;
    env.create_seed_tables("uuid", "jsonb").await;
    env.migrate().await;
    let config = env.write_config();
    let cli = |args: &'static [&'static str]| {
        let config = config.clone();
        async move {
            let out = pushoccurrence(&config, args).output().await.unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (code, first, _) = cli(&["send"]).await;
    assert_eq!(code, Some(0));
    let (_, second, _) = cli(&["send", r#"{"n": 2}"#]).await;
    let ids = vec![first.trim().to_owned(), second.trim().to_owned()];
    let (code, _, stderr) = cli(&["send", "not json"]).await;
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("invalid input syntax for type json"),
        "{stderr}"
    );

    let (code, status, _) = cli(&["status"]).await;
    assert_eq!(code, Some(0));
    assert!(status.contains("pending                   2\n"), "{status}");
    assert!(status.contains("transferred, last minute  0\n"), "{status}");

    let consumer = env.consumer().await;
    let relay = env.relay().await;
    consumer.wait_for_all(&ids).await;
    assert_eq!(
        consumer.get(&ids[0]).body,
        br#"{"pushoccurrence": "test event"}"#
    );
    wait_until("nothing is pending", || async { env.pending().await == 0 }).await;
    let (_, status, _) = cli(&["status"]).await;
    assert!(
        status.contains("pending                   0\n")
            && status.contains("parked                    0\n")
            && status.contains("transferred, last minute  2\n")
            && status.contains("transferred, last hour    2\n"),
        "{status}"
    );
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn retention_deletes_only_rows_transferred_long_enough_ago_with_their_bodies() {
    let mut env = TestEnv::new("retention").await;
    env.config["retention"] =
        serde_json::json!({"transferred_after_sec": 3600, "batch_size": 2, "interval_sec": 0.2});
    env.migrate().await;
    let old = env.insert_many(5, 5).await;
    let recent = env.insert_many(2, 2).await;
    let waiting = env.insert_many(1, 1).await;
    let s = &env.name;
    let mark = |ids: &[String], ago: &str| {
        format!(
            "UPDATE \"{s}\".message_queue_log SET transferred = true, transfer_time = localtimestamp - interval '{ago}'
              WHERE message_id::text IN ({});",
            ids.iter().map(|i| format!("'{i}'")).collect::<Vec<_>>().join(",")
        )
    };
    env.pg
        .batch_execute(&format!(
            "{}{}UPDATE \"{s}\".message_queue_log SET relay_enqueued_at = now() - interval '2 days'
              WHERE message_id::text = '{}';",
            mark(&old, "2 days"),
            mark(&recent, "1 minute"),
            waiting[0]
        ))
        .await
        .unwrap();
    let count = |table: &'static str| {
        let env = &env;
        async move {
            let n: i64 = env
                .pg
                .query_one(
                    &format!("SELECT count(*) FROM \"{}\".{table}", env.name),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            n
        }
    };
    assert_eq!(
        (
            count("message_queue_log").await,
            count("message_queue_log_data").await
        ),
        (8, 8)
    );

    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let admin = relay.admin().await;
    wait_until("old rows are deleted", || async {
        count("message_queue_log").await == 3
    })
    .await;
    assert_eq!(count("message_queue_log_data").await, 3);
    let left = env
        .texts(
            &format!("SELECT message_id::text FROM \"{s}\".message_queue_log ORDER BY 1"),
            &[],
        )
        .await;
    let mut kept = [recent, waiting.clone()].concat();
    kept.sort();
    assert_eq!(left, kept);
    // An old pending row is the relay's, not retention's.
    consumer.wait_for_all(&waiting).await;
    let (_, text) = http_get(&admin, "/metrics").await;
    assert_eq!(
        metric(&text, "pushoccurrence_rows_deleted_total"),
        Some(5.0),
        "{text}"
    );
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn the_documented_least_privilege_role_runs_the_relay() {
    let mut env = TestEnv::new("leastpriv").await;
    env.migrate().await;
    let role = format!("{}_relay", env.name);
    let grants = include_str!("../../deploy/relay-role.sql")
        .replace("pushoccurrence_relay", &format!("\"{role}\""))
        .replace("data_exchange", &format!("\"{}\"", env.name));
    env.pg.batch_execute(&grants).await.unwrap();
    env.config["postgres"]["user"] = role.clone().into();
    env.config["postgres"]["auto_migrate"] = false.into();
    env.config["retention"] =
        serde_json::json!({"transferred_after_sec": 3600, "interval_sec": 0.2});
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let ids = env.insert_many(30, 10).await;
    env.pg
        .execute(
            &format!(
                "INSERT INTO \"{}\".message_queue_log (message_id) VALUES ('00000000-0000-4000-8000-0000000000bb')",
                env.name
            ),
            &[],
        )
        .await
        .unwrap();
    consumer.wait_for_all(&ids).await;
    wait_until(
        "the good rows are marked and the bad one failed",
        || async {
            env.pending().await == 1
                && env
                    .row_state("00000000-0000-4000-8000-0000000000bb")
                    .await
                    .0
                    >= 1
        },
    )
    .await;
    assert_exactly_once(&consumer, &ids);
    let sessions: i64 = env
        .pg
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(sessions >= 2, "the relay runs as {role}");
    assert_eq!(
        relay.log_count("permission denied"),
        0,
        "{}",
        relay.log_text()
    );
    assert!(relay.terminate().await.success());

    // Without the grants the same relay cannot even read the outbox.
    let text = format!(
        "REVOKE ALL ON ALL TABLES IN SCHEMA \"{}\" FROM \"{role}\"",
        env.name
    );
    env.pg.batch_execute(&text).await.unwrap();
    let out = pushoccurrence(&env.write_config(), &["check"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success()
            && stdout.contains(&format!(
                "FAIL  privileges: role {role} lacks SELECT on \"{}\".\"message_queue_log\"",
                env.name
            ))
            && stdout.contains("deploy/relay-role.sql"),
        "{stdout}"
    );
    env.pg
        .batch_execute(&format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\""))
        .await
        .unwrap();
    env.cleanup().await;
}

/// The relay under the documented least-privilege role (so a test can take
/// a grant away), with `admin.stall_after_sec` set; returns the role.
async fn as_relay_role(env: &mut TestEnv, stall_after_sec: f64) -> String {
    env.migrate().await;
    let role = format!("{}_relay", env.name);
    env.pg
        .batch_execute(&role_grants(env, &role))
        .await
        .unwrap();
    env.config["postgres"]["user"] = role.clone().into();
    env.config["postgres"]["auto_migrate"] = false.into();
    env.config["admin"]["stall_after_sec"] = stall_after_sec.into();
    role
}

/// deploy/relay-role.sql for this test's schema and role.
fn role_grants(env: &TestEnv, role: &str) -> String {
    include_str!("../../deploy/relay-role.sql")
        .replace("pushoccurrence_relay", &format!("\"{role}\""))
        .replace("data_exchange", &format!("\"{}\"", env.name))
}

/// The statement of deploy/relay-role.sql that starts with `start`.
fn grant_statement(env: &TestEnv, role: &str, start: &str) -> String {
    let sql = role_grants(env, role);
    let from = sql.find(start).unwrap();
    let len = sql[from..].find(';').unwrap();
    sql[from..=from + len].to_owned()
}

async fn drop_role(env: &TestEnv, role: &str) {
    env.pg
        .batch_execute(&format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\""))
        .await
        .unwrap();
}

/// Connected and listening is not enough: when every claim fails (here the
/// claim's `FOR UPDATE` loses its UPDATE grant; behind a pooler it was the
/// pooler) while rows wait, `/readyz` turns 503 with both reasons, the
/// failed batches are counted, and the backlog gauges show the real count.
/// Once claims work the rows go out and it is ready again. A backlog that
/// cannot be sampled reads NaN, is counted and warned about once.
#[tokio::test]
async fn readyz_reports_a_stall_when_every_claim_fails_while_rows_wait() {
    let mut env = TestEnv::new("stall").await;
    let role = as_relay_role(&mut env, 1.0).await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let admin = relay.admin().await;
    wait_until("ready", || async {
        http_get(&admin, "/readyz").await.0 == 200
    })
    .await;
    let scrape = || async { http_get(&admin, "/metrics").await.1 };
    let series = |text: &str, name: &str| metric(text, name).unwrap_or(-1.0);

    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "REVOKE UPDATE ON \"{s}\".message_queue_log FROM \"{role}\""
        ))
        .await
        .unwrap();
    let ids = env.insert_many(5, 5).await;
    wait_until("/readyz names the stall", || async {
        let (code, why) = http_get(&admin, "/readyz").await;
        code == 503
            && why.contains("5 rows claimable and no batch committed for")
            && why.contains("every batch has failed for")
    })
    .await;
    let (_, why) = http_get(&admin, "/readyz").await;
    assert!(
        why.starts_with("not ready: ") && why.contains("admin.stall_after_sec 1"),
        "{why}"
    );
    assert!(
        !why.contains("rabbitmq") && !why.contains("listener"),
        "{why}"
    );
    assert_eq!(http_get(&admin, "/healthz").await.0, 200);
    let text = scrape().await;
    assert_eq!(series(&text, "pushoccurrence_pending_rows"), 5.0, "{text}");
    assert_eq!(
        series(&text, "pushoccurrence_claimable_rows"),
        5.0,
        "{text}"
    );
    assert!(
        series(&text, "pushoccurrence_batches_failed_total") >= 1.0,
        "{text}"
    );
    assert_eq!(series(&text, "pushoccurrence_batches_total"), 0.0, "{text}");
    assert_eq!(
        series(&text, "pushoccurrence_last_batch_commit_timestamp_seconds"),
        0.0,
        "{text}"
    );
    assert_eq!(consumer.count(), 0);

    env.pg
        .batch_execute(&grant_statement(&env, &role, "GRANT UPDATE"))
        .await
        .unwrap();
    consumer.wait_for_all(&ids).await;
    wait_until("ready again", || async {
        http_get(&admin, "/readyz").await == (200, "ready\n".to_owned())
    })
    .await;
    assert_exactly_once(&consumer, &ids);
    let text = scrape().await;
    assert!(
        series(&text, "pushoccurrence_batches_total") >= 1.0,
        "{text}"
    );
    assert!(
        series(&text, "pushoccurrence_last_batch_commit_timestamp_seconds") > 0.0,
        "{text}"
    );

    // A backlog that cannot be read is unknown, not empty.
    env.pg
        .batch_execute(&format!(
            "REVOKE SELECT ON \"{s}\".message_queue_log FROM \"{role}\""
        ))
        .await
        .unwrap();
    wait_until(
        "the backlog gauges read NaN after two failed samples",
        || async {
            let text = scrape().await;
            metric(&text, "pushoccurrence_pending_rows").is_some_and(f64::is_nan)
                && metric(&text, "pushoccurrence_claimable_rows").is_some_and(f64::is_nan)
                && series(&text, "pushoccurrence_backlog_sample_failures_total") >= 2.0
        },
    )
    .await;
    assert_eq!(
        relay.log_count("cannot sample the backlog"),
        1,
        "{}",
        relay.log_text()
    );
    env.pg
        .batch_execute(&grant_statement(&env, &role, "GRANT SELECT"))
        .await
        .unwrap();
    wait_until("the backlog is sampled again", || async {
        series(&scrape().await, "pushoccurrence_pending_rows") == 0.0
    })
    .await;
    relay.wait_log("the backlog can be sampled again").await;
    assert!(relay.terminate().await.success());
    drop_role(&env, &role).await;
    env.cleanup().await;
}

/// Idle is not stuck: with nothing claimable (everything sent, one row
/// waiting out its retry delay, one parked) the relay stays ready well past
/// `admin.stall_after_sec` since its last commit.
#[tokio::test]
async fn an_idle_relay_stays_ready_past_the_stall_time() {
    let mut env = TestEnv::new("idle").await;
    env.config["admin"]["stall_after_sec"] = 1.into();
    env.config["relay"]["attempt_delay_ms"] = 3_600_000.into();
    env.config["relay"]["max_retry_delay_sec"] = 3600.into();
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let admin = relay.admin().await;
    wait_until("ready", || async {
        http_get(&admin, "/readyz").await.0 == 200
    })
    .await;
    let ids = env.insert_many(3, 3).await;
    consumer.wait_for_all(&ids).await;
    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "INSERT INTO \"{s}\".message_queue_log (message_id) VALUES ('00000000-0000-4000-8000-00000000000c');
             INSERT INTO \"{s}\".message_queue_log (message_id, relay_parked_at)
                  VALUES ('00000000-0000-4000-8000-00000000000d', now());"
        ))
        .await
        .unwrap();
    let answers = std::cell::RefCell::new(Vec::new());
    // The oldest pending row's age, as the relay samples it, is the clock:
    // three stall times after the last commit (the delayed row's attempt).
    wait_until("the delayed row has waited three stall times", || async {
        let answer = http_get(&admin, "/readyz").await;
        answers.borrow_mut().push(answer);
        let text = http_get(&admin, "/metrics").await.1;
        metric(&text, "pushoccurrence_rows_failed_total") == Some(1.0)
            && metric(&text, "pushoccurrence_pending_rows") == Some(1.0)
            && metric(&text, "pushoccurrence_claimable_rows") == Some(0.0)
            && metric(&text, "pushoccurrence_oldest_pending_age_seconds")
                .is_some_and(|age| age >= 3.0)
    })
    .await;
    let mut answers = answers.into_inner();
    answers.push(http_get(&admin, "/readyz").await);
    assert!(
        answers.iter().all(|a| *a == (200, "ready\n".to_owned())),
        "{answers:?}"
    );
    let text = http_get(&admin, "/metrics").await.1;
    let last_commit = metric(&text, "pushoccurrence_last_batch_commit_timestamp_seconds")
        .expect("the last commit's time is a metric");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(last_commit > 0.0 && last_commit <= now, "{text}");
    assert_eq!(
        metric(&text, "pushoccurrence_batches_failed_total"),
        Some(0.0)
    );
    assert_exactly_once(&consumer, &ids);
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

/// A relay that cannot read its outbox (the schema dropped under it) is
/// blind: its backlog gauges read NaN, not 0, and `/readyz` says so after
/// `admin.stall_after_sec`; once the schema is back it is ready again.
#[tokio::test]
async fn a_dropped_outbox_schema_turns_readyz_and_the_gauges_and_recovers() {
    let mut env = TestEnv::new("dropschema").await;
    env.config["admin"]["stall_after_sec"] = 1.into();
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let admin = relay.admin().await;
    let ids = env.insert_many(3, 3).await;
    consumer.wait_for_all(&ids).await;
    wait_until("ready, with an empty backlog sampled", || async {
        let text = http_get(&admin, "/metrics").await.1;
        http_get(&admin, "/readyz").await.0 == 200
            && metric(&text, "pushoccurrence_pending_rows") == Some(0.0)
    })
    .await;

    env.pg
        .batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", env.name))
        .await
        .unwrap();
    wait_until("/readyz names the unreadable backlog", || async {
        let (code, why) = http_get(&admin, "/readyz").await;
        code == 503 && why.contains("the outbox's backlog cannot be read for")
    })
    .await;
    let text = http_get(&admin, "/metrics").await.1;
    for gauge in [
        "pushoccurrence_pending_rows",
        "pushoccurrence_claimable_rows",
        "pushoccurrence_oldest_pending_age_seconds",
    ] {
        assert!(
            metric(&text, gauge).is_some_and(f64::is_nan),
            "{gauge}: {text}"
        );
    }
    assert!(
        metric(&text, "pushoccurrence_backlog_sample_failures_total").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(http_get(&admin, "/healthz").await.0, 200);

    env.migrate().await;
    let more = env.insert_many(3, 3).await;
    consumer.wait_for_all(&more).await;
    wait_until("ready again", || async {
        http_get(&admin, "/readyz").await == (200, "ready\n".to_owned())
    })
    .await;
    assert_exactly_once(&consumer, &[ids, more].concat());
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

/// Descriptors the process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Half-open requests (headers never finished) must not exhaust the relay:
/// the endpoint holds a bounded number of connections, closes one whose
/// headers do not arrive in time, and health and relaying carry on.
#[tokio::test]
async fn a_flood_of_half_open_admin_requests_never_starves_health_or_relaying() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const FLOOD: usize = 3000;
    let env = TestEnv::new("adminflood").await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let admin = relay.admin().await;
    let pid = relay.child.id().unwrap();
    let before = open_fds(pid);

    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        let mut stream = tokio::net::TcpStream::connect(&admin).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: flood\r\n")
            .await
            .unwrap();
        flood.push(stream);
    }
    assert_eq!(http_get(&admin, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(http_get(&admin, "/readyz").await.0, 200);
    let ids = env.insert_many(20, 10).await;
    consumer.wait_for_all(&ids).await;
    // Every connection of the flood was accepted before the probe; most are
    // closed again.
    wait_until(
        "the relay holds a bounded number of descriptors",
        || async { open_fds(pid) < before + FLOOD / 4 },
    )
    .await;
    drop(flood);

    // A request whose headers never end is closed by the server.
    let mut stream = tokio::net::TcpStream::connect(&admin).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: slow\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
        "the server kept a half-open request open"
    );
    assert!(
        !String::from_utf8_lossy(&rest).contains("200 OK"),
        "{rest:?}"
    );

    let more = env.insert_many(20, 10).await;
    consumer.wait_for_all(&more).await;
    assert_exactly_once(&consumer, &[ids, more].concat());
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

/// A grant taken away from the columns the mark writes is the table's
/// fault, not the rows': the mark fails for no row at all as it does for
/// these, so no row is charged or parked, and the rows go out once the
/// grant is back.
#[tokio::test]
async fn a_grant_revoked_on_the_marked_columns_charges_no_row() {
    let mut env = TestEnv::new("revokemark").await;
    env.config["relay"]["max_attempts"] = 2.into();
    env.config["relay"]["attempt_delay_ms"] = 50.into();
    let role = as_relay_role(&mut env, 1.0).await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let admin = relay.admin().await;
    let s = &env.name;
    // The claim's FOR UPDATE still works (UPDATE on `transferred` stays).
    env.pg
        .batch_execute(&format!(
            "REVOKE UPDATE (transfer_time) ON \"{s}\".message_queue_log FROM \"{role}\""
        ))
        .await
        .unwrap();
    let ids = env.insert_many(5, 5).await;
    wait_until("several batches failed", || async {
        let text = http_get(&admin, "/metrics").await.1;
        metric(&text, "pushoccurrence_batches_failed_total").unwrap_or(0.0) >= 3.0
    })
    .await;
    let charged: i64 = env
        .pg
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{s}\".message_queue_log
                  WHERE relay_attempts > 0 OR relay_parked_at IS NOT NULL"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(charged, 0, "{}", relay.log_text());
    assert_eq!(env.pending().await, 5);
    env.pg
        .batch_execute(&format!(
            "GRANT UPDATE (transfer_time) ON \"{s}\".message_queue_log TO \"{role}\""
        ))
        .await
        .unwrap();
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    // Each failed batch was published before its mark failed.
    assert_no_loss(&consumer, &ids, usize::MAX);
    assert!(relay.terminate().await.success());
    drop_role(&env, &role).await;
    env.cleanup().await;
}
