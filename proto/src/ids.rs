//! Ids shared by every crate: one id space for workers, the coordinator's.

use std::fmt;

/// A worker's id, as the coordinator assigned it at registration (in static `--workers` mode,
/// its position in that list). The same id names the worker in placement maps, routers'
/// connection pools, metrics labels and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u32);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}
