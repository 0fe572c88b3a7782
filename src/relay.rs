//! The per-row decisions of the relay, kept pure so they are tested without
//! PostgreSQL or RabbitMQ: which claimed rows become messages, and which are
//! held back and why.

use crate::config::AMQP_MAX_SHORT_STRING;
use crate::db::outbox::ClaimedRow;
use crate::mq::publisher::Message;

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
    /// The batch's byte budget was spent before this row; it goes in a later
    /// batch. Not a failure.
    Deferred,
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
            Self::Deferred => "deferred to the next batch".into(),
        }
    }

    /// Whether this counts as a failed attempt of the row.
    pub fn is_failure(&self) -> bool {
        *self != Self::Deferred
    }
}

/// The rows of one claim, sorted into messages and held rows.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Assembled {
    /// Messages to publish, one per claimed id.
    pub messages: Vec<Message>,
    /// Claimed ids that are not published this time.
    pub held: Vec<(String, Hold)>,
    /// How many distinct ids were claimed.
    pub claimed: usize,
}

/// Groups the claim query's rows (one per data row) by id. Identical
/// duplicate data rows publish once; differing ones are held, as are rows
/// without data or body, oversized bodies (over `max_message_bytes`), ids
/// too long for AMQP, and bodies withheld by the batch's byte budget.
pub fn assemble(rows: Vec<ClaimedRow>, max_message_bytes: u64) -> Assembled {
    // Rows of one id are usually adjacent; a linear search from the end
    // keeps the order of first appearance without hashing ids.
    let mut groups: Vec<(String, Vec<ClaimedRow>)> = Vec::new();
    for row in rows {
        match groups.iter_mut().rev().find(|(id, _)| *id == row.id) {
            Some((_, group)) => group.push(row),
            None => groups.push((row.id.clone(), vec![row])),
        }
    }
    let mut out = Assembled {
        claimed: groups.len(),
        ..Assembled::default()
    };
    for (id, group) in groups {
        match classify(&id, &group, max_message_bytes) {
            Ok(()) => {
                let body = group
                    .into_iter()
                    .next()
                    .and_then(|r| r.body)
                    .unwrap_or_default();
                out.messages.push(Message { id, body });
            }
            Err(hold) => out.held.push((id, hold)),
        }
    }
    out
}

/// Decides whether the data rows of one id can be published.
fn classify(id: &str, group: &[ClaimedRow], max_message_bytes: u64) -> Result<(), Hold> {
    if id.len() > AMQP_MAX_SHORT_STRING {
        return Err(Hold::IdTooLong);
    }
    if !group[0].has_data {
        return Err(Hold::NoData);
    }
    for row in group {
        let Some(size) = row.size else {
            return Err(Hold::NullBody);
        };
        let size = i64::from(size);
        if u64::try_from(size).is_ok_and(|s| s > max_message_bytes) {
            return Err(Hold::Oversize { size });
        }
    }
    if group.iter().any(|r| r.body.is_none()) {
        return Err(Hold::Deferred);
    }
    if group.iter().any(|r| r.body != group[0].body) {
        return Err(Hold::AmbiguousBody);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 10;

    fn row(id: &str, body: Option<&str>, has_data: bool) -> ClaimedRow {
        ClaimedRow {
            id: id.into(),
            body: body.map(|b| b.as_bytes().to_vec()),
            has_data,
            size: body.map(|b| i32::try_from(b.len()).unwrap()),
            attempts: 0,
        }
    }

    fn withheld(id: &str, size: i32) -> ClaimedRow {
        ClaimedRow {
            id: id.into(),
            body: None,
            has_data: true,
            size: Some(size),
            attempts: 0,
        }
    }

    fn ids(a: &Assembled) -> Vec<&str> {
        a.messages.iter().map(|m| m.id.as_str()).collect()
    }

    #[test]
    fn one_row_per_id_becomes_one_message_in_order() {
        let a = assemble(
            vec![row("b", Some("2"), true), row("a", Some("1"), true)],
            MAX,
        );
        assert_eq!(a.claimed, 2);
        assert_eq!(ids(&a), ["b", "a"]);
        assert_eq!(a.messages[1].body, b"1");
        assert!(a.held.is_empty());
    }

    #[test]
    fn rows_without_data_or_body_are_held() {
        let a = assemble(
            vec![
                row("a", None, false),
                row("b", None, true),
                row("c", Some(""), true),
            ],
            MAX,
        );
        assert_eq!(
            a.held,
            vec![("a".into(), Hold::NoData), ("b".into(), Hold::NullBody)]
        );
        assert_eq!(ids(&a), ["c"]);
        assert!(a.messages[0].body.is_empty());
    }

    #[test]
    fn duplicate_data_rows_publish_once_only_when_identical() {
        let a = assemble(
            vec![
                row("same", Some("x"), true),
                row("diff", Some("1"), true),
                row("same", Some("x"), true),
                row("diff", Some("2"), true),
                row("nul", Some("x"), true),
                row("nul", None, true),
            ],
            MAX,
        );
        assert_eq!(a.claimed, 3);
        assert_eq!(ids(&a), ["same"]);
        assert_eq!(
            a.held,
            vec![
                ("diff".into(), Hold::AmbiguousBody),
                ("nul".into(), Hold::NullBody)
            ]
        );
    }

    #[test]
    fn oversized_bodies_long_ids_and_withheld_bodies_are_held() {
        let long_id = "i".repeat(256);
        let a = assemble(
            vec![
                withheld("big", 11),
                withheld("later", 5),
                row(&long_id, Some("x"), true),
                row(&"j".repeat(255), Some("ok"), true),
            ],
            MAX,
        );
        assert_eq!(
            a.held,
            vec![
                ("big".into(), Hold::Oversize { size: 11 }),
                ("later".into(), Hold::Deferred),
                (long_id, Hold::IdTooLong),
            ]
        );
        assert_eq!(a.messages.len(), 1);
        assert!(!Hold::Deferred.is_failure() && Hold::NoData.is_failure());
    }
}
