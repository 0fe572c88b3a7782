//! `migrate`: creates the seed's schema, or adds the relay's indexes and the
//! producer function to an existing one, and can run any number of times.

use crate::support::*;

async fn index_names(env: &TestEnv) -> Vec<String> {
    env.pg
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 ORDER BY 1",
            &[&env.name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn migrate_creates_the_seed_schema_and_is_idempotent() {
    let env = TestEnv::new("migrate").await;
    for _ in 0..2 {
        env.migrate().await;
    }
    assert_eq!(
        index_names(&env).await,
        [
            "message_queue_log_data_message_id_idx",
            "message_queue_log_pending_idx",
            "message_queue_log_pkey"
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
            .contains(&"message_queue_log_pending_idx".to_owned())
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
    let outbox = pushoccurrence::db::outbox::Outbox::inspect(&env.pg, s)
        .await
        .unwrap();
    // As the relay's claim sessions plan it.
    for (setting, value) in pushoccurrence::db::CLAIM_SESSION_SETTINGS {
        env.pg
            .batch_execute(&format!("SET {setting} = {value}"))
            .await
            .unwrap();
    }
    // The generic plan of the prepared statement, which is what those
    // settings make the sessions run.
    env.pg
        .batch_execute(&format!(
            "PREPARE claim(int8, int8, int8, text) AS {}",
            outbox.claim_sql(true)
        ))
        .await
        .unwrap();
    let plan: Vec<String> = env
        .pg
        .query(
            "EXPLAIN EXECUTE claim(100, 1000000, 16000000, '00000000-0000-0000-0000-000000000000')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("message_queue_log_pending_idx"), "{plan}");
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
