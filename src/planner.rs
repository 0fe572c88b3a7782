//! The planner: the per-row decisions of a batch, kept pure so they are
//! tested without PostgreSQL or RabbitMQ: which claimed rows are published,
//! which are held back and why, and where the next claim starts.

use std::collections::{HashMap, HashSet};

use crate::amqp::AMQP_MAX_SHORT_STRING;
use crate::db::outbox::{ClaimPosition, ClaimedRow, Fetched};
use crate::mq::publisher::Message;
use crate::routing::{MessageFields, Router};

/// Why a claimed row was not published; it stays pending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// The status row has no data row (yet: a producer may commit them apart).
    NoData,
    /// The data row's body is NULL.
    NullBody,
    /// Several data rows with different bodies: publishing either under one
    /// `message_id` would let consumer de-duplication drop the other.
    AmbiguousBody,
    /// The body is larger than the broker accepts.
    Oversize {
        /// The body's size in bytes.
        size: i64,
    },
    /// The id does not fit an AMQP short string (255 bytes).
    IdTooLong,
    /// A routing column or property the broker would refuse; the text
    /// names the column.
    BadField(String),
    /// The row names an exchange that does not exist.
    NoExchange(String),
    /// The broker refused messages to the exchange the row names (an
    /// internal exchange, no write permission) by closing the channel.
    RefusedExchange {
        /// The exchange.
        exchange: String,
        /// The broker's words.
        reason: String,
    },
    /// The batch's byte budget was spent before this row; it goes in a later
    /// batch. Not a failure.
    Deferred,
    /// An earlier row of the same ordering key in this batch is not
    /// published; this one waits for it. Not a failure.
    BehindKey {
        /// The ordering key.
        key: String,
        /// The earlier row it waits for.
        waits_for: String,
    },
}

impl Hold {
    /// The reason stored on the row and logged.
    pub fn reason(&self) -> String {
        match self {
            Self::NoData => "no data row in message_queue_log_data".into(),
            Self::NullBody => "message_body is NULL".into(),
            Self::AmbiguousBody => "several data rows with different bodies".into(),
            Self::Oversize { size } => {
                format!("body of {size} bytes exceeds relay.max_message_bytes")
            }
            Self::IdTooLong => format!("message_id is longer than {AMQP_MAX_SHORT_STRING} bytes"),
            Self::BadField(reason) => reason.clone(),
            Self::NoExchange(name) => format!(
                "exchange '{name}' named by the row does not exist; declare it (rabbitmq.exchanges) or fix the row"
            ),
            Self::RefusedExchange { exchange, reason } => format!(
                "the broker refused publishing to exchange '{exchange}' named by the row ({reason}); grant write permission or fix the row"
            ),
            Self::Deferred => "deferred to the next batch".into(),
            Self::BehindKey { key, waits_for } => format!(
                "waits for row {waits_for}, before it in ordering key '{key}', which this batch did not publish"
            ),
        }
    }

    /// Whether this counts as a failed attempt of the row.
    pub fn is_failure(&self) -> bool {
        !matches!(self, Self::Deferred | Self::BehindKey { .. })
    }
}

/// What to do with one claim, decided from ids and sizes alone, before any
/// body leaves the database.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Ids whose bodies to fetch and publish, in claim order.
    pub fetch: Vec<String>,
    /// Claimed ids not published this time, with the reason.
    pub held: Vec<(String, Hold)>,
    /// How many distinct ids were claimed.
    pub claimed: usize,
    /// The claimed ids that carry an ordering key, with it, in claim order
    /// (which is each key's order).
    pub keyed: Vec<(String, String)>,
    /// Where the next claim should start: the last row before the first one
    /// deferred for the byte budget (deferred rows go in the next batch),
    /// not counting rows that followed their key's head in a run.
    /// `None` when that row has no `relay_enqueued_at`: such rows come first
    /// in a pass, so the claim that took it started from the beginning, and
    /// the next one does too.
    pub cursor: Option<ClaimPosition>,
}

/// Sorts a claim (one row per data row, in claim order) into ids to fetch and
/// ids held back: no data row, a NULL body, a body over `max_message_bytes`,
/// an id too long for AMQP, or (not a failure) past the batch's
/// `max_batch_bytes`, which always admits the first body.
pub fn plan(rows: &[ClaimedRow], max_message_bytes: u64, max_batch_bytes: u64) -> Plan {
    let mut out = Plan::default();
    let mut bytes: u64 = 0;
    let mut deferring = false;
    // The last row before the deferred ones: where the next claim starts.
    let mut last_taken: Option<&ClaimedRow> = None;
    for group in rows.chunk_by(|a, b| a.id == b.id) {
        let id = &group[0].id;
        out.claimed += 1;
        let group_bytes: u64 = group
            .iter()
            .map(|r| r.size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0))
            .sum();
        let oversize = group
            .iter()
            .filter_map(|r| r.size)
            .find(|s| u64::try_from(*s).is_ok_and(|s| s > max_message_bytes));
        let hold = if deferring {
            // Past the budget nothing is judged: the rows go in a later batch.
            Some(Hold::Deferred)
        } else if id.len() > AMQP_MAX_SHORT_STRING {
            Some(Hold::IdTooLong)
        } else if !group[0].has_data {
            Some(Hold::NoData)
        } else if group.iter().any(|r| r.size.is_none()) {
            Some(Hold::NullBody)
        } else if let Some(size) = oversize {
            Some(Hold::Oversize {
                size: i64::from(size),
            })
        } else if !out.fetch.is_empty() && bytes + group_bytes > max_batch_bytes {
            deferring = true;
            Some(Hold::Deferred)
        } else {
            None
        };
        if !deferring && !group[0].in_run {
            last_taken = Some(&group[0]);
        }
        if let Some(key) = &group[0].ordering_key {
            out.keyed.push((id.clone(), key.clone()));
        }
        match hold {
            Some(hold) => out.held.push((id.clone(), hold)),
            None => {
                bytes += group_bytes;
                out.fetch.push(id.clone());
            }
        }
    }
    out.cursor = last_taken.and_then(|row| {
        row.enqueued_at.clone().map(|enqueued_at| ClaimPosition {
            enqueued_at,
            id: row.id.clone(),
        })
    });
    out
}

/// The rows of one claim, sorted into messages and held rows.
#[derive(Debug, Default, PartialEq)]
pub struct Assembled {
    /// Messages to publish, one per fetched id, in claim order.
    pub messages: Vec<Message>,
    /// Claimed ids that are not published this time.
    pub held: Vec<(String, Hold)>,
    /// How many distinct ids were claimed.
    pub claimed: usize,
    /// The keyed ids claimed, with their keys, in claim order.
    pub keyed: Vec<(String, String)>,
}

/// Takes the bodies a claim brought along (one per claimed row, `None` where
/// the claim withheld it) for the ids the plan publishes. A planned id with a
/// withheld body, which happens when the claim's byte budget counted a body
/// the plan holds back, comes back in the second list, to be fetched apart:
/// none of its rows is taken, so a partly read id is never mistaken for a
/// whole one.
pub fn take_bodies(
    plan: &Plan,
    rows: &[ClaimedRow],
    bodies: Vec<Option<Fetched>>,
) -> (Vec<Fetched>, Vec<String>) {
    let planned: HashSet<&str> = plan.fetch.iter().map(String::as_str).collect();
    let mut taken = Vec::with_capacity(plan.fetch.len());
    let mut withheld = Vec::new();
    let mut bodies = bodies.into_iter();
    for group in rows.chunk_by(|a, b| a.id == b.id) {
        let group_bodies: Vec<Option<Fetched>> = bodies.by_ref().take(group.len()).collect();
        let id = &group[0].id;
        if !planned.contains(id.as_str()) {
            continue;
        }
        if group_bodies.iter().all(Option::is_some) {
            taken.extend(group_bodies.into_iter().flatten());
        } else {
            withheld.push(id.clone());
        }
    }
    (taken, withheld)
}

/// Joins a [`Plan`] with the fetched rows (one per data row) and routes each
/// message. Identical duplicate data rows publish once; differing ones are
/// held, and so are rows whose routing or properties the broker would refuse.
pub fn assemble(plan: Plan, fetched: Vec<Fetched>, router: &Router) -> Assembled {
    let mut by_id: HashMap<String, (MessageFields, Vec<Vec<u8>>)> =
        HashMap::with_capacity(plan.fetch.len());
    for row in fetched {
        by_id
            .entry(row.id)
            .or_insert_with(|| (row.fields, Vec::new()))
            .1
            .push(row.body);
    }
    let keys: HashMap<&str, &str> = plan
        .keyed
        .iter()
        .map(|(id, key)| (id.as_str(), key.as_str()))
        .collect();
    let mut out = Assembled {
        held: plan.held,
        claimed: plan.claimed,
        ..Assembled::default()
    };
    for id in plan.fetch {
        let Some((fields, mut bodies)) = by_id.remove(&id) else {
            // The data row vanished between claim and fetch (a producer deleted it).
            out.held.push((id, Hold::NoData));
            continue;
        };
        let first = bodies.pop().expect("an entry holds at least one body");
        if !bodies.iter().all(|b| *b == first) {
            out.held.push((id, Hold::AmbiguousBody));
            continue;
        }
        match router.resolve(&fields) {
            Ok(destination) => out.messages.push(Message {
                ordering_key: keys.get(id.as_str()).map(|key| (*key).to_owned()),
                id,
                body: first,
                destination,
            }),
            Err(reason) => out.held.push((id, Hold::BadField(reason))),
        }
    }
    out.keyed = plan.keyed;
    out
}

/// Holds back every message that follows, in its ordering key, a claimed
/// row this batch does not publish (held for bad input, deferred, waiting
/// out a delay only this process knows of): a later row of a key never goes
/// out before an earlier one. Run on the batch as it will be published.
pub fn hold_behind_keys(batch: &mut Assembled) {
    if batch.keyed.is_empty() {
        return;
    }
    let publishing: HashSet<&str> = batch.messages.iter().map(|m| m.id.as_str()).collect();
    // The first row of each key that is not published.
    let mut stopped: HashMap<&str, &str> = HashMap::new();
    let mut behind: HashMap<String, Hold> = HashMap::new();
    for (id, key) in &batch.keyed {
        match stopped.get(key.as_str()) {
            Some(first) if publishing.contains(id.as_str()) => {
                behind.insert(
                    id.clone(),
                    Hold::BehindKey {
                        key: key.clone(),
                        waits_for: (*first).to_owned(),
                    },
                );
            }
            Some(_) => {}
            None if !publishing.contains(id.as_str()) => {
                stopped.insert(key, id);
            }
            None => {}
        }
    }
    if behind.is_empty() {
        return;
    }
    let (held, published): (Vec<Message>, Vec<Message>) = std::mem::take(&mut batch.messages)
        .into_iter()
        .partition(|m| behind.contains_key(&m.id));
    batch.messages = published;
    for message in held {
        let hold = behind.remove(&message.id).expect("partitioned by it");
        batch.held.push((message.id, hold));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::outbox::EnqueuedAt;

    const MAX: u64 = 10;
    const BUDGET: u64 = 25;

    fn row(id: &str, size: Option<i32>, has_data: bool) -> ClaimedRow {
        ClaimedRow {
            id: id.into(),
            enqueued_at: Some(EnqueuedAt(id.as_bytes().to_vec())),
            has_data,
            size,
            ordering_key: None,
            in_run: false,
        }
    }

    fn cursor_id(p: &Plan) -> Option<&str> {
        p.cursor.as_ref().map(|c| c.id.as_str())
    }

    fn body(id: &str, b: &str) -> Fetched {
        Fetched {
            id: id.into(),
            body: b.as_bytes().to_vec(),
            fields: MessageFields::default(),
        }
    }

    #[test]
    fn bodies_the_claim_brought_are_taken_for_planned_ids_only() {
        let rows = [
            row("a", Some(3), true),
            row("b", Some(30), true),
            row("c", Some(3), true),
        ];
        let p = plan(&rows, MAX, BUDGET);
        let bodies = vec![Some(body("a", "aaa")), None, Some(body("c", "ccc"))];
        let (taken, withheld) = take_bodies(&p, &rows, bodies);
        assert_eq!(taken, vec![body("a", "aaa"), body("c", "ccc")]);
        assert!(withheld.is_empty());
    }

    #[test]
    fn a_planned_id_with_a_withheld_body_is_fetched_apart_whole() {
        // The claim counted a body the plan holds back (an id too long for
        // AMQP), so its budget ran out before the plan's did: "c"'s second
        // data row came without its body.
        let long = "L".repeat(300);
        let rows = [
            row(&long, Some(8), true),
            row("b", Some(8), true),
            row("c", Some(5), true),
            row("c", Some(5), true),
        ];
        let p = plan(&rows, MAX, BUDGET);
        assert_eq!(p.fetch, vec!["b", "c"]);
        let bodies = vec![
            Some(body(&long, "llllllll")),
            Some(body("b", "bbbbbbbb")),
            Some(body("c", "ccccc")),
            None,
        ];
        let (taken, withheld) = take_bodies(&p, &rows, bodies);
        assert_eq!(taken, vec![body("b", "bbbbbbbb")]);
        assert_eq!(withheld, vec!["c"]);
    }

    fn router() -> Router {
        let config = crate::config::tests::seed();
        Router::new(&config.rabbitmq, "text/plain")
    }

    fn message(id: &str, b: &str) -> Message {
        Message {
            id: id.into(),
            body: b.as_bytes().to_vec(),
            destination: router().resolve(&MessageFields::default()).unwrap(),
            ordering_key: None,
        }
    }

    #[test]
    fn good_rows_are_fetched_in_order_and_become_messages() {
        let p = plan(
            &[row("a", Some(1), true), row("b", Some(1), true)],
            MAX,
            BUDGET,
        );
        assert_eq!(p.fetch, ["a", "b"]);
        assert_eq!((p.claimed, cursor_id(&p)), (2, Some("b")));
        assert_eq!(
            p.cursor.as_ref().unwrap().enqueued_at,
            EnqueuedAt(b"b".to_vec()),
            "the cursor resumes after the row's own relay_enqueued_at"
        );
        let a = assemble(p, vec![body("b", "2"), body("a", "1")], &router());
        assert_eq!(a.messages, vec![message("a", "1"), message("b", "2")]);
        assert!(a.held.is_empty());
    }

    fn keyed(id: &str, key: &str, in_run: bool) -> ClaimedRow {
        ClaimedRow {
            ordering_key: Some(key.into()),
            in_run,
            ..row(id, Some(1), true)
        }
    }

    #[test]
    fn a_row_not_published_holds_back_the_later_rows_of_its_key_only() {
        // k1 has no data row: k2 and k3 (its run) wait; j and the unkeyed u go.
        let rows = [
            ClaimedRow {
                has_data: false,
                size: None,
                ..keyed("k1", "K", false)
            },
            keyed("j1", "J", false),
            row("u", Some(1), true),
            keyed("k2", "K", true),
            keyed("j2", "J", true),
            keyed("k3", "K", true),
        ];
        let p = plan(&rows, MAX, BUDGET);
        assert_eq!(
            cursor_id(&p),
            Some("u"),
            "rows of a run never move the cursor"
        );
        let fetched = ["j1", "u", "k2", "j2", "k3"]
            .map(|id| body(id, id))
            .to_vec();
        let mut a = assemble(p, fetched, &router());
        hold_behind_keys(&mut a);
        let sent: Vec<(&str, Option<&str>)> = a
            .messages
            .iter()
            .map(|m| (m.id.as_str(), m.ordering_key.as_deref()))
            .collect();
        assert_eq!(sent, [("j1", Some("J")), ("u", None), ("j2", Some("J"))]);
        let behind = |id: &str| Hold::BehindKey {
            key: "K".into(),
            waits_for: id.into(),
        };
        assert_eq!(
            a.held,
            [
                ("k1".into(), Hold::NoData),
                ("k2".into(), behind("k1")),
                ("k3".into(), behind("k1")),
            ]
        );
        assert!(!behind("k1").is_failure());
        assert_eq!(
            behind("k1").reason(),
            "waits for row k1, before it in ordering key 'K', which this batch did not publish"
        );
    }

    #[test]
    fn rows_without_data_or_body_oversized_or_with_long_ids_are_held() {
        let long = "i".repeat(256);
        let rows = [
            row("a", None, false),
            row("b", None, true),
            row("c", Some(11), true),
            row(&long, Some(1), true),
            row("d", Some(0), true),
        ];
        let p = plan(&rows, MAX, BUDGET);
        assert_eq!(
            p.held,
            vec![
                ("a".into(), Hold::NoData),
                ("b".into(), Hold::NullBody),
                ("c".into(), Hold::Oversize { size: 11 }),
                (long, Hold::IdTooLong),
            ]
        );
        assert_eq!(p.fetch, ["d"]);
        assert_eq!(cursor_id(&p), Some("d"));
        assert!(!Hold::Deferred.is_failure() && Hold::NoData.is_failure());
    }

    #[test]
    fn a_row_without_relay_enqueued_at_leaves_no_cursor_behind() {
        let unstamped = |id| ClaimedRow {
            enqueued_at: None,
            ..row(id, Some(1), true)
        };
        // Such rows sort first: a claim of only them started from the
        // beginning, and so does the next.
        let p = plan(&[unstamped("a"), unstamped("b")], MAX, BUDGET);
        assert_eq!((p.fetch.len(), cursor_id(&p)), (2, None));
        let p = plan(&[unstamped("a"), row("b", Some(1), true)], MAX, BUDGET);
        assert_eq!(cursor_id(&p), Some("b"));
    }

    #[test]
    fn the_byte_budget_defers_the_rest_and_keeps_the_cursor_before_it() {
        let rows = [
            row("a", Some(10), true),
            row("b", Some(10), true),
            row("c", Some(10), true),
            row("d", None, true),
        ];
        let p = plan(&rows, MAX, BUDGET);
        assert_eq!(p.fetch, ["a", "b"]);
        assert_eq!(
            p.held,
            vec![("c".into(), Hold::Deferred), ("d".into(), Hold::Deferred)]
        );
        assert_eq!(cursor_id(&p), Some("b"));
        // The first body always fits, whatever the budget.
        assert_eq!(plan(&[row("big", Some(10), true)], MAX, 1).fetch, ["big"]);
    }

    #[test]
    fn duplicate_data_rows_publish_once_only_when_identical() {
        let rows = [
            row("diff", Some(1), true),
            row("diff", Some(1), true),
            row("same", Some(1), true),
            row("same", Some(1), true),
        ];
        let p = plan(&rows, MAX, BUDGET);
        assert_eq!(p.claimed, 2);
        let bodies = vec![
            body("same", "x"),
            body("diff", "1"),
            body("same", "x"),
            body("diff", "2"),
        ];
        let a = assemble(p, bodies, &router());
        assert_eq!(a.messages, vec![message("same", "x")]);
        assert_eq!(a.held, vec![("diff".into(), Hold::AmbiguousBody)]);
    }

    #[test]
    fn a_data_row_deleted_before_the_fetch_is_held() {
        let a = assemble(
            plan(&[row("gone", Some(1), true)], MAX, BUDGET),
            vec![],
            &router(),
        );
        assert_eq!(a.held, vec![("gone".into(), Hold::NoData)]);
    }

    #[test]
    fn a_row_with_a_field_the_broker_would_refuse_is_held_with_the_reason() {
        let mut bad = body("bad", "x");
        bad.fields.priority = Some(1000);
        let p = plan(
            &[row("bad", Some(1), true), row("good", Some(1), true)],
            MAX,
            BUDGET,
        );
        let a = assemble(p, vec![bad, body("good", "y")], &router());
        assert_eq!(a.messages, vec![message("good", "y")]);
        assert_eq!(
            a.held,
            vec![(
                "bad".into(),
                Hold::BadField("column priority is 1000; AMQP takes 0 to 255".into())
            )]
        );
    }
}
