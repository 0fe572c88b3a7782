//! PushOccurrence relays events from a PostgreSQL transactional outbox to
//! RabbitMQ and marks a row transferred only after the broker confirmed it.
//!
//! # Layout
//!
//! By layer, lowest first: a module uses only modules of its own layer or
//! below, and no file uses one that uses it back (`tests/layers.rs` checks
//! the files, and lists the one use still in the way). Configuration is plain data flowing down; each layer builds
//! its own clients from it.
//!
//! 1. Foundations, using nothing of the relay: [`tls`] PostgreSQL's TLS
//!    modes, root certificates and connectors; [`amqp`] AMQP's limits, URLs
//!    and channel errors, [`amqp::table`] JSON → AMQP tables; [`backoff`]
//!    reconnection delays; [`shutdown`] the stop signal; [`progress`]
//!    whether batches still commit.
//! 2. [`config`]: the seed's JSON config, environment overrides, validation;
//!    the only reader of the process environment.
//! 3. [`routing`]: each message's exchange, routing key and properties.
//! 4. The services: [`db`] PostgreSQL sessions, [`db::outbox`] the claim
//!    and mark statements, [`db::migrate`] the schema; [`mq`] the AMQP
//!    connection owner and the declared topology, [`mq::publisher`]
//!    confirm-mode publishing.
//! 5. [`metrics`], [`admin`]: Prometheus metrics and the `/metrics`,
//!    `/healthz`, `/readyz` endpoint; [`db::listener`] LISTEN.
//! 6. [`planner`]: pure per-row decisions (which claimed rows become messages).
//! 7. [`worker`]: a worker's loop, its batch as named steps (claim,
//!    publish, confirm, mark, commit) with a typed outcome; [`retention`]:
//!    optional deletion of old transferred rows.
//! 8. [`service`]: wiring, start-up and the ordered shutdown.
//! 9. [`cli`], [`cmd`]: the `pushoccurrence` command line.

pub mod admin;
pub mod amqp;
pub mod backoff;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod db;
pub mod metrics;
pub mod mq;
pub mod planner;
pub mod progress;
pub mod retention;
pub mod routing;
pub mod service;
pub mod shutdown;
pub mod tls;
pub mod worker;
