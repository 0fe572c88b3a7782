//! The command line: config errors name the key and exit 78, unreachable
//! services exit 69, `check` reports one line per check, secrets never print.

use serde_json::Value;

use crate::support::*;

async fn run_with(env: &TestEnv, args: &[&str], vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = pushoccurrence(&env.write_config(), args);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(PATIENCE, cmd.output())
        .await
        .unwrap()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test]
async fn each_bad_config_gives_exit_78_and_names_the_key() {
    type Edit = fn(&mut Value);
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "unknown key",
            |c| c["rabbitmq"]["queue"]["durabel"] = true.into(),
            "unknown field `durabel`",
        ),
        (
            "wrong type",
            |c| c["postgres"]["port"] = "five".into(),
            "key postgres.port",
        ),
        (
            "missing key",
            |c| {
                c["listener"].as_object_mut().unwrap().remove("channels");
            },
            "missing field `channels`",
        ),
        (
            "zero buffer",
            |c| c["rabbitmq"]["retry"]["buffer_size"] = 0.into(),
            "rabbitmq.retry.buffer_size",
        ),
        (
            "unsafe queue",
            |c| c["rabbitmq"]["queue"]["durable"] = false.into(),
            "rabbitmq.queue.allow_unsafe",
        ),
        (
            "bad url",
            |c| c["rabbitmq"]["url"] = "localhost:5672".into(),
            "key rabbitmq.url",
        ),
        (
            "bad ssl mode",
            |c| c["postgres"]["ssl_mode"] = "on".into(),
            "key postgres.ssl_mode",
        ),
        (
            "long channel",
            |c| c["listener"]["channels"] = vec!["c".repeat(64)].into(),
            "listener.channels[0]",
        ),
    ];
    for (case, edit, expected) in cases {
        let mut env = TestEnv::new("badcfg").await;
        edit(&mut env.config);
        for command in ["run", "check"] {
            let (code, text) = run_with(&env, &[command], &[]).await;
            assert_eq!(code, Some(78), "{case} ({command}): {text}");
            assert!(
                text.contains(expected),
                "{case} ({command}): expected '{expected}' in: {text}"
            );
        }
    }

    let env = TestEnv::new("badenv").await;
    let (code, text) = run_with(
        &env,
        &["run"],
        &[("PUSHOCCURRENCE_RABBITMQ_RETRY_BUFFER_SIZE", "lots")],
    )
    .await;
    assert_eq!(code, Some(78), "{text}");
    assert!(
        text.contains("PUSHOCCURRENCE_RABBITMQ_RETRY_BUFFER_SIZE")
            && text.contains("expected a number"),
        "{text}"
    );
    let (code, text) = run_with(&env, &["run"], &[("PUSHOCCURRENCE_QUEUE_NAME", "x")]).await;
    assert_eq!(code, Some(78), "{text}");
    assert!(
        text.contains("PUSHOCCURRENCE_QUEUE_NAME is not a setting"),
        "{text}"
    );

    let missing = env.dir.path().join("nowhere.json");
    let out = pushoccurrence(&missing, &["run"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
}

#[tokio::test]
async fn check_reports_each_step_and_tells_missing_schema_from_unreachable_services() {
    let mut env = TestEnv::new("check").await;
    let (code, text) = run_with(&env, &["check"], &[]).await;
    assert_eq!(code, Some(78), "{text}");
    assert!(
        text.contains("ok    postgres") && text.contains("run `pushoccurrence migrate`"),
        "{text}"
    );

    let (code, text) = run_with(&env, &["migrate"], &[]).await;
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = run_with(&env, &["check"], &[]).await;
    assert_eq!(code, Some(0), "{text}");
    for line in [
        "ok    config",
        "ok    postgres",
        "ok    outbox schema",
        "ok    rabbitmq",
        "ok    queue",
    ] {
        assert!(text.contains(line), "missing '{line}' in: {text}");
    }

    // A queue that exists with other settings is a clear failure.
    env.cleanup_queue_only().await;
    declare_transient_queue(&env.name).await;
    let (code, text) = run_with(&env, &["check"], &[]).await;
    assert_eq!(code, Some(69), "{text}");
    assert!(
        text.contains("already exists with other settings"),
        "{text}"
    );
    env.cleanup_queue_only().await;

    // Nothing listens on port 1; the password must not leak into the error.
    env.config["postgres"]["port"] = 1.into();
    env.config["postgres"]["password"] = "sentinel-pg-secret".into();
    env.config["rabbitmq"]["url"] = "amqp://guest:sentinel-mq-secret@127.0.0.1:1/%2f".into();
    let (code, text) = run_with(&env, &["check"], &[]).await;
    assert_eq!(code, Some(69), "{text}");
    assert!(text.contains("FAIL  postgres"), "{text}");
    env.config["postgres"]["port"] = pg_port().into();
    let (code, text) = run_with(&env, &["check"], &[("RUST_LOG", "trace")]).await;
    assert_eq!(code, Some(69), "{text}");
    assert!(
        text.contains("FAIL  rabbitmq") && text.contains("guest:***@127.0.0.1:1"),
        "{text}"
    );
    assert!(!text.contains("sentinel"), "a secret leaked: {text}");
    env.cleanup().await;
}

#[tokio::test]
async fn help_explains_each_subcommand() {
    let out = tokio::process::Command::new(BIN)
        .arg("--help")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "run",
        "migrate",
        "check",
        "--config",
        "PUSHOCCURRENCE_CONFIG",
    ] {
        assert!(help.contains(word), "--help lacks {word}: {help}");
    }
}

async fn declare_transient_queue(name: &str) {
    use lapin::options::QueueDeclareOptions;
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_by_config_flag_or_environment() {
    let mut env = TestEnv::new("jsonlog").await;
    let parse_all = |stderr: &str| -> Vec<Value> {
        stderr
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
            })
            .collect()
    };
    let migrated = |lines: &[Value]| {
        lines.iter().any(|l| {
            l["message"] == "outbox schema is up to date"
                && l["level"] == "INFO"
                && l["schema"] == env.name.as_str()
                && l["timestamp"].is_string()
        })
    };
    let stderr_of = |out: std::process::Output| {
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stderr).unwrap()
    };

    let out = pushoccurrence(&env.write_config(), &["--log-format", "json", "migrate"])
        .output()
        .await
        .unwrap();
    assert!(migrated(&parse_all(&stderr_of(out))));

    let out = pushoccurrence(&env.write_config(), &["migrate"])
        .env("PUSHOCCURRENCE_LOG_FORMAT", "json")
        .output()
        .await
        .unwrap();
    assert!(migrated(&parse_all(&stderr_of(out))));

    env.config["log"] = serde_json::json!({"format": "json"});
    let out = pushoccurrence(&env.write_config(), &["migrate"])
        .output()
        .await
        .unwrap();
    assert!(migrated(&parse_all(&stderr_of(out))));

    // The default is text, and a flag beats the file.
    let out = pushoccurrence(&env.write_config(), &["--log-format", "text", "migrate"])
        .output()
        .await
        .unwrap();
    let text = stderr_of(out);
    assert!(
        text.contains("outbox schema is up to date") && !text.starts_with('{'),
        "{text}"
    );

    env.config["log"] = serde_json::json!({"format": "yaml"});
    let (code, text) = run_with(&env, &["migrate"], &[]).await;
    assert_eq!(code, Some(78));
    assert!(
        text.contains("key log.format: unknown format 'yaml'"),
        "{text}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_taken_admin_port_stops_run_with_exit_78_naming_the_key() {
    let mut env = TestEnv::new("adminport").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    env.config["admin"]["listen"] = addr.clone().into();
    let (code, text) = run_with(&env, &["run"], &[]).await;
    assert_eq!(code, Some(78), "{text}");
    assert!(
        text.contains(&format!("key admin.listen: cannot listen on {addr}")),
        "{text}"
    );
    env.config["admin"]["listen"] = "localhost".into();
    let (code, text) = run_with(&env, &["run"], &[]).await;
    assert_eq!(code, Some(78), "{text}");
    assert!(
        text.contains("key admin.listen: 'localhost' is not an address and port"),
        "{text}"
    );
    env.cleanup().await;
}

/// The README's quick-start test command works on a machine without
/// cargo-nextest (not part of a Rust toolchain): `scripts/test` installs it
/// first, and CI runs the very same command. A stand-in `cargo` records what
/// the script asks of it.
#[tokio::test]
async fn the_readme_test_command_installs_nextest_when_missing_and_ci_runs_the_same() {
    use std::os::unix::fs::PermissionsExt;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let quick_start = &readme[readme.find("## Quick start").unwrap()..];
    let quick_start = &quick_start[..quick_start.find("\n## ").unwrap()];
    assert!(
        quick_start.contains("\nscripts/test\n") && !quick_start.contains("cargo nextest"),
        "{quick_start}"
    );
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    let ci_commands: Vec<&str> = ci
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("nextest") || l.contains("scripts/test"))
        .filter(|l| !l.starts_with('#') && !l.starts_with("log "))
        .collect();
    assert_eq!(ci_commands, ["scripts/test"], "{ci}");

    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let fake = dir.path().join("cargo");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$*\" >> {calls}\ncase \"$*\" in\n  'nextest --version') test -e {installed} ;;\n  install*) touch {installed} ;;\nesac\n",
            calls = calls.display(),
            installed = dir.path().join("installed").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = root.join("scripts/test");
    for _ in 0..2 {
        let out = tokio::process::Command::new(&script)
            .args(["-E", "test(x)"])
            .env("PATH", &path)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        "nextest --version\ninstall cargo-nextest --locked\nnextest run --locked -E test(x)\n\
         nextest --version\nnextest run --locked -E test(x)\n"
    );
}

/// Secrets never print, whatever the input: a password with a raw `/` in
/// the AMQP URL, a URL without a scheme, a number where a password goes,
/// the same through environment variables and `_FILE`, and services that
/// cannot be reached. `check`, `migrate` and `run` (killed once it has
/// tried to connect) are all read, stdout and stderr, at `trace`.
#[tokio::test]
async fn no_output_path_prints_a_secret() {
    // Every fragment of the secrets used below.
    const SECRETS: [&str; 4] = ["Zq9", "kW7", "73195046", "pG5ecr3t"];
    let leaks = |text: &str| SECRETS.iter().any(|s| text.contains(s));
    let mut env = TestEnv::new("secrets").await;
    env.migrate().await;
    let base = env.config.clone();
    let secret_file = env.dir.path().join("amqp-url");
    std::fs::write(&secret_file, "amqp://guest:Zq9/kW7@127.0.0.1:5672/\n").unwrap();
    let secret_file = secret_file.to_str().unwrap().to_owned();

    /// What is tried, the config edit, environment variables, what the output says.
    type Case = (
        &'static str,
        fn(&mut Value),
        Vec<(&'static str, &'static str)>,
        &'static str,
    );
    let bad_configs: Vec<Case> = vec![
        (
            "raw slash in the URL's password",
            |c| c["rabbitmq"]["url"] = "amqp://guest:Zq9/kW7@127.0.0.1:5672/".into(),
            vec![],
            "key rabbitmq.url: 'amqp://guest:***@127.0.0.1:5672/' is not an AMQP URL",
        ),
        (
            "URL without a scheme",
            |c| c["rabbitmq"]["url"] = "guest:Zq9kW7@127.0.0.1:5672".into(),
            vec![],
            "key rabbitmq.url: 'guest:***@127.0.0.1:5672' is not an AMQP URL",
        ),
        (
            "two @ in the URL",
            |c| c["rabbitmq"]["url"] = "amqp://guest:Zq9@kW7@127.0.0.1:notaport/".into(),
            vec![],
            "key rabbitmq.url: 'amqp://guest:***@127.0.0.1:notaport/'",
        ),
        (
            "numeric password",
            |c| c["postgres"]["password"] = 73_195_046.into(),
            vec![],
            "key postgres.password: expected a string; put the value in quotes",
        ),
        (
            "numeric URL",
            |c| c["rabbitmq"]["url"] = 73_195_046.into(),
            vec![],
            "key rabbitmq.url: expected a string; put the value in quotes",
        ),
        (
            "password as a list",
            |c| c["postgres"]["password"] = serde_json::json!(["pG5ecr3t"]),
            vec![],
            "key postgres.password: expected a string",
        ),
        (
            "URL from the environment",
            |_| {},
            vec![(
                "PUSHOCCURRENCE_RABBITMQ_URL",
                "amqp://guest:Zq9/kW7@127.0.0.1:5672/",
            )],
            "environment variable PUSHOCCURRENCE_RABBITMQ_URL (key rabbitmq.url): 'amqp://guest:***@127.0.0.1:5672/'",
        ),
    ];
    for (case, edit, vars, expected) in bad_configs {
        env.config = base.clone();
        edit(&mut env.config);
        for command in ["check", "migrate", "run"] {
            let mut vars = vars.clone();
            vars.push(("RUST_LOG", "trace"));
            let (code, text) = run_with(&env, &[command], &vars).await;
            assert_eq!(code, Some(78), "{case} ({command}): {text}");
            assert!(text.contains(expected), "{case} ({command}): {text}");
            assert!(!leaks(&text), "{case} ({command}) leaked a secret: {text}");
        }
    }
    env.config = base.clone();
    let file_var = [
        ("PUSHOCCURRENCE_RABBITMQ_URL_FILE", secret_file.as_str()),
        ("RUST_LOG", "trace"),
    ];
    let (code, text) = run_with(&env, &["check"], &file_var).await;
    assert_eq!(code, Some(78), "{text}");
    assert!(
        text.contains(
            "environment variable PUSHOCCURRENCE_RABBITMQ_URL_FILE (key rabbitmq.url): 'amqp://guest:***@127.0.0.1:5672/'"
        ),
        "{text}"
    );
    assert!(!leaks(&text), "the _FILE secret leaked: {text}");

    // Services that cannot be reached, with the secrets in the config and
    // in the environment.
    let unreachable: Vec<Case> = vec![
        (
            "unknown broker host",
            |c| {
                c["rabbitmq"]["url"] = "amqp://guest:Zq9kW7@po-no-such-host.invalid:5672/%2f".into()
            },
            vec![],
            "FAIL  rabbitmq",
        ),
        (
            "closed broker port",
            |_| {},
            vec![(
                "PUSHOCCURRENCE_RABBITMQ_URL",
                "amqp://guest:Zq9kW7@127.0.0.1:1/%2f",
            )],
            "FAIL  rabbitmq",
        ),
        (
            "closed database port",
            |c| c["postgres"]["port"] = 1.into(),
            vec![("PUSHOCCURRENCE_POSTGRES_PASSWORD", "pG5ecr3t")],
            "FAIL  postgres",
        ),
    ];
    for (case, edit, vars, expected) in unreachable {
        env.config = base.clone();
        edit(&mut env.config);
        let mut vars = vars.clone();
        vars.push(("RUST_LOG", "trace"));
        let (code, text) = run_with(&env, &["check"], &vars).await;
        assert_eq!(code, Some(69), "{case} (check): {text}");
        assert!(text.contains(expected), "{case} (check): {text}");
        assert!(!leaks(&text), "{case} (check) leaked a secret: {text}");
        if case == "closed database port" {
            let (code, text) = run_with(&env, &["migrate"], &vars).await;
            assert_eq!(code, Some(69), "{case} (migrate): {text}");
            assert!(!leaks(&text), "{case} (migrate) leaked a secret: {text}");
        }

        let mut cmd = pushoccurrence(&env.write_config(), &["run"]);
        let log = env
            .dir
            .path()
            .join(format!("run-{}.log", case.replace(' ', "-")));
        let out = std::fs::File::create(&log).unwrap();
        cmd.stdout(out.try_clone().unwrap()).stderr(out);
        for (k, v) in &vars {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let failure = if case == "closed database port" {
            "cannot connect to postgres"
        } else {
            "cannot connect to rabbitmq"
        };
        wait_until(&format!("{case}: run reports '{failure}'"), || async {
            std::fs::read_to_string(&log).unwrap().contains(failure)
        })
        .await;
        child.kill().await.unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!leaks(&text), "{case} (run) leaked a secret: {text}");
    }
    env.cleanup().await;
}

/// Kubernetes sets these for Services named `pushoccurrence` and
/// `pushoccurrence-postgres` in the relay's namespace.
const SERVICE_LINKS: &[(&str, &str)] = &[
    ("PUSHOCCURRENCE_SERVICE_HOST", "10.0.0.1"),
    ("PUSHOCCURRENCE_SERVICE_PORT", "9780"),
    ("PUSHOCCURRENCE_PORT", "tcp://10.0.0.1:9780"),
    ("PUSHOCCURRENCE_PORT_9780_TCP", "tcp://10.0.0.1:9780"),
    ("PUSHOCCURRENCE_PORT_9780_TCP_PROTO", "tcp"),
    ("PUSHOCCURRENCE_PORT_9780_TCP_PORT", "9780"),
    ("PUSHOCCURRENCE_PORT_9780_TCP_ADDR", "10.0.0.1"),
    ("PUSHOCCURRENCE_POSTGRES_SERVICE_HOST", "10.0.0.5"),
    ("PUSHOCCURRENCE_POSTGRES_SERVICE_PORT", "5432"),
    ("PUSHOCCURRENCE_POSTGRES_PORT", "tcp://10.0.0.5:5432"),
    ("PUSHOCCURRENCE_POSTGRES_PORT_5432_TCP_ADDR", "10.0.0.5"),
];

#[tokio::test]
async fn kubernetes_service_links_and_unknown_variables_never_stop_the_relay() {
    use std::os::unix::ffi::OsStringExt;
    let env = TestEnv::new("k8senv").await;
    env.migrate().await;
    let mut vars = SERVICE_LINKS.to_vec();
    vars.push(("PUSHOCCURRENCE_TEAM", "payments"));
    let mut cmd = pushoccurrence(&env.write_config(), &["check"]);
    for (k, v) in &vars {
        cmd.env(k, v);
    }
    // Not UTF-8, elsewhere in the environment and under the prefix.
    cmd.env(
        "PO_TEST_LATIN1",
        std::ffi::OsString::from_vec(b"caf\xe9".to_vec()),
    );
    cmd.env(
        "PUSHOCCURRENCE_NOTE",
        std::ffi::OsString::from_vec(b"caf\xe9".to_vec()),
    );
    let out = cmd.output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    // The file's port (the real server's) stood against the service link.
    assert!(
        text.contains(&format!("ok    postgres: 127.0.0.1:{}", pg_port())),
        "{text}"
    );
    assert!(
        text.contains(
            "WARN pushoccurrence: environment variable PUSHOCCURRENCE_TEAM is not a setting of this relay; ignored"
        ),
        "{text}"
    );
    assert!(
        text.contains("PUSHOCCURRENCE_NOTE is not a setting of this relay (and its value is not UTF-8); ignored"),
        "{text}"
    );
    assert!(!text.contains("PUSHOCCURRENCE_PORT"), "{text}");
    assert!(!text.contains("panicked"), "{text}");

    // A likely misspelling of a real setting is still an error: the
    // operator believes it took effect.
    let (code, text) = run_with(&env, &["check"], &[("PUSHOCCURRENCE_POSTGRES_HSOT", "db")]).await;
    assert_eq!(code, Some(78), "{text}");
    assert!(
        text.contains(
            "environment variable PUSHOCCURRENCE_POSTGRES_HSOT is not a setting of this relay; did you mean PUSHOCCURRENCE_POSTGRES_HOST?"
        ),
        "{text}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn config_errors_name_the_variable_or_the_file_that_set_the_value() {
    let env = TestEnv::new("cfgsrc").await;
    let (code, text) = run_with(
        &env,
        &["check"],
        &[("PUSHOCCURRENCE_POSTGRES_PORT", "70000")],
    )
    .await;
    assert_eq!(code, Some(78), "{text}");
    assert_eq!(
        text.trim(),
        "error: environment variable PUSHOCCURRENCE_POSTGRES_PORT (key postgres.port): invalid value: 70000, expected a whole number from 0 to 65535"
    );
    let (code, text) = run_with(
        &env,
        &["check"],
        &[("PUSHOCCURRENCE_RELAY_BATCH_SIZE", "0")],
    )
    .await;
    assert_eq!(code, Some(78), "{text}");
    assert_eq!(
        text.trim(),
        "error: environment variable PUSHOCCURRENCE_RELAY_BATCH_SIZE (key relay.batch_size): must be at least 1"
    );

    // A byte order mark (Windows editors) is not an error; a key given twice is.
    let path = env.write_config();
    let json = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("\u{feff}{json}")).unwrap();
    let out = pushoccurrence(&path, &["check"]).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ok    config"), "{stdout}");
    let twice = json.replacen(
        "\"host\": \"127.0.0.1\",",
        "\"host\": \"127.0.0.1\", \"host\": \"db\",",
        1,
    );
    assert_ne!(twice, json);
    std::fs::write(&path, twice).unwrap();
    let out = pushoccurrence(&path, &["check"]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "error: {} is not valid JSON: key postgres.host is given twice; keep one at line",
            path.display()
        )),
        "{stderr}"
    );
    env.cleanup().await;
}

/// Runs a command against `env`'s config: (exit code, stdout, stderr).
async fn output(env: &TestEnv, args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::time::timeout(PATIENCE, pushoccurrence(&env.write_config(), args).output())
        .await
        .unwrap()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn parked_and_requeue_tell_each_case_apart_and_read_ids_in_the_columns_type() {
    let env = TestEnv::new("requeue").await;
    env.migrate().await;
    let s = &env.name;
    let ids: Vec<String> = (0..8)
        .map(|n| format!("{:08x}-2a4b-4c7d-9e8f-{n:012x}", fastrand::u32(..)))
        .collect();
    for id in &ids {
        env.insert_event(id, "'\\x01'", false).await;
    }
    // 0-4 parked (with a reason holding a line break and a tab), 5 pending,
    // 6 transferred, 7 parked.
    env.pg
        .execute(
            &format!(
                "UPDATE \"{s}\".message_queue_log
                    SET relay_parked_at = now() - make_interval(secs => 10 - right(message_id::text, 1)::int),
                        relay_attempts = 3, relay_last_error = E'first line\\nsecond\\tpart'
                  WHERE message_id = ANY($1::text[]::uuid[])"
            ),
            &[&vec![&ids[0], &ids[1], &ids[2], &ids[3], &ids[4], &ids[7]]],
        )
        .await
        .unwrap();
    env.pg
        .execute(
            &format!(
                "UPDATE \"{s}\".message_queue_log SET transferred = true, transfer_time = now() WHERE message_id = $1::text::uuid"
            ),
            &[&ids[6]],
        )
        .await
        .unwrap();

    // Limits the command line refuses, instead of an empty list or a raw SQL error.
    for bad in [&["parked", "--limit", "0"][..], &["parked", "--limit=-1"]] {
        let (code, _, stderr) = output(&env, bad).await;
        assert_eq!(code, Some(2), "{bad:?}: {stderr}");
        assert!(stderr.contains("--limit"), "{stderr}");
    }
    let (code, stdout, stderr) = output(&env, &["parked", "--limit", "2"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].starts_with(&format!("{}\tattempts=3\t", ids[0])),
        "{stdout}"
    );
    assert!(lines[1].starts_with(&ids[1]), "{stdout}");
    assert!(
        lines[0].ends_with("\treason=first line\\nsecond\\tpart"),
        "{stdout}"
    );
    assert_eq!(
        lines[2],
        "4 more parked row(s) not shown; raise --limit to see them"
    );
    let (_, stdout, _) = output(&env, &["parked"]).await;
    assert_eq!(
        stdout.lines().count(),
        6,
        "one line per parked row: {stdout}"
    );

    // Parked ids in other spellings of the same uuid.
    let upper = ids[0].to_uppercase();
    let braced = format!("{{{}}}", ids[1]);
    let bare = ids[2].replace('-', "");
    let (code, stdout, stderr) = output(&env, &["requeue", &upper, &braced, &bare]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(stdout, "requeued 3 row(s)\n");
    let parked = env
        .texts(
            &format!(
                "SELECT message_id::text FROM \"{s}\".message_queue_log WHERE relay_parked_at IS NOT NULL ORDER BY 1"
            ),
            &[],
        )
        .await;
    let mut still = vec![ids[3].clone(), ids[4].clone(), ids[7].clone()];
    still.sort();
    assert_eq!(parked, still);

    // Nothing matched: each id with its own reason, exit 1.
    let unknown = "00000000-0000-4000-8000-000000000000";
    let (code, stdout, stderr) =
        output(&env, &["requeue", &ids[5], &ids[6], unknown, "no-such-id"]).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert_eq!(
        stdout,
        format!(
            "requeued 0 row(s)\n\
             malformed, left alone: no-such-id (not a uuid (message_id is uuid), e.g. 5f0c6e1e-2a4b-4c7d-9e8f-0123456789ab)\n\
             not found in the outbox (check the id and postgres.schema): {unknown}\n\
             not parked (still pending; the relay sends it), left alone: {}\n\
             already transferred, left alone: {}\n",
            ids[5], ids[6]
        )
    );
    assert_eq!(
        stderr.trim(),
        "error: nothing requeued: no id given names a parked row"
    );

    // Some matched: exit 0, the rest reported.
    let (code, stdout, _) = output(&env, &["requeue", &ids[3], "no-such-id"]).await;
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.starts_with("requeued 1 row(s)\nmalformed, left alone: no-such-id"),
        "{stdout}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_error_and_its_causes_are_each_said_once() {
    let mut env = TestEnv::new("once").await;
    let role = env.name.clone();
    env.pg
        .batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN"))
        .await
        .unwrap();
    env.config["postgres"]["user"] = role.clone().into();
    let (code, _, stderr) = output(&env, &["migrate"]).await;
    assert_eq!(code, Some(78), "{stderr}");
    assert_eq!(
        stderr,
        "error: create the outbox schema and tables: permission denied for database test (SQLSTATE 42501)\n"
    );
    let (code, _, stderr) = output(&env, &["run"]).await;
    assert_eq!(code, Some(78), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        "error: migrate the outbox: create the outbox schema and tables: permission denied for database test (SQLSTATE 42501)"
    );
    env.pg
        .batch_execute(&format!("DROP ROLE \"{role}\""))
        .await
        .unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn migrate_through_a_transaction_pooler_is_refused_before_it_takes_a_lock() {
    let mut env = TestEnv::new("poolmigrate").await;
    env.config["postgres"]["pooler"] = "transaction".into();
    env.config["postgres"]["auto_migrate"] = false.into();
    let out = pushoccurrence(&env.write_config(), &["migrate"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("migrate needs a session of its own") && stderr.contains("listener.host"),
        "{stderr}"
    );
    env.cleanup().await;
}

/// The broker's nodes from the environment with the seed's file, which
/// always has `rabbitmq.url`: `PUSHOCCURRENCE_RABBITMQ_URLS` replaces the
/// file's URL (as `PUSHOCCURRENCE_RABBITMQ_URL` replaces a file's list),
/// instead of "set one of them" with no way out but editing the file; both
/// in the environment stay an error. A list given as one string is told to
/// be a list, and a bad item is named by its index; no secret is printed.
#[tokio::test]
async fn the_environment_s_broker_nodes_replace_the_file_s_and_a_urls_string_is_told_to_be_a_list()
{
    let mut env = TestEnv::new("cfg_urls").await;
    env.migrate().await;
    // The seed's file: one URL, here one that would never connect.
    env.config["rabbitmq"]["url"] = "amqp://guest:fiLe5ecret@127.0.0.1:1/".into();
    let nodes = format!(
        "amqp://guest:eNv5ecret@127.0.0.1:{}/,{}",
        free_port(),
        amqp_url()
    );
    let (code, text) = run_with(
        &env,
        &["check"],
        &[("PUSHOCCURRENCE_RABBITMQ_URLS", &nodes)],
    )
    .await;
    assert!(!text.contains("5ecret"), "a secret printed: {text}");
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("ok    rabbitmq: amqp://guest:***@127.0.0.1:5672/"),
        "{text}"
    );
    assert!(
        !text.contains("127.0.0.1:1/"),
        "the file's URL is replaced: {text}"
    );

    let (code, text) = run_with(
        &env,
        &["check"],
        &[
            ("PUSHOCCURRENCE_RABBITMQ_URLS", &nodes),
            ("PUSHOCCURRENCE_RABBITMQ_URL", &amqp_url()),
        ],
    )
    .await;
    assert!(!text.contains("5ecret"), "a secret printed: {text}");
    assert_eq!(code, Some(78), "{text}");
    assert!(
        text.contains("keys rabbitmq.url and rabbitmq.urls: set one of them"),
        "{text}"
    );

    // A file with a list; the environment's single URL replaces it.
    env.config["rabbitmq"]
        .as_object_mut()
        .unwrap()
        .remove("url");
    env.config["rabbitmq"]["urls"] = serde_json::json!(["amqp://guest:fiLe5ecret@127.0.0.1:1/"]);
    let (code, text) = run_with(
        &env,
        &["check"],
        &[("PUSHOCCURRENCE_RABBITMQ_URL", &amqp_url())],
    )
    .await;
    assert!(!text.contains("5ecret"), "a secret printed: {text}");
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("127.0.0.1:1/"), "{text}");

    env.config["rabbitmq"]["urls"] = "amqp://guest:fiLe5ecret@127.0.0.1:1/".into();
    let (code, text) = run_with(&env, &["check"], &[]).await;
    assert!(!text.contains("5ecret"), "a secret printed: {text}");
    assert_eq!(code, Some(78), "{text}");
    assert!(
        text.contains("key rabbitmq.urls: expected a list of AMQP URLs"),
        "{text}"
    );
    env.config["rabbitmq"]["urls"] = serde_json::json!([amqp_url(), 5672]);
    let (code, text) = run_with(&env, &["check"], &[]).await;
    assert!(!text.contains("5ecret"), "a secret printed: {text}");
    assert_eq!(code, Some(78), "{text}");
    assert!(
        text.contains("key rabbitmq.urls[1]: expected a string"),
        "{text}"
    );
    env.cleanup().await;
}
