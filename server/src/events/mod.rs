//! Database events: the rows of `sales.events` and the relay that reads them
//! from Postgres and feeds the WebSocket hub.

pub mod model;
pub mod relay;

pub use model::{Ephemeral, Event, Kind, Pos};
