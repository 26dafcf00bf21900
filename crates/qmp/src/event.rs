//! QMP events and their fan-out to every monitor.

use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

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
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// Sessions that fall this many events behind lose the oldest ones.
    const CAPACITY: usize = 65536;

    pub fn new() -> Self {
        EventBus {
            tx: broadcast::channel(Self::CAPACITY).0,
        }
    }

    /// Sends an event to every session in command mode. Never blocks.
    pub fn emit(&self, event: Event) {
        // No receiver means no monitor is listening: the event is dropped, as in QEMU.
        let _ = self.tx.send(Arc::new(event));
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}
