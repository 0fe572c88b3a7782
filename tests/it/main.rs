//! Integration tests against the real local PostgreSQL and RabbitMQ. Each
//! test has its own schema, NOTIFY channel and queue, so they run in parallel.
#![allow(unreachable_pub)] // items are shared between the test modules of one binary
#![allow(clippy::let_underscore_must_use)] // clean-up and consumer acks are best effort

mod cli; // the binary's commands: bad config, check, exit codes, secrets
mod migrate; // schema creation on fresh and existing seed databases
mod relay; // delivery: exactly once, bodies byte-exact, sweeps, two relays, SIGTERM
mod support; // per-test outbox and queue, the relay process, a recording consumer
