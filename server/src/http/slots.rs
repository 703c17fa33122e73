//! Bounds on long-running requests (exports, import uploads): so many at
//! once per instance, and so many per user, so that one user cannot hold
//! every slot of the instance. A slot is held until its guard drops,
//! however the request ends.

use super::error::{ApiError, ErrorBody};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Slots of one kind of request: `total` per instance, `per_user` each.
pub struct Slots {
    total: Arc<Semaphore>,
    total_limit: usize,
    per_user: usize,
    users: Arc<Mutex<HashMap<i64, usize>>>,
    names: Names,
}

/// How the 429 of a kind of request names it and its two settings.
pub struct Names {
    /// `exports`, `import uploads`.
    pub what: &'static str,
    /// The setting of `total`, e.g. `EXPORT_MAX_CONCURRENT`.
    pub total: &'static str,
    /// The setting of `per_user`, e.g. `EXPORT_MAX_PER_USER`.
    pub per_user: &'static str,
}

/// Retry-After of a request that found no slot.
pub const RETRY_AFTER: u64 = 5;

/// Why no slot was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Busy {
    /// The user already holds `per_user` slots.
    User,
    /// The instance's `total` slots are taken.
    Instance,
}

/// Held for as long as the request runs.
pub struct Slot {
    user: i64,
    users: Arc<Mutex<HashMap<i64, usize>>>,
    _permit: OwnedSemaphorePermit,
}

impl Slots {
    pub fn new(total: usize, per_user: usize, names: Names) -> Self {
        Self {
            total: Arc::new(Semaphore::new(total)),
            total_limit: total,
            per_user,
            users: Default::default(),
            names,
        }
    }

    /// A slot for `user`, or the 429 (with Retry-After) that names the
    /// limit it met.
    pub fn take_or_429(&self, user: i64) -> Result<Slot, ApiError> {
        self.take(user).map_err(|busy| {
            let Names {
                what,
                total,
                per_user,
            } = self.names;
            let (message, limit) = match busy {
                Busy::User => (
                    format!(
                        "you already have {} {what} running ({per_user}); retry after {RETRY_AFTER} s",
                        self.per_user
                    ),
                    per_user,
                ),
                Busy::Instance => (
                    format!(
                        "{} {what} are already running on this instance ({total}); retry after {RETRY_AFTER} s",
                        self.total_limit
                    ),
                    total,
                ),
            };
            ApiError::TooManyRequests(
                ErrorBody::new("rate_limited", message, Some(json!({"limit": limit}))),
                RETRY_AFTER,
            )
        })
    }

    /// A slot for `user`, or why there is none (the user's own limit is
    /// checked first).
    pub fn take(&self, user: i64) -> Result<Slot, Busy> {
        let mut map = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(user).or_insert(0);
        if *n >= self.per_user {
            if *n == 0 {
                map.remove(&user);
            }
            return Err(Busy::User);
        }
        let Ok(permit) = self.total.clone().try_acquire_owned() else {
            if *n == 0 {
                map.remove(&user);
            }
            return Err(Busy::Instance);
        };
        *n += 1;
        Ok(Slot {
            user,
            users: self.users.clone(),
            _permit: permit,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_user_then_per_instance_and_released_on_drop() {
        let s = Slots::new(
            3,
            2,
            Names {
                what: "things",
                total: "T",
                per_user: "U",
            },
        );
        let a1 = s.take(1).unwrap();
        let _a2 = s.take(1).unwrap();
        assert_eq!(s.take(1).err(), Some(Busy::User));
        let _b1 = s.take(2).unwrap();
        assert_eq!(s.take(3).err(), Some(Busy::Instance));
        drop(a1);
        let _c1 = s.take(3).unwrap();
        assert_eq!(s.take(1).err(), Some(Busy::Instance));
        assert!(s.users.lock().unwrap().get(&4).is_none());
    }
}
