//! Everything every response gets, one layer per concern: request id
//! (header, task-local, log span) and errors in one JSON shape
//! (`request_id`), rate and body limits (`limits`), ETag / 304,
//! Cache-Control, Vary and compression (`representation`), security
//! headers (`headers`).

mod headers;
mod limits;
mod representation;
mod request_id;

pub use headers::with_security_headers;
pub use limits::{
    bearer_challenge, check_query, client_ip, forwarded_https, throttle_key, with_limits,
    RateLimits,
};
pub use representation::{
    etag_of, if_match_holds, mark, offer_cached, with_representation, Head, Streaming,
};
pub use request_id::{error_response, request_id, with_request_id};
