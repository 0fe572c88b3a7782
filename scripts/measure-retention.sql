-- What one retention run costs on a 10-million-row history, before and
-- after the transfer-time index (docs/retention.md has the results):
--   psql -h 127.0.0.1 -U postgres test -f scripts/measure-retention.sql
-- It works in a database of its own, po_retention_measure (about 3 GB, a
-- few minutes to build), and drops it at the end: its long transactions
-- would otherwise hold up every CREATE INDEX CONCURRENTLY in the database
-- they run in. The statements are those of src/db/outbox.rs (the previous
-- release's expired_sql and delete_ids_sql before, retention_sql after)
-- with the defaults: batches of 1000, rows transferred more than 7 days ago.
\set ON_ERROR_STOP on
\timing on
DROP DATABASE IF EXISTS po_retention_measure;
CREATE DATABASE po_retention_measure;
\connect po_retention_measure
CREATE TABLE message_queue_log (
    message_id uuid PRIMARY KEY,
    transferred boolean DEFAULT false,
    transfer_time timestamp,
    relay_enqueued_at timestamptz DEFAULT now(),
    relay_attempts integer NOT NULL DEFAULT 0,
    relay_next_attempt_at timestamptz,
    relay_last_error text,
    relay_parked_at timestamptz);
CREATE TABLE message_queue_log_data (
    message_id uuid REFERENCES message_queue_log (message_id),
    message_body bytea);

-- 10 000 rows past retention (the oldest, so first in the heap), then
-- 10 000 000 transferred within the last 6 days, with their bodies.
INSERT INTO message_queue_log (message_id, transferred, transfer_time)
    SELECT gen_random_uuid(), true, localtimestamp - interval '8 days' + i * interval '1 ms'
      FROM generate_series(1, 10000) i;
INSERT INTO message_queue_log (message_id, transferred, transfer_time)
    SELECT gen_random_uuid(), true, localtimestamp - interval '6 days' + i * interval '50 ms'
      FROM generate_series(1, 10000000) i;
INSERT INTO message_queue_log_data SELECT message_id, '\x00' FROM message_queue_log;
CREATE INDEX message_queue_log_data_message_id_idx ON message_queue_log_data (message_id);
VACUUM ANALYZE message_queue_log;
VACUUM ANALYZE message_queue_log_data;
SELECT pg_size_pretty(pg_total_relation_size('message_queue_log')) AS status_table,
       pg_size_pretty(pg_total_relation_size('message_queue_log_data')) AS body_table;

-- Before: a run of the old statements, then the final (short) batch's
-- search again, as EXPLAIN sees it.
DO $$
DECLARE
    ids uuid[];
    n bigint;
    total bigint := 0;
    batches int := 0;
    started timestamptz := clock_timestamp();
BEGIN
    LOOP
        SELECT array_agg(message_id) INTO ids FROM (
            SELECT message_id FROM message_queue_log
             WHERE transferred IS TRUE AND transfer_time < localtimestamp - 604800 * interval '1 second'
             LIMIT 1000 FOR UPDATE SKIP LOCKED) x;
        batches := batches + 1;
        EXIT WHEN ids IS NULL;
        DELETE FROM message_queue_log_data WHERE message_id = ANY (ids);
        DELETE FROM message_queue_log WHERE message_id = ANY (ids);
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
        EXIT WHEN n < 1000;
    END LOOP;
    RAISE NOTICE 'before: % rows deleted in % batches, % ms', total, batches,
        round(extract(epoch FROM clock_timestamp() - started) * 1000);
END $$;
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)
SELECT message_id FROM message_queue_log
 WHERE transferred IS TRUE AND transfer_time < localtimestamp - 604800 * interval '1 second'
 LIMIT 1000 FOR UPDATE SKIP LOCKED;

-- After: the index migrate builds, 10 000 rows past retention again, and
-- a run of the new statement.
CREATE INDEX message_queue_log_transfer_time_idx ON message_queue_log (transfer_time) WHERE transferred IS TRUE;
INSERT INTO message_queue_log (message_id, transferred, transfer_time)
    SELECT gen_random_uuid(), true, localtimestamp - interval '8 days' + i * interval '1 ms'
      FROM generate_series(1, 10000) i;
INSERT INTO message_queue_log_data
    SELECT message_id, '\x00' FROM message_queue_log WHERE transfer_time < localtimestamp - interval '7 days';
VACUUM ANALYZE message_queue_log;
VACUUM ANALYZE message_queue_log_data;
DO $$
DECLARE
    n bigint;
    total bigint := 0;
    batches int := 0;
    started timestamptz := clock_timestamp();
BEGIN
    LOOP
        WITH expired AS MATERIALIZED (
             SELECT tableoid AS table_id, ctid AS row_id, message_id FROM message_queue_log
              WHERE transferred IS TRUE
                AND transfer_time < (now() - 604800 * interval '1 second')::timestamp
                AND transfer_time::timestamptz < now() - 604800 * interval '1 second'
              ORDER BY transfer_time
              LIMIT 1000
                FOR UPDATE SKIP LOCKED),
              bodies AS (
             DELETE FROM message_queue_log_data d
              WHERE d.message_id = ANY (ARRAY(SELECT message_id FROM expired))
                AND d.message_id <> ALL (ARRAY(
                    SELECT kept.message_id FROM message_queue_log kept
                     WHERE kept.message_id = ANY (ARRAY(SELECT message_id FROM expired))
                       AND (kept.tableoid, kept.ctid) NOT IN (SELECT table_id, row_id FROM expired))))
        DELETE FROM message_queue_log l
         WHERE l.ctid = ANY (ARRAY(SELECT row_id FROM expired))
           AND (l.tableoid, l.ctid) IN (SELECT table_id, row_id FROM expired)
           AND l.transferred IS TRUE;
        GET DIAGNOSTICS n = ROW_COUNT;
        batches := batches + 1;
        total := total + n;
        EXIT WHEN n < 1000;
    END LOOP;
    RAISE NOTICE 'after: % rows deleted in % batches, % ms', total, batches,
        round(extract(epoch FROM clock_timestamp() - started) * 1000);
END $$;
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)
WITH expired AS MATERIALIZED (
     SELECT tableoid AS table_id, ctid AS row_id, message_id FROM message_queue_log
      WHERE transferred IS TRUE
        AND transfer_time < (now() - 604800 * interval '1 second')::timestamp
        AND transfer_time::timestamptz < now() - 604800 * interval '1 second'
      ORDER BY transfer_time
      LIMIT 1000
        FOR UPDATE SKIP LOCKED),
      bodies AS (
     DELETE FROM message_queue_log_data d
      WHERE d.message_id = ANY (ARRAY(SELECT message_id FROM expired))
        AND d.message_id <> ALL (ARRAY(
            SELECT kept.message_id FROM message_queue_log kept
             WHERE kept.message_id = ANY (ARRAY(SELECT message_id FROM expired))
               AND (kept.tableoid, kept.ctid) NOT IN (SELECT table_id, row_id FROM expired))))
DELETE FROM message_queue_log l
 WHERE l.ctid = ANY (ARRAY(SELECT row_id FROM expired))
   AND (l.tableoid, l.ctid) IN (SELECT table_id, row_id FROM expired)
   AND l.transferred IS TRUE;

\connect test
DROP DATABASE po_retention_measure;
