//! PgBouncer in front of PostgreSQL, started by the test: claims work in
//! session and in transaction pooling mode; LISTEN is proven by a probe, and
//! a listener that cannot hear (through a transaction pooler) says so once
//! while the sweep carries delivery.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::support::*;

/// A private PgBouncer on a free port, in front of the test database; its
/// own ini file and directory, run as `postgres` (it refuses root); killed
/// on drop.
pub struct PgBouncer {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl PgBouncer {
    /// Starts one in `pool_mode` (`session` or `transaction`) and waits until
    /// a session through it answers.
    pub async fn start(pool_mode: &str) -> Self {
        Self::start_with(pool_mode, "").await
    }

    /// [`PgBouncer::start`] with `extra` lines in its `[pgbouncer]` section.
    pub async fn start_with(pool_mode: &str, extra: &str) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("po-pgbouncer-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Fewer server sessions than the relay has clients in transaction
        // mode, so its transactions really share them.
        let pool_size = if pool_mode == "transaction" { 3 } else { 30 };
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n\
                 test = host=127.0.0.1 port={pg} dbname=test\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {users}\n\
                 pool_mode = {pool_mode}\n\
                 default_pool_size = {pool_size}\n\
                 max_client_conn = 200\n\
                 admin_users = postgres\n\
                 logfile = {log}\n\
                 {extra}\n",
                pg = pg_port(),
                users = dir.join("users.txt").display(),
                log = dir.join("pgbouncer.log").display(),
            ),
        )
        .unwrap();
        let owned = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(owned.success());
        // setpriv execs pgbouncer itself, so killing the child kills it.
        let child = Command::new("setpriv")
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "pgbouncer",
            ])
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run pgbouncer (apt-get install -y pgbouncer)");
        let bouncer = Self { child, port, dir };
        wait_until("pgbouncer answers", || async {
            let conn = format!("host=127.0.0.1 port={port} user=postgres dbname=test");
            match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    client.simple_query("SELECT 1").await.is_ok()
                }
                Err(_) => false,
            }
        })
        .await;
        bouncer
    }
}

impl PgBouncer {
    /// A session through the pooler to `database` (`test`, or
    /// `pgbouncer` for its admin console).
    pub async fn session(&self, database: &str) -> tokio_postgres::Client {
        let conn = format!(
            "host=127.0.0.1 port={} user=postgres dbname={database}",
            self.port
        );
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    /// Runs `command` on the admin console.
    pub async fn admin(&self, command: &str) {
        let client = self.session("pgbouncer").await;
        client.simple_query(command).await.unwrap();
    }
}

impl PgBouncer {
    /// How many server sessions the pool of the test database has open.
    pub async fn server_sessions(&self) -> usize {
        let client = self.session("pgbouncer").await;
        client
            .simple_query("SHOW SERVERS")
            .await
            .unwrap()
            .iter()
            .filter(|m| {
                matches!(m, tokio_postgres::SimpleQueryMessage::Row(row)
                    if row.get("database") == Some("test"))
            })
            .count()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const DEAF: &str = "the listener does not hear notifications";

/// 2000 events through a relay whose sessions go through PgBouncer in
/// `pool_mode`, the listener directly to PostgreSQL when `direct_listener`.
async fn relays_through_pgbouncer(pool_mode: &str, direct_listener: bool) {
    let bouncer = PgBouncer::start(pool_mode).await;
    let mut env = TestEnv::new(&format!("pgb_{pool_mode}")).await;
    env.migrate().await;
    // What the claim transactions' settings are, seen from inside them: the
    // mark (an UPDATE in the claim transaction) records them.
    let s = &env.name;
    env.pg
        .batch_execute(&format!(
            "CREATE TABLE \"{s}\".seen (setting text, value text);
             CREATE FUNCTION \"{s}\".record_settings() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               INSERT INTO \"{s}\".seen
                 SELECT name, setting FROM pg_settings
                  WHERE name IN ('jit', 'plan_cache_mode', 'enable_seqscan', 'max_parallel_workers_per_gather',
                                 'idle_in_transaction_session_timeout', 'lock_timeout', 'application_name');
               RETURN NULL;
             END $$;
             CREATE TRIGGER record_settings AFTER UPDATE ON \"{s}\".message_queue_log
               FOR EACH STATEMENT EXECUTE FUNCTION \"{s}\".record_settings();"
        ))
        .await
        .unwrap();
    env.config["postgres"]["port"] = bouncer.port.into();
    if pool_mode == "transaction" {
        env.config["postgres"]["pooler"] = pool_mode.into();
    }
    // A session pooler needs no setting: it is a direct connection to the relay.
    let hears = direct_listener || pool_mode == "session";
    if direct_listener {
        env.config["listener"]["host"] = "127.0.0.1".into();
        env.config["listener"]["port"] = pg_port().into();
    } else if pool_mode == "transaction" {
        // Migrations need a session; the tables exist already.
        env.config["postgres"]["auto_migrate"] = false.into();
    }
    if hears {
        // No idle sweeps: only notifications can wake the relay, so
        // delivery proves the listener hears.
        env.config["rabbitmq"]["retry"]["idle_sleep_ms"] = 3_600_000.into();
    }
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let admin = relay.admin().await;
    if !hears {
        relay.wait_log(DEAF).await;
    }

    let ids = env.insert_many(2000, 100).await;
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &ids);

    let log = relay.log_text();
    assert_eq!(relay.failed_batches().await, 0.0, "{log}");
    // Every claim transaction had the claim session's settings.
    let values = |setting: &'static str| {
        let env = &env;
        async move {
            env.texts(
                &format!(
                    "SELECT DISTINCT value FROM \"{}\".seen WHERE setting = $1",
                    env.name
                ),
                &[&setting],
            )
            .await
        }
    };
    assert_eq!(values("jit").await, ["off"]);
    assert_eq!(values("plan_cache_mode").await, ["force_generic_plan"]);
    assert_eq!(values("enable_seqscan").await, ["off"]);
    assert_eq!(values("max_parallel_workers_per_gather").await, ["0"]);
    assert_eq!(values("lock_timeout").await, ["5000"]);
    assert_eq!(values("application_name").await, [env.name.clone()]);
    let idle = values("idle_in_transaction_session_timeout").await;
    assert!(idle.len() == 1 && idle[0] != "0", "{idle:?}");
    assert_eq!(log.matches(DEAF).count(), usize::from(!hears), "{log}");
    if !hears {
        assert!(
            log.contains("listener.host"),
            "the warning names the fix: {log}"
        );
    }
    let (_, metrics) = http_get(&admin, "/metrics").await;
    assert_eq!(
        metric(&metrics, "pushoccurrence_listener_deaf"),
        Some(if hears { 0.0 } else { 1.0 }),
        "{metrics}"
    );
    assert!(relay.terminate().await.success());

    // `status` says whether a relay with this config hears or polls.
    let (code, stdout) = env.command(&["status"]).await;
    assert_eq!(code, Some(0), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("notifications"))
        .unwrap_or_else(|| panic!("no notifications line: {stdout}"));
    if hears {
        assert!(
            line.contains("heard by a session") && !line.contains("NOT"),
            "{line}"
        );
    } else {
        assert!(
            line.contains("NOT heard") && line.contains("polling"),
            "{line}"
        );
    }
    env.cleanup().await;
    drop(bouncer);
}

#[tokio::test]
async fn pgbouncer_session_mode_relays_every_event_once() {
    relays_through_pgbouncer("session", false).await;
}

#[tokio::test]
async fn pgbouncer_session_mode_with_a_direct_listener_relays_every_event_once() {
    relays_through_pgbouncer("session", true).await;
}

#[tokio::test]
async fn pgbouncer_transaction_mode_relays_every_event_once_by_polling_and_says_so() {
    relays_through_pgbouncer("transaction", false).await;
}

#[tokio::test]
async fn pgbouncer_transaction_mode_with_a_direct_listener_relays_every_event_once() {
    relays_through_pgbouncer("transaction", true).await;
}

/// A session pooler switched to transaction pooling under a running relay
/// that was told nothing: the workers' named statements meet other server
/// sessions (detected by SQLSTATE, warned about once, and the next sessions
/// keep nothing across transactions), and the listener, whose LISTEN stays
/// on a server session it no longer has, finds at its next probe that it
/// does not hear; the sweep carries delivery.
#[tokio::test]
async fn a_pooler_switched_to_transaction_mode_under_the_relay_is_detected_and_loses_nothing() {
    // Round robin: consecutive transactions of a client land on different
    // server sessions once the pooler is in transaction mode.
    let bouncer = PgBouncer::start_with("session", "server_round_robin = 1").await;
    let mut env = TestEnv::new("pgb_switch").await;
    env.migrate().await;
    env.config["postgres"]["port"] = bouncer.port.into();
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let admin = relay.admin().await;
    let mut ids = env.insert_many(500, 100).await;
    consumer.wait_for_all(&ids).await;
    assert!(!relay.log_text().contains(DEAF));

    bouncer.admin("SET pool_mode = 'transaction'").await;
    ids.extend(env.insert_many(2000, 100).await);
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    relay.wait_log(DEAF).await;
    assert_exactly_once(&consumer, &ids);

    let log = relay.log_text();
    let detected = "PostgreSQL is behind a transaction pooler";
    assert_eq!(log.matches(detected).count(), 1, "{log}");
    assert!(
        log.contains("postgres.pooler"),
        "the warning names the setting: {log}"
    );
    assert_eq!(log.matches(DEAF).count(), 1, "{log}");
    let (_, metrics) = http_get(&admin, "/metrics").await;
    assert_eq!(metric(&metrics, "pushoccurrence_listener_deaf"), Some(1.0));
    assert!(relay.terminate().await.success());
    env.cleanup().await;
    drop(bouncer);
}

/// The statements a pooled server session carries, by name.
async fn statements_on(bouncer: &PgBouncer) -> Vec<String> {
    let client = bouncer.session("test").await;
    let mut names: Vec<String> = client
        .simple_query("SELECT name FROM pg_prepared_statements")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    names.sort();
    names
}

/// Through a transaction pooler with one server session, which carries
/// another client's statements named as the relay's PostgreSQL client names
/// its own (`s0`, `s1`, …): every command (`check`, `status`, `send`,
/// `parked`, `requeue`) and the relay (start-up, claims, retention) work
/// without one failed statement, and none of them leaves a statement on the
/// server session for the next client to meet.
#[tokio::test]
async fn through_a_transaction_pooler_nothing_meets_or_leaves_a_named_statement() {
    let bouncer = PgBouncer::start_with("transaction", "default_pool_size = 1").await;
    let mut env = TestEnv::new("pgb_named").await;
    env.migrate().await;
    let planted: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
    {
        let client = bouncer.session("test").await;
        let sql: String = planted
            .iter()
            .map(|name| format!("PREPARE {name} AS SELECT 1;"))
            .collect();
        client.batch_execute(&sql).await.unwrap();
    }
    let mut expected = planted.clone();
    expected.sort();
    assert_eq!(statements_on(&bouncer).await, expected);

    env.config["postgres"]["port"] = bouncer.port.into();
    env.config["postgres"]["pooler"] = "transaction".into();
    env.config["postgres"]["auto_migrate"] = false.into();
    env.config["relay"]["max_attempts"] = 1.into();
    // Retention runs (and deletes nothing: every row is younger).
    env.config["retention"] =
        serde_json::json!({"transferred_after_sec": 3600, "interval_sec": 0.2});
    let run = |args: &'static [&'static str]| {
        let env = &env;
        async move {
            let (code, text) = env.command(args).await;
            assert_eq!(code, Some(0), "{args:?}: {text}");
            text
        }
    };
    run(&["check"]).await;
    let status = run(&["status"]).await;
    assert!(status.contains("NOT heard"), "{status}");
    run(&["send", "through the pooler"]).await;

    let consumer = env.consumer().await;
    let orphan = uuid(1);
    env.insert_status_row(&orphan).await;
    let relay = env.relay().await;
    let ids = env.insert_many(300, 100).await;
    consumer.wait_for_all(&ids).await;
    wait_until("the row without data is parked", || async {
        env.row_state(&orphan).await.0 >= 1
    })
    .await;
    env.wait_all_transferred_but(1).await;
    let log = relay.log_text();
    assert_eq!(relay.failed_batches().await, 0.0, "{log}");
    assert!(relay.terminate().await.success());
    // The config names the pooler: nothing tells the operator to name it.
    assert!(!log.contains("Set postgres.pooler"), "{log}");
    // The only errors: the row without data, parked.
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(
        errors.len() == 1 && errors[0].contains("row parked"),
        "{log}"
    );

    let parked = run(&["parked"]).await;
    assert!(parked.contains(&orphan), "{parked}");
    let requeued = run(&["requeue", "--all"]).await;
    assert!(requeued.contains("requeued 1 row"), "{requeued}");
    run(&["status"]).await;

    assert_eq!(
        statements_on(&bouncer).await,
        expected,
        "the pooled server session holds only the other client's statements"
    );
    env.cleanup().await;
    drop(bouncer);
}

/// Through a transaction pooler the config does not name, the relay's named
/// statements live on one server session and another client's statements
/// under the same names (here: another outbox's relay, whose client also
/// names them `s0`, `s1`, …) on another. A claim transaction that lands on
/// the other server session must not run those: it would claim the other
/// outbox's rows, publish them to this relay's queue and mark them
/// transferred there, lost to their own consumers, and nothing would fail.
/// The relay notices that its transaction runs on another server session
/// than the one its statements were prepared on, rolls back, and carries on
/// as behind a transaction pooler.
#[tokio::test]
async fn an_unnamed_transaction_pooler_never_runs_another_clients_statements_as_the_relays() {
    use pushoccurrence::db::outbox::Outbox;
    relay_beside_foreign_statements(|outbox: &Outbox| outbox.statements_sql().to_vec()).await;
}

/// As above, with the other relay of the previous release, whose client
/// prepared five statements (no claims of unkeyed rows): this relay's
/// named statements then meet ones with other parameters (SQLSTATE 08P01,
/// a bind message with the wrong number of parameters), which show the
/// pooler just as well. Without that, every batch failed and the relay
/// never switched to statements of its own in every transaction.
#[tokio::test]
async fn a_transaction_pooler_with_a_previous_release_relays_statements_is_detected() {
    use pushoccurrence::db::outbox::Outbox;
    relay_beside_foreign_statements(|outbox: &Outbox| {
        vec![
            outbox.claim_sql(false),
            outbox.claim_sql(true),
            outbox.bodies_sql(),
            outbox.mark_sql(),
            outbox.fail_sql(),
        ]
    })
    .await;
}

/// A relay through an undeclared transaction pooler whose other server
/// session carries another outbox's statements, made by `theirs`, under
/// the relay's names.
async fn relay_beside_foreign_statements(
    theirs: impl Fn(&pushoccurrence::db::outbox::Outbox) -> Vec<String>,
) {
    use pushoccurrence::db::outbox::Outbox;
    let bouncer = PgBouncer::start_with("transaction", "default_pool_size = 2").await;
    let mut mine = TestEnv::new("pgb_mine").await;
    mine.migrate().await;
    let other = TestEnv::new("pgb_theirs").await;
    other.migrate().await;
    let outbox = Outbox::inspect(&other.pg, &other.name).await.unwrap();
    // In the order their client prepares (and so names) its own.
    let their_statements = theirs(&outbox);

    // `first` holds one of the two server sessions, so the relay prepares
    // its statements on the other.
    let first = bouncer.session("test").await;
    first.batch_execute("BEGIN; SELECT 1").await.unwrap();
    mine.config["postgres"]["port"] = bouncer.port.into();
    mine.config["postgres"]["auto_migrate"] = false.into();
    // One worker, so its statements are the process's first ones.
    mine.config["rabbitmq"]["retry"]["buffer_size"] = 1.into();
    mine.config["relay"]["batch_size"] = 1.into();
    let consumer = mine.consumer().await;
    let relay = mine.relay().await;
    let mut ids = mine.insert_many(5, 5).await;
    consumer.wait_for_all(&ids).await;

    // The other outbox's statements on the first server session, then the
    // relay's transactions moved there: `second` takes the relay's server
    // session, `first` lets its own go.
    for i in 0..40 {
        first
            .batch_execute(&format!(
                "PREPARE s{i} AS {}",
                their_statements[i % their_statements.len()]
            ))
            .await
            .unwrap();
    }
    let second = bouncer.session("test").await;
    let pinned = tokio::spawn(async move {
        second.batch_execute("BEGIN; SELECT 1").await.unwrap();
        second
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    first.batch_execute("COMMIT").await.unwrap();
    let second = pinned.await.unwrap();

    let their_ids = other.insert_many(20, 20).await;
    ids.extend(mine.insert_many(20, 20).await);
    wait_until(
        "the relay relays its own rows or someone else's",
        || async {
            let counts = consumer.counts();
            ids.iter().all(|id| counts.contains_key(id))
                || their_ids.iter().any(|id| counts.contains_key(id))
        },
    )
    .await;
    let received = consumer.ids();
    let foreign: Vec<&String> = their_ids
        .iter()
        .filter(|id| received.contains(id))
        .collect();
    assert!(
        foreign.is_empty(),
        "the other outbox's rows went out through this relay: {foreign:?}"
    );
    assert_eq!(
        other.pending().await,
        20,
        "the other outbox's rows are untouched"
    );
    second.batch_execute("COMMIT").await.unwrap();
    env_settles(&mine, &consumer, &ids).await;
    let log = relay.log_text();
    assert_eq!(
        log.matches("PostgreSQL is behind a transaction pooler")
            .count(),
        1,
        "{log}"
    );
    assert!(relay.terminate().await.success());
    mine.cleanup().await;
    other.cleanup().await;
    drop(bouncer);
}

/// Every one of `ids` arrives once, and every row is transferred.
async fn env_settles(env: &TestEnv, consumer: &Consumer, ids: &[String]) {
    consumer.wait_for_all(ids).await;
    env.wait_all_transferred().await;
    assert_exactly_once(consumer, ids);
}

/// A session pooler whose `server_reset_query` leaves prepared statements
/// behind (`RESET ALL`, or none) hands the relay server sessions that carry
/// the previous client's statements under the names the relay's client
/// gives its own (`s0`, `s1`, …: a relay restarted, another process using
/// the same driver). A name found taken is skipped: no failed batch, and no
/// warning that blames a transaction pooler (whose fix, `postgres.pooler =
/// "transaction"`, would be wrong here).
#[tokio::test]
async fn a_session_pooler_handing_on_prepared_statements_costs_no_batch_and_blames_no_transaction_pooler()
 {
    let bouncer = PgBouncer::start_with(
        "session",
        "default_pool_size = 8\nserver_reset_query = RESET ALL",
    )
    .await;
    let mut env = TestEnv::new("pgb_leftover").await;
    env.migrate().await;
    // Every server session of the pool carries statements s0 … s39.
    let clients: Vec<tokio_postgres::Client> = {
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(bouncer.session("test").await);
        }
        clients
    };
    for client in &clients {
        let sql: String = (0..40)
            .map(|i| format!("PREPARE s{i} AS SELECT 1;"))
            .collect();
        client.batch_execute(&sql).await.unwrap();
    }
    drop(clients);
    wait_until("the pooler has every server session back", || async {
        let names = statements_on(&bouncer).await;
        names.len() == 40
    })
    .await;

    env.config["postgres"]["port"] = bouncer.port.into();
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let ids = env.insert_many(500, 100).await;
    env_settles(&env, &consumer, &ids).await;
    let log = relay.log_text();
    assert!(!log.contains("batch failed"), "{log}");
    assert!(!log.contains("transaction pooler"), "{log}");
    assert!(relay.terminate().await.success());
    env.cleanup().await;
    drop(bouncer);
}

/// `check` with several hosts names the one the session went to in the
/// config's words: behind a pooler the server's own idea of its address
/// (`inet_server_addr()`) is PostgreSQL's, behind the pooler, an address
/// the config does not name at all.
#[tokio::test]
async fn check_names_the_configured_host_it_reached_through_a_pooler() {
    let bouncer = PgBouncer::start("session").await;
    let mut env = TestEnv::new("pgb_check").await;
    env.migrate().await;
    env.config["postgres"]["host"] = "127.0.0.1,localhost".into();
    env.config["postgres"]["port"] = serde_json::json!([free_port(), bouncer.port]);
    let out = pushoccurrence(&env.write_config(), &["check"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("writes go to localhost:{})", bouncer.port)),
        "{stdout}"
    );
    env.cleanup().await;
    drop(bouncer);
}

/// The seed's config pointed at a transaction pooler without saying so
/// (`postgres.pooler` unset, `auto_migrate` on by default): the start-up
/// migration takes its session advisory lock on one pooled server session
/// and its unlock runs on another ("you don't own a lock of type
/// ExclusiveLock"), so the lock stays on the pooled server session after
/// the relay is gone, and every later migration of the schema, `migrate`
/// run directly against PostgreSQL included, waits for it until PgBouncer
/// happens to close that server session. Not fixed: a migration cannot
/// tell an undeclared transaction pooler from a direct session before it
/// takes its lock (consecutive statements usually land on the same server
/// session), and a lock that cannot be left behind means reworking how
/// migrations are serialised.
#[tokio::test]
#[ignore = "not fixed: the migration lock of a start-up behind an undeclared transaction pooler stays on a pooled server session"]
async fn a_start_up_migration_through_an_undeclared_transaction_pooler_leaves_no_lock_behind() {
    let mut env = TestEnv::new("pgb_lock").await;
    env.migrate().await;
    let key = format!("pushoccurrence:migrate:{}", env.name);
    // Round robin: consecutive statements of the relay land on the server
    // sessions in turn, as under any concurrent load; with two and with
    // three of them, so the unlock cannot land where the lock is by the
    // parity of the migration's statements.
    for pool_size in [2, 3] {
        let bouncer = PgBouncer::start_with(
            "transaction",
            &format!("default_pool_size = {pool_size}\nserver_round_robin = 1"),
        )
        .await;
        // Open every server session: one transaction each at once.
        let mut clients = Vec::new();
        for _ in 0..pool_size {
            let client = bouncer.session("test").await;
            client.batch_execute("BEGIN; SELECT 1").await.unwrap();
            clients.push(client);
        }
        for client in &clients {
            client.batch_execute("COMMIT").await.unwrap();
        }
        drop(clients);
        assert_eq!(bouncer.server_sessions().await, pool_size);
        env.config["postgres"]["port"] = bouncer.port.into();
        let relay = env.relay().await;
        assert!(relay.terminate().await.success());
        let held: i64 = env
            .pg
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1
                    AND objid = (hashtext($1)::int8 & 4294967295)::oid",
                &[&key],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            held, 0,
            "the migration lock outlived the relay ({pool_size} server sessions)"
        );
        drop(bouncer);
    }
    env.cleanup().await;
}

/// A session pooler whose pool has room for the relay's listener and its
/// workers (here two), not for every session it opens: the backlog
/// sampler and the listener's probe sender each keep a server session of
/// their own for the relay's whole life, and they connect before the
/// workers (which wait for the broker first), so the workers wait for a
/// server session forever ("timeout waiting for server") and nothing is
/// relayed. Not fixed: those two would have to give their session back
/// after each use (a connect every few seconds on a direct connection);
/// docs/topologies.md says how many server sessions a relay needs.
#[tokio::test]
#[ignore = "not fixed: a relay needs its workers + 3 server sessions of a session pooler; with fewer its workers may get none"]
async fn a_session_pooler_with_room_for_the_listener_and_the_workers_relays() {
    let bouncer = PgBouncer::start_with("session", "default_pool_size = 3").await;
    let mut env = TestEnv::new("pgb_small").await;
    env.migrate().await;
    env.config["postgres"]["port"] = bouncer.port.into();
    env.config["postgres"]["auto_migrate"] = false.into();
    env.config["postgres"]["query_timeout_ms"] = 2000.into();
    let consumer = env.consumer().await;
    let relay = env.relay_unready().await;
    let ids = env.insert_many(100, 100).await;
    env_settles(&env, &consumer, &ids).await;
    drop(relay);
    env.cleanup().await;
    drop(bouncer);
}

/// A transaction pooler in front of a primary and its standby: the
/// listener's direct connection names both servers, as `postgres.host`
/// does, so it follows a failover. The first listed here refuses
/// connections; the listener (and the start-up migration, which uses the
/// same address) goes to the next, hears every notification, and `status`
/// says so.
#[tokio::test]
async fn a_listener_given_several_hosts_past_a_transaction_pooler_goes_to_the_one_that_accepts_writes()
 {
    let bouncer = PgBouncer::start("transaction").await;
    let mut env = TestEnv::new("pgb_lhosts").await;
    env.config["postgres"]["port"] = bouncer.port.into();
    env.config["postgres"]["pooler"] = "transaction".into();
    env.config["listener"]["host"] = "127.0.0.1,localhost".into();
    env.config["listener"]["port"] = serde_json::json!([free_port(), pg_port()]);
    // No idle sweeps: only notifications can wake the relay.
    env.config["rabbitmq"]["retry"]["idle_sleep_ms"] = 3_600_000.into();
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let ids = env.insert_many(200, 50).await;
    env_settles(&env, &consumer, &ids).await;
    let log = relay.log_text();
    assert!(!log.contains(DEAF), "{log}");
    assert!(relay.terminate().await.success());
    let (code, stdout) = env.command(&["status"]).await;
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("heard by a session at"), "{stdout}");
    assert!(!stdout.contains("NOT heard"), "{stdout}");
    env.cleanup().await;
    drop(bouncer);
}

/// PgBouncer reports its own errors with SQLSTATE 08P01 too (here its
/// `query_timeout`, a claim waiting on a table lock longer than PgBouncer
/// allows). Only PostgreSQL's own refusal of a bind message shows another
/// client's statement under the relay's name: a session pooler the user
/// declared is not taken for a transaction pooler, with advice to change
/// the config, for a timeout.
#[tokio::test]
async fn a_session_poolers_own_protocol_error_is_not_taken_for_a_transaction_pooler() {
    let bouncer = PgBouncer::start_with("session", "query_timeout = 1").await;
    let mut env = TestEnv::new("pgb_sess08p01").await;
    env.migrate().await;
    env.config["postgres"]["port"] = bouncer.port.into();
    env.config["postgres"]["pooler"] = "session".into();
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let first = env.push_keyed(&env.pg, None, "before").await;
    consumer.wait_for_all(std::slice::from_ref(&first)).await;

    // A maintenance lock that outlasts PgBouncer's query_timeout; the
    // sweeps (every 100 ms) run into it.
    let mut locker = pg().await;
    let tx = locker.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "LOCK TABLE \"{}\".message_queue_log IN ACCESS EXCLUSIVE MODE",
        env.name
    ))
    .await
    .unwrap();
    wait_until("a claim ran into PgBouncer's query_timeout", || async {
        relay.log_text().contains("query timeout")
    })
    .await;
    tx.rollback().await.unwrap();

    let after = env.push_keyed(&env.pg, None, "after").await;
    consumer.wait_for_all(std::slice::from_ref(&after)).await;
    let log = relay.log_text();
    assert!(!log.contains("behind a transaction pooler"), "{log}");
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}
