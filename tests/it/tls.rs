//! TLS: PostgreSQL in every `ssl_mode` against the local server (which
//! offers TLS with the Debian "snakeoil" certificate for `localhost`), and
//! RabbitMQ over `amqps://` on a private node with a CA the test creates.
//! A certificate from another CA fails with an error that says so.

use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;

use crate::support::*;

/// The local server's certificate: self-signed, for DNS name `localhost`.
const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// Creates `ca.pem` (a CA named `ca_name`) and, signed by it, `server.pem`
/// / `server.key` for `localhost` and 127.0.0.1 in `dir`; returns the CA's path.
fn make_certs(dir: &Path, ca_name: &str) -> PathBuf {
    let subject = format!("/CN={ca_name}");
    let run = |args: &[&str]| {
        let out = StdCommand::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", &subject,
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    dir.join("ca.pem")
}

async fn check(env: &TestEnv) -> (bool, String) {
    let out = pushoccurrence(&env.write_config(), &["check"])
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn postgres_tls_follows_each_ssl_mode_and_a_foreign_ca_is_refused() {
    let mut env = TestEnv::new("pgtls").await;
    env.migrate().await;
    let pg = |env: &mut TestEnv, host: &str, mode: &str, root: Option<&str>| {
        env.config["postgres"]["host"] = host.into();
        env.config["postgres"]["ssl_mode"] = mode.into();
        env.config["postgres"]["ssl_root_cert"] = root.map_or(serde_json::Value::Null, Into::into);
    };

    // The relay itself, every session encrypted and the server authenticated.
    pg(&mut env, "localhost", "verify-full", Some(SNAKEOIL));
    let consumer = env.consumer().await;
    let relay = env.relay().await;
    let ids = env.insert_many(20, 10).await;
    consumer.wait_for_all(&ids).await;
    let (sessions, encrypted): (i64, i64) = {
        let row = env
            .pg
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE s.ssl)
                   FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid
                  WHERE a.application_name = $1",
                &[&env.name],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        sessions >= 2 && encrypted == sessions,
        "{encrypted} of {sessions} sessions use TLS"
    );
    assert!(relay.terminate().await.success());

    // verify-ca checks the chain only, so the address may differ from the name.
    pg(&mut env, "127.0.0.1", "verify-ca", Some(SNAKEOIL));
    let (ok, text) = check(&env).await;
    assert!(ok, "{text}");
    pg(&mut env, "127.0.0.1", "require", None);
    let (ok, text) = check(&env).await;
    assert!(ok, "{text}");

    // verify-full checks the name too.
    pg(&mut env, "127.0.0.1", "verify-full", Some(SNAKEOIL));
    let (ok, text) = check(&env).await;
    assert!(
        !ok && text.contains("FAIL  postgres") && text.contains("not valid for name"),
        "{text}"
    );

    // A CA that did not sign the server's certificate.
    let foreign = make_certs(env.dir.path(), "some other CA");
    pg(
        &mut env,
        "localhost",
        "verify-ca",
        Some(foreign.to_str().unwrap()),
    );
    let (ok, text) = check(&env).await;
    assert!(
        !ok && text.contains("invalid peer certificate: UnknownIssuer"),
        "{text}"
    );

    // verify-* without a CA is a config error naming the key.
    pg(&mut env, "localhost", "verify-full", None);
    let (ok, text) = check(&env).await;
    assert!(!ok && text.contains("key postgres.ssl_root_cert"), "{text}");
    env.cleanup().await;
}

#[tokio::test]
async fn rabbitmq_over_amqps_with_the_configured_ca_and_a_foreign_ca_is_refused() {
    let mut env = TestEnv::new("amqps").await;
    let tls_port = free_port();
    let broker = PrivateBroker::start_with(|dir| {
        make_certs(dir, "pushoccurrence test CA");
        format!(
            "listeners.ssl.default = {tls_port}
ssl_options.cacertfile = {d}/ca.pem
ssl_options.certfile = {d}/server.pem
ssl_options.keyfile = {d}/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
",
            d = dir.display()
        )
    })
    .await;
    let ca = env.dir.path().join("broker-ca.pem");
    std::fs::copy(broker.dir().join("ca.pem"), &ca).unwrap();
    env.config["rabbitmq"]["url"] = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f").into();
    env.config["rabbitmq"]["ca_file"] = ca.to_str().unwrap().into();
    let consumer = Consumer::start(&broker.url(), &env.name).await;
    let relay = env.relay().await;
    let ids = env.insert_many(30, 10).await;
    consumer.wait_for_all(&ids).await;
    assert_exactly_once(&consumer, &ids);
    assert!(
        relay
            .log_text()
            .contains(&format!("amqps://guest:***@127.0.0.1:{tls_port}"))
    );
    assert!(relay.terminate().await.success());

    let foreign_dir = env.dir.path().join("foreign");
    std::fs::create_dir_all(&foreign_dir).unwrap();
    let foreign = make_certs(&foreign_dir, "some other CA");
    env.config["rabbitmq"]["ca_file"] = foreign.to_str().unwrap().into();
    let (ok, text) = check(&env).await;
    assert!(
        !ok && text.contains("FAIL  rabbitmq")
            && text.contains("invalid peer certificate: UnknownIssuer"),
        "{text}"
    );
    env.cleanup().await;
    drop(broker);
}
