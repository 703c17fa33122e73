//! The events' vocabulary: kinds, channels, recipients and the forms of
//! delivery. What each event means for who receives it and what it makes
//! stale is in `rules`.

/// NOTIFY channel carrying the highest new event id (a hint only: the relay
/// long-polls the log and does not depend on it).
pub const EVENTS_CHANNEL: &str = "sales_events";
/// NOTIFY channel for messages that are delivered live and never stored:
/// payload `{"userId": 5, "event": "export-progress", "data": {...}}`.
pub const EPHEMERAL_CHANNEL: &str = "sales_ephemeral";
/// NOTIFY channel on which each user or session event is announced as its
/// transaction commits (migration 0025), ahead of its turn in delivery
/// order: `{"id", "kind", "userId", "sessionId", "generation", "revoke"}`.
/// A hint to read the user's access back, never trusted by itself.
pub const ACCESS_CHANNEL: &str = "sales_access";
/// NOTIFY channel on which an admin's cache clear (`POST
/// /api/admin/cache/clear`) tells the other instances to drop their
/// in-process first level: Redis is shared, the first level is not, and a
/// clear writes no event for their relays to see. The payload is sealed
/// (`events::sealed`, event `cache-cleared`); one that does not open is
/// ignored.
pub const CACHE_CHANNEL: &str = "sales_cache";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    SalesCreated,
    SalesUpdated,
    SalesDeleted,
    BatchCompleted,
    StoreCreated,
    StoreUpdated,
    StoreStatusChanged,
    StoreDeleted,
    Announcement,
    UserNotification,
    /// An import or asynchronous batch ended (`jobs`): to the user who queued
    /// it; one queued from the command line to the admins' `batch` channel.
    ImportCompleted,
    // Users and sessions (audit, and revocation on every instance): to the
    // admins' `admin` channel.
    UserCreated,
    UserUpdated,
    UserDeleted,
    SessionRevoked,
    /// `TRUNCATE` of the sales or store table (payload `{"table": ...}`):
    /// every cached answer is stale; to the `admin` and `announcements`
    /// channels.
    TableTruncated,
    /// `sales.prune_events` deleted events or expired history (payload
    /// `{"pruned": n, "expired": m}`): cached histories are stale; relayed
    /// to nobody.
    EventsPruned,
    /// A kind this server does not know; relayed to nobody.
    Other,
}

impl Kind {
    pub fn parse(s: &str) -> Kind {
        match s {
            "sales-data-created" => Kind::SalesCreated,
            "sales-data-updated" => Kind::SalesUpdated,
            "sales-data-deleted" => Kind::SalesDeleted,
            "batch-completed" => Kind::BatchCompleted,
            "store-created" => Kind::StoreCreated,
            "store-updated" => Kind::StoreUpdated,
            "store-status-changed" => Kind::StoreStatusChanged,
            "store-deleted" => Kind::StoreDeleted,
            "system-announcement" => Kind::Announcement,
            "user-notification" => Kind::UserNotification,
            "import-completed" => Kind::ImportCompleted,
            "user-created" => Kind::UserCreated,
            "user-updated" => Kind::UserUpdated,
            "user-deleted" => Kind::UserDeleted,
            "session-revoked" => Kind::SessionRevoked,
            "table-truncated" => Kind::TableTruncated,
            "events-pruned" => Kind::EventsPruned,
            _ => Kind::Other,
        }
    }

    pub fn is_sales(self) -> bool {
        matches!(
            self,
            Kind::SalesCreated | Kind::SalesUpdated | Kind::SalesDeleted
        )
    }

    /// User and session changes: they revoke access (see `crate::access`).
    pub fn is_user(self) -> bool {
        matches!(
            self,
            Kind::UserCreated | Kind::UserUpdated | Kind::UserDeleted | Kind::SessionRevoked
        )
    }

    pub fn is_store(self) -> bool {
        matches!(
            self,
            Kind::StoreCreated | Kind::StoreUpdated | Kind::StoreStatusChanged | Kind::StoreDeleted
        )
    }
}

/// A channel a client subscribes to explicitly. Each user's own channel
/// (user notifications, the batches they made, their export progress) is
/// implicit and needs no subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// `sales-data-<storeId>`: created/updated/deleted sales of one store.
    Sales(i64),
    /// `stores`: store-created/-updated/-status-changed/-deleted, for stores in scope.
    Stores,
    /// `announcements`: system announcements.
    Announcements,
    /// `batch`: every batch-completed event (admins only).
    Batch,
    /// `admin`: user and session changes, the audit trail (admins only).
    Admin,
    /// `region-<name>`: created/updated/deleted sales of every store of a
    /// region (a scoped token: of its stores only).
    Region(RegionKey),
    /// `all-stores`: created/updated/deleted sales of every store (a scoped
    /// token: of its stores only).
    AllStores,
}

/// A region name as a channel key, interned so that a channel stays a small
/// `Copy` value. The table only grows (region names are few); past
/// [`RegionKey::MAX`] names no new one is taken, and such a region has no
/// channel. Names the database gives (a store's region, on an event) are
/// always taken; names a client sends only up to [`RegionKey::CLIENT_MAX`]
/// of them, so clients naming made-up regions cannot fill the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionKey(u32);

#[derive(Default)]
struct Regions {
    ids: std::collections::HashMap<String, u32>,
    names: Vec<String>,
    /// Names taken from clients before the database named them.
    from_clients: usize,
}

impl Regions {
    fn take(&mut self, name: &str, client: bool) -> Option<u32> {
        if let Some(&id) = self.ids.get(name) {
            return Some(id);
        }
        if self.names.len() >= RegionKey::MAX
            || (client && self.from_clients >= RegionKey::CLIENT_MAX)
        {
            return None;
        }
        self.from_clients += usize::from(client);
        let id = self.names.len() as u32;
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        Some(id)
    }
}

fn regions() -> &'static std::sync::RwLock<Regions> {
    static R: std::sync::OnceLock<std::sync::RwLock<Regions>> = std::sync::OnceLock::new();
    R.get_or_init(Default::default)
}

impl RegionKey {
    pub const MAX: usize = 100_000;
    pub const CLIENT_MAX: usize = 1_000;

    /// The key of a region name the database gave (1..=100 characters, as
    /// `sales.stores` allows).
    pub fn of(name: &str) -> Option<RegionKey> {
        Self::intern(name, false)
    }

    /// The key of a region name a client sent: a known name, or a new one
    /// while fewer than CLIENT_MAX names came from clients. A new name no
    /// store written through the API can have (blank, only invisible
    /// characters, blanks at either end, a control character or a line
    /// separator: the REST region filter refuses the same) is refused
    /// rather than given room in the table.
    pub fn named_by_client(name: &str) -> Option<RegionKey> {
        if let Some(k) = Self::known(name) {
            return Some(k);
        }
        use sales_core::names::{breaks_text, shows_nothing};
        if name.chars().any(breaks_text) || name.trim() != name || shows_nothing(name) {
            return None;
        }
        Self::intern(name, true)
    }

    /// The key of a region name already known, without adding it.
    pub fn known(name: &str) -> Option<RegionKey> {
        regions()
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .ids
            .get(name)
            .map(|&id| RegionKey(id))
    }

    fn intern(name: &str, client: bool) -> Option<RegionKey> {
        if name.is_empty() || name.chars().count() > 100 {
            return None;
        }
        if let Some(k) = Self::known(name) {
            return Some(k);
        }
        regions()
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take(name, client)
            .map(RegionKey)
    }

    pub fn name(self) -> String {
        regions()
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .names
            .get(self.0 as usize)
            .cloned()
            .unwrap_or_default()
    }
}

/// Names of the implicit channels; subscribing to them is acknowledged and changes nothing.
pub const IMPLICIT: &[&str] = &[
    "notifications",
    "user-notifications",
    "export-progress",
    "batch-completed",
    "import-progress",
    "import-completed",
];

impl Channel {
    /// A channel a client named.
    pub fn parse(name: &str) -> Option<Channel> {
        match name {
            "stores" => Some(Channel::Stores),
            "announcements" => Some(Channel::Announcements),
            "batch" => Some(Channel::Batch),
            "admin" => Some(Channel::Admin),
            "all-stores" => Some(Channel::AllStores),
            _ if name.starts_with("region-") => {
                RegionKey::named_by_client(&name["region-".len()..]).map(Channel::Region)
            }
            _ => {
                let id = name.strip_prefix("sales-data-")?;
                // The id as it is written everywhere else: digits only,
                // no leading zero (`sales-data-01` would be a second name
                // for `sales-data-1`, acknowledged under a name that no
                // frame carries).
                if id.is_empty()
                    || id.len() > 18
                    || id.starts_with('0')
                    || !id.bytes().all(|b| b.is_ascii_digit())
                {
                    return None;
                }
                id.parse().ok().filter(|&s: &i64| s > 0).map(Channel::Sales)
            }
        }
    }

    /// A channel a client named to leave it: as [`Channel::parse`], but a
    /// region name not known yet is not added (nobody can follow it), so
    /// unsubscribing never uses up room for names. `Err(())`: a region
    /// that no one follows.
    pub fn parse_to_leave(name: &str) -> Option<Result<Channel, ()>> {
        match name.strip_prefix("region-") {
            Some(r) if !r.is_empty() && r.chars().count() <= 100 => {
                Some(RegionKey::known(r).map(Channel::Region).ok_or(()))
            }
            Some(_) => None,
            None => Self::parse(name).map(Ok),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Channel::Sales(s) => format!("sales-data-{s}"),
            Channel::Stores => "stores".into(),
            Channel::Announcements => "announcements".into(),
            Channel::Batch => "batch".into(),
            Channel::Admin => "admin".into(),
            Channel::Region(r) => format!("region-{}", r.name()),
            Channel::AllStores => "all-stores".into(),
        }
    }

    /// Whether a holder of these claims may subscribe.
    pub fn allowed(&self, is_admin: bool, can_access_store: impl Fn(i64) -> bool) -> bool {
        match *self {
            Channel::Sales(s) => can_access_store(s),
            Channel::Batch | Channel::Admin => is_admin,
            // Scoped tokens get their stores' events only (ChannelInScope).
            Channel::Stores | Channel::Announcements | Channel::Region(_) | Channel::AllStores => {
                true
            }
        }
    }
}

/// Who an event goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipient {
    /// Every connection of one user (their implicit channel).
    User(i64),
    /// Every subscriber of a channel.
    Channel(Channel),
    /// Subscribers of a channel whose scope includes the store.
    ChannelInScope(Channel, i64),
}

/// Which frame a recipient gets for an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The event as logged.
    Full,
    /// A sales row left this store or month: the old key's subscribers get a
    /// `sales-data-deleted` frame for the old key (`"moved": true`), never the
    /// new payload (they may not be allowed to see the new store).
    MovedAway,
    /// A sales row that came from a store the recipient may not see: the
    /// full frame without what it says of the old store (`previousStoreId`,
    /// `previousYear`, `previousMonth` and the old days, `previousDays`).
    MovedIn,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        assert_eq!(Channel::parse("sales-data-12"), Some(Channel::Sales(12)));
        assert_eq!(Channel::parse("stores"), Some(Channel::Stores));
        assert_eq!(
            Channel::parse("announcements"),
            Some(Channel::Announcements)
        );
        assert_eq!(Channel::parse("batch"), Some(Channel::Batch));
        for bad in [
            "sales-data-",
            "sales-data-0",
            "sales-data-01",
            "sales-data-007",
            "sales-data-+1",
            "sales-data--1",
            "sales-data-1x",
            "sales-data-99999999999999999999",
            "x",
        ] {
            assert_eq!(Channel::parse(bad), None, "{bad}");
        }
        assert_eq!(Channel::Sales(5).name(), "sales-data-5");
        assert_eq!(Channel::parse("all-stores"), Some(Channel::AllStores));
        let north = Channel::parse("region-North").unwrap();
        assert_eq!(north.name(), "region-North");
        assert_eq!(Channel::parse("region-North"), Some(north));
        assert_ne!(Channel::parse("region-South"), Some(north));
        assert_eq!(Channel::parse("region-"), None);
        assert_eq!(Channel::parse(&format!("region-{}", "x".repeat(101))), None);
        // A new name no store can have through the API is not taken from a
        // client: blank, invisible only, blanks at an end, controls.
        for made_up in [
            " ",
            "\u{200b}",
            " North",
            "North ",
            "No\u{0}rth",
            "a\u{2028}b",
        ] {
            assert_eq!(
                Channel::parse(&format!("region-{made_up}")),
                None,
                "{made_up:?}"
            );
        }
        // Known to the database, such a name is followed as it is.
        RegionKey::of("Odd ").unwrap();
        assert!(Channel::parse("region-Odd ").is_some());
    }

    /// Clients naming made-up regions fill only their share of the table:
    /// past it a new name from a client is refused, while the database's
    /// names are still taken, and then known to clients too.
    #[test]
    fn clients_cannot_fill_the_region_table() {
        let mut r = Regions::default();
        for i in 0..RegionKey::CLIENT_MAX {
            assert!(r.take(&format!("made-up-{i}"), true).is_some());
        }
        assert_eq!(r.take("made-up-more", true), None);
        assert_eq!(r.take("made-up-7", true), Some(7), "a known name");
        let real = r.take("North", false).expect("the database's name");
        assert_eq!(r.take("North", true), Some(real));
    }
}
