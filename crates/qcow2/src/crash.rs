//! Crash states for tests: a storage that records writes and flushes, and every image a
//! crash during the recorded requests can leave.

use std::io;
use std::sync::{Arc, Mutex};

use crate::{Image, MemStorage, OpenOptions, Storage};

/// One request a [`Recorder`] saw.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    Write(u64, Vec<u8>),
    Flush,
}

/// Memory storage that records its writes and flushes, to rebuild what a crash can leave.
#[derive(Clone, Default)]
pub(crate) struct Recorder {
    pub inner: MemStorage,
    pub events: Arc<Mutex<Vec<Event>>>,
}

#[async_trait::async_trait]
impl Storage for Recorder {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let event = Event::Write(offset, buf.to_vec());
        self.events.lock().unwrap().push(event);
        self.inner.write_at(offset, buf).await
    }
    async fn flush(&self) -> io::Result<()> {
        self.events.lock().unwrap().push(Event::Flush);
        Ok(())
    }
    async fn len(&self) -> io::Result<u64> {
        self.inner.len().await
    }
    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len).await
    }
}

fn apply(bytes: &mut Vec<u8>, off: u64, data: &[u8]) {
    let (a, b) = (off as usize, off as usize + data.len());
    if bytes.len() < b {
        bytes.resize(b, 0);
    }
    bytes[a..b].copy_from_slice(data);
}

/// Images a crash during `events` can leave on top of `base`: every prefix of the writes, and
/// every write alone on top of what the last flush before it made durable (writes between
/// flushes may reach the disk in any order).
pub(crate) fn crash_states(base: &[u8], events: &[Event]) -> Vec<Vec<u8>> {
    let mut states = Vec::new();
    let (mut prefix, mut durable) = (base.to_vec(), base.to_vec());
    for e in events {
        match e {
            Event::Flush => durable = prefix.clone(),
            Event::Write(off, data) => {
                let mut alone = durable.clone();
                apply(&mut alone, *off, data);
                states.push(alone);
                apply(&mut prefix, *off, data);
                states.push(prefix.clone());
            }
        }
    }
    states
}

/// Open `base` read-write, run `op` on it, and return the crash states it can leave.
pub(crate) async fn crashes_of<F, Fut>(base: &[u8], op: F) -> Vec<Vec<u8>>
where
    F: FnOnce(Image) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let rec = Recorder {
        inner: MemStorage::from_bytes(base.to_vec()),
        ..Recorder::default()
    };
    let image = Image::open(Arc::new(rec.clone()), OpenOptions::default())
        .await
        .unwrap();
    op(image).await;
    let events = rec.events.lock().unwrap().clone();
    crash_states(base, &events)
}
