//! Secrets: passwords and URLs with user info are held in [`Secret`], shown
//! redacted ([`redact_url`]), and every value in effect is collected so
//! that no error message can quote one ([`secret_values`], [`url_secrets`]).

use std::fmt;

use serde_json::Value;

/// The keys whose values are secret (and their environment forms).
pub(super) const SECRET_KEYS: [&str; 3] = ["postgres.password", "rabbitmq.url", "rabbitmq.urls"];

/// What must never be printed of the secret keys' values in `json`: each
/// value as the text serde would quote (any JSON type), and for a URL also
/// its user info's password, raw and percent-decoded.
pub(super) fn secret_values(json: &Value) -> Vec<String> {
    fn leaves(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Null => {}
            Value::String(s) => out.extend(url_secrets(s)),
            Value::Array(items) => items.iter().for_each(|v| leaves(v, out)),
            Value::Object(map) => map.values().for_each(|v| leaves(v, out)),
            other => out.push(other.to_string()),
        }
    }
    let mut out = Vec::new();
    for key in SECRET_KEYS {
        let value = key.split('.').try_fold(json, |node, part| node.get(part));
        if let Some(value) = value {
            leaves(value, &mut out);
        }
    }
    out
}

/// A secret string and, when it looks like a URL with user info, the
/// password in it (what [`redact_url`] hides), raw and percent-decoded.
pub(super) fn url_secrets(value: &str) -> Vec<String> {
    let mut out = vec![value.to_owned()];
    if let Some((_, _, password)) = split_userinfo(value) {
        out.push(password.to_owned());
        out.push(percent_decode(password));
    }
    out
}

/// A string that must never be printed: `Debug` and `Display` show `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub(super) String);

impl Secret {
    /// The secret value, for the one place that hands it to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Replaces the password of a URL's user info with `***`.
///
/// Over-eager by design: the user info runs from `://` (or the start, when
/// the scheme is missing) to the *last* `@`, so a password holding a raw
/// `/`, `?`, `#` or `@` is hidden whole, even though a URL parser would end
/// the authority earlier. Everything after the user name's first `:` is the
/// password. A URL with no `@` has no user info and is shown as it is.
pub fn redact_url(url: &str) -> String {
    match split_userinfo(url) {
        Some((before, user, _password)) => {
            let at = url.rfind('@').expect("split_userinfo found one");
            format!("{before}{user}:***{}", &url[at..])
        }
        None => url.to_owned(),
    }
}

/// `%XX` escapes decoded (invalid ones kept as they are, bytes that are not
/// UTF-8 replaced): the form in which a client library might quote a password.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `(scheme and "://", user, password)` of a URL whose user info holds a
/// password, read as [`redact_url`] reads it.
fn split_userinfo(url: &str) -> Option<(&str, &str, &str)> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let at = url[start..].rfind('@')? + start;
    let (user, password) = url[start..at].split_once(':')?;
    Some((&url[..start], user, password))
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::config::ConfigError;
    use crate::config::tests::{SEED, edit, err, parse};

    #[test]
    fn secrets_never_print() {
        let c = parse(SEED, &[]).unwrap();
        let dump = format!("{c:?}");
        assert!(!dump.contains("your_db_password"), "{dump}");
        assert!(!dump.contains("guest:guest"), "{dump}");
        assert_eq!(
            c.rabbitmq.nodes[0].redacted,
            "amqp://guest:***@localhost:5672/"
        );
    }

    #[test]
    fn redact_url_hides_only_the_password() {
        assert_eq!(redact_url("amqp://u:p%40ss@h:1/v"), "amqp://u:***@h:1/v");
        assert_eq!(redact_url("amqp://h:5672/%2f"), "amqp://h:5672/%2f");
        assert_eq!(redact_url("amqp://user@h/"), "amqp://user@h/");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn redact_url_hides_a_password_a_parser_would_cut_short() {
        assert_eq!(
            redact_url("amqp://guest:Zq9/kW7@127.0.0.1:5672/"),
            "amqp://guest:***@127.0.0.1:5672/"
        );
        assert_eq!(redact_url("amqp://u:a@b?c#d@h/v"), "amqp://u:***@h/v");
        assert_eq!(redact_url("guest:s3cret@h:5672"), "guest:***@h:5672");
        assert_eq!(redact_url("amqp://:s3cret@h/"), "amqp://:***@h/");
    }

    #[test]
    fn type_errors_of_secret_keys_never_echo_the_value() {
        let cases: [(&str, Value); 4] = [
            ("postgres.password", 73_195_046.into()),
            ("postgres.password", serde_json::json!({"v": "s3cret-obj"})),
            ("rabbitmq.url", 73_195_046.into()),
            ("rabbitmq.url", true.into()),
        ];
        for (key, value) in cases {
            let (block, field) = key.split_once('.').unwrap();
            let e = err(&edit(|v| v[block][field] = value.clone()), &[]);
            assert_eq!(
                e,
                format!("config.json: key {key}: expected a string; put the value in quotes")
            );
        }
    }

    #[test]
    fn no_error_message_quotes_a_secret() {
        // A URL a parser rejects whole, quoted by lapin's message.
        let e = err(
            SEED,
            &[("PUSHOCCURRENCE_RABBITMQ_URL", "relay:s3cret@localhost:5672")],
        );
        assert!(
            e.starts_with(
                "environment variable PUSHOCCURRENCE_RABBITMQ_URL (key rabbitmq.url): 'relay:***@localhost:5672'"
            ),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        // A message that would quote a secret for another reason.
        let e = ConfigError::new("x 'amqp://u:p%2Fw@h/' y p/w")
            .scrubbed(&url_secrets("amqp://u:p%2Fw@h/"));
        assert_eq!(e.to_string(), "x '***' y ***");
    }
}
