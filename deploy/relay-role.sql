-- The least-privileged role for running the relay with postgres.auto_migrate
-- set to false. Run it as the outbox's owner after `pushoccurrence migrate`
-- (which needs the owner's rights, once per release). Replace the schema
-- (data_exchange) and the role (pushoccurrence_relay) if yours differ.
-- tests/it/ops.rs runs the relay under exactly these grants.

CREATE ROLE pushoccurrence_relay LOGIN PASSWORD 'change me';
-- Only if CONNECT was revoked from PUBLIC on your database:
-- GRANT CONNECT ON DATABASE your_database TO pushoccurrence_relay;
GRANT USAGE ON SCHEMA data_exchange TO pushoccurrence_relay;

-- Claim (SELECT ... FOR UPDATE SKIP LOCKED) and read the bodies.
GRANT SELECT ON data_exchange.message_queue_log, data_exchange.message_queue_log_data
    TO pushoccurrence_relay;
-- Mark rows transferred and record failed attempts; nothing else is written.
GRANT UPDATE (transferred, transfer_time, relay_attempts, relay_next_attempt_at,
              relay_last_error, relay_parked_at)
    ON data_exchange.message_queue_log TO pushoccurrence_relay;

-- Only with retention (retention.transferred_after_sec > 0):
GRANT DELETE ON data_exchange.message_queue_log, data_exchange.message_queue_log_data
    TO pushoccurrence_relay;

-- LISTEN needs no grant. Producers need INSERT on both tables, or EXECUTE on
-- data_exchange.push_occurrence(...), which runs with their own rights.
