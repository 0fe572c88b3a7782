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
    let sql = outbox
        .claim_sql(true)
        .replace("$1", "100")
        .replace("$2", "'00000000-0000-0000-0000-000000000000'");
    let plan: Vec<String> = env
        .pg
        .query(&format!("EXPLAIN {sql}"), &[])
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
    eprintln!("{plan}");
    env.cleanup().await;
}
