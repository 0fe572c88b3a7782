//! What AMQP 0.9.1 (and RabbitMQ) allow and mean, apart from any
//! connection: the short-string limit, URLs as the seed's Go client reads
//! them, which errors close only a channel, and JSON as field tables
//! ([`table`]). The config checks its values with it when it is loaded;
//! the broker link, the publisher, the planner and routing use it on the
//! way out.

pub mod table;

use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};
use lapin::uri::AMQPUri;

/// The longest AMQP short string (queue names, message ids).
pub const AMQP_MAX_SHORT_STRING: usize = 255;

/// Parses an AMQP URL as the seed's Go client (amqp091-go) reads it: an
/// empty path, as in the seed's `amqp://guest:guest@localhost:5672/`, is the
/// default vhost `/`. lapin reads that path as the vhost named `""`, which
/// RabbitMQ does not have (`NOT_ALLOWED - vhost  not found`, forever), and
/// no vhost can have that name, so nothing is lost by the rule. `%2f` and
/// named vhosts keep their meaning. Both the config's validation and the
/// broker link's `connect` parse through here.
///
/// # Errors
/// The parser's message; it never contains the URL (nor its password).
pub fn parse_uri(url: &str) -> Result<AMQPUri, InvalidAmqpUrl> {
    let mut uri: AMQPUri = url.parse().map_err(InvalidAmqpUrl)?;
    if uri.vhost.is_empty() {
        uri.vhost = "/".to_owned();
    }
    Ok(uri)
}

/// Why a text is not an AMQP URL: the parser's words (the parser gives no
/// error type of its own), never the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidAmqpUrl(String);

/// The channel-level (soft) AMQP error behind `error`, if that is what it is:
/// such an error closes one channel and leaves the connection up.
pub fn channel_error(error: &lapin::Error) -> Option<&AMQPError> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) if matches!(e.kind(), AMQPErrorKind::Soft(_)) => Some(e),
        _ => None,
    }
}

/// The soft error kind of a channel-level error.
pub fn soft_kind(error: &AMQPError) -> Option<&AMQPSoftError> {
    match error.kind() {
        AMQPErrorKind::Soft(kind) => Some(kind),
        AMQPErrorKind::Hard(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_vhost_path_means_the_default_vhost() {
        let vhost = |url: &str| parse_uri(url).unwrap().vhost;
        assert_eq!(vhost("amqp://guest:guest@localhost:5672/"), "/");
        assert_eq!(vhost("amqp://guest:guest@localhost:5672"), "/");
        assert_eq!(vhost("amqp://h:5672/%2f"), "/");
        assert_eq!(vhost("amqp://h:5672/%2F?heartbeat=5"), "/");
        assert_eq!(vhost("amqp://h:5672/?heartbeat=5"), "/");
        assert_eq!(vhost("amqp://h:5672/orders"), "orders");
        assert_eq!(vhost("amqps://h/team%2forders"), "team/orders");
    }
}
