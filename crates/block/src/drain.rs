//! The drain gate every node has: it counts requests in flight and can stop new ones.
//!
//! States: *open* (depth 0: requests enter freely) and *drained* (depth ≥ 1: new
//! requests wait at the gate). `drain()` raises the depth and then waits until the
//! in-flight count is 0; `undrain()` lowers it and, at 0, wakes the waiting requests.
//! Drains nest: the gate reopens only when every `drain` has its `undrain`.
//!
//! Invariants: a request is counted from the moment it passes the gate until its
//! [`InFlight`] guard drops; while depth ≥ 1 the count only falls. The state sits behind
//! a `std` mutex that is never held across an `.await`.

use std::sync::Mutex;
use tokio::sync::Notify;

#[derive(Debug, Default)]
struct State {
    depth: u32,
    in_flight: u64,
}

/// A node's request counter and quiesce gate.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<State>,
    changed: Notify,
}

/// One level of drain on a gate, reopened when dropped (see [`Gate::drained`]).
#[derive(Debug)]
pub struct Drained<'a> {
    gate: &'a Gate,
}

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        self.gate.undrain();
    }
}

/// Proof that one request is in flight; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight<'a> {
    gate: &'a Gate,
}

impl Gate {
    /// A new open gate with nothing in flight.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut state = match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut state)
    }

    /// Waits until the gate is open, then counts one request in.
    pub async fn enter(&self) -> InFlight<'_> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let entered = self.with(|s| {
                if s.depth == 0 {
                    s.in_flight += 1;
                    true
                } else {
                    false
                }
            });
            if entered {
                return InFlight { gate: self };
            }
            notified.await;
        }
    }

    /// Closes the gate (one more level) and waits for all requests in flight to finish.
    pub async fn drain(&self) {
        self.with(|s| s.depth += 1);
        self.wait_idle().await;
    }

    /// [`Gate::drain`] until the returned guard is dropped.
    pub async fn drained(&self) -> Drained<'_> {
        self.drain().await;
        Drained { gate: self }
    }

    /// Waits until nothing is in flight, without closing the gate.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.with(|s| s.in_flight == 0) {
                return;
            }
            notified.await;
        }
    }

    /// Reopens one level of drain; at depth 0 the waiting requests proceed.
    pub fn undrain(&self) {
        let reopened = self.with(|s| {
            s.depth = s.depth.saturating_sub(1);
            s.depth == 0
        });
        if reopened {
            self.changed.notify_waiters();
        }
    }

    /// Whether at least one drain is active.
    pub fn is_drained(&self) -> bool {
        self.with(|s| s.depth > 0)
    }

    /// Requests currently in flight.
    pub fn in_flight(&self) -> u64 {
        self.with(|s| s.in_flight)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let idle = self.gate.with(|s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.in_flight == 0
        });
        if idle {
            self.gate.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn drain_waits_for_in_flight_request() {
        let gate = Arc::new(Gate::new());
        let guard = gate.enter().await;
        let g2 = gate.clone();
        let drainer = tokio::spawn(async move { g2.drain().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!drainer.is_finished());
        drop(guard);
        drainer.await.unwrap();
        assert!(gate.is_drained());
    }

    #[tokio::test]
    async fn request_waits_until_last_undrain() {
        let gate = Arc::new(Gate::new());
        gate.drain().await;
        gate.drain().await;
        let g2 = gate.clone();
        let request = tokio::spawn(async move {
            let _in = g2.enter().await;
        });
        gate.undrain();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!request.is_finished());
        gate.undrain();
        request.await.unwrap();
        assert_eq!(gate.in_flight(), 0);
    }
}
