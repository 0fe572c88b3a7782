//! Routing beyond the seed's queue: per-row exchange, routing key, headers
//! and properties; exchanges, queues (quorum included) and bindings declared
//! from the config; routes by NOTIFY channel; unroutable rows parked.

use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;

use crate::support::*;

/// A test's extra broker names, derived from its own name so tests never meet.
struct Names {
    exchange: String,
    orders: String,
    refunds: String,
}

impl Names {
    fn of(env: &TestEnv) -> Self {
        Self {
            exchange: format!("{}.events", env.name),
            orders: format!("{}.orders", env.name),
            refunds: format!("{}.refunds", env.name),
        }
    }

    /// A topic exchange, two queues bound to it (`order.*` and
    /// `*.refunded`), declared by the relay.
    fn declare_in(&self, env: &mut TestEnv) {
        let mq = &mut env.config["rabbitmq"];
        mq["exchanges"] = json!([{"name": self.exchange, "type": "topic"}]);
        mq["queues"] = json!([{"name": self.orders}, {"name": self.refunds}]);
        mq["bindings"] = json!([
            {"queue": self.orders, "exchange": self.exchange, "routing_key": "order.*"},
            {"queue": self.refunds, "exchange": self.exchange, "routing_key": "*.refunded"},
        ]);
    }

    async fn cleanup(self, env: TestEnv) {
        delete_from_broker(&[&self.orders, &self.refunds], &[&self.exchange]).await;
        env.cleanup().await;
    }
}

/// Writes one event through the producer helper with extra named arguments
/// (`p_routing_key => 'x'`, ...) and returns its id.
async fn send(env: &TestEnv, body: &str, args: &str) -> String {
    let sep = if args.is_empty() { "" } else { ", " };
    env.pg
        .query_one(
            &format!(
                "SELECT \"{}\".push_occurrence(convert_to($1, 'UTF8'){sep}{args})::text",
                env.name
            ),
            &[&body],
        )
        .await
        .unwrap()
        .get(0)
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[tokio::test]
async fn a_topic_exchange_routes_each_row_by_its_routing_key_and_null_rows_keep_the_seed_queue() {
    let mut env = TestEnv::new("topic").await;
    let names = Names::of(&env);
    names.declare_in(&mut env);
    let seed_queue = env.consumer().await;
    let relay = env.relay().await;
    let orders = Consumer::attach(&names.orders).await;
    let refunds = Consumer::attach(&names.refunds).await;

    let x = &names.exchange;
    let created = send(
        &env,
        "created",
        &format!("p_exchange => '{x}', p_routing_key => 'order.created'"),
    )
    .await;
    let refunded = send(
        &env,
        "refunded",
        &format!("p_exchange => '{x}', p_routing_key => 'order.refunded'"),
    )
    .await;
    let payment = send(
        &env,
        "payment",
        &format!("p_exchange => '{x}', p_routing_key => 'payment.refunded'"),
    )
    .await;
    let plain = send(&env, "plain", "").await;

    orders
        .wait_for_all(&[created.clone(), refunded.clone()])
        .await;
    refunds
        .wait_for_all(&[refunded.clone(), payment.clone()])
        .await;
    seed_queue.wait_for_all(std::slice::from_ref(&plain)).await;
    wait_until("nothing is pending", || async { env.pending().await == 0 }).await;

    assert_eq!(
        orders.ids(),
        sorted(vec![created.clone(), refunded.clone()])
    );
    assert_eq!(refunds.ids(), sorted(vec![refunded.clone(), payment]));
    assert_eq!(seed_queue.ids(), vec![plain.clone()]);
    let r = orders.get(&created);
    assert_eq!(
        (r.exchange.as_str(), r.routing_key.as_str()),
        (x.as_str(), "order.created")
    );
    assert_eq!(r.body, b"created");
    let p = seed_queue.get(&plain);
    assert_eq!(
        (p.exchange.as_str(), p.routing_key.as_str()),
        ("", env.name.as_str())
    );
    assert_eq!(p.content_type.as_deref(), Some("application/octet-stream"));

    assert!(relay.terminate().await.success());
    names.cleanup(env).await;
}

#[tokio::test]
async fn headers_and_properties_arrive_intact_and_typed() {
    let env = TestEnv::new("headers").await;
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let headers = json!({
        "tenant": "acme", "count": 3, "ratio": 0.25, "urgent": true, "none": null,
        "tags": ["a", 2], "nested": {"deep": -7}
    });
    let id = send(
        &env,
        "{}",
        &format!(
            "p_headers => '{headers}', p_content_type => 'application/json',
             p_correlation_id => 'corr-1', p_reply_to => 'replies', p_message_type => 'order.created',
             p_expiration_ms => 4294967295, p_priority => 7::smallint"
        ),
    )
    .await;
    consumer.wait_for_all(std::slice::from_ref(&id)).await;
    let p = consumer.get(&id).properties;
    let mut nested = FieldTable::default();
    nested.insert("deep".into(), AMQPValue::LongLongInt(-7));
    let mut expected = FieldTable::default();
    for (k, v) in [
        ("tenant", AMQPValue::LongString("acme".into())),
        ("count", AMQPValue::LongLongInt(3)),
        ("ratio", AMQPValue::Double(0.25)),
        ("urgent", AMQPValue::Boolean(true)),
        ("none", AMQPValue::Void),
        (
            "tags",
            AMQPValue::FieldArray(
                vec![AMQPValue::LongString("a".into()), AMQPValue::LongLongInt(2)].into(),
            ),
        ),
        ("nested", AMQPValue::FieldTable(nested)),
    ] {
        expected.insert(k.into(), v);
    }
    assert_eq!(p.headers().as_ref(), Some(&expected));
    let text = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.to_string());
    assert_eq!(text(p.content_type()).as_deref(), Some("application/json"));
    assert_eq!(text(p.correlation_id()).as_deref(), Some("corr-1"));
    assert_eq!(text(p.reply_to()).as_deref(), Some("replies"));
    assert_eq!(text(p.kind()).as_deref(), Some("order.created"));
    assert_eq!(text(p.expiration()).as_deref(), Some("4294967295"));
    assert_eq!(*p.priority(), Some(7));
    assert_eq!(text(p.message_id()).as_deref(), Some(id.as_str()));
    assert_eq!(*p.delivery_mode(), Some(2));
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn a_quorum_queue_declared_from_the_config_receives_messages() {
    let mut env = TestEnv::new("quorum").await;
    env.config["rabbitmq"]["queue"]["arguments"] = json!({"x-queue-type": "quorum"});
    let relay = env.relay().await;
    let consumer = Consumer::attach(&env.name).await;
    let ids = env.insert_many(30, 10).await;
    consumer.wait_for_all(&ids).await;
    wait_until("nothing is pending", || async { env.pending().await == 0 }).await;
    assert_exactly_once(&consumer, &ids);

    // The broker holds it as a quorum queue: a classic declaration is refused.
    let conn = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let classic = conn
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            env.name.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(classic.contains("x-queue-type"), "{classic}");
    let _ = conn.close(200, "bye".into()).await;
    assert!(relay.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test]
async fn routes_follow_the_notify_channel_recorded_on_the_row() {
    let mut env = TestEnv::new("chanroute").await;
    let names = Names::of(&env);
    names.declare_in(&mut env);
    let billing = format!("{}_billing", env.name);
    env.config["listener"]["channels"] = json!([env.name, billing]);
    env.config["rabbitmq"]["routes"] =
        json!({ billing.clone(): {"exchange": names.exchange, "routing_key": "order.billed"} });
    let seed_queue = env.consumer().await;
    let relay = env.relay().await;
    let orders = Consumer::attach(&names.orders).await;

    let billed = send(&env, "billed", &format!("p_channel => '{billing}'")).await;
    let overridden = send(
        &env,
        "refund",
        &format!("p_channel => '{billing}', p_routing_key => 'x.refunded'"),
    )
    .await;
    let default = send(&env, "default", "").await;
    let refunds = Consumer::attach(&names.refunds).await;
    orders.wait_for_all(std::slice::from_ref(&billed)).await;
    refunds
        .wait_for_all(std::slice::from_ref(&overridden))
        .await;
    seed_queue
        .wait_for_all(std::slice::from_ref(&default))
        .await;
    wait_until("nothing is pending", || async { env.pending().await == 0 }).await;
    assert_eq!(orders.ids(), vec![billed.clone()]);
    assert_eq!(orders.get(&billed).routing_key, "order.billed");
    assert_eq!(seed_queue.ids(), vec![default]);
    assert!(relay.terminate().await.success());
    names.cleanup(env).await;
}

#[tokio::test]
async fn unroutable_rows_and_bad_routing_fields_are_parked_with_their_reason_while_others_flow() {
    let mut env = TestEnv::new("unroutable").await;
    env.config["relay"]["max_attempts"] = 2.into();
    env.config["relay"]["attempt_delay_ms"] = 50.into();
    let names = Names::of(&env);
    names.declare_in(&mut env);
    let seed_queue = env.consumer().await;
    let mut relay = env.relay().await;
    let x = &names.exchange;
    let nobody = send(
        &env,
        "lost?",
        &format!("p_exchange => '{x}', p_routing_key => 'nobody.home'"),
    )
    .await;
    let missing_exchange = format!("{}.missing", env.name);
    let no_exchange = send(
        &env,
        "lost?",
        &format!("p_exchange => '{missing_exchange}'"),
    )
    .await;
    let bad_priority = send(&env, "lost?", "p_priority => 300::smallint").await;
    let good = env.insert_many(20, 10).await;

    let parked = |id: String| {
        let env = &env;
        async move {
            wait_until(&format!("{id} is parked"), || async {
                env.row_state(&id).await.2
            })
            .await;
            let (attempts, reason, _, transferred) = env.row_state(&id).await;
            assert!(!transferred && attempts == 2, "{attempts} {transferred}");
            reason.unwrap_or_default()
        }
    };
    let reason = parked(nobody).await;
    assert!(
        reason.contains("312 NO_ROUTE") && reason.contains("routing key 'nobody.home'"),
        "{reason}"
    );
    let reason = parked(no_exchange).await;
    assert!(
        reason.contains(&format!(
            "exchange '{missing_exchange}' named by the row does not exist"
        )),
        "{reason}"
    );
    let reason = parked(bad_priority).await;
    assert_eq!(reason, "column priority is 300; AMQP takes 0 to 255");

    seed_queue.wait_for_all(&good).await;
    assert_exactly_once(&seed_queue, &good);
    // Only configured routes make the relay suspect its own topology.
    assert_eq!(relay.log_count("declared the configured exchanges"), 0);
    assert!(relay.is_running());
    assert!(relay.terminate().await.success());
    names.cleanup(env).await;
}

#[tokio::test]
async fn a_configured_route_to_a_missing_exchange_is_refused_at_connect_with_the_key() {
    let mut env = TestEnv::new("routecheck").await;
    let missing = format!("{}.nowhere", env.name);
    env.config["rabbitmq"]["exchange"] = missing.clone().into();
    env.migrate().await;
    let out = pushoccurrence(&env.write_config(), &["check"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(69), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "FAIL  rabbitmq: exchange '{missing}' named by rabbitmq.exchange does not exist; declare it in rabbitmq.exchanges"
        )),
        "{stdout}"
    );

    // Declared in the config, the same route checks out.
    env.config["rabbitmq"]["exchanges"] = json!([{"name": missing, "type": "fanout"}]);
    let out = pushoccurrence(&env.write_config(), &["check"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "ok    routing: 1 exchange(s), 0 more queue(s), 0 binding(s) declared; default route: exchange '{missing}'"
        )),
        "{stdout}"
    );
    delete_from_broker(&[], &[&missing]).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_headers_exchange_matches_on_the_typed_headers_of_the_row() {
    let mut env = TestEnv::new("hdrx").await;
    let names = Names::of(&env);
    let mq = &mut env.config["rabbitmq"];
    mq["exchanges"] = json!([{"name": names.exchange, "type": "headers"}]);
    mq["queues"] = json!([{"name": names.orders}]);
    mq["bindings"] = json!([{"queue": names.orders, "exchange": names.exchange,
                             "arguments": {"x-match": "all", "tenant": "acme", "version": 2}}]);
    env.config["relay"]["max_attempts"] = 1.into();
    let relay = env.relay().await;
    let orders = Consumer::attach(&names.orders).await;
    let x = &names.exchange;
    let matching = send(
        &env,
        "acme v2",
        &format!(r#"p_exchange => '{x}', p_headers => '{{"tenant": "acme", "version": 2, "extra": true}}'"#),
    )
    .await;
    let other = send(
        &env,
        "acme v3",
        &format!(r#"p_exchange => '{x}', p_headers => '{{"tenant": "acme", "version": 3}}'"#),
    )
    .await;
    orders.wait_for_all(std::slice::from_ref(&matching)).await;
    wait_until("the other row is parked", || async {
        env.row_state(&other).await.2
    })
    .await;
    let reason = env.row_state(&other).await.1.unwrap_or_default();
    assert!(reason.contains("312 NO_ROUTE"), "{reason}");
    assert_eq!(orders.ids(), vec![matching]);
    assert!(relay.terminate().await.success());
    names.cleanup(env).await;
}

#[tokio::test]
async fn a_row_naming_an_exchange_the_broker_refuses_is_parked_and_the_stream_flows() {
    let mut env = TestEnv::new("refused").await;
    let names = Names::of(&env);
    env.config["rabbitmq"]["exchanges"] =
        json!([{"name": names.exchange, "type": "fanout", "internal": true}]);
    env.config["relay"]["max_attempts"] = 2.into();
    env.config["relay"]["attempt_delay_ms"] = 50.into();
    let seed_queue = env.consumer().await;
    let relay = env.relay().await;
    let before = env.insert_many(10, 10).await;
    seed_queue.wait_for_all(&before).await;
    let refused = send(
        &env,
        "internal",
        &format!("p_exchange => '{}'", names.exchange),
    )
    .await;
    let after = env.insert_many(20, 10).await;
    wait_until("the refused row is parked", || async {
        env.row_state(&refused).await.2
    })
    .await;
    let (attempts, reason, _, transferred) = env.row_state(&refused).await;
    assert!(!transferred && attempts == 2, "{attempts}");
    let reason = reason.unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "the broker refused publishing to exchange '{}'",
            names.exchange
        )) && reason.contains("internal"),
        "{reason}"
    );
    seed_queue.wait_for_all(&after).await;
    assert_no_loss(&seed_queue, &[before, after].concat(), 30);
    assert!(relay.terminate().await.success());
    names.cleanup(env).await;
}
