//! Host clusters that reads are using outside the metadata lock.
//!
//! A read maps its range under the metadata lock and reads the data after releasing it. A
//! discard (or a copy-on-write) may drop the last reference to that host cluster in between;
//! if the allocator then handed the cluster to another guest cluster and a write landed in it,
//! the read would return someone else's data. So a read pins the host clusters it mapped
//! before the lock is released, and the allocator skips pinned clusters: a freed cluster is
//! reused only once every read that mapped it before the free has finished.
//!
//! State: a count per pinned host cluster behind a `std` mutex that is never held across an
//! `.await`. Invariant: a pin is taken while the metadata lock is held (so no free and reuse
//! can slip between the mapping and the pin) and is released by dropping its [`Pin`], which
//! also happens when the read's future is dropped half way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// The pinned host clusters of one image, shared by its readers and its allocator.
#[derive(Debug, Default)]
pub(crate) struct Pins {
    counts: Mutex<HashMap<u64, u32>>,
}

impl Pins {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, u32>> {
        // The map stays consistent even if a holder panicked: every update is one statement.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pin host clusters `first..=last` until the returned guard is dropped.
    pub fn pin(self: &Arc<Self>, first: u64, last: u64) -> Pin {
        let mut counts = self.lock();
        for c in first..=last {
            *counts.entry(c).or_insert(0) += 1;
        }
        Pin {
            pins: Arc::clone(self),
            first,
            last,
        }
    }

    /// Whether a read still uses host cluster `cluster`.
    pub fn is_pinned(&self, cluster: u64) -> bool {
        self.lock().contains_key(&cluster)
    }
}

/// Host clusters pinned by one read; dropping it releases them.
#[derive(Debug)]
pub(crate) struct Pin {
    pins: Arc<Pins>,
    first: u64,
    last: u64,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut counts = self.pins.lock();
        for c in self.first..=self.last {
            if let Some(n) = counts.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_count_and_release_on_drop() {
        let pins = Arc::new(Pins::default());
        let a = pins.pin(3, 4);
        let b = pins.pin(4, 4);
        assert!(pins.is_pinned(3) && pins.is_pinned(4) && !pins.is_pinned(5));
        drop(a);
        assert!(!pins.is_pinned(3) && pins.is_pinned(4));
        drop(b);
        assert!(!pins.is_pinned(4));
    }
}
