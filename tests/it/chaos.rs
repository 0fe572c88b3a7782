//! What the chaos runs share: relays behind proxies in front of both
//! services, the faults thrown at them (links cut, stalled or down,
//! sessions terminated, processes killed or stopped and replaced), and
//! producers of keyed events whose per-key order the checker
//! (`support::check_key_order`) holds the consumer to.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::proxy::Proxy;
use crate::support::*;

/// Every fault a chaos run knows.
pub const ALL_FAULTS: [&str; 8] = [
    "amqp cut",
    "amqp stall",
    "amqp down",
    "pg cut",
    "pg stall",
    "pg terminate",
    "sigkill",
    "sigterm",
];

/// The three faults issue 14's proof names: a relay killed, its broker
/// connection cut, its database sessions terminated.
pub const KILL_CUT_TERMINATE: [&str; 3] = ["sigkill", "amqp cut", "pg terminate"];

/// Relays sharing one outbox, each reaching PostgreSQL and RabbitMQ through
/// a proxy of the test's, and the faults thrown at them so far.
pub struct Chaos {
    pub pg_proxy: Proxy,
    pub mq_proxy: Proxy,
    pub relays: Vec<Relay>,
    /// How often each fault was thrown.
    pub faults: BTreeMap<&'static str, usize>,
}

impl Chaos {
    /// Routes `env`'s relays through two new proxies, with timeouts of 2 s
    /// (a stalled link is noticed; a loaded machine is not taken for one)
    /// and a 2 s AMQP heartbeat, and starts `relays` relays.
    pub async fn start(env: &mut TestEnv, relays: usize) -> Self {
        let pg_proxy = Proxy::start(pg_port()).await;
        let mq_proxy = Proxy::start(5672).await;
        env.config["postgres"]["port"] = pg_proxy.port.into();
        env.config["postgres"]["query_timeout_ms"] = 2000.into();
        env.config["relay"]["confirm_timeout_ms"] = 2000.into();
        env.config["rabbitmq"]["url"] = format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=2",
            mq_proxy.port
        )
        .into();
        let mut started = Vec::new();
        for _ in 0..relays {
            started.push(env.relay().await);
        }
        Self {
            pg_proxy,
            mq_proxy,
            relays: started,
            faults: BTreeMap::new(),
        }
    }

    /// Throws faults of `kinds` for `length`, one every `gap_ms` (drawn
    /// at random): first each kind once, in the order given, so a short run
    /// has them all, then kinds drawn at random.
    pub async fn run(
        &mut self,
        env: &TestEnv,
        kinds: &[&'static str],
        length: Duration,
        gap_ms: Range<u64>,
    ) {
        let deadline = Instant::now() + length;
        let mut thrown = 0;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(gap_ms.clone()))).await;
            let fault = match kinds.get(thrown) {
                Some(&fault) => fault,
                None => kinds[fastrand::usize(..kinds.len())],
            };
            self.throw(env, fault).await;
            thrown += 1;
        }
        self.mq_proxy.pass();
        self.pg_proxy.pass();
    }

    /// Throws one fault; the link faults that last (stall, down) last a
    /// random 0.5-3 s.
    pub async fn throw(&mut self, env: &TestEnv, fault: &'static str) {
        *self.faults.entry(fault).or_default() += 1;
        let lasting = Duration::from_millis(fastrand::u64(500..3000));
        match fault {
            "amqp cut" => self.mq_proxy.cut(),
            "pg cut" => self.pg_proxy.cut(),
            "pg terminate" => {
                env.terminate_relay_sessions().await;
            }
            "amqp stall" | "amqp down" | "pg stall" => {
                let proxy = match fault.starts_with("pg") {
                    true => &self.pg_proxy,
                    false => &self.mq_proxy,
                };
                match fault.ends_with("down") {
                    true => proxy.down(),
                    false => proxy.stall(),
                }
                tokio::time::sleep(lasting).await;
                proxy.pass();
            }
            "sigkill" | "sigterm" => {
                let victim = self.relays.remove(fastrand::usize(..self.relays.len()));
                if fault == "sigkill" {
                    victim.kill().await;
                } else {
                    assert_eq!(victim.terminate().await.code(), Some(0));
                }
                self.relays.push(env.relay_unready().await);
            }
            other => panic!("no such fault: {other}"),
        }
    }

    /// Stops every relay with SIGTERM; each must exit cleanly.
    pub async fn stop(self) {
        for relay in self.relays {
            assert_eq!(relay.terminate().await.code(), Some(0));
        }
    }
}

/// Rows of one keyed producer, `(ordering key, id)` in the order its
/// transactions committed them.
pub type Written = Vec<(Option<String>, String)>;

/// Starts a producer that writes through `push_occurrence`, until
/// `until`, transactions of: three rows of the hot key `hot`, two rows
/// each of two keys drawn from `k000`..`k{keys}`, and two unkeyed rows,
/// locking the keys in sorted order (as the README asks of writers of
/// several keys); it pauses `pause_ms` between transactions.
pub fn produce_keyed(
    env: &TestEnv,
    keys: u32,
    pause_ms: u64,
    until: Instant,
) -> tokio::task::JoinHandle<Written> {
    let sql = format!(
        "SELECT \"{}\".push_occurrence(convert_to($1::text, 'UTF8'), p_ordering_key => $2::text)::text",
        env.name
    );
    tokio::spawn(async move {
        let mut client = pg().await;
        let statement = client.prepare(&sql).await.unwrap();
        let mut written = Vec::new();
        let mut t = 0;
        while Instant::now() < until {
            let mut rows: Vec<Option<String>> = vec![Some("hot".into()); 3];
            for _ in 0..2 {
                let key = format!("k{:03}", fastrand::u32(..keys));
                rows.extend([Some(key.clone()), Some(key)]);
            }
            rows.extend([None, None]);
            // Sorted, so a transaction's rows of a key stay in the order
            // pushed and its key locks are taken in one order.
            rows.sort();
            let tx = client.transaction().await.unwrap();
            let mut ids = Vec::with_capacity(rows.len());
            for (i, key) in rows.into_iter().enumerate() {
                let id: String = tx
                    .query_one(&statement, &[&format!("t{t} {key:?} {i}"), &key])
                    .await
                    .unwrap()
                    .get(0);
                ids.push((key, id));
            }
            tx.commit().await.unwrap();
            written.extend(ids);
            t += 1;
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        }
        written
    })
}

/// Asserts the reference order the checker reads from the table agrees
/// with what one producer did: its rows of each key appear there in the
/// order it wrote them. (Across producers only the table can tell.)
pub fn assert_written_in_table_order(
    written: &Written,
    orders: &std::collections::HashMap<String, Vec<String>>,
) {
    let mut place = std::collections::HashMap::new();
    for ids in orders.values() {
        for (i, id) in ids.iter().enumerate() {
            place.insert(id.as_str(), i);
        }
    }
    let mut last: std::collections::HashMap<&str, usize> = Default::default();
    for (key, id) in written {
        let Some(key) = key else { continue };
        let i = *place
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{id} of key {key} is not in the table"));
        if let Some(&before) = last.get(key.as_str()) {
            assert!(
                before < i,
                "key {key}: {id} was written after row #{before} but the table orders it #{i}"
            );
        }
        last.insert(key, i);
    }
}
