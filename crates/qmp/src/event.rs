//! QMP events and their fan-out to every monitor.

use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// One event as it goes on the wire.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    /// Omitted on the wire when `None`, as QEMU omits an empty `data`.
    pub data: Option<Value>,
    pub seconds: i64,
    pub microseconds: i64,
}

impl Event {
    /// An event stamped with the wall clock now.
    pub fn new(name: impl Into<String>, data: Option<Value>) -> Self {
        let (seconds, microseconds) = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => (
                i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                i64::from(d.subsec_micros()),
            ),
            Err(_) => (-1, -1),
        };
        Event {
            name: name.into(),
            data,
            seconds,
            microseconds,
        }
    }

    /// The event as a JSON object.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert(
            "timestamp".into(),
            json!({"seconds": self.seconds, "microseconds": self.microseconds}),
        );
        m.insert("event".into(), self.name.clone().into());
        if let Some(data) = &self.data {
            m.insert("data".into(), data.clone());
        }
        Value::Object(m)
    }
}

/// Delivers events to every session. Cheap to clone.
///
/// Each subscribed session has its own queue, which grows only as events
/// arrive (a preallocated ring of this capacity would cost megabytes at
/// start-up). A session that falls [`EventBus::CAPACITY`] events behind loses
/// the oldest ones and is told how many on its next receive.
#[derive(Debug)]
pub struct EventBus {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Live `EventBus` handles; the bus closes when the last one goes.
    senders: AtomicUsize,
    subscribers: Mutex<Vec<Arc<Queue>>>,
}

#[derive(Debug, Default)]
struct Queue {
    state: Mutex<QueueState>,
    /// One waiter (the receiving session); a wake-up sent while it is not
    /// waiting is kept for its next wait.
    ready: Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    events: VecDeque<Arc<Event>>,
    lagged: u64,
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for EventBus {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        EventBus {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for EventBus {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        for queue in lock(&self.shared.subscribers).iter() {
            lock(&queue.state).closed = true;
            queue.ready.notify_one();
        }
    }
}

impl EventBus {
    /// Sessions that fall this many events behind lose the oldest ones.
    const CAPACITY: usize = 65536;

    pub fn new() -> Self {
        EventBus {
            shared: Arc::new(Shared {
                senders: AtomicUsize::new(1),
                subscribers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Sends an event to every session in command mode. Never blocks.
    pub fn emit(&self, event: Event) {
        // No receiver means no monitor is listening: the event is dropped, as in QEMU.
        let subscribers = lock(&self.shared.subscribers);
        if subscribers.is_empty() {
            return;
        }
        let event = Arc::new(event);
        for queue in subscribers.iter() {
            {
                let mut state = lock(&queue.state);
                if state.events.len() == Self::CAPACITY {
                    state.events.pop_front();
                    state.lagged += 1;
                }
                state.events.push_back(event.clone());
            }
            queue.ready.notify_one();
        }
    }

    pub(crate) fn subscribe(&self) -> Receiver {
        let queue = Arc::new(Queue::default());
        lock(&self.shared.subscribers).push(queue.clone());
        Receiver {
            queue,
            shared: self.shared.clone(),
        }
    }
}

/// Why [`Receiver::recv`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecvError {
    /// This many events were dropped because the session fell behind.
    Lagged(u64),
    /// Every `EventBus` handle is gone.
    Closed,
}

/// Why [`Receiver::try_recv`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TryRecvError {
    Empty,
    Lagged(u64),
    Closed,
}

/// One session's subscription.
#[derive(Debug)]
pub(crate) struct Receiver {
    queue: Arc<Queue>,
    shared: Arc<Shared>,
}

impl Receiver {
    /// The next event, waiting for one. Cancel-safe: nothing is taken from the
    /// queue before the returned future completes.
    pub(crate) async fn recv(&mut self) -> Result<Arc<Event>, RecvError> {
        loop {
            match self.try_recv() {
                Ok(event) => return Ok(event),
                Err(TryRecvError::Lagged(n)) => return Err(RecvError::Lagged(n)),
                Err(TryRecvError::Closed) => return Err(RecvError::Closed),
                Err(TryRecvError::Empty) => self.queue.ready.notified().await,
            }
        }
    }

    /// The next event if one is queued.
    pub(crate) fn try_recv(&mut self) -> Result<Arc<Event>, TryRecvError> {
        let mut state = lock(&self.queue.state);
        if state.lagged > 0 {
            return Err(TryRecvError::Lagged(std::mem::take(&mut state.lagged)));
        }
        match state.events.pop_front() {
            Some(event) => Ok(event),
            None if state.closed => Err(TryRecvError::Closed),
            None => Err(TryRecvError::Empty),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        lock(&self.shared.subscribers).retain(|q| !Arc::ptr_eq(q, &self.queue));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: i64) -> Event {
        Event {
            name: "E".into(),
            data: None,
            seconds: n,
            microseconds: 0,
        }
    }

    #[tokio::test]
    async fn every_subscriber_gets_every_event_in_order() {
        let bus = EventBus::new();
        let mut a = bus.subscribe();
        let mut b = bus.subscribe();
        bus.emit(event(1));
        bus.emit(event(2));
        for rx in [&mut a, &mut b] {
            assert_eq!(rx.recv().await.map(|e| e.seconds), Ok(1));
            assert_eq!(rx.recv().await.map(|e| e.seconds), Ok(2));
            assert_eq!(rx.try_recv().err(), Some(TryRecvError::Empty));
        }
    }

    #[tokio::test]
    async fn events_before_subscribing_are_not_seen() {
        let bus = EventBus::new();
        bus.emit(event(1));
        let mut rx = bus.subscribe();
        assert_eq!(rx.try_recv().err(), Some(TryRecvError::Empty));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken() {
        let bus = EventBus::new();
        let mut rx = bus.subscribe();
        let sender = bus.clone();
        let task = tokio::spawn(async move { rx.recv().await.map(|e| e.seconds) });
        tokio::task::yield_now().await;
        sender.emit(event(7));
        assert_eq!(task.await.ok(), Some(Ok(7)));
    }

    #[tokio::test]
    async fn a_receiver_behind_by_the_capacity_loses_the_oldest() {
        let bus = EventBus::new();
        let mut rx = bus.subscribe();
        let total = EventBus::CAPACITY as i64 + 3;
        for n in 0..total {
            bus.emit(event(n));
        }
        assert_eq!(rx.recv().await.err(), Some(RecvError::Lagged(3)));
        assert_eq!(rx.recv().await.map(|e| e.seconds), Ok(3));
    }

    #[tokio::test]
    async fn the_bus_closes_with_its_last_handle() {
        let bus = EventBus::new();
        let mut rx = bus.subscribe();
        let other = bus.clone();
        drop(bus);
        other.emit(event(1));
        drop(other);
        assert_eq!(rx.recv().await.map(|e| e.seconds), Ok(1));
        assert_eq!(rx.recv().await.err(), Some(RecvError::Closed));
    }

    #[test]
    fn dropped_receivers_unsubscribe() {
        let bus = EventBus::new();
        let rx = bus.subscribe();
        assert_eq!(lock(&bus.shared.subscribers).len(), 1);
        drop(rx);
        assert!(lock(&bus.shared.subscribers).is_empty());
    }
}
