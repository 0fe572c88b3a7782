//! Integration tests against the real local PostgreSQL and RabbitMQ. Each
//! test has its own schema, NOTIFY channel and queue, so they run in parallel.
#![allow(unreachable_pub)] // items are shared between the test modules of one binary
#![allow(clippy::let_underscore_must_use)] // clean-up and consumer acks are best effort
#![allow(clippy::disallowed_methods)] // the tests read their own PO_* variables

mod bad_input; // each bad-input rule: retried, parked with a reason, stream keeps flowing
mod broker; // channel faults, refused messages, full queues, long alarms, a lost queue: owner pays
mod chaos; // the chaos runs' relays behind proxies, their faults, producers of keyed events
mod cli; // the binary's commands: bad config, check, exit codes, secrets
mod cluster; // a three-node RabbitMQ cluster, quorum queues, nodes stopped under load
mod failover; // a private primary and its streaming standby: the primary dies, the standby is promoted, the relay follows
mod faults; // broker, database and process faults injected for real; nothing lost
mod migrate; // schema creation on fresh and existing seed databases
mod ops; // the admin endpoint: metrics against what was sent, health, readiness
mod ordering; // per-key order of first deliveries: relays, producers, held keys, counted breaks
mod pooler; // PgBouncer in session and transaction mode, a listener that proves it hears
mod proxy; // in-test TCP proxy: cut, stall or refuse the relay's connections
mod relay; // delivery: exactly once, bodies byte-exact, sweeps, two relays, SIGTERM
mod retention; // what retention deletes: only expired rows, by row identity, in any time zone; cheap runs
mod routing; // exchanges, routing keys, headers, quorum queues, channel routes, unroutable rows
mod schema; // the user's own schema: rows the database refuses to update, retyped columns, huge attempt counts
mod support; // per-test outbox and queue, the relay process, a recording consumer
mod tls; // TLS to PostgreSQL in every ssl_mode, amqps:// to a private node
