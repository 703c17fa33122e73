//! What events mean to the server: who may receive each one, in which
//! form, and which cache tags it makes stale. Live dispatch, replay
//! (resume) and cache invalidation all ask these questions here, so a new
//! kind or a new rule is written once.

use super::model::Event;
use super::vocab::{Channel, Kind, Recipient, Variant};
use crate::cache;

/// The (store, year, month) a sales row had before an update moved it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OldKey {
    pub store_id: i64,
    pub year: Option<i64>,
    pub month: Option<i64>,
}

impl Event {
    /// For a sales row an update moved to another store or month (plain SQL
    /// can), the key it left. The extension records `previousStoreId`, and
    /// `previousYear` / `previousMonth` when the month changed.
    pub fn moved_from(&self) -> Option<OldKey> {
        if self.kind != Kind::SalesUpdated {
            return None;
        }
        let store = self.store_id?;
        let k = self.payload.keys();
        if k.previous_store_id.is_none_or(|p| p == store)
            && k.previous_year.is_none_or(|y| Some(y) == k.year)
            && k.previous_month.is_none_or(|m| Some(m) == k.month)
        {
            return None;
        }
        Some(OldKey {
            store_id: k.previous_store_id.unwrap_or(store),
            year: k.previous_year.or(k.year),
            month: k.previous_month.or(k.month),
        })
    }

    /// The form a recipient gets, given the form [`Event::deliveries`] named
    /// and the stores it may see: the full frame of a row moved from a store
    /// it may not see is sent without what it says of that store.
    pub fn variant_for(&self, variant: Variant, can_access_store: impl Fn(i64) -> bool) -> Variant {
        match (variant, self.moved_from()) {
            (Variant::Full, Some(old))
                if Some(old.store_id) != self.store_id && !can_access_store(old.store_id) =>
            {
                Variant::MovedIn
            }
            _ => variant,
        }
    }

    /// Who receives this event and in which form, the full frame first (a
    /// connection reached twice gets the first only).
    pub fn deliveries(&self) -> Vec<(Recipient, Variant)> {
        use Recipient::*;
        if let Some(u) = self.user_id {
            // A user-only event (user notifications): that user alone.
            return vec![(User(u), Variant::Full)];
        }
        match self.kind {
            k if k.is_sales() => {
                let Some(s) = self.store_id else {
                    return vec![];
                };
                let mut out = vec![(Channel(self::Channel::Sales(s)), Variant::Full)];
                // Whole-chain and region followers, each token its stores.
                out.push((ChannelInScope(self::Channel::AllStores, s), Variant::Full));
                if let Some(r) = self.region {
                    out.push((ChannelInScope(self::Channel::Region(r), s), Variant::Full));
                }
                // Last, the old key's deletion: to the old store's
                // followers, and to whole-chain and region followers whose
                // token has the old store (the event names only the new
                // store's region, which covers a move within a region). A
                // follower that also sees the row where it is now got the
                // row above and gets nothing more.
                if let Some(old) = self.moved_from().filter(|o| o.store_id != s) {
                    out.push((
                        Channel(self::Channel::Sales(old.store_id)),
                        Variant::MovedAway,
                    ));
                    out.push((
                        ChannelInScope(self::Channel::AllStores, old.store_id),
                        Variant::MovedAway,
                    ));
                    if let Some(r) = self.region {
                        out.push((
                            ChannelInScope(self::Channel::Region(r), old.store_id),
                            Variant::MovedAway,
                        ));
                    }
                }
                out
            }
            k if k.is_store() => match self.store_id {
                Some(s) => vec![(ChannelInScope(self::Channel::Stores, s), Variant::Full)],
                None => vec![],
            },
            Kind::Announcement => vec![(Channel(self::Channel::Announcements), Variant::Full)],
            Kind::ImportCompleted => vec![(Channel(self::Channel::Batch), Variant::Full)],
            k if k.is_user() => vec![(Channel(self::Channel::Admin), Variant::Full)],
            // Every row went at once: what anyone shows is gone. Admins
            // get it with the audit; anyone on `announcements` too (it
            // names only the table).
            Kind::TableTruncated => vec![
                (Channel(self::Channel::Admin), Variant::Full),
                (Channel(self::Channel::Announcements), Variant::Full),
            ],
            Kind::BatchCompleted => {
                // The batch's author gets it on their own channel; admins may
                // follow every batch.
                let mut out = Vec::with_capacity(2);
                if let Some(a) = self.actor_id {
                    out.push((User(a), Variant::Full));
                }
                out.push((Channel(self::Channel::Batch), Variant::Full));
                out
            }
            _ => vec![],
        }
    }

    /// The cache tags this event makes stale. Every sales change touches its
    /// store, its store-month, its row and the cross-store views (and, for a
    /// row that moved, the store and month it left); every store change the
    /// store list, the store's documents and everything that embeds them.
    pub fn cache_tags(&self) -> Vec<String> {
        let mut tags = Vec::new();
        let ym = |y: Option<i64>, m: Option<i64>| y.zip(m);
        if self.kind.is_sales() {
            tags.push(cache::TAG_SALES_ALL.to_string());
            if let Some(s) = self.store_id {
                tags.push(cache::tag_store(s));
                let k = self.payload.keys();
                if let Some((y, m)) = ym(k.year, k.month) {
                    tags.push(cache::tag_store_month(s, y, m));
                }
            }
            if let Some(old) = self.moved_from() {
                tags.push(cache::tag_store(old.store_id));
                if let Some((y, m)) = ym(old.year, old.month) {
                    tags.push(cache::tag_store_month(old.store_id, y, m));
                }
            }
            if let Some(r) = self.row_id {
                tags.push(cache::tag_row(r));
            }
        } else if matches!(self.kind, Kind::UserUpdated | Kind::UserDeleted) {
            // Histories show their actors' emails as they are now.
            tags.push(cache::TAG_USERS.to_string());
        } else if self.kind == Kind::EventsPruned {
            tags.push(cache::TAG_HISTORY.to_string());
        } else if self.kind == Kind::TableTruncated {
            // Every row of the table went at once: everything cached is stale.
            tags.push(cache::TAG_ALL.to_string());
        } else if self.kind.is_store() {
            tags.push(cache::TAG_STORES.to_string());
            // Store documents appear inside sales documents (`store.name`)
            // and regions drive summaries.
            tags.push(cache::TAG_SALES_ALL.to_string());
            if let Some(s) = self.store_id {
                tags.push(cache::tag_store(s));
                tags.push(cache::tag_store_doc(s));
            }
        }
        tags
    }
}

/// The tags of many events, sorted and without repeats.
pub fn cache_tags<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<String> {
    let mut tags: Vec<String> = events.into_iter().flat_map(Event::cache_tags).collect();
    tags.sort();
    tags.dedup();
    tags
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use serde_json::Value;

    fn ev(kind: &str, store: Option<i64>, payload: Value) -> Event {
        Event {
            id: 7,
            seq: 100,
            kind_name: kind.into(),
            kind: Kind::parse(kind),
            store_id: store,
            user_id: None,
            actor_id: Some(1),
            row_id: Some(9),
            row_version: Some(2),
            payload: crate::events::model::Payload::from_value(&payload),
            created_at: chrono::Utc::now(),
            region: None,
        }
    }

    #[test]
    fn import_completed_goes_to_its_importer_or_the_admins() {
        let mut e = ev("import-completed", None, json!({"jobId": 4}));
        e.user_id = Some(7);
        assert_eq!(e.deliveries(), vec![(Recipient::User(7), Variant::Full)]);
        e.user_id = None;
        assert_eq!(
            e.deliveries(),
            vec![(Recipient::Channel(Channel::Batch), Variant::Full)]
        );
        assert!(e.cache_tags().is_empty());
        assert!(crate::events::vocab::IMPLICIT.contains(&"import-progress"));
    }

    #[test]
    fn user_changes_go_to_the_admin_channel() {
        for kind in [
            "user-created",
            "user-updated",
            "user-deleted",
            "session-revoked",
        ] {
            let e = ev(kind, None, json!({"userId": 4}));
            assert_eq!(
                e.deliveries(),
                vec![(Recipient::Channel(Channel::Admin), Variant::Full)],
                "{kind}"
            );
            let shown = matches!(kind, "user-updated" | "user-deleted");
            assert_eq!(
                e.cache_tags(),
                if shown {
                    vec![cache::TAG_USERS.to_string()]
                } else {
                    vec![]
                },
                "{kind}"
            );
        }
        assert!(Channel::Admin.allowed(true, |_| true));
        assert!(!Channel::Admin.allowed(false, |_| true));
    }

    #[test]
    fn a_truncated_table_clears_everything_and_tells_admins_and_announcements() {
        let e = ev("table-truncated", None, json!({"table": "monthly_sales"}));
        assert_eq!(
            e.deliveries(),
            vec![
                (Recipient::Channel(Channel::Admin), Variant::Full),
                (Recipient::Channel(Channel::Announcements), Variant::Full)
            ]
        );
        assert_eq!(e.cache_tags(), vec![cache::TAG_ALL.to_string()]);
    }

    #[test]
    fn pruning_makes_histories_stale_and_goes_to_nobody() {
        let e = ev("events-pruned", None, json!({"pruned": 5}));
        assert!(e.deliveries().is_empty());
        assert_eq!(e.cache_tags(), vec![cache::TAG_HISTORY.to_string()]);
    }

    #[test]
    fn sales_tags() {
        let t = ev(
            "sales-data-updated",
            Some(3),
            json!({"year": 2025, "month": 4}),
        )
        .cache_tags();
        for want in ["sales:all", "store:3", "store:3:2025-04", "row:9"] {
            assert!(t.contains(&want.to_string()), "{want} in {t:?}");
        }
        let t = ev("store-status-changed", Some(4), json!({})).cache_tags();
        assert!(t.contains(&"stores".to_string()) && t.contains(&"storedoc:4".to_string()));
        assert!(ev("system-announcement", None, json!({}))
            .cache_tags()
            .is_empty());
    }

    #[test]
    fn a_moved_row_invalidates_and_notifies_its_old_key() {
        let moved = ev(
            "sales-data-updated",
            Some(3),
            json!({"year": 2025, "month": 4, "previousStoreId": 2, "previousYear": 2024, "previousMonth": 12}),
        );
        let t = moved.cache_tags();
        assert!(t.contains(&"store:2".to_string()));
        assert!(t.contains(&"store:2:2024-12".to_string()));
        assert!(t.contains(&"store:3:2025-04".to_string()));
        assert_eq!(
            moved.deliveries(),
            vec![
                (Recipient::Channel(Channel::Sales(3)), Variant::Full),
                (
                    Recipient::ChannelInScope(Channel::AllStores, 3),
                    Variant::Full
                ),
                // Last: a connection reached by a full delivery too gets that.
                (Recipient::Channel(Channel::Sales(2)), Variant::MovedAway),
                // Whole-chain followers who see the old store, not the new.
                (
                    Recipient::ChannelInScope(Channel::AllStores, 2),
                    Variant::MovedAway
                ),
            ]
        );
        // With its store's region: that region's followers too.
        let mut in_north = moved.clone();
        let north = crate::events::vocab::RegionKey::of("North").unwrap();
        in_north.region = Some(north);
        assert!(in_north.deliveries().contains(&(
            Recipient::ChannelInScope(Channel::Region(north), 3),
            Variant::Full
        )));
        assert!(in_north.deliveries().contains(&(
            Recipient::ChannelInScope(Channel::Region(north), 2),
            Variant::MovedAway
        )));
        let f: Value = serde_json::from_str(&moved.frame(Variant::MovedAway)).unwrap();
        assert_eq!(f["event"], "sales-data-deleted");
        assert_eq!(f["data"]["storeId"], 2);
        assert_eq!(f["data"]["year"], 2024);
        assert_eq!(f["data"]["moved"], true);
        assert!(f["data"].get("totalSales").is_none());
        // A recipient that may not see the old store gets the row without
        // what the event says of it; one that may, the full frame.
        let mut with_days = moved.clone();
        with_days.payload = crate::events::model::Payload::from_value(&json!({
            "year": 2025, "month": 4, "previousStoreId": 2, "previousYear": 2024,
            "previousMonth": 12, "changedDays": ["5"], "previousDays": {"5": {"sales": 7}},
            "totalSales": 9
        }));
        assert_eq!(
            with_days.variant_for(Variant::Full, |s| s == 3),
            Variant::MovedIn
        );
        assert_eq!(
            with_days.variant_for(Variant::Full, |_| true),
            Variant::Full
        );
        assert_eq!(
            with_days.variant_for(Variant::MovedAway, |s| s == 2),
            Variant::MovedAway
        );
        let f: Value = serde_json::from_str(&with_days.frame(Variant::MovedIn)).unwrap();
        assert_eq!(f["event"], "sales-data-updated");
        assert_eq!(f["data"]["storeId"], 3);
        assert_eq!(f["data"]["version"], 2);
        assert_eq!(f["data"]["totalSales"], 9);
        assert_eq!(f["data"]["changedDays"], json!(["5"]));
        for gone in [
            "previousStoreId",
            "previousYear",
            "previousMonth",
            "previousDays",
        ] {
            assert!(f["data"].get(gone).is_none(), "{gone}: {f}");
        }
        let full: Value = serde_json::from_str(&with_days.frame(Variant::Full)).unwrap();
        assert_eq!(full["data"]["previousDays"]["5"]["sales"], 7);
        // A move within one store (another month) hides nothing.
        let month_move = ev(
            "sales-data-updated",
            Some(3),
            json!({"year": 2025, "month": 4, "previousYear": 2025, "previousMonth": 3}),
        );
        assert_eq!(
            month_move.variant_for(Variant::Full, |s| s == 3),
            Variant::Full
        );

        // Another month of the same store: its store's channel (and
        // all-stores), old month's tags.
        let month = ev(
            "sales-data-updated",
            Some(3),
            json!({"year": 2025, "month": 4, "previousYear": 2025, "previousMonth": 3}),
        );
        assert!(month.cache_tags().contains(&"store:3:2025-03".to_string()));
        assert_eq!(month.deliveries().len(), 2);
        // Not a move.
        let same = ev(
            "sales-data-updated",
            Some(3),
            json!({"year": 2025, "month": 4, "previousStoreId": 3}),
        );
        assert_eq!(same.moved_from(), None);
    }
}
