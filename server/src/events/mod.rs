//! Database events: the rows of `sales.events`, what they mean (kinds,
//! recipients, cache tags: `vocab`) and the relay that reads them from
//! Postgres and hands them to whatever sink the server gives it.

pub mod holders;
pub mod model;
pub mod relay;
pub mod vocab;

pub use model::{Ephemeral, Event, Pos};
pub use vocab::{Channel, Kind, Recipient, Variant, EPHEMERAL_CHANNEL, EVENTS_CHANNEL};
