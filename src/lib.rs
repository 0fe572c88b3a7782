//! PushOccurrence relays events from a PostgreSQL transactional outbox to
//! RabbitMQ and marks a row transferred only after the broker confirmed it.
//!
//! # Layout
//!
//! In reading order, following an event from the table to the queue:
//!
//! * [`config`]: the seed's JSON config, environment overrides, validation.
//! * [`db`]: PostgreSQL sessions; [`db::outbox`] the claim and mark
//!   statements, [`db::migrate`] the schema, [`db::listener`] LISTEN.
//! * [`planner`]: pure per-row decisions (which claimed rows become messages).
//! * [`routing`]: each message's exchange, routing key and properties.
//! * [`mq`]: the AMQP connection owner and the declared topology;
//!   [`mq::publisher`] confirm-mode publishing, [`mq::table`] JSON → AMQP tables.
//! * [`worker`]: a worker's loop; its batch as named steps (claim,
//!   publish, confirm, mark, commit) with a typed outcome.
//! * [`service`]: wiring, start-up and the ordered shutdown.
//! * [`retention`]: optional deletion of old transferred rows.
//! * [`metrics`], [`admin`]: Prometheus metrics and the `/metrics`,
//!   `/healthz`, `/readyz` endpoint; [`progress`] whether batches still
//!   commit, for `/readyz`.
//! * [`backoff`], [`shutdown`]: reconnection delays and the stop signal.
//! * [`cli`], [`cmd`]: the `pushoccurrence` command line.

pub mod admin;
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
pub mod worker;
