//! What every scenario and baseline shares: the bench's own outbox schema
//! and queue (emptied before each run), the history's outbox (kept across
//! drains), the ids rows get, the relay's config and process, and the
//! connections and waits they are measured with.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use lapin::options::{QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;
use tokio_postgres::{Client, NoTls};

use pushoccurrence::config::Config;
use pushoccurrence::db::migrate::{self, UUIDV7_SQL};
use pushoccurrence::db::outbox::{PARKED_PREDICATE, PENDING_PREDICATE};

use crate::Args;

/// The bench's schema, queue, NOTIFY channel, connection and application
/// name: one fixed name, so a second run at once is noticed and refused.
pub(crate) const NAME: &str = "po_bench";

/// The schema of the history scenario's outbox, which keeps its transferred
/// rows from one drain to the next (building millions of them takes minutes).
pub(crate) const HISTORY_SCHEMA: &str = "po_bench_history";

/// Which ids the bench's rows get (`--ids`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Ids {
    /// Time-ordered (UUIDv7), made by the expression `push_occurrence()` uses.
    V7,
    /// Random (`gen_random_uuid()`, v4), as producers that make their own
    /// ids often do.
    V4,
}

impl Ids {
    /// As `--ids` takes it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::V7 => "v7",
            Self::V4 => "v4",
        }
    }

    /// The SQL expression making one id.
    pub(crate) fn sql(self) -> &'static str {
        match self {
            Self::V7 => UUIDV7_SQL,
            Self::V4 => "gen_random_uuid()",
        }
    }
}

impl std::fmt::Display for Ids {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V7 => "time-ordered UUIDv7s, as `push_occurrence()` makes them",
            Self::V4 => "random UUIDv4s, from `gen_random_uuid()`",
        })
    }
}

/// Where the relay reaches PostgreSQL and RabbitMQ instead of the bench's
/// own addresses: the distance scenario's delay proxies.
pub(crate) struct Endpoints {
    pub(crate) pg_port: u16,
    pub(crate) amqp_url: String,
}

/// How the relay runs: its outbox's schema, another
/// `(batch_size, buffer_size)` than the defaults, and other endpoints.
#[derive(Clone, Copy)]
pub(crate) struct RelaySetup<'a> {
    pub(crate) schema: &'a str,
    pub(crate) window: Option<(usize, usize)>,
    pub(crate) via: Option<&'a Endpoints>,
}

impl Default for RelaySetup<'_> {
    fn default() -> Self {
        Self {
            schema: NAME,
            window: None,
            via: None,
        }
    }
}

/// The bench's own PostgreSQL session, the relay's config (as parsed, and
/// as the JSON each relay process is started with) and the message body.
pub(crate) struct Bench {
    pub(crate) pg: Client,
    pub(crate) amqp_url: String,
    pub(crate) pg_port: u16,
    pub(crate) body: Vec<u8>,
    /// The ids of the rows the bench writes (the first of `--ids`; the
    /// history scenario runs once per kind given).
    pub(crate) ids: Ids,
    pub(crate) config: Config,
    config_json: serde_json::Value,
    /// The relay's `RUST_LOG` (`--relay-log`).
    relay_log: String,
    dir: tempfile::TempDir,
}

impl Bench {
    pub(crate) async fn new(args: &Args) -> anyhow::Result<Self> {
        let pg = pg_connect(args.pg_port).await?;
        // Two runs at once would share the schema and queue and spoil both.
        let others: i64 = pg
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name IN ($1, 'po-bench') AND pid <> pg_backend_pid()", &[&NAME])
            .await?
            .get(0);
        if others > 0 {
            bail!(
                "another benchmark (or its relay) is still connected to the database; stop it first"
            );
        }
        // The relay's defaults, with only the names and endpoints set.
        let mut config_json = json!({
            "postgres": {"host": "127.0.0.1", "port": args.pg_port, "database": "test", "user": "postgres",
                         "schema": NAME, "application_name": NAME},
            "rabbitmq": {"url": args.amqp_url, "connection_name": NAME, "queue": {"name": NAME}},
            "listener": {"channels": [NAME]},
            // Any free port: a relay running beside the bench keeps its own.
            "admin": {"listen": "127.0.0.1:0"}
        });
        if let Some(n) = args.buffer_size {
            config_json["rabbitmq"]["retry"] = json!({"buffer_size": n});
        }
        if let Some(n) = args.batch_size {
            config_json["relay"] = json!({"batch_size": n});
        }
        let config = Config::parse(
            &config_json.to_string(),
            &Default::default(),
            "bench config",
        )?;
        let body = (0..args.body).map(|i| (i % 251) as u8).collect();
        Ok(Self {
            pg,
            amqp_url: args.amqp_url.clone(),
            pg_port: args.pg_port,
            body,
            ids: args.ids.first().copied().unwrap_or(Ids::V7),
            config,
            config_json,
            relay_log: args.relay_log.clone(),
            dir: tempfile::tempdir()?,
        })
    }

    /// A fresh, empty outbox and an empty queue.
    pub(crate) async fn reset(&self) -> anyhow::Result<()> {
        self.reset_outbox(NAME).await?;
        self.reset_queue().await
    }

    /// A fresh, empty outbox in `schema`.
    pub(crate) async fn reset_outbox(&self, schema: &str) -> anyhow::Result<()> {
        self.pg
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await?;
        migrate::run(&self.pg, schema, NAME).await?;
        Ok(())
    }

    /// The bench's queue, declared and empty.
    pub(crate) async fn reset_queue(&self) -> anyhow::Result<()> {
        let conn = amqp_connect(&self.amqp_url).await?;
        let ch = conn.create_channel().await?;
        ch.queue_declare(
            NAME.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_purge(NAME.into(), QueuePurgeOptions::default())
            .await?;
        conn.close(200, "reset".into()).await?;
        Ok(())
    }

    /// Inserts `n` pending rows with bodies of the configured size and
    /// `ids` (the bench's when `None`) into `schema`'s outbox, and refreshes
    /// its statistics as a relay's table would have them. With `keys`, the
    /// rows take that many ordering keys in turn (`k0`, `k1`, … `k0`
    /// again), so each key's rows lie spread over the backlog; one key is a
    /// single hot key holding every row.
    pub(crate) async fn fill(
        &self,
        schema: &str,
        n: usize,
        ids: Option<Ids>,
        keys: Option<u32>,
    ) -> anyhow::Result<()> {
        let key = match keys {
            Some(_) => "'k' || (i % $3::int)",
            None => "NULL::text",
        };
        let keys = i32::try_from(keys.unwrap_or(1))?;
        let n = i32::try_from(n)?;
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&n, &self.body];
        if key.contains("$3") {
            params.push(&keys);
        }
        self.pg
            .execute(
                &format!(
                    "WITH ids AS (INSERT INTO {schema}.message_queue_log (message_id, ordering_key)
                                  SELECT {id}, {key} FROM generate_series(1, $1::int) AS i
                                   ORDER BY i RETURNING message_id)
                     INSERT INTO {schema}.message_queue_log_data (message_id, message_body)
                     SELECT message_id, $2::bytea FROM ids",
                    id = ids.unwrap_or(self.ids).sql()
                ),
                &params,
            )
            .await?;
        self.pg
            .batch_execute(&format!("VACUUM ANALYZE {schema}.message_queue_log"))
            .await?;
        Ok(())
    }

    /// The ids of the bench outbox's rows, oldest first.
    pub(crate) async fn ids_in_order(&self) -> anyhow::Result<Vec<String>> {
        let rows = self
            .pg
            .query(
                &format!(
                    "SELECT message_id::text FROM {NAME}.message_queue_log
                      ORDER BY relay_enqueued_at, message_id"
                ),
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Whether no row is left to claim in `schema`'s outbox: cheap through
    /// the partial index, for polling while the clock runs.
    pub(crate) async fn none_claimable(&self, schema: &str) -> anyhow::Result<bool> {
        Ok(self
            .pg
            .query_one(
                &format!(
                    "SELECT NOT EXISTS (SELECT 1 FROM {schema}.message_queue_log WHERE {PENDING_PREDICATE})"
                ),
                &[],
            )
            .await?
            .get(0))
    }

    /// Rows not marked transferred, parked or not, counted through the
    /// relay's partial indexes of claimable and of parked rows, so a
    /// history does not make the count slow.
    pub(crate) async fn pending(&self, schema: &str) -> anyhow::Result<i64> {
        Ok(self
            .pg
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM {schema}.message_queue_log WHERE {PENDING_PREDICATE})
                          + (SELECT count(*) FROM {schema}.message_queue_log WHERE {PARKED_PREDICATE})"
                ),
                &[],
            )
            .await?
            .get(0))
    }

    /// Starts the relay with the bench's config, changed as `setup` says.
    pub(crate) fn spawn_relay(
        &self,
        bin: &Path,
        setup: RelaySetup<'_>,
    ) -> anyhow::Result<tokio::process::Child> {
        let mut config = self.config_json.clone();
        config["postgres"]["schema"] = json!(setup.schema);
        if let Some((batch, buffer)) = setup.window {
            config["relay"] = json!({"batch_size": batch});
            config["rabbitmq"]["retry"] = json!({"buffer_size": buffer});
        }
        if let Some(via) = setup.via {
            config["postgres"]["port"] = json!(via.pg_port);
            config["rabbitmq"]["url"] = json!(via.amqp_url);
        }
        let path = self.dir.path().join("config.json");
        std::fs::write(&path, config.to_string())?;
        Ok(tokio::process::Command::new(bin)
            .arg("--config")
            .arg(&path)
            .arg("run")
            .env("RUST_LOG", &self.relay_log)
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .spawn()?)
    }

    pub(crate) async fn cleanup(&self) {
        let _ = self
            .pg
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {NAME} CASCADE; DROP SCHEMA IF EXISTS {HISTORY_SCHEMA} CASCADE"
            ))
            .await;
        if let Ok(conn) = amqp_connect(&self.amqp_url).await {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch.queue_delete(NAME.into(), Default::default()).await;
            }
            let _ = conn.close(200, "bye".into()).await;
        }
    }
}

pub(crate) async fn pg_connect(port: u16) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=test application_name=po-bench"),
        NoTls,
    )
    .await
    .context("connect to PostgreSQL")?;
    tokio::spawn(connection);
    Ok(client)
}

/// Connects as the relay does, so `--amqp-url` takes the seed's
/// `amqp://…:5672/` form too (an empty path is the vhost `/`).
pub(crate) async fn amqp_connect(url: &str) -> anyhow::Result<Connection> {
    let uri = pushoccurrence::amqp::parse_uri(url)
        .map_err(|e| anyhow::anyhow!("--amqp-url is not an AMQP URL: {e}"))?;
    Connection::connect_uri(uri, ConnectionProperties::default())
        .await
        .context("connect to RabbitMQ")
}

pub(crate) async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            bail!("gave up after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

pub(crate) async fn stop(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
}
