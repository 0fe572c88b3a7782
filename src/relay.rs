//! The per-row decisions of the relay, kept pure so they are tested without
//! PostgreSQL or RabbitMQ: which claimed rows become messages, and which are
//! held back and why.

use crate::db::outbox::ClaimedRow;
use crate::mq::publisher::Message;

/// Why a claimed row was not published; it stays pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The status row has no data row (yet: a producer may commit them apart).
    NoData,
    /// The data row's body is NULL.
    NullBody,
    /// Several data rows with different bodies: publishing either under one
    /// `message_id` would let consumer de-duplication drop the other.
    AmbiguousBody,
}

impl Hold {
    /// A short reason for logs.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoData => "no data row",
            Self::NullBody => "NULL body",
            Self::AmbiguousBody => "several data rows with different bodies",
        }
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
/// duplicate data rows publish once; differing ones are held.
pub fn assemble(rows: Vec<ClaimedRow>) -> Assembled {
    // Rows of one id are usually adjacent; a linear search keeps the order
    // of first appearance without hashing ids.
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
        if !group[0].has_data {
            out.held.push((id, Hold::NoData));
            continue;
        }
        let mut bodies = group.into_iter().map(|r| r.body);
        let first = bodies.next().flatten();
        let mut differing = false;
        let mut any_null = first.is_none();
        for body in bodies {
            any_null |= body.is_none();
            differing |= body != first;
        }
        match first {
            _ if differing && !any_null => out.held.push((id, Hold::AmbiguousBody)),
            Some(body) if !any_null => out.messages.push(Message { id, body }),
            _ => out.held.push((id, Hold::NullBody)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, body: Option<&str>, has_data: bool) -> ClaimedRow {
        ClaimedRow {
            id: id.into(),
            body: body.map(|b| b.as_bytes().to_vec()),
            has_data,
        }
    }

    #[test]
    fn one_row_per_id_becomes_one_message_in_order() {
        let a = assemble(vec![row("b", Some("2"), true), row("a", Some("1"), true)]);
        assert_eq!(a.claimed, 2);
        assert_eq!(
            a.messages.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["b", "a"]
        );
        assert_eq!(a.messages[1].body, b"1");
        assert!(a.held.is_empty());
    }

    #[test]
    fn rows_without_data_or_body_are_held() {
        let a = assemble(vec![
            row("a", None, false),
            row("b", None, true),
            row("c", Some(""), true),
        ]);
        assert_eq!(
            a.held,
            vec![("a".into(), Hold::NoData), ("b".into(), Hold::NullBody)]
        );
        assert_eq!(
            a.messages,
            vec![Message {
                id: "c".into(),
                body: vec![]
            }]
        );
    }

    #[test]
    fn duplicate_data_rows_publish_once_only_when_identical() {
        let a = assemble(vec![
            row("same", Some("x"), true),
            row("diff", Some("1"), true),
            row("same", Some("x"), true),
            row("diff", Some("2"), true),
            row("nul", Some("x"), true),
            row("nul", None, true),
        ]);
        assert_eq!(a.claimed, 3);
        assert_eq!(
            a.messages,
            vec![Message {
                id: "same".into(),
                body: b"x".to_vec()
            }]
        );
        assert_eq!(
            a.held,
            vec![
                ("diff".into(), Hold::AmbiguousBody),
                ("nul".into(), Hold::NullBody)
            ]
        );
    }
}
