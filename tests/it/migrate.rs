//! `migrate`: creates the seed's schema, or adds the relay's indexes and the
//! producer function to an existing one, and can run any number of times.

use crate::support::*;

async fn index_names(env: &TestEnv) -> Vec<String> {
    env.texts(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 ORDER BY 1",
        &[&env.name],
    )
    .await
}

#[tokio::test]
async fn migrate_creates_the_seed_schema_and_is_idempotent() {
    let env = TestEnv::new("migrate").await;
    let first = env.migrate().await;
    assert!(
        first.contains("tables created, indexes created: message_queue_log_pending_enqueued_idx, message_queue_log_data_message_id_idx, message_queue_log_transfer_time_idx, message_queue_log_parked_idx, message_queue_log_ordering_key_idx, message_id uuid"),
        "{first}"
    );
    let again = env.migrate().await;
    assert!(
        again.contains("tables already present, indexes created: none, already present: message_queue_log_pending_enqueued_idx, message_queue_log_data_message_id_idx, message_queue_log_transfer_time_idx, message_queue_log_parked_idx, message_queue_log_ordering_key_idx, message_id uuid"),
        "{again}"
    );
    // The indexes are marked as the relay's in the creating transaction.
    let comments: i64 = env
        .pg
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND obj_description(c.oid, 'pg_class') LIKE 'pushoccurrence:%'",
            &[&env.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(comments, 5);
    assert_eq!(
        index_names(&env).await,
        [
            "message_queue_log_data_message_id_idx",
            "message_queue_log_ordering_key_idx",
            "message_queue_log_parked_idx",
            "message_queue_log_pending_enqueued_idx",
            "message_queue_log_pkey",
            "message_queue_log_transfer_time_idx"
        ]
    );
    // The producer helper writes both rows and returns the new id.
    let id: String = env
        .pg
        .query_one(
            &format!(
                "SELECT \"{}\".push_occurrence('\\x01'::bytea)::text",
                env.name
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(id.len(), 36);
    assert_eq!(env.pending().await, 1);
    env.cleanup().await;
}

#[tokio::test]
async fn migrate_adds_to_an_existing_seed_schema_without_changing_its_types() {
    let env = TestEnv::new("existing").await;
    env.create_seed_tables("text", "jsonb").await;
    env.insert_event("before-migrate", "'{\"k\": 1}'", false)
        .await;
    let stdout = env.migrate().await;
    assert!(
        stdout.contains("message_id text") && stdout.contains("message_body jsonb"),
        "{stdout}"
    );
    assert!(
        index_names(&env)
            .await
            .contains(&"message_queue_log_pending_enqueued_idx".to_owned())
    );
    // The helper follows the table's types: a text id and a jsonb body.
    env.pg
        .execute(
            &format!(
                "SELECT \"{}\".push_occurrence('{{\"k\": 2}}'::jsonb, 'my-id')",
                env.name
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(env.pending().await, 2);
    env.cleanup().await;
}

#[tokio::test]
async fn the_claim_query_uses_the_partial_index_not_a_scan_of_history() {
    let env = TestEnv::new("plan").await;
    env.migrate().await;
    let s = &env.name;
    // 50 000 transferred rows of history and a few pending ones, and no
    // statistics yet (a fresh table filled in a burst).
    env.pg
        .batch_execute(&format!(
            "INSERT INTO \"{s}\".message_queue_log (message_id, transferred)
                  SELECT gen_random_uuid(), i > 20 FROM generate_series(1, 50000) i;
             INSERT INTO \"{s}\".message_queue_log_data
                                    SELECT message_id, '\\x00' FROM \"{s}\".message_queue_log;"
        ))
        .await
        .unwrap();
    // As the relay's claim sessions plan it: the generic plan, which is
    // what their settings make them run.
    env.prepare_claim_as_the_relay(true).await;
    let plan = env
        .texts(
            "EXPLAIN EXECUTE claim(100, 1000000, 16000000, '{}', 200, '-infinity', '00000000-0000-0000-0000-000000000000')",
            &[],
        )
        .await
        .join("\n");
    assert!(
        plan.contains("message_queue_log_pending_enqueued_idx"),
        "{plan}"
    );
    assert!(!plan.contains("Seq Scan"), "{plan}");
    assert!(
        plan.contains("message_queue_log_data_message_id_idx"),
        "{plan}"
    );
    let (generic, custom): (i64, i64) = {
        let row = env
            .pg
            .query_one(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = 'claim'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((generic, custom), (1, 0), "{plan}");
    eprintln!("{plan}");
    env.cleanup().await;
}

/// What the release before claim order left behind: the pending index on
/// message_id and a relay_enqueued_at stamped at transaction start.
async fn as_the_release_before_claim_order_left_it(env: &TestEnv) {
    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "DROP INDEX \"{s}\".message_queue_log_pending_enqueued_idx;
             CREATE INDEX message_queue_log_pending_idx ON \"{s}\".message_queue_log (message_id)
                 WHERE transferred IS NOT TRUE AND relay_parked_at IS NULL;
             ALTER TABLE \"{s}\".message_queue_log ALTER COLUMN relay_enqueued_at SET DEFAULT now();"
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_relay_without_auto_migrate_warns_about_the_old_index_and_migrate_replaces_it_under_load()
{
    let mut env = TestEnv::new("oldidx").await;
    env.migrate().await;
    as_the_release_before_claim_order_left_it(&env).await;
    env.config["postgres"]["auto_migrate"] = false.into();
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    relay
        .wait_log("lacks the pending-rows index of this release")
        .await;
    // It still relays, through the old index.
    let mut ids = env.insert_many(30, 10).await;
    consumer.wait_for_all(&ids).await;
    // The owner migrates while the relay runs: the index is built and the
    // old one dropped without blocking it, and events keep flowing.
    let stdout = env.migrate().await;
    assert!(
        stdout.contains("dropped (superseded): message_queue_log_pending_idx"),
        "{stdout}"
    );
    ids.extend(env.insert_many(30, 10).await);
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &ids);
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn claims_take_the_oldest_rows_first_and_an_earlier_pending_index_is_replaced() {
    use pushoccurrence::db::outbox::{ClaimedRow, Outbox};
    let env = TestEnv::new("order").await;
    env.migrate().await;
    let s = &env.name;
    as_the_release_before_claim_order_left_it(&env).await;
    let stdout = env.migrate().await;
    assert!(
        stdout.contains("indexes created: message_queue_log_pending_enqueued_idx, already present: message_queue_log_data_message_id_idx, message_queue_log_transfer_time_idx, message_queue_log_parked_idx, message_queue_log_ordering_key_idx, dropped (superseded): message_queue_log_pending_idx"),
        "{stdout}"
    );
    assert_eq!(
        index_names(&env).await,
        [
            "message_queue_log_data_message_id_idx",
            "message_queue_log_ordering_key_idx",
            "message_queue_log_parked_idx",
            "message_queue_log_pending_enqueued_idx",
            "message_queue_log_pkey",
            "message_queue_log_transfer_time_idx"
        ]
    );
    // One transaction writes three events, their ids out of order: each row
    // is stamped when it is inserted, so claims take them as written.
    let ids = [
        "ffffffff-0000-4000-8000-000000000000",
        "00000000-0000-4000-8000-000000000000",
        "88888888-0000-4000-8000-000000000000",
    ];
    let inserts: String = ids
        .iter()
        .map(|id| {
            format!(
                "INSERT INTO \"{s}\".message_queue_log (message_id) VALUES ('{id}');
                 INSERT INTO \"{s}\".message_queue_log_data VALUES ('{id}', '\\x01');"
            )
        })
        .collect();
    env.pg
        .batch_execute(&format!("BEGIN; {inserts} COMMIT;"))
        .await
        .unwrap();
    let outbox = Outbox::inspect(&env.pg, s).await.unwrap();
    let first = env.pg.prepare(&outbox.claim_sql(false)).await.unwrap();
    let after = env.pg.prepare(&outbox.claim_sql(true)).await.unwrap();
    let (limit, max) = (2_i64, 1_000_000_i64);
    let no_keys: Vec<String> = Vec::new();
    let window = limit * 2;
    let claimed = |rows: Vec<tokio_postgres::Row>| -> Vec<ClaimedRow> {
        rows.iter()
            .filter_map(|r| ClaimedRow::decode(r).unwrap().map(|(row, _)| row))
            .collect()
    };
    let batch = claimed(
        env.pg
            .query(&first, &[&limit, &max, &max, &no_keys, &window])
            .await
            .unwrap(),
    );
    let taken: Vec<&str> = batch.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(taken, ids[..2]);
    // The cursor resumes after the last row taken.
    let last = batch.last().unwrap();
    let cursor = last.enqueued_at.as_ref().unwrap();
    let batch = claimed(
        env.pg
            .query(
                &after,
                &[&limit, &max, &max, &no_keys, &window, cursor, &last.id],
            )
            .await
            .unwrap(),
    );
    let taken: Vec<&str> = batch.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(taken, ids[2..]);
    // A row a producer stamped NULL itself comes first in a pass, not never.
    let unstamped = "44444444-0000-4000-8000-000000000000";
    env.pg
        .batch_execute(&format!(
            "INSERT INTO \"{s}\".message_queue_log (message_id, relay_enqueued_at) VALUES ('{unstamped}', NULL);
             INSERT INTO \"{s}\".message_queue_log_data VALUES ('{unstamped}', '\\x01');"
        ))
        .await
        .unwrap();
    let batch = claimed(
        env.pg
            .query(&first, &[&limit, &max, &max, &no_keys, &window])
            .await
            .unwrap(),
    );
    assert_eq!(
        (batch[0].id.as_str(), batch[0].enqueued_at.is_none()),
        (unstamped, true)
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_outbox_from_before_routing_gains_the_message_columns_and_one_helper() {
    let env = TestEnv::new("upgrade").await;
    env.create_seed_tables("uuid", "bytea").await;
    let s = &env.name;
    // What the release before routing left behind: its bookkeeping columns
    // and a three-argument helper.
    env.pg
        .batch_execute(&format!(
            "ALTER TABLE \"{s}\".message_queue_log
                 ADD COLUMN relay_attempts integer NOT NULL DEFAULT 0,
                 ADD COLUMN relay_next_attempt_at timestamptz,
                 ADD COLUMN relay_last_error text, ADD COLUMN relay_parked_at timestamptz;
             CREATE FUNCTION \"{s}\".push_occurrence(p_message_body bytea, p_message_id uuid DEFAULT NULL,
                 p_channel text DEFAULT 'x') RETURNS uuid LANGUAGE sql AS 'SELECT gen_random_uuid()';"
        ))
        .await
        .unwrap();
    env.migrate().await;
    let columns: i64 = env
        .pg
        .query_one(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = $1
              AND table_name = 'message_queue_log' AND is_nullable = 'YES'
              AND column_name IN ('exchange', 'routing_key', 'headers', 'content_type', 'correlation_id',
                                  'reply_to', 'message_type', 'expiration_ms', 'priority', 'notify_channel')",
            &[&env.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(columns, 10);
    let helpers: i64 = env
        .pg
        .query_one(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = $1 AND p.proname = 'push_occurrence'",
            &[&env.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        helpers, 1,
        "the old helper must be replaced, not overloaded"
    );
    // Seed-era positional calls still work, and the channel is recorded.
    let id: String = env
        .pg
        .query_one(
            &format!("SELECT \"{s}\".push_occurrence('\\x01'::bytea, NULL, 'elsewhere')::text"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let channel: Option<String> = env
        .pg
        .query_one(
            &format!(
                "SELECT notify_channel FROM \"{s}\".message_queue_log WHERE message_id::text = $1"
            ),
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(channel.as_deref(), Some("elsewhere"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_column_of_the_same_name_and_another_type_is_reported_not_reused() {
    let env = TestEnv::new("clash").await;
    env.create_seed_tables("uuid", "bytea").await;
    env.pg
        .batch_execute(&format!(
            "ALTER TABLE \"{}\".message_queue_log ADD COLUMN headers text",
            env.name
        ))
        .await
        .unwrap();
    let out = pushoccurrence(&env.write_config(), &["migrate"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}.message_queue_log.headers is text, but the relay reads it as jsonb",
            env.name
        )),
        "{stderr}"
    );
    env.cleanup().await;
}

/// Writes `n` events the seed's way (both rows, no helper, no relay
/// columns yet); returns their ids.
async fn insert_seed_events(env: &TestEnv, n: i32) -> Vec<String> {
    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "BEGIN;
             CREATE TEMP TABLE new_ids AS SELECT gen_random_uuid() AS id FROM generate_series(1, {n});
             INSERT INTO \"{s}\".message_queue_log (message_id) SELECT id FROM new_ids;
             INSERT INTO \"{s}\".message_queue_log_data (message_id, message_body)
                  SELECT id, convert_to('seed ' || id, 'UTF8') FROM new_ids;
             COMMIT;"
        ))
        .await
        .unwrap();
    let ids = env.texts("SELECT id::text FROM new_ids", &[]).await;
    env.pg.batch_execute("DROP TABLE new_ids").await.unwrap();
    ids
}

/// Starts three relays at once on the test's outbox (auto_migrate on),
/// checks that all come up and stay up, and that `ids` plus events written
/// afterwards arrive exactly once.
async fn three_relays_started_at_once_deliver(env: &TestEnv, mut ids: Vec<String>) {
    let consumer = env.consumer().await;
    let relays = env.relays_at_once(3).await;
    ids.extend(env.insert_many(300, 20).await);
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &ids);
    for mut relay in relays {
        assert!(relay.is_running(), "{}", relay.log_text());
        assert!(relay.terminate().await.success());
    }
}

#[tokio::test]
async fn three_relays_started_at_once_on_the_seeds_tables_all_come_up() {
    let env = TestEnv::new("start3old").await;
    env.create_seed_tables("uuid", "bytea").await;
    let ids = insert_seed_events(&env, 200).await;
    three_relays_started_at_once_deliver(&env, ids).await;
    assert!(
        index_names(&env)
            .await
            .contains(&"message_queue_log_pending_enqueued_idx".to_owned())
    );
    env.cleanup().await;
}

#[tokio::test]
async fn three_relays_started_at_once_on_a_fresh_schema_all_come_up() {
    let env = TestEnv::new("start3new").await;
    three_relays_started_at_once_deliver(&env, Vec::new()).await;
    env.cleanup().await;
}

#[tokio::test]
async fn three_migrate_commands_at_once_all_succeed() {
    for seed_tables in [true, false] {
        let env = TestEnv::new("migrate3").await;
        if seed_tables {
            env.create_seed_tables("uuid", "bytea").await;
        }
        let path = env.write_config();
        let runs: Vec<_> = (0..3)
            .map(|_| pushoccurrence(&path, &["migrate"]).output())
            .collect();
        for out in futures_util::future::join_all(runs).await {
            let out = out.unwrap();
            assert_eq!(
                out.status.code(),
                Some(0),
                "seed tables: {seed_tables}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(
            index_names(&env).await,
            [
                "message_queue_log_data_message_id_idx",
                "message_queue_log_ordering_key_idx",
                "message_queue_log_parked_idx",
                "message_queue_log_pending_enqueued_idx",
                "message_queue_log_pkey",
                "message_queue_log_transfer_time_idx"
            ]
        );
        env.cleanup().await;
    }
}

#[tokio::test]
async fn a_start_up_migration_whose_session_is_terminated_is_retried_not_fatal() {
    let env = TestEnv::new("migretry").await;
    env.create_seed_tables("uuid", "bytea").await;
    let ids = insert_seed_events(&env, 50).await;
    // Another "instance" holds the migration lock of this schema.
    let lock_key = format!("pushoccurrence:migrate:{}", env.name);
    env.pg
        .execute("SELECT pg_advisory_lock(hashtext($1))", &[&lock_key])
        .await
        .unwrap();
    let consumer = env.consumer().await;
    let mut relay = env.relay_unready().await;
    wait_until("the relay's session is at the migration lock", || async {
        let at_lock: i64 = env
            .pg
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name = $1 AND query LIKE '%advisory_lock%'",
                &[&env.name],
            )
            .await
            .unwrap()
            .get(0);
        at_lock > 0
    })
    .await;
    // The session is lost while it waits (57P01, then a closed session).
    assert_eq!(env.terminate_relay_sessions().await, 1);
    env.pg
        .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&lock_key])
        .await
        .unwrap();
    relay.wait_ready_or_exit().await;
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &ids);
    assert_eq!(
        relay.log_count("cannot prepare the outbox yet; retrying"),
        1
    );
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn a_schema_named_with_the_helpers_dollar_quote_tag_migrates_and_relays() {
    // `$fn$` was the tag quoting the producer helper's body, which names
    // the schema.
    let env = TestEnv::new("x$fn$y").await;
    assert!(env.name.contains("$fn$"));
    env.migrate().await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let ids = env.insert_many(40, 10).await;
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &ids);
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

/// `(index, comment)` of every index in the test's schema, by name.
async fn index_comments(env: &TestEnv) -> Vec<(String, Option<String>)> {
    env.pg
        .query(
            "SELECT c.relname::text, obj_description(c.oid, 'pg_class') FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relkind = 'i' ORDER BY 1",
            &[&env.name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn indexes_are_checked_by_definition_and_a_users_own_index_is_never_dropped() {
    let env = TestEnv::new("idxdef").await;
    env.migrate().await;
    let s = &env.name;
    // The user's own objects under the relay's index names: an index on
    // other columns, a table, and an index named like the earlier
    // release's pending index (which migrate replaces).
    env.pg
        .batch_execute(&format!(
            "DROP INDEX \"{s}\".message_queue_log_pending_enqueued_idx;
             DROP INDEX \"{s}\".message_queue_log_data_message_id_idx;
             CREATE INDEX message_queue_log_pending_enqueued_idx ON \"{s}\".message_queue_log (transfer_time);
             CREATE TABLE \"{s}\".message_queue_log_data_message_id_idx (x int);
             CREATE INDEX message_queue_log_pending_idx ON \"{s}\".message_queue_log (message_id, transferred);"
        ))
        .await
        .unwrap();
    let (code, out) = env.command(&["migrate"]).await;
    assert_eq!(code, Some(78), "{out}");
    assert!(
        out.contains(&format!(
            "index {s}.message_queue_log_pending_enqueued_idx: the name is taken by an index that is not the relay's"
        )) && out.contains("ALTER INDEX"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "index {s}.message_queue_log_data_message_id_idx: the name is taken by a table"
        )),
        "{out}"
    );
    // Nothing of the user's was dropped, nothing was claimed created.
    assert!(out.contains("indexes created: none"), "{out}");
    assert_eq!(
        index_names(&env).await,
        [
            "message_queue_log_ordering_key_idx",
            "message_queue_log_parked_idx",
            "message_queue_log_pending_enqueued_idx",
            "message_queue_log_pending_idx",
            "message_queue_log_pkey",
            "message_queue_log_transfer_time_idx"
        ]
    );
    // `check` does not take the user's index for the relay's.
    let (code, out) = env.command(&["check"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("no pending-rows index: claims will scan; its name message_queue_log_pending_enqueued_idx is taken by an index that is not the relay's"),
        "{out}"
    );

    // Once the names are free, migrate builds and marks its own indexes,
    // and still leaves the user's index alone.
    env.pg
        .batch_execute(&format!(
            "ALTER INDEX \"{s}\".message_queue_log_pending_enqueued_idx RENAME TO users_transfer_time_idx;
             DROP TABLE \"{s}\".message_queue_log_data_message_id_idx;"
        ))
        .await
        .unwrap();
    let out = env.migrate().await;
    assert!(
        out.contains("indexes created: message_queue_log_pending_enqueued_idx, message_queue_log_data_message_id_idx"),
        "{out}"
    );
    assert!(!out.contains("dropped"), "{out}");
    let comments = index_comments(&env).await;
    let comment = |name: &str| {
        comments
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, c)| c.clone())
            .unwrap_or_default()
    };
    assert!(comment("message_queue_log_pending_enqueued_idx").starts_with("pushoccurrence:"));
    assert!(comment("message_queue_log_data_message_id_idx").starts_with("pushoccurrence:"));
    assert_eq!(comment("message_queue_log_pending_idx"), "");
    assert_eq!(
        index_names(&env).await,
        [
            "message_queue_log_data_message_id_idx",
            "message_queue_log_ordering_key_idx",
            "message_queue_log_parked_idx",
            "message_queue_log_pending_enqueued_idx",
            "message_queue_log_pending_idx",
            "message_queue_log_pkey",
            "message_queue_log_transfer_time_idx",
            "users_transfer_time_idx"
        ]
    );
    // An index of exactly the relay's definition without the mark (as an
    // earlier release left it) is taken as the relay's and marked.
    env.pg
        .batch_execute(&format!(
            "COMMENT ON INDEX \"{s}\".message_queue_log_pending_enqueued_idx IS NULL"
        ))
        .await
        .unwrap();
    let out = env.migrate().await;
    assert!(
        out.contains("indexes created: none, already present: message_queue_log_pending_enqueued_idx, message_queue_log_data_message_id_idx"),
        "{out}"
    );
    assert!(
        index_comments(&env).await.iter().all(|(name, comment)| name
            == "message_queue_log_pending_idx"
            || name == "users_transfer_time_idx"
            || name == "message_queue_log_pkey"
            || comment
                .as_deref()
                .is_some_and(|c| c.starts_with("pushoccurrence:"))),
        "{:?}",
        index_comments(&env).await
    );
    let (code, out) = env.command(&["check"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("no pending-rows index"), "{out}");
    env.cleanup().await;
}

#[tokio::test]
async fn column_types_the_relay_cannot_use_are_refused_naming_the_column() {
    for (alter, column, found, supported) in [
        (
            "ALTER COLUMN transferred DROP DEFAULT, ALTER COLUMN transferred TYPE integer USING transferred::integer",
            "transferred",
            "integer",
            "boolean",
        ),
        (
            "ALTER COLUMN transfer_time TYPE text",
            "transfer_time",
            "text",
            "timestamp",
        ),
        (
            "ALTER COLUMN relay_attempts DROP DEFAULT, ALTER COLUMN relay_attempts TYPE text",
            "relay_attempts",
            "text",
            "integer",
        ),
    ] {
        let env = TestEnv::new("coltype").await;
        env.migrate().await;
        env.pg
            .batch_execute(&format!(
                // The partial indexes' predicates need a boolean `transferred`.
                "DROP INDEX \"{s}\".message_queue_log_pending_enqueued_idx;
                 DROP INDEX \"{s}\".message_queue_log_transfer_time_idx;
                 DROP INDEX \"{s}\".message_queue_log_parked_idx;
                 DROP INDEX \"{s}\".message_queue_log_ordering_key_idx;
                 ALTER TABLE \"{s}\".message_queue_log {alter}",
                s = env.name
            ))
            .await
            .unwrap();
        let expected = format!("{}.message_queue_log.{column} is {found}", env.name);
        for args in [&["check"][..], &["status"], &["migrate"]] {
            let (code, out) = env.command(args).await;
            assert_eq!(code, Some(78), "{args:?}: {out}");
            assert!(
                out.contains(&expected) && out.contains(supported),
                "{args:?}: {out}"
            );
        }
        env.cleanup().await;
    }
}

#[tokio::test]
async fn ids_the_helper_cannot_make_are_refused_and_a_bigint_id_takes_its_default() {
    // A bigint id with an identity: the helper and `send` take its next
    // value, and the event is relayed under it.
    let env = TestEnv::new("bigid").await;
    env.create_seed_tables("bigint GENERATED BY DEFAULT AS IDENTITY", "bytea")
        .await;
    env.migrate().await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let (code, out) = env.command(&["send", "hello"]).await;
    assert_eq!(code, Some(0), "{out}");
    let id = out.lines().next().unwrap().trim().to_owned();
    assert!(id.parse::<i64>().is_ok(), "{out}");
    consumer.wait_for_all(std::slice::from_ref(&id)).await;
    assert_eq!(consumer.get(&id).body, b"hello");
    assert!(relay.terminate().await.success());
    env.cleanup().await;

    // Without a default there is nothing to take: the helper says so.
    let env = TestEnv::new("bigid0").await;
    env.create_seed_tables("bigint", "bytea").await;
    let out = env.migrate().await;
    assert!(
        out.contains("need an id from the caller: message_id is bigint without a default"),
        "{out}"
    );
    let s = &env.name;
    let e = env
        .pg
        .execute(&format!("SELECT \"{s}\".push_occurrence('\\x01')"), &[])
        .await
        .unwrap_err();
    let text = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(
        text.contains("message_id is bigint and has no default") && text.contains("p_message_id"),
        "{e:?}"
    );
    env.pg
        .execute(&format!("SELECT \"{s}\".push_occurrence('\\x01', 7)"), &[])
        .await
        .unwrap();
    env.cleanup().await;

    // An id column too short for a generated id (a uuid's 36 characters):
    // refused, never truncated into colliding ids.
    let env = TestEnv::new("shortid").await;
    env.create_seed_tables("varchar(8)", "bytea").await;
    env.migrate().await;
    let s = &env.name;
    let e = env
        .pg
        .execute(&format!("SELECT \"{s}\".push_occurrence('\\x01')"), &[])
        .await
        .unwrap_err();
    let text = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(
        text.contains("message_id is character varying(8)") && text.contains("36"),
        "{e:?}"
    );
    assert_eq!(env.pending().await, 0);
    env.cleanup().await;

    // A body longer than a varchar(n) column: `send` fails, nothing written.
    let env = TestEnv::new("shortbody").await;
    env.create_seed_tables("text", "varchar(8)").await;
    env.migrate().await;
    let (code, out) = env.command(&["send", "0123456789"]).await;
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("SQLSTATE 22001"), "{out}");
    assert_eq!(env.pending().await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn a_body_table_alone_gets_a_status_table_of_its_id_type_and_a_failure_creates_nothing() {
    let env = TestEnv::new("halfmade").await;
    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "CREATE SCHEMA \"{s}\";
             CREATE TABLE \"{s}\".message_queue_log_data (message_id text, message_body bytea);"
        ))
        .await
        .unwrap();
    let out = env.migrate().await;
    assert!(out.contains("message_id text"), "{out}");
    env.pg
        .execute(
            &format!("SELECT \"{s}\".push_occurrence('\\x01', 'my-id')"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(env.pending().await, 1);
    env.cleanup().await;

    // A body table the relay cannot read: refused, and nothing is created.
    let env = TestEnv::new("halfbad").await;
    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "CREATE SCHEMA \"{s}\";
             CREATE TABLE \"{s}\".message_queue_log_data (message_id text, message_body integer);"
        ))
        .await
        .unwrap();
    let (code, out) = env.command(&["migrate"]).await;
    assert_eq!(code, Some(78), "{out}");
    assert!(
        out.contains(&format!(
            "{s}.message_queue_log_data.message_body is integer"
        )),
        "{out}"
    );
    let tables = env
        .texts(
            "SELECT relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 ORDER BY 1",
            &[&env.name],
        )
        .await;
    assert_eq!(tables, ["message_queue_log_data"]);
    env.cleanup().await;
}

#[tokio::test]
async fn migrate_behind_an_open_transaction_never_blocks_producers() {
    // The seed's tables: migrate adds the relay's columns.
    let env = TestEnv::new("locktmo").await;
    env.create_seed_tables("uuid", "bytea").await;
    migrate_behind_an_open_transaction(&env).await;
    env.cleanup().await;
    // The release before: migrate changes a column's default.
    let env = TestEnv::new("locktmo2").await;
    env.migrate().await;
    as_the_release_before_claim_order_left_it(&env).await;
    migrate_behind_an_open_transaction(&env).await;
    env.cleanup().await;
}

/// Holds a transaction that wrote to the outbox open while `migrate` runs
/// and producers insert under a statement timeout: no insert times out,
/// migrate says what it waits for, and completes once the transaction ends.
async fn migrate_behind_an_open_transaction(env: &TestEnv) {
    let s = env.name.clone();
    // A transaction that touched the outbox stays open.
    let holder = pg().await;
    holder.batch_execute("BEGIN").await.unwrap();
    let held = "00000000-0000-4000-8000-000000000001";
    holder
        .batch_execute(&format!(
            "INSERT INTO \"{s}\".message_queue_log (message_id) VALUES ('{held}');
             INSERT INTO \"{s}\".message_queue_log_data VALUES ('{held}', '\\x01');"
        ))
        .await
        .unwrap();
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // Migrate needs an exclusive lock on the status table.
    let log = env.dir.path().join("migrate.log");
    let mut migrate = pushoccurrence(&env.write_config(), &["migrate"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Producers keep writing, each statement under a timeout, until
    // migrate has said what it waits for more than once.
    let producer = pg().await;
    producer
        .batch_execute("SET statement_timeout = '10s'")
        .await
        .unwrap();
    let mut ids = vec![held.to_owned()];
    wait_until("migrate reports the lock it waits for, twice", || {
        let id = uuid_like(ids.len());
        ids.push(id.clone());
        let (producer, s, log) = (&producer, &s, &log);
        async move {
            producer
                .batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO \"{s}\".message_queue_log (message_id) VALUES ('{id}');
                     INSERT INTO \"{s}\".message_queue_log_data VALUES ('{id}', '\\x01');
                     COMMIT;"
                ))
                .await
                .unwrap_or_else(|e| panic!("a producer's insert failed: {e:?}"));
            let text = std::fs::read_to_string(log).unwrap_or_default();
            text.matches(&format!("pid {holder_pid}")).count() >= 2
        }
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("waiting for a lock") && text.contains("idle in transaction"),
        "{text}"
    );
    // Once the transaction ends, migrate completes.
    holder.batch_execute("COMMIT").await.unwrap();
    let status = tokio::time::timeout(PATIENCE, migrate.wait())
        .await
        .expect("migrate completes")
        .unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert_eq!(env.pending().await, ids.len() as i64);
    assert_eq!(
        index_names(env).await,
        [
            "message_queue_log_data_message_id_idx",
            "message_queue_log_ordering_key_idx",
            "message_queue_log_parked_idx",
            "message_queue_log_pending_enqueued_idx",
            "message_queue_log_pkey",
            "message_queue_log_transfer_time_idx"
        ]
    );
}

/// A distinct uuid-shaped id for the `n`th event of a test.
fn uuid_like(n: usize) -> String {
    format!("10000000-0000-4000-8000-{n:012}")
}

#[tokio::test]
async fn an_index_build_names_the_transactions_it_waits_for() {
    let env = TestEnv::new("cicwait").await;
    env.migrate().await;
    as_the_release_before_claim_order_left_it(&env).await;
    // A transaction anywhere in the database, on no outbox table: a
    // concurrent index build waits for it to end.
    let holder = pg().await;
    holder
        .batch_execute("BEGIN; SELECT txid_current();")
        .await
        .unwrap();
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let log = env.dir.path().join("migrate.log");
    let mut migrate = pushoccurrence(&env.write_config(), &["migrate"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until(
        "migrate names the transaction its index build waits for",
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let named = text.lines().any(|l| {
                l.contains("it waits until these transactions of the database have ended")
                    && l.contains("message_queue_log_pending_enqueued_idx")
                    && l.contains(&format!("pid {holder_pid} (application_name 'po-test'"))
            });
            async move { named }
        },
    )
    .await;
    assert!(migrate.try_wait().unwrap().is_none(), "migrate is waiting");
    holder.batch_execute("COMMIT").await.unwrap();
    let status = tokio::time::timeout(PATIENCE, migrate.wait())
        .await
        .expect("migrate completes")
        .unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert_eq!(
        index_names(&env).await,
        [
            "message_queue_log_data_message_id_idx",
            "message_queue_log_ordering_key_idx",
            "message_queue_log_parked_idx",
            "message_queue_log_pending_enqueued_idx",
            "message_queue_log_pkey",
            "message_queue_log_transfer_time_idx"
        ]
    );
    env.cleanup().await;
}

/// The unix milliseconds a UUIDv7 (as text) carries in its first 48 bits.
fn uuidv7_millis(id: &str) -> i64 {
    let hex: String = id.chars().filter(|c| *c != '-').take(12).collect();
    i64::from_str_radix(&hex, 16).unwrap()
}

/// Ids `push_occurrence()` makes are UUIDv7 (time first, RFC 9562), for a
/// uuid and for a text `message_id`: consecutive events get increasing ids,
/// so their index entries (the primary key's, the body table's) land on
/// the newest pages instead of anywhere in the history.
#[tokio::test]
async fn push_occurrence_makes_time_ordered_uuidv7_ids() {
    for id_type in ["uuid", "text"] {
        let env = TestEnv::new(&format!("uuidv7_{id_type}")).await;
        env.create_seed_tables(id_type, "bytea").await;
        env.migrate().await;
        let now_ms = || {
            i64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis(),
            )
            .unwrap()
        };
        let before = now_ms();
        let mut ids = Vec::new();
        for _ in 0..5 {
            let id: String = env
                .pg
                .query_one(
                    &format!(
                        "SELECT \"{}\".push_occurrence('\\x01'::bytea)::text",
                        env.name
                    ),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            ids.push(id);
            // A new millisecond for the next id.
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        }
        let after = now_ms();
        for id in &ids {
            assert_eq!(id.len(), 36, "{id}");
            assert_eq!(&id[14..15], "7", "version 7: {id}");
            assert!("89ab".contains(&id[19..20]), "RFC 9562 variant: {id}");
            let ms = uuidv7_millis(id);
            assert!(
                before - 1000 <= ms && ms <= after + 1000,
                "{id}: {ms} not in {before}..{after}"
            );
        }
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ids, "ids increase with time");
        assert_eq!(env.pending().await, 5);
        env.cleanup().await;
    }
}

/// `status` reads the parked and the recently transferred rows through
/// indexes, never the history: each of its statements is planned without a
/// scan of the status table over 50 000 old transferred rows, and its
/// counts are right.
#[tokio::test]
async fn status_reads_parked_and_recent_rows_through_indexes_not_the_history() {
    let env = TestEnv::new("statusplan").await;
    env.migrate().await;
    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "INSERT INTO \"{s}\".message_queue_log (message_id, transferred, transfer_time)
                  SELECT gen_random_uuid(), true, localtimestamp - interval '2 days' FROM generate_series(1, 50000);
             INSERT INTO \"{s}\".message_queue_log (message_id, transferred, transfer_time)
                  SELECT gen_random_uuid(), true, localtimestamp - interval '30 minutes' FROM generate_series(1, 3);
             INSERT INTO \"{s}\".message_queue_log (message_id, transferred, transfer_time)
                  SELECT gen_random_uuid(), true, localtimestamp FROM generate_series(1, 2);
             INSERT INTO \"{s}\".message_queue_log (message_id, relay_parked_at, relay_attempts)
                  SELECT gen_random_uuid(), now(), 3 FROM generate_series(1, 4);
             INSERT INTO \"{s}\".message_queue_log (message_id) SELECT gen_random_uuid() FROM generate_series(1, 5);
             ANALYZE \"{s}\".message_queue_log;"
        ))
        .await
        .unwrap();
    let outbox = pushoccurrence::db::outbox::Outbox::inspect(&env.pg, s)
        .await
        .unwrap();
    for sql in [
        outbox.history_sql(),
        outbox.backlog_sql(),
        outbox.parked_count_sql(),
        outbox.parked_sql().replace("$1", "100"),
    ] {
        let plan = env.texts(&format!("EXPLAIN {sql}"), &[]).await.join("\n");
        assert!(!plan.contains("Seq Scan"), "{sql}\n{plan}");
    }
    let (code, out) = env.command(&["status"]).await;
    assert_eq!(code, Some(0), "{out}");
    for line in [
        "pending                   5",
        "parked                    4",
        "transferred, last minute  2",
        "transferred, last hour    5",
    ] {
        assert!(out.contains(line), "{line}: {out}");
    }
    env.cleanup().await;
}

/// A status table without its body table: `migrate` says what is missing
/// and how to create it (with the status table's id type), not to run
/// `migrate`, which is what just refused.
#[tokio::test]
async fn migrate_on_a_status_table_without_its_body_table_says_how_to_make_one() {
    let env = TestEnv::new("nodata").await;
    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "CREATE SCHEMA \"{s}\";
             CREATE TABLE \"{s}\".message_queue_log (
                 message_id bigint PRIMARY KEY, transferred boolean DEFAULT false, transfer_time timestamp);"
        ))
        .await
        .unwrap();
    let (code, out) = env.command(&["migrate"]).await;
    assert_eq!(code, Some(78), "{out}");
    assert!(
        out.contains(&format!(
            "{s}.message_queue_log exists but {s}.message_queue_log_data does not"
        )) && out.contains("(message_id bigint, message_body bytea)"),
        "{out}"
    );
    assert!(!out.contains("run `pushoccurrence migrate`"), "{out}");
    env.cleanup().await;
}
