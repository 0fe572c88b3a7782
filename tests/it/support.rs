//! Shared test plumbing: a private outbox, queue and channel per test, the
//! real `pushoccurrence` binary as a child process, a consumer that records
//! every delivery, and `wait_until` instead of sleeps.
//!
//! Services are the local PostgreSQL and RabbitMQ; `PO_TEST_PG_PORT` and
//! `PO_TEST_AMQP_URL` point elsewhere if needed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, NoTls};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_pushoccurrence");

/// How long any wait in a test may take before it fails.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn pg_port() -> u16 {
    std::env::var("PO_TEST_PG_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5432)
}

pub fn amqp_url() -> String {
    std::env::var("PO_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Connects to the test database as `postgres`.
pub async fn pg() -> Client {
    pg_database("test").await
}

/// Connects to `database` as `postgres`.
pub async fn pg_database(database: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname={database} application_name=po-test",
            pg_port()
        ),
        NoTls,
    )
    .await
    .expect("connect to the local PostgreSQL (is it running?)");
    tokio::spawn(connection);
    client
}

/// Polls `check` every 20 ms until it returns true; panics with `what` after [`PATIENCE`].
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One test's private world: schema, NOTIFY channel, queue, config file.
pub struct TestEnv {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub pg: Client,
    pub config: Value,
}

impl TestEnv {
    /// A fresh name and a config pointing at it; nothing is created yet.
    pub async fn new(tag: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "po_{tag}_{}_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        let config = json!({
            "postgres": {"host": "127.0.0.1", "port": pg_port(), "database": "test", "user": "postgres",
                         "password": "", "ssl_mode": "disable", "schema": name, "application_name": name},
            "rabbitmq": {"url": amqp_url(), "connection_name": name,
                         "queue": {"name": name, "durable": true, "auto_delete": false, "exclusive": false, "no_wait": false},
                         "retry": {"buffer_size": 100, "retry_delay_sec": 0.2, "idle_sleep_ms": 100}},
            "listener": {"channels": [name]},
            "relay": {"batch_size": 50, "max_retry_delay_sec": 2},
            // Any free port, so tests never meet; Relay::admin finds it.
            "admin": {"listen": "127.0.0.1:0"}
        });
        Self {
            name,
            dir: tempfile::tempdir().expect("temp dir"),
            pg: pg().await,
            config,
        }
    }

    /// Keeps the batches in flight at `buffer_size / batch_size` whatever
    /// round trip the relay measures (on a loaded machine PostgreSQL looks
    /// far, and `relay.max_workers` lets more batches fly): for tests that
    /// bound duplicates by `buffer_size` per fault.
    pub fn hold_window_at_buffer_size(&mut self) {
        let buffer = self.config["rabbitmq"]["retry"]["buffer_size"]
            .as_u64()
            .unwrap();
        let batch = self.config["relay"]["batch_size"].as_u64().unwrap();
        self.config["relay"]["max_workers"] = (buffer / batch).into();
    }

    /// Runs `pushoccurrence migrate` with the current config; panics with
    /// its output unless it succeeds. Returns what it printed.
    pub async fn migrate(&self) -> String {
        let out = pushoccurrence(&self.write_config(), &["migrate"])
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "migrate failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Writes the current config and returns its path.
    pub fn write_config(&self) -> PathBuf {
        let path = self.dir.path().join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&self.config).unwrap()).unwrap();
        path
    }

    /// Creates the seed's tables with the given column types (the seed
    /// allows uuid or text ids and bytea, jsonb or text bodies), without the
    /// relay's additions.
    pub async fn create_seed_tables(&self, id_type: &str, body_type: &str) {
        let s = &self.name;
        self.pg
            .batch_execute(&format!(
                "CREATE SCHEMA \"{s}\";
                 CREATE TABLE \"{s}\".message_queue_log (message_id {id_type} PRIMARY KEY,
                     transferred BOOLEAN DEFAULT FALSE, transfer_time TIMESTAMP);
                 CREATE TABLE \"{s}\".message_queue_log_data (
                     message_id {id_type} REFERENCES \"{s}\".message_queue_log(message_id),
                     message_body {body_type});"
            ))
            .await
            .unwrap();
    }

    /// Inserts a status row without its data row (no NOTIFY): an event
    /// whose body is missing, or not committed yet.
    pub async fn insert_status_row(&self, id: &str) {
        self.pg
            .execute(
                &format!(
                    "INSERT INTO \"{}\".message_queue_log (message_id) VALUES ('{id}')",
                    self.name
                ),
                &[],
            )
            .await
            .unwrap();
    }

    /// Runs `pushoccurrence` with this env's config and `args`: its exit
    /// code and its stdout followed by its stderr.
    pub async fn command(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = pushoccurrence(&self.write_config(), args)
            .output()
            .await
            .unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Inserts one event the seed's way, in one transaction: both rows, then
    /// `NOTIFY channel 'id'` when `notify` is set. `body` is a SQL expression.
    pub async fn insert_event(&self, id: &str, body_sql: &str, notify: bool) {
        let s = &self.name;
        let notify = if notify {
            format!("NOTIFY \"{s}\", '{id}';")
        } else {
            String::new()
        };
        self.pg
            .batch_execute(&format!(
                "BEGIN;
                 INSERT INTO \"{s}\".message_queue_log (message_id) VALUES ('{id}');
                 INSERT INTO \"{s}\".message_queue_log_data (message_id, message_body) VALUES ('{id}', {body_sql});
                 {notify}
                 COMMIT;"
            ))
            .await
            .unwrap();
    }

    /// Inserts `n` events with bytea bodies `body-<i>` through the producer
    /// helper, `per_tx` per transaction; returns their ids.
    pub async fn insert_many(&self, n: usize, per_tx: usize) -> Vec<String> {
        let mut ids = Vec::with_capacity(n);
        let mut start = 0;
        while start < n {
            let end = (start + per_tx).min(n);
            let rows = self
                .pg
                .query(
                    &format!(
                        "SELECT \"{}\".push_occurrence(convert_to('body-' || i, 'UTF8'))::text
                           FROM generate_series($1::int, $2::int) AS i",
                        self.name
                    ),
                    &[&(start as i32), &(end as i32 - 1)],
                )
                .await
                .unwrap();
            ids.extend(rows.iter().map(|r| r.get::<_, String>(0)));
            start = end;
        }
        ids
    }

    /// Starts a producer that writes `transactions` transactions of
    /// `per_tx` events through the producer helper, pausing `pause_ms`
    /// between them; it returns the ids of the events it committed.
    pub fn produce(
        &self,
        transactions: usize,
        per_tx: usize,
        pause_ms: u64,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        let schema = self.name.clone();
        tokio::spawn(async move {
            let pg = pg().await;
            let sql = format!(
                "SELECT \"{schema}\".push_occurrence(convert_to('stream ' || i, 'UTF8'))::text
                   FROM generate_series(1, $1::int) AS i"
            );
            let mut ids = Vec::new();
            for _ in 0..transactions {
                let rows = pg.query(&sql, &[&(per_tx as i32)]).await.unwrap();
                ids.extend(rows.iter().map(|r| r.get::<_, String>(0)));
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
            }
            ids
        })
    }

    /// A row's bookkeeping: `(attempts, last error, parked, transferred)`.
    pub async fn row_state(&self, id: &str) -> (i32, Option<String>, bool, bool) {
        let row = self
            .pg
            .query_one(
                &format!(
                    "SELECT relay_attempts, relay_last_error, relay_parked_at IS NOT NULL, transferred IS TRUE
                       FROM \"{}\".message_queue_log WHERE message_id::text = $1",
                    self.name
                ),
                &[&id],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2), row.get(3))
    }

    /// How many sessions carry the relay's application_name.
    pub async fn relay_sessions(&self) -> i64 {
        self.pg
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&self.name],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Terminates every session the relay opened (by its application_name).
    pub async fn terminate_relay_sessions(&self) -> i64 {
        self.pg
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                &[&self.name],
            )
            .await
            .unwrap()
            .len() as i64
    }

    /// The first column of every row `sql` returns (a text column).
    pub async fn texts(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Vec<String> {
        self.pg
            .query(sql, params)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Waits until no row is left untransferred.
    pub async fn wait_all_transferred(&self) {
        wait_until("every row is marked transferred", || async {
            self.pending().await == 0
        })
        .await;
    }

    /// Waits until exactly `left` rows are untransferred (parked ones, say).
    pub async fn wait_all_transferred_but(&self, left: i64) {
        wait_until(&format!("all rows but {left} are transferred"), || async {
            self.pending().await == left
        })
        .await;
    }

    /// Rows with at least one failed attempt charged.
    pub async fn charged(&self) -> i64 {
        self.pg
            .query_one(
                &format!(
                    "SELECT count(*) FROM \"{}\".message_queue_log WHERE relay_attempts > 0",
                    self.name
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Rows not yet transferred.
    pub async fn pending(&self) -> i64 {
        self.pg
            .query_one(
                &format!(
                    "SELECT count(*) FROM \"{}\".message_queue_log WHERE transferred IS NOT TRUE",
                    self.name
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Prepares the claim statement of `after_cursor` as `claim`, planned
    /// as the relay's claim sessions plan it (their settings, and so a
    /// generic plan): for tests that read its plan.
    pub async fn prepare_claim_as_the_relay(&self, after_cursor: bool) {
        let outbox = pushoccurrence::db::outbox::Outbox::inspect(&self.pg, &self.name)
            .await
            .unwrap();
        for (setting, value) in pushoccurrence::db::CLAIM_SESSION_SETTINGS {
            self.pg
                .batch_execute(&format!("SET {setting} = {value}"))
                .await
                .unwrap();
        }
        let types = if after_cursor {
            "int8, int8, int8, text[], int8, timestamptz, text"
        } else {
            "int8, int8, int8, text[], int8"
        };
        self.pg
            .batch_execute(&format!(
                "PREPARE claim({types}) AS {}",
                outbox.claim_sql(after_cursor)
            ))
            .await
            .unwrap();
    }

    /// Each ordering key's rows in the order the relay promises to deliver
    /// them: `(relay_enqueued_at NULLS FIRST, message_id)`.
    pub async fn key_orders(&self) -> HashMap<String, Vec<String>> {
        let rows = self
            .pg
            .query(
                &format!(
                    // The table's message_id, not the output column of that
                    // name: integer ids in their order, not as text.
                    "SELECT l.ordering_key, l.message_id::text AS id FROM \"{}\".message_queue_log l
                      WHERE l.ordering_key IS NOT NULL
                      ORDER BY l.ordering_key, l.relay_enqueued_at NULLS FIRST, l.message_id",
                    self.name
                ),
                &[],
            )
            .await
            .unwrap();
        let mut orders: HashMap<String, Vec<String>> = HashMap::new();
        for row in rows {
            orders.entry(row.get(0)).or_default().push(row.get(1));
        }
        orders
    }

    /// Writes one event of `key` through the producer helper, with body
    /// `body`, on the client given (inside its transaction, if any).
    pub async fn push_keyed(
        &self,
        client: &(impl GenericClient + Sync),
        key: Option<&str>,
        body: &str,
    ) -> String {
        client
            .query_one(
                &format!(
                    "SELECT \"{}\".push_occurrence(convert_to($1::text, 'UTF8'), p_ordering_key => $2::text)::text",
                    self.name
                ),
                &[&body, &key],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Declares the test queue as the relay will and starts a consumer on it.
    pub async fn consumer(&self) -> Consumer {
        Consumer::start(&amqp_url(), &self.name).await
    }

    /// Starts the relay binary with the current config.
    pub async fn relay(&self) -> Relay {
        Relay::start(&self.write_config(), self.dir.path()).await
    }

    /// Starts `n` relays at once from one config file, then waits until
    /// each is ready (failing at once if one exits).
    pub async fn relays_at_once(&self, n: usize) -> Vec<Relay> {
        let path = self.write_config();
        let mut relays: Vec<Relay> = (0..n)
            .map(|_| Relay::spawn(&path, self.dir.path()))
            .collect();
        for relay in &mut relays {
            relay.wait_ready_or_exit().await;
        }
        relays
    }

    /// Starts the relay binary without waiting for it to be ready.
    pub async fn relay_unready(&self) -> Relay {
        Relay::spawn(&self.write_config(), self.dir.path())
    }

    /// A fresh world in a database of its own, for a test that holds
    /// transactions open for long: a `CREATE INDEX CONCURRENTLY` (which
    /// `migrate` runs on existing tables) waits for every older transaction
    /// of its database, so in the shared one it would stall the start-up of
    /// every relay that runs beside this test.
    pub async fn in_own_database(tag: &str) -> Self {
        let mut env = Self::new(tag).await;
        env.pg
            .batch_execute(&format!("CREATE DATABASE \"{}\"", env.name))
            .await
            .unwrap();
        env.config["postgres"]["database"] = env.name.clone().into();
        env.pg = pg_database(&env.name).await;
        env
    }

    /// Drops the test's schema (or its own database) and queue.
    pub async fn cleanup(self) {
        if self.config["postgres"]["database"] == "test" {
            let _ = self
                .pg
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name))
                .await;
        } else {
            let _ = pg()
                .await
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                    self.name
                ))
                .await;
        }
        self.cleanup_queue_only().await;
    }

    /// Deletes the test's queue.
    pub async fn cleanup_queue_only(&self) {
        delete_from_broker(&[&self.name], &[]).await;
    }
}

/// Deletes queues and exchanges a test declared (missing ones are fine).
pub async fn delete_from_broker(queues: &[&str], exchanges: &[&str]) {
    let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await else {
        return;
    };
    // A refusal closes the channel, so each deletion gets its own.
    for queue in queues {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete((*queue).into(), QueueDeleteOptions::default())
                .await;
        }
    }
    for exchange in exchanges {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .exchange_delete((*exchange).into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// Whether `queue` exists on the local broker (a passive declare).
pub async fn queue_exists(queue: &str) -> bool {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect to the local RabbitMQ");
    // A missing queue closes the channel, so the connection is closed after.
    let exists = conn
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = conn.close(200, "bye".into()).await;
    exists
}

/// One message as the consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub timestamp: Option<u64>,
    pub exchange: String,
    pub routing_key: String,
    pub properties: BasicProperties,
}

/// Records every delivery on a queue, acking each after recording it.
pub struct Consumer {
    pub received: Arc<Mutex<Vec<Received>>>,
    _connection: Connection,
}

impl Consumer {
    /// Declares `queue` (durable, classic) and consumes from it.
    pub async fn start(url: &str, queue: &str) -> Self {
        Self::consume(url, queue, false).await
    }

    /// Consumes from `queue` once it exists, declared by someone else (the
    /// relay, from its config).
    pub async fn attach(queue: &str) -> Self {
        let url = amqp_url();
        wait_until(&format!("queue {queue} exists"), || async {
            let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await else {
                return false;
            };
            let ch = conn.create_channel().await.unwrap();
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let found = ch
                .queue_declare(queue.into(), passive, FieldTable::default())
                .await
                .is_ok();
            let _ = conn.close(200, "bye".into()).await;
            found
        })
        .await;
        Self::consume(&url, queue, true).await
    }

    /// Consumes from `queue` on the broker at `url`, declared by the relay.
    pub async fn attach_to(url: &str, queue: &str) -> Self {
        Self::consume(url, queue, true).await
    }

    async fn consume(url: &str, queue: &str, passive: bool) -> Self {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("connect to the local RabbitMQ (is it running?)");
        let channel = connection.create_channel().await.unwrap();
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    passive,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "po-test".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let p = &delivery.properties;
                sink.lock().unwrap().push(Received {
                    id: p
                        .message_id()
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                    body: delivery.data.clone(),
                    content_type: p.content_type().as_ref().map(|s| s.to_string()),
                    delivery_mode: *p.delivery_mode(),
                    timestamp: *p.timestamp(),
                    exchange: delivery.exchange.to_string(),
                    routing_key: delivery.routing_key.to_string(),
                    properties: p.clone(),
                });
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        });
        Self {
            received,
            _connection: connection,
        }
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// How often each id arrived.
    pub fn counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for r in self.received.lock().unwrap().iter() {
            *counts.entry(r.id.clone()).or_default() += 1;
        }
        counts
    }

    /// Waits until every id in `ids` arrived at least once.
    pub async fn wait_for_all(&self, ids: &[String]) {
        wait_until(&format!("{} messages arrived", ids.len()), || async {
            let counts = self.counts();
            ids.iter().all(|id| counts.contains_key(id))
        })
        .await;
    }

    /// The distinct ids received, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.counts().into_keys().collect();
        ids.sort();
        ids
    }

    pub fn get(&self, id: &str) -> Received {
        self.received
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.id == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} was not received"))
    }
}

/// Counts of a run, as the Jepsen total-queue checker defines them.
#[derive(Debug)]
pub struct Tally {
    pub sent: usize,
    pub received: usize,
    pub duplicates: usize,
    pub lost: usize,
    pub unexpected: usize,
}

/// Compares what was sent with what arrived.
pub fn tally(consumer: &Consumer, ids: &[String]) -> Tally {
    let counts = consumer.counts();
    let sent: std::collections::HashSet<&String> = ids.iter().collect();
    Tally {
        sent: ids.len(),
        received: counts.len(),
        duplicates: counts.values().map(|n| n - 1).sum(),
        lost: ids.iter().filter(|id| !counts.contains_key(*id)).count(),
        unexpected: counts.keys().filter(|id| !sent.contains(id)).count(),
    }
}

/// A chaos run's end: prints `{run}: {setup}` and the tally (the lines
/// docs/chaos.md quotes), then asserts nothing was lost or invented.
pub fn report_chaos(run: &str, setup: &str, t: &Tally) {
    println!("{run}: {setup}");
    println!(
        "{run}: sent {} / received {} distinct / duplicates {} / lost {} / unexpected {}",
        t.sent, t.received, t.duplicates, t.lost, t.unexpected
    );
    assert_eq!((t.lost, t.unexpected), (0, 0), "{t:?}");
}

/// A chaos run's order check: prints `{run}: ` and the order tally (the
/// line docs/chaos.md quotes after [`report_chaos`]'s), then asserts no
/// keyed row was lost and every key's first deliveries were in order.
pub fn report_key_order(run: &str, t: &OrderTally) {
    println!(
        "{run}: keys {} / keyed rows {} / first deliveries {} / duplicates {} / lost {} / out of order {}",
        t.keys,
        t.keyed_rows,
        t.first_deliveries,
        t.duplicates,
        t.lost,
        t.out_of_order.len()
    );
    assert!(
        t.lost == 0 && t.out_of_order.is_empty(),
        "lost {}, out of order: {:?}",
        t.lost,
        &t.out_of_order[..t.out_of_order.len().min(10)]
    );
}

/// What a per-key order check found, in the manner of Jepsen's queue
/// checker: for each ordering key, the first deliveries must follow the
/// rows' order; repeats are allowed (at-least-once) and counted.
#[derive(Debug, Default)]
pub struct OrderTally {
    pub keys: usize,
    pub keyed_rows: usize,
    pub first_deliveries: usize,
    pub duplicates: usize,
    pub lost: usize,
    /// Each first delivery of a row that came after a later row of its key.
    pub out_of_order: Vec<String>,
}

/// Checks the consumer's deliveries, in arrival order, against each key's
/// row order (`orders`, from [`TestEnv::key_orders`]).
pub fn check_key_order(consumer: &Consumer, orders: &HashMap<String, Vec<String>>) -> OrderTally {
    let place: HashMap<&str, (&str, usize)> = orders
        .iter()
        .flat_map(|(key, ids)| {
            ids.iter()
                .enumerate()
                .map(move |(i, id)| (id.as_str(), (key.as_str(), i)))
        })
        .collect();
    let mut tally = OrderTally {
        keys: orders.len(),
        keyed_rows: place.len(),
        ..OrderTally::default()
    };
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut latest: HashMap<&str, usize> = HashMap::new();
    for r in consumer.received.lock().unwrap().iter() {
        let Some(&(key, i)) = place.get(r.id.as_str()) else {
            continue;
        };
        if !seen.insert(r.id.clone()) {
            tally.duplicates += 1;
            continue;
        }
        tally.first_deliveries += 1;
        match latest.get(key) {
            Some(&later) if later > i => tally.out_of_order.push(format!(
                "key {key}: row #{i} ({}) first arrived after row #{later} ({})",
                r.id, orders[key][later]
            )),
            _ => {
                latest.insert(key, i);
            }
        }
    }
    tally.lost = place.keys().filter(|id| !seen.contains(**id)).count();
    tally
}

/// Asserts every keyed row arrived and every key's first deliveries were
/// in order; returns the tally.
pub fn assert_keys_in_order(
    consumer: &Consumer,
    orders: &HashMap<String, Vec<String>>,
) -> OrderTally {
    let t = check_key_order(consumer, orders);
    report_key_order("key order", &t);
    t
}

/// Asserts nothing was lost or invented, and at most `max_duplicates` repeats.
pub fn assert_no_loss(consumer: &Consumer, ids: &[String], max_duplicates: usize) -> Tally {
    let t = tally(consumer, ids);
    eprintln!("{t:?}");
    assert!(t.lost == 0 && t.unexpected == 0, "{t:?}");
    assert!(
        t.duplicates <= max_duplicates,
        "{t:?}, allowed {max_duplicates} duplicates"
    );
    t
}

/// Asserts that `ids` arrived exactly once each and nothing else arrived.
pub fn assert_exactly_once(consumer: &Consumer, ids: &[String]) {
    let counts = consumer.counts();
    let lost: Vec<_> = ids.iter().filter(|id| !counts.contains_key(*id)).collect();
    let duplicated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let unexpected: Vec<_> = counts.keys().filter(|id| !ids.contains(id)).collect();
    assert!(
        lost.is_empty() && duplicated.is_empty() && unexpected.is_empty(),
        "sent {}, received {} distinct; lost {lost:?}, duplicated {duplicated:?}, unexpected {unexpected:?}",
        ids.len(),
        counts.len()
    );
}

/// A running `pushoccurrence run` process.
pub struct Relay {
    pub child: Child,
    pub log: PathBuf,
}

impl Relay {
    pub async fn start(config: &Path, dir: &Path) -> Self {
        let relay = Self::spawn(config, dir);
        relay.wait_ready().await;
        relay
    }

    pub fn spawn(config: &Path, dir: &Path) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let log = dir.join(format!("relay-{}.log", SEQ.fetch_add(1, Ordering::Relaxed)));
        let child = pushoccurrence(config, &["run"])
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn pushoccurrence");
        Self { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the relay's `/readyz` says ready: connected to a broker
    /// that does not block it, its topology working, its listener
    /// listening, its batches not stalled.
    pub async fn wait_ready(&self) {
        let admin = self.admin().await;
        wait_until("the relay's /readyz answers 200", || async {
            http_get(&admin, "/readyz").await.0 == 200
        })
        .await;
    }

    /// Waits until the relay is ready (its `/readyz`) or has exited; panics
    /// with its exit status and log if it exited (an early exit fails at
    /// once instead of after [`PATIENCE`]).
    pub async fn wait_ready_or_exit(&mut self) {
        let mut exited = None;
        wait_until("the relay is ready or has exited", || {
            exited = self.child.try_wait().unwrap();
            let admin = self.admin_address();
            let gone = exited.is_some();
            async move {
                gone || match admin {
                    // A relay exiting right now refuses the connection.
                    Some(admin) => try_http_get(&admin, "/readyz")
                        .await
                        .is_ok_and(|(code, _)| code == 200),
                    None => false,
                }
            }
        })
        .await;
        assert!(
            exited.is_none(),
            "the relay exited ({exited:?}):\n{}",
            self.log_text()
        );
    }

    /// Waits until the relay's log contains `text`: for tests whose subject
    /// is the log line itself (a warning, the one ERROR of an outage).
    /// Anything else waits on `/readyz`, the metrics or the database.
    pub async fn wait_log(&self, text: &str) {
        wait_until(&format!("the relay logs '{text}'"), || async {
            self.log_text().contains(text)
        })
        .await;
    }

    /// The admin endpoint's address (the tests let the relay pick a free
    /// port, which only its start-up line tells).
    pub async fn admin(&self) -> String {
        let mut address = None;
        wait_until("the relay says where its admin endpoint listens", || {
            address = self.admin_address();
            let found = address.is_some();
            async move { found }
        })
        .await;
        address.unwrap()
    }

    /// [`Relay::admin`] if the relay has said it yet.
    fn admin_address(&self) -> Option<String> {
        let log = self.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("admin endpoint listening"))?;
        let start = line.find("addr=").expect("the line names the address") + "addr=".len();
        Some(line[start..].split_whitespace().next()?.to_owned())
    }

    /// The value of one series of the relay's `/metrics` (`None` when the
    /// text has no such sample).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric(&http_get(&self.admin().await, "/metrics").await.1, series)
    }

    /// Times the relay's `connection` (`rabbitmq`, `postgres_listener`)
    /// came back after being lost, from its metrics.
    pub async fn reconnections(&self, connection: &str) -> f64 {
        let series = format!("pushoccurrence_reconnections_total{{connection=\"{connection}\"}}");
        self.metric(&series)
            .await
            .unwrap_or_else(|| panic!("no metric {series}"))
    }

    /// Batches that failed so far (their rows stay pending), from the
    /// relay's metrics; a claim session that cannot connect fails its batch.
    pub async fn failed_batches(&self) -> f64 {
        self.metric("pushoccurrence_batches_failed_total")
            .await
            .expect("the relay counts failed batches")
    }

    /// `/readyz`'s status code and text.
    pub async fn readyz(&self) -> (u16, String) {
        http_get(&self.admin().await, "/readyz").await
    }

    /// How often the relay's log contains `text`.
    pub fn log_count(&self, text: &str) -> usize {
        self.log_text().matches(text).count()
    }

    /// Kills the process with SIGKILL: no clean-up of any kind.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends SIGTERM and waits for the exit.
    pub async fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().expect("still running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("relay exits after SIGTERM")
            .unwrap()
    }
}

/// `pushoccurrence --config <config> <args>` with a quiet, test-friendly environment.
pub fn pushoccurrence(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("PUSHOCCURRENCE_")) {
        cmd.env_remove(key);
    }
    cmd.kill_on_drop(true);
    cmd
}

/// A RabbitMQ node of the test's own, for faults that would disturb the
/// shared broker (alarms are node-wide). Boots in a few seconds; stopped
/// and removed on drop.
pub struct PrivateBroker {
    pub node: String,
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
}

/// How a private node's boot ended.
enum Boot {
    Up,
    /// The node crashed; the last lines of its log.
    Died(String),
    /// Still not up at the deadline; the last lines of its log.
    Late(String),
}

/// How long a private node may take to boot: three boot at once for a
/// cluster, beside the rest of the suite, on two cores.
const BOOT_PATIENCE: Duration = Duration::from_secs(150);

impl PrivateBroker {
    pub async fn start() -> Self {
        Self::start_with(|_| String::new()).await
    }

    /// Starts a node whose `rabbitmq.conf` is what `conf` returns, given
    /// the node's own directory (owned by the rabbitmq user; put files the
    /// node must read there first).
    pub async fn start_with(conf: impl FnOnce(&Path) -> String) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let node = format!(
            "po-{}-{}@localhost",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let port = free_port();
        let dist_port = free_port();
        let dir = std::env::temp_dir().join(format!("po-broker-{}", node.replace('@', "-")));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].").unwrap();
        std::fs::write(dir.join("rabbitmq.conf"), conf(&dir)).unwrap();
        // The server runs as the rabbitmq user and must own its directory.
        let owned = std::process::Command::new("chown")
            .args(["-R", "rabbitmq"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(owned.success());
        let mut broker = Self {
            node,
            port,
            dist_port,
            dir,
        };
        // A node whose port was taken between `free_port` and its own bind
        // (another test, an outgoing connection) dies at boot: it is started
        // again on fresh ports instead of being waited on until the deadline.
        let deadline = Instant::now() + BOOT_PATIENCE;
        for attempt in 1.. {
            broker.launch();
            match broker.boot(deadline).await {
                Boot::Up => return broker,
                Boot::Died(log) if attempt < 3 => {
                    eprintln!(
                        "private RabbitMQ node {} died at boot, starting it again: {log}",
                        broker.node
                    );
                    broker.port = free_port();
                    broker.dist_port = free_port();
                    let _ = std::fs::remove_dir_all(broker.dir.join("mnesia"));
                    let _ = std::fs::remove_dir_all(broker.dir.join("log"));
                }
                Boot::Died(log) => {
                    panic!("private RabbitMQ node {} died at boot: {log}", broker.node)
                }
                Boot::Late(log) => panic!(
                    "private RabbitMQ node {} did not start within {BOOT_PATIENCE:?}: {log}",
                    broker.node
                ),
            }
        }
        unreachable!()
    }

    /// `rabbitmq-server -detached` for this node on its current ports.
    fn launch(&self) {
        let started = self
            .command("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_PID_FILE", self.dir.join("pid"))
            .status()
            .unwrap();
        assert!(started.success(), "rabbitmq-server -detached failed");
    }

    /// Waits until the node has booted, has died (it left a crash dump), or
    /// `deadline` has passed.
    async fn boot(&self, deadline: Instant) -> Boot {
        loop {
            // await_startup fails at once until the node has registered with epmd.
            if self.ctl(&["await_startup", "--timeout", "10"]) {
                return Boot::Up;
            }
            if self.dir.join("log").join("erl_crash.dump").exists() {
                return Boot::Died(self.log_tail());
            }
            if Instant::now() >= deadline {
                return Boot::Late(self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last lines the node logged, for a failure message.
    fn log_tail(&self) -> String {
        let log = self.dir.join("log").join(format!("{}.log", self.node));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn command(&self, program: &str) -> std::process::Command {
        let mut cmd = std::process::Command::new(program);
        cmd.env("RABBITMQ_NODENAME", &self.node)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    /// Runs `rabbitmqctl -n <node> <args>`; true on success.
    pub fn ctl(&self, args: &[&str]) -> bool {
        self.command("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .status()
            .unwrap()
            .success()
    }

    /// What `rabbitmqctl -n <node> --quiet <args>` prints (empty on failure).
    pub fn ctl_output(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("rabbitmqctl")
            .env("RABBITMQ_NODENAME", &self.node)
            .arg("-n")
            .arg(&self.node)
            .arg("--quiet")
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The node's own directory (certificates written by `start_with`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.ctl(&["stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on `addr` over plain HTTP/1.1: `(status code, body)`.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    try_http_get(addr, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

/// [`http_get`], or the error of a server that is not (or no longer) there.
pub async fn try_http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in: {head}"));
    Ok((code, body.to_owned()))
}

/// The value of one sample line (`name{labels} value`) in a metrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// A fresh uuid whose last field is `n`, for rows a test names itself.
pub fn uuid(n: u32) -> String {
    format!("{:08x}-2222-4000-8000-{n:012x}", fastrand::u32(..))
}
