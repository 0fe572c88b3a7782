//! Delivery: events reach the queue exactly once, with their ids, bodies and
//! properties, whether notified, swept, or written while no relay ran.

use crate::support::*;

#[tokio::test]
async fn notified_events_arrive_exactly_once_with_ids_bodies_and_properties() {
    let mut env = TestEnv::new("notify").await;
    // No idle sweeps during the test: only notifications can wake the relay.
    env.config["rabbitmq"]["retry"]["idle_sleep_ms"] = 3_600_000.into();
    let consumer = env.consumer().await;
    let relay = env.relay().await;

    let mut ids = Vec::new();
    for i in 0..20 {
        let id = env
            .pg
            .query_one("SELECT gen_random_uuid()::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0);
        env.insert_event(&id, &format!("convert_to('event {i}', 'UTF8')"), true)
            .await;
        consumer.wait_for_all(std::slice::from_ref(&id)).await;
        ids.push(id);
    }
    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &ids);
    for (i, id) in ids.iter().enumerate() {
        let m = consumer.get(id);
        assert_eq!(m.body, format!("event {i}").into_bytes());
        assert_eq!(m.delivery_mode, Some(2), "persistent");
        assert_eq!(m.content_type.as_deref(), Some("application/octet-stream"));
        assert!(m.timestamp.is_some_and(|t| t > 1_700_000_000));
    }
    let stamped: i64 = env
        .pg
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{}\".message_queue_log WHERE transferred AND transfer_time IS NOT NULL",
                env.name
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stamped, 20);
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn rows_written_while_no_relay_ran_are_delivered_at_start_up() {
    let mut env = TestEnv::new("startup").await;
    // No idle sweeps: only the start-up sweep can find these rows.
    env.config["rabbitmq"]["retry"]["idle_sleep_ms"] = 3_600_000.into();
    env.migrate().await;
    let ids = env.insert_many(300, 100).await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &ids);
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn rows_written_without_notify_are_found_by_the_idle_sweep() {
    let mut env = TestEnv::new("sweep").await;
    env.config["rabbitmq"]["retry"]["idle_sleep_ms"] = 50.into();
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = format!("{:08x}-0000-4000-8000-{:012x}", fastrand::u32(..), i);
        env.insert_event(&id, "'\\x00ff'::bytea", false).await;
        consumer.wait_for_all(std::slice::from_ref(&id)).await;
        ids.push(id);
    }
    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &ids);
    assert_eq!(consumer.get(&ids[0]).body, vec![0x00, 0xff]);
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn sessions_and_the_amqp_connection_carry_the_relay_name() {
    let env = TestEnv::new("names").await;
    let relay = env.relay().await;
    // The listener's session, and a claim session once the start-up sweep ran.
    wait_until("two sessions carry the relay's name", || async {
        env.relay_sessions().await >= 2
    })
    .await;
    let expected = format!("{{\"connection_name\",\"{}\"}}", env.name);
    wait_until("rabbitmqctl lists the relay's connection name", || async {
        let out = std::process::Command::new("rabbitmqctl")
            .args(["-q", "list_connections", "client_properties"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&expected)
    })
    .await;
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

/// Every id type the seed allows, with every body type, byte for byte.
#[tokio::test]
async fn all_six_id_and_body_type_combinations_arrive_byte_exact() {
    for id_type in ["uuid", "text"] {
        for body_type in ["bytea", "jsonb", "text"] {
            let env = TestEnv::new("types").await;
            env.create_seed_tables(id_type, body_type).await;
            let consumer = env.consumer().await;
            let relay = env.relay().await;

            // Bodies chosen to break naive conversions: backslashes that
            // `::bytea` would decode, NUL and non-UTF-8 bytes, non-ASCII text,
            // and a JSON document PostgreSQL rewrites into canonical form.
            let cases: Vec<(&str, Vec<u8>)> = match body_type {
                "bytea" => vec![
                    (
                        "'\\x00ff5c313031'::bytea",
                        vec![0x00, 0xff, b'\\', b'1', b'0', b'1'],
                    ),
                    ("''::bytea", vec![]),
                ],
                "text" => vec![
                    ("'a\\101b ünï ✓'", "a\\101b ünï ✓".as_bytes().to_vec()),
                    ("''", vec![]),
                ],
                _ => vec![
                    (
                        r#"'{"b": 1, "a": [1,  2], "s": "x\\y"}'"#,
                        br#"{"a": [1, 2], "b": 1, "s": "x\\y"}"#.to_vec(),
                    ),
                    ("'[]'", b"[]".to_vec()),
                ],
            };
            let mut ids = Vec::new();
            for (i, (sql, _)) in cases.iter().enumerate() {
                let id = if id_type == "uuid" {
                    format!("{:08x}-1111-4000-8000-{:012x}", fastrand::u32(..), i)
                } else {
                    format!("order-{i}/Ünïcode id with spaces")
                };
                env.insert_event(&id, sql, true).await;
                ids.push(id);
            }
            consumer.wait_for_all(&ids).await;
            env.wait_all_transferred().await;
            assert_exactly_once(&consumer, &ids);
            let content_type = match body_type {
                "bytea" => "application/octet-stream",
                "jsonb" => "application/json",
                _ => "text/plain; charset=utf-8",
            };
            for (id, (_, expected)) in ids.iter().zip(&cases) {
                let m = consumer.get(id);
                assert_eq!(&m.body, expected, "{id_type}/{body_type} body of {id}");
                assert_eq!(
                    m.content_type.as_deref(),
                    Some(content_type),
                    "{id_type}/{body_type}"
                );
            }
            assert!(relay.terminate().await.success());
            env.cleanup().await;
        }
    }
}

#[tokio::test]
async fn two_relays_on_one_outbox_deliver_each_event_once() {
    let env = TestEnv::new("pair").await;
    let consumer = env.consumer().await;
    let first = env.relay().await;
    let second = env.relay().await;
    let ids = env.insert_many(3000, 25).await;
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    // Both took part, and neither published what the other had claimed.
    assert_exactly_once(&consumer, &ids);
    assert!(first.terminate().await.success());
    assert!(second.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn sigterm_during_a_stream_loses_nothing_and_duplicates_nothing() {
    let env = TestEnv::new("sigterm").await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;

    // A producer keeps writing while the relay is stopped mid-stream.
    let producer_env_name = env.name.clone();
    let producer = tokio::spawn(async move {
        let pg = pg().await;
        let mut ids = Vec::new();
        for _ in 0..60 {
            let rows = pg
                .query(
                    &format!(
                        "SELECT \"{producer_env_name}\".push_occurrence(convert_to('stream ' || i, 'UTF8'))::text
                           FROM generate_series(1, 50) AS i"
                    ),
                    &[],
                )
                .await
                .unwrap();
            ids.extend(rows.iter().map(|r| r.get::<_, String>(0)));
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        ids
    });
    wait_until("the stream is flowing", || async {
        consumer.count() >= 300
    })
    .await;
    let status = relay.terminate().await;
    assert_eq!(status.code(), Some(0), "a stop by SIGTERM exits 0");
    // PostgreSQL ends a backend shortly after its client is gone.
    wait_until(
        "no session (and so no row lock) outlives the relay",
        || async { env.relay_sessions().await == 0 },
    )
    .await;

    let ids = producer.await.unwrap();
    let successor = env.relay().await;
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &ids);
    assert!(successor.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn the_seeds_url_with_an_empty_vhost_path_reaches_the_default_vhost() {
    let mut env = TestEnv::new("vhost").await;
    // The seed's form: `localhost` and a bare trailing slash, which the Go
    // client read as the default vhost `/`.
    env.config["rabbitmq"]["url"] = "amqp://guest:guest@localhost:5672/".into();
    env.migrate().await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    // Ready, and at the first attempt: no error was reported on the way.
    let log = relay.log_text();
    assert!(!log.contains("cannot connect"), "{log}");
    let ids = env.insert_many(20, 10).await;
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &ids);
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn three_instances_on_one_host_from_the_seeds_file_all_relay() {
    let mut env = TestEnv::new("seedfile").await;
    // The seed's file as its users have it: no admin section, the seed's
    // URL, retry block and defaults. Only the names are the test's own.
    let mut config: serde_json::Value =
        serde_json::from_str(include_str!("seed_config.json")).unwrap();
    config["rabbitmq"]["queue"]["name"] = env.name.clone().into();
    config["listener"]["channels"] = serde_json::json!([env.name]);
    config["postgres"]["schema"] = env.name.clone().into();
    env.config = config;
    env.migrate().await;
    let consumer = env.consumer().await;
    let path = env.write_config();
    let mut relays: Vec<Relay> = (0..3)
        .map(|_| Relay::spawn(&path, env.dir.path()))
        .collect();
    // At most one has the default admin port; the others say so once each
    // (and have no /readyz to ask).
    let says = |relay: &Relay, line: &str| relay.log_count(line) == 1;
    wait_until(
        "each relay serves its admin endpoint or says why not",
        || async {
            relays.iter().all(|r| {
                says(r, "admin endpoint not started") || says(r, "admin endpoint listening")
            })
        },
    )
    .await;
    let warned = relays
        .iter()
        .filter(|r| says(r, "admin endpoint not started"))
        .count();
    assert!(warned >= 2, "warned {warned}");
    for relay in &mut relays {
        if !says(relay, "admin endpoint not started") {
            relay.wait_ready_or_exit().await;
        }
    }
    let ids = env.insert_many(600, 20).await;
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &ids);
    for mut relay in relays {
        assert!(relay.is_running(), "{}", relay.log_text());
        assert!(relay.terminate().await.success());
    }
    env.cleanup().await;
}

#[tokio::test]
async fn far_from_postgresql_the_relay_keeps_more_batches_in_flight_up_to_its_cap() {
    let mut env = TestEnv::new("distance").await;
    env.migrate().await;
    // Each batch waits on four round trips to PostgreSQL (BEGIN, claim,
    // mark, COMMIT); at 20 ms each that is far more than its own work.
    let proxy =
        crate::proxy::Proxy::start_delayed(pg_port(), std::time::Duration::from_millis(20)).await;
    env.config["postgres"]["port"] = proxy.port.into();
    env.config["relay"]["max_workers"] = 4.into();
    // Windows of 100 in batches of 50: 2 batches in flight nearby.
    let ids = env.insert_many(2000, 500).await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    wait_until("the relay keeps 4 batches in flight", || async {
        relay.metric("pushoccurrence_batches_in_flight").await == Some(4.0)
    })
    .await;
    // The workers past the window claim on sessions of their own: four
    // claim sessions and the listener's.
    wait_until("4 claim sessions are open", || async {
        env.relay_sessions().await >= 5
    })
    .await;
    consumer.wait_for_all(&ids).await;
    wait_until("nothing is pending", || async { env.pending().await == 0 }).await;
    assert_exactly_once(&consumer, &ids);
    assert_eq!(
        relay.metric("pushoccurrence_batches_in_flight").await,
        Some(4.0),
        "never past relay.max_workers"
    );
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}
