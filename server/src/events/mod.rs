//! Database events: the rows of `sales.events` (`model`), their vocabulary
//! (kinds, channels, recipients: `vocab`), what they mean (recipients and
//! cache tags: `rules`) and the relay that reads them from
//! Postgres and hands them to whatever sink the server gives it.

pub mod holders;
pub mod model;
pub mod relay;
pub mod rules;
pub mod sealed;
pub mod vocab;

pub use model::{Ephemeral, Event, Pos};
pub use vocab::{
    Channel, Kind, Recipient, Variant, ACCESS_CHANNEL, CACHE_CHANNEL, EPHEMERAL_CHANNEL,
    EVENTS_CHANNEL,
};
