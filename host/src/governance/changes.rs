//! How replicas hear of each other's management changes: each change is applied to this process's
//! cache and announced on one channel, through Postgres LISTEN/NOTIFY when the store is Postgres
//! and through Redis pub/sub when Redis is configured (both, when both are).
//!
//! **A replica that loses a subscription forgets every cached key, since it may have missed
//! changes while it was away.** The cache's TTL remains the backstop for anything else.

use std::sync::Weak;
use std::time::Duration;

use super::limits::{EntityId, Kind};
use super::Governance;

/// The channel name, valid for both Postgres and Redis.
pub const CHANNEL: &str = "portcullis_changes";

/// A change to the records behind the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A key's record changed (by its token hash): its cached resolution is stale.
    Key(String),
    /// An entity was deleted: its counters go too.
    Deleted(EntityId),
    /// A team or user changed, which any cached key may belong to.
    Everything,
}

impl Change {
    /// `<origin> <change>`: the origin lets a replica skip its own announcements.
    pub fn encode(&self, origin: &str) -> String {
        match self {
            Change::Key(token) => format!("{origin} key {token}"),
            Change::Deleted(entity) => {
                format!("{origin} deleted {} {}", entity.kind.noun(), entity.id)
            }
            Change::Everything => format!("{origin} everything"),
        }
    }

    /// The change and its origin; `None` for a message this version does not know, which a
    /// newer replica may send during an upgrade.
    pub fn decode(message: &str) -> Option<(&str, Change)> {
        let mut words = message.splitn(4, ' ');
        let origin = words.next()?;
        let change = match (words.next()?, words.next(), words.next()) {
            ("key", Some(token), None) => Change::Key(token.to_owned()),
            ("deleted", Some(kind), Some(id)) => {
                let kind = [Kind::Key, Kind::Team, Kind::User]
                    .into_iter()
                    .find(|k| k.noun() == kind)?;
                Change::Deleted(EntityId::new(kind, id))
            }
            ("everything", None, None) => Change::Everything,
            _ => return None,
        };
        Some((origin, change))
    }
}

/// Applies the changes other replicas announce through Postgres, for as long as `governance`
/// lives; reconnects after a lost connection.
pub async fn listen_postgres(governance: Weak<Governance>, database_url: String) {
    const RETRY_EVERY: Duration = Duration::from_secs(1);
    let mut lost = false;
    loop {
        if governance.strong_count() == 0 {
            return;
        }
        let mut listener = match sqlx::postgres::PgListener::connect(&database_url).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::debug!(error = %e, "cannot listen for changes on postgres");
                tokio::time::sleep(RETRY_EVERY).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::debug!(error = %e, "cannot listen for changes on postgres");
            tokio::time::sleep(RETRY_EVERY).await;
            continue;
        }
        if lost {
            heard(&governance, None);
        }
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => heard(&governance, Some(notification.payload())),
                // The connection dropped; the listener reconnects on the next call, but what was
                // said meanwhile is gone.
                Ok(None) => heard(&governance, None),
                Err(_) => break,
            }
            if governance.strong_count() == 0 {
                return;
            }
        }
        lost = true;
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// A message from another replica, or `None` when messages may have been lost.
pub fn heard(governance: &Weak<Governance>, message: Option<&str>) {
    let Some(governance) = governance.upgrade() else {
        return;
    };
    match message {
        None => governance.apply(&Change::Everything),
        Some(message) => match Change::decode(message) {
            Some((origin, _)) if origin == governance.origin() => {}
            Some((_, change)) => governance.apply(&change),
            None => tracing::debug!(message, "unknown change announced; ignored"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_survive_the_wire() {
        for change in [
            Change::Key("abc123".into()),
            Change::Deleted(EntityId::new(Kind::Team, "team-1")),
            Change::Everything,
        ] {
            let text = change.encode("r1");
            assert_eq!(Change::decode(&text), Some(("r1", change)));
        }
    }

    #[test]
    fn unknown_messages_are_not_changes() {
        assert_eq!(Change::decode("r1 rename a b"), None);
        assert_eq!(Change::decode("r1"), None);
        assert_eq!(Change::decode("r1 deleted robot x"), None);
    }
}
