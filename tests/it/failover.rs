//! PostgreSQL failover: a private primary and its streaming standby on this
//! machine, the relay given both; the primary dies mid-stream, the standby
//! is promoted, and the relay follows it without losing a row the standby
//! has.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_postgres::{Client, NoTls};

use crate::support::*;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// One private PostgreSQL server run as the postgres user, in a temp dir,
/// on a free port; stopped (immediately) and removed on drop.
struct PrivatePg {
    port: u16,
    dir: PathBuf,
}

impl PrivatePg {
    /// A new primary that accepts replication connections from 127.0.0.1.
    fn primary() -> Self {
        let pg = Self::empty("primary");
        // initdb's pg_hba.conf already trusts replication from 127.0.0.1
        // with `-A trust`.
        pg.as_postgres(PG_BIN.to_owned() + "/initdb")
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(pg.data())
            .run("initdb");
        pg.configure(
            "wal_level = replica\nmax_wal_senders = 5\nwal_keep_size = '64MB'\n\
             fsync = off\nfull_page_writes = off\n",
        );
        pg.start();
        pg
    }

    /// A streaming standby of `primary`, made with `pg_basebackup -R`.
    fn standby_of(primary: &Self) -> Self {
        let pg = Self::empty("standby");
        pg.as_postgres(PG_BIN.to_owned() + "/pg_basebackup")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ])
            .args(["-p", &primary.port.to_string(), "-D"])
            .arg(pg.data())
            .run("pg_basebackup");
        // The copied postgresql.conf names the primary's port and socket
        // directory; later lines win.
        pg.configure("hot_standby = on\n");
        pg.start();
        pg
    }

    fn empty(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "po-pg-{what}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let owned = std::process::Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(owned.success());
        Self {
            port: free_port(),
            dir,
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn as_postgres(&self, program: impl AsRef<Path>) -> std::process::Command {
        let mut cmd = std::process::Command::new("runuser");
        cmd.args(["-u", "postgres", "--"])
            .arg(program.as_ref())
            .stdin(Stdio::null());
        cmd
    }

    /// Appends `settings` and this server's port and socket directory to
    /// its postgresql.conf.
    fn configure(&self, settings: &str) {
        use std::io::Write;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data().join("postgresql.conf"))
            .unwrap();
        write!(
            conf,
            "\n{settings}port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n",
            self.port,
            self.dir.display()
        )
        .unwrap();
    }

    fn pg_ctl(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = self.as_postgres(PG_BIN.to_owned() + "/pg_ctl");
        cmd.arg("-D").arg(self.data()).args(args);
        cmd
    }

    fn start(&self) {
        let log = self.dir.join("server.log");
        self.pg_ctl(&["-w", "-t", "60", "-l", log.to_str().unwrap(), "start"])
            .run("pg_ctl start");
    }

    /// Stops the server at once, as a crash would (no checkpoint, no
    /// goodbye to its sessions or its standby).
    fn crash(&self) {
        self.pg_ctl(&["-m", "immediate", "stop"])
            .run("pg_ctl stop -m immediate");
    }

    fn promote(&self) {
        self.pg_ctl(&["-w", "-t", "60", "promote"])
            .run("pg_ctl promote");
    }

    async fn client(&self) -> Client {
        connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        ))
        .await
        .unwrap()
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl(&["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

trait Run {
    fn run(&mut self, what: &str);
}

impl Run for std::process::Command {
    /// Runs the command; panics with its output unless it succeeds.
    fn run(&mut self, what: &str) {
        let out = self.output().unwrap();
        assert!(
            out.status.success(),
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

async fn connect(conninfo: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The relay's failed batches and, among them, its claim sessions that
/// could not connect (no server took writes), from one scrape.
async fn failures(relay: &Relay) -> (f64, f64) {
    let text = http_get(&relay.admin().await, "/metrics").await.1;
    let series = |name: &str| metric(&text, name).unwrap_or_else(|| panic!("no metric {name}"));
    (
        series("pushoccurrence_batches_failed_total"),
        series("pushoccurrence_claim_session_connect_failures_total"),
    )
}

/// Transferred and all rows of the outbox on one server.
async fn counts(pg: &Client, schema: &str) -> (i64, i64) {
    let row = pg
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE transferred), count(*) FROM \"{schema}\".message_queue_log"
            ),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn the_relay_follows_a_promoted_standby_and_delivers_every_row_it_has() {
    let primary = PrivatePg::primary();
    let standby = PrivatePg::standby_of(&primary);
    let mut env = TestEnv::new("failover").await;
    // Both servers, 127.0.0.1 twice with their own ports; the primary
    // first, as an operator lists them.
    env.config["postgres"]["host"] = "127.0.0.1,127.0.0.1".into();
    env.config["postgres"]["port"] = format!("{},{}", primary.port, standby.port).into();
    env.config["postgres"]["database"] = "postgres".into();
    let relay = env.relay().await;
    let consumer = Consumer::attach(&env.name).await;

    // A steady stream, written to whichever server accepts writes; only
    // committed rows count (a commit whose answer is lost with the primary
    // may or may not have happened: the standby's rows decide).
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let stop = stop.clone();
        let schema = env.name.clone();
        let conninfo = format!(
            "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=postgres \
             target_session_attrs=read-write connect_timeout=5",
            primary.port, standby.port
        );
        tokio::spawn(async move {
            let sql = format!(
                "SELECT \"{schema}\".push_occurrence(convert_to('failover ' || i, 'UTF8'))::text
                   FROM generate_series(1, 10) AS i"
            );
            let mut session: Option<Client> = None;
            let mut committed = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if session.as_ref().is_none_or(Client::is_closed) {
                    session = connect(&conninfo).await.ok();
                }
                if let Some(pg) = &session {
                    match pg.query(&sql, &[]).await {
                        Ok(rows) => committed += rows.len(),
                        Err(_) => session = None,
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            committed
        })
    };

    let old = primary.client().await;
    wait_until("the relay transfers 300 rows on the primary", || async {
        counts(&old, &env.name).await.0 >= 300
    })
    .await;
    drop(old);

    // The primary dies mid-stream. Until the standby is promoted, the
    // relay's sessions find only a read-only server, and refuse it.
    let (_, refused_connects) = failures(&relay).await;
    primary.crash();
    wait_until(
        "a claim session found no server that takes writes",
        || async { failures(&relay).await.1 > refused_connects },
    )
    .await;
    standby.promote();

    let new = standby.client().await;
    let (_, at_promotion) = counts(&new, &env.name).await;
    wait_until(
        "the relay transfers rows on the promoted standby",
        || async { counts(&new, &env.name).await.0 >= at_promotion + 200 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let committed = producer.await.unwrap();
    wait_until(
        "every row on the promoted standby is transferred",
        || async {
            let (transferred, all) = counts(&new, &env.name).await;
            transferred == all
        },
    )
    .await;

    // Every row that reached the standby was delivered; rows committed on
    // the old primary and never replicated are gone with it (whatever the
    // relay had sent of them arrived too, and is not counted as lost).
    let ids: Vec<String> = new
        .query(
            &format!(
                "SELECT message_id::text FROM \"{}\".message_queue_log",
                env.name
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    consumer.wait_for_all(&ids).await;
    let t = tally(&consumer, &ids);
    eprintln!("failover: {t:?}; the producer saw {committed} rows committed");
    assert_eq!(t.lost, 0, "{t:?}");
    // At most the in-flight window (buffer_size 100) goes out twice: the
    // batches in flight when the primary died, whose marks died with it.
    assert!(t.duplicates <= 100, "{t:?}");
    // The listener followed the primary too: it listened again, on the
    // promoted standby (the only server left).
    wait_until("the listener listens on the promoted standby", || async {
        relay.reconnections("postgres_listener").await >= 1.0
            && relay
                .metric("pushoccurrence_connection_up{connection=\"postgres_listener\"}")
                .await
                == Some(1.0)
    })
    .await;
    assert!(relay.terminate().await.success());
    env.cleanup_queue_only().await;
}

#[tokio::test]
async fn a_server_that_turns_read_only_is_left_after_one_failed_batch_per_session() {
    let server = PrivatePg::primary();
    let mut env = TestEnv::new("readonly").await;
    env.config["postgres"]["port"] = server.port.into();
    env.config["postgres"]["database"] = "postgres".into();
    let relay = env.relay().await;
    let consumer = Consumer::attach(&env.name).await;
    let pg = server.client().await;
    let write = |n: i32| {
        format!(
            "SELECT \"{}\".push_occurrence(convert_to('ro ' || i, 'UTF8'))::text
               FROM generate_series(1, {n}) AS i",
            env.name
        )
    };
    let mut ids: Vec<String> = pg
        .query(&write(50), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    consumer.wait_for_all(&ids).await;

    // The server turns read-only under the relay's sessions, as a primary
    // being demoted does: every new transaction on them is refused with
    // SQLSTATE 25006. (A producer's session that set its own default still
    // writes, so rows keep coming.)
    for sql in [
        "ALTER SYSTEM SET default_transaction_read_only = on",
        "SELECT pg_reload_conf()",
    ] {
        pg.batch_execute(sql).await.unwrap();
    }
    pg.batch_execute("SET default_transaction_read_only = off")
        .await
        .unwrap();
    let during: Vec<String> = pg
        .query(&write(30), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Each session that meets the refusal is dropped (its batch fails);
    // its replacement is refused at connect, because the server does not
    // accept writes.
    wait_until(
        "a batch was refused and the relay has tried again a few times",
        || async {
            let (batches, connects) = failures(&relay).await;
            batches - connects >= 1.0 && connects >= 4.0
        },
    )
    .await;
    // Never a loop of failing batches: at most one per claim session open
    // when the server turned (buffer_size 100 / batch_size 50 = 2 workers).
    let (batches, connects) = failures(&relay).await;
    assert!(batches - connects <= 2.0, "{}", relay.log_text());
    // The warning names the cause and what the relay does about it.
    assert!(
        relay.log_text().contains("the server is read-only"),
        "{}",
        relay.log_text()
    );
    // The rows were not charged for it.
    let charged: i64 = pg
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{}\".message_queue_log WHERE relay_attempts > 0",
                env.name
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(charged, 0);

    // Writable again: the relay resumes by itself and delivers every row.
    for sql in [
        "ALTER SYSTEM RESET default_transaction_read_only",
        "SELECT pg_reload_conf()",
    ] {
        pg.batch_execute(sql).await.unwrap();
    }
    ids.extend(during);
    consumer.wait_for_all(&ids).await;
    wait_until("every row is transferred", || async {
        let (transferred, all) = counts(&pg, &env.name).await;
        transferred == all
    })
    .await;
    assert_no_loss(&consumer, &ids, 0);
    assert!(relay.terminate().await.success());
    env.cleanup_queue_only().await;
}

/// A first host that accepts the connection and never answers (a frozen
/// primary still completes TCP handshakes) costs one
/// `postgres.connect_timeout_sec`; every session then goes to the next.
#[tokio::test]
async fn a_host_that_accepts_and_never_answers_is_passed_over_for_the_next() {
    let mut env = TestEnv::new("silenthost").await;
    let silent = crate::broker::silent_server().await;
    env.config["postgres"]["host"] = "127.0.0.1,127.0.0.1".into();
    env.config["postgres"]["port"] = format!("{silent},{}", pg_port()).into();
    env.config["postgres"]["connect_timeout_sec"] = 1.into();
    let check = pushoccurrence(&env.write_config(), &["check"])
        .output()
        .await
        .unwrap();
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let ids = env.insert_many(20, 10).await;
    consumer.wait_for_all(&ids).await;
    env.wait_all_transferred().await;
    assert_exactly_once(&consumer, &ids);
    // `check` ran before the schema existed: it got past the silent host.
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        stdout.contains(&format!("writes go to 127.0.0.1:{}", pg_port())),
        "{stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}
