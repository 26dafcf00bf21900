//! A node's named dirty bitmaps: the bits (crate `bitmap`) plus the state QEMU keeps beside
//! them (enabled, busy, readonly, inconsistent, persistent) and the successor a job hangs
//! under a bitmap it uses.
//!
//! Every write, write_zeroes and discard that reaches a node marks the node's recording
//! bitmaps once the request is done (it marks even when the request failed: a failed write
//! may have changed part of the range). A bitmap a job uses is *frozen*: it gets an anonymous
//! successor that records the writes from then on while the bitmap itself stays as the job
//! found it; when the job ends the successor is either folded back in (the changes are kept
//! for next time) or takes the bitmap's place (only the changes since the job started
//! remain).
//!
//! State: one `std` mutex per bitmap, never held across an `.await`; the list of a node's
//! bitmaps is newest first, as QEMU lists them.

use std::sync::{Arc, Mutex, MutexGuard};

use bitmap::{DirtyBitmap, Granularity};

/// QEMU's longest bitmap name, in bytes.
pub const MAX_NAME_LEN: usize = 1023;

/// One named bitmap of a node.
#[derive(Debug)]
pub struct NodeBitmap {
    name: String,
    state: Mutex<BitmapState>,
}

/// The bits and flags of a [`NodeBitmap`].
#[derive(Debug, Clone)]
pub struct BitmapState {
    pub bits: DirtyBitmap,
    /// Records writes (QEMU: not disabled).
    pub enabled: bool,
    /// In use by an export or a job besides the successor logic (QEMU's `busy`).
    pub busy: bool,
    /// Loaded from a read-only image: may not change.
    pub readonly: bool,
    /// Found in use on disk at open: its bits cannot be trusted.
    pub inconsistent: bool,
    /// Stored in the image when the node closes.
    pub persistent: bool,
    /// Set while a job owns the bitmap: records what the bitmap would.
    pub successor: Option<Successor>,
}

/// The anonymous bitmap that records writes while its parent is frozen.
#[derive(Debug, Clone)]
pub struct Successor {
    pub bits: DirtyBitmap,
    pub enabled: bool,
}

/// How a bitmap is refused for an operation (QEMU's `bdrv_dirty_bitmap_check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Busy and readonly bitmaps are refused.
    BusyReadonly,
    /// Busy and inconsistent bitmaps are refused.
    BusyInconsistent,
    /// Busy, readonly and inconsistent bitmaps are refused.
    All,
}

impl NodeBitmap {
    /// A new clean bitmap.
    pub fn new(name: String, size: u64, granularity: Granularity, enabled: bool) -> Self {
        Self::with_state(
            name,
            BitmapState {
                bits: DirtyBitmap::new(size, granularity),
                enabled,
                busy: false,
                readonly: false,
                inconsistent: false,
                persistent: false,
                successor: None,
            },
        )
    }

    /// A bitmap with the given state (loaded from an image, or restored by a rollback).
    pub fn with_state(name: String, state: BitmapState) -> Self {
        Self {
            name,
            state: Mutex::new(state),
        }
    }

    /// The bitmap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The state, locked. Never hold it across an `.await`.
    pub fn lock(&self) -> MutexGuard<'_, BitmapState> {
        // Every update is a plain assignment of whole values: a panic cannot leave it torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `offset..offset + len` in whatever records for this bitmap.
    pub fn mark(&self, offset: u64, len: u64) {
        let mut s = self.lock();
        match &mut s.successor {
            Some(succ) => {
                if succ.enabled {
                    succ.bits.set(offset, len);
                }
            }
            None => {
                if s.enabled && !s.readonly && !s.inconsistent {
                    s.bits.set(offset, len);
                }
            }
        }
    }

    /// Refuses the bitmap for an operation as QEMU does; the message is QEMU's.
    pub fn check(&self, check: Check) -> Result<(), String> {
        let s = self.lock();
        if s.busy || s.successor.is_some() {
            return Err(format!(
                "Bitmap '{}' is currently in use by another operation and cannot be used",
                self.name
            ));
        }
        if matches!(check, Check::BusyReadonly | Check::All) && s.readonly {
            return Err(format!(
                "Bitmap '{}' is readonly and cannot be modified",
                self.name
            ));
        }
        if matches!(check, Check::BusyInconsistent | Check::All) && s.inconsistent {
            return Err(format!(
                "Bitmap '{}' is inconsistent and cannot be used",
                self.name
            ));
        }
        Ok(())
    }

    /// Freezes the bitmap for a job: a successor with the bitmap's recording state takes
    /// over recording. Returns the bits as they were (what the job works from).
    pub fn freeze(&self) -> DirtyBitmap {
        let mut s = self.lock();
        let succ = Successor {
            bits: DirtyBitmap::new(s.bits.size(), s.bits.granularity()),
            enabled: s.enabled,
        };
        s.successor = Some(succ);
        s.bits.clone()
    }

    /// Ends a freeze keeping everything: the successor's marks are merged into the bitmap
    /// (QEMU's reclaim).
    pub fn reclaim(&self) {
        let mut s = self.lock();
        if let Some(succ) = s.successor.take() {
            // Same size and granularity by construction; a resize resizes both.
            let _ = s.bits.merge(&succ.bits);
            s.enabled = succ.enabled;
        }
    }

    /// Ends a freeze dropping what the job synced: the successor becomes the bitmap (QEMU's
    /// abdicate).
    pub fn abdicate(&self) {
        let mut s = self.lock();
        if let Some(succ) = s.successor.take() {
            s.bits = succ.bits;
            s.enabled = succ.enabled;
        }
    }

    /// Follows a resize of the node.
    pub fn resize(&self, size: u64) {
        let mut s = self.lock();
        s.bits.resize(size);
        if let Some(succ) = &mut s.successor {
            succ.bits.resize(size);
        }
    }

    /// The successor's entry while the bitmap is frozen: anonymous, recording as the bitmap
    /// did, never busy.
    pub fn successor_info(&self) -> Option<BitmapInfo> {
        let s = self.lock();
        let succ = s.successor.as_ref()?;
        Some(BitmapInfo {
            name: None,
            count: succ.bits.count(),
            granularity: succ.bits.granularity().bytes(),
            recording: succ.enabled,
            busy: false,
            persistent: false,
            inconsistent: false,
        })
    }

    /// `BlockDirtyInfo` of query-named-block-nodes.
    pub fn info(&self) -> BitmapInfo {
        let s = self.lock();
        BitmapInfo {
            name: Some(self.name.clone()),
            count: s.bits.count(),
            granularity: s.bits.granularity().bytes(),
            recording: s.enabled || s.successor.as_ref().is_some_and(|x| x.enabled),
            busy: s.busy || s.successor.is_some(),
            persistent: s.persistent,
            inconsistent: s.inconsistent,
        }
    }
}

/// A bitmap as an image stores it: what a format driver loads on open and stores on close.
#[derive(Debug, Clone)]
pub struct PersistentBitmap {
    pub name: String,
    /// Tracks writes (qcow2's `auto` flag).
    pub enabled: bool,
    /// Found in use on open: the bits were lost.
    pub inconsistent: bool,
    pub bits: DirtyBitmap,
}

impl NodeBitmap {
    /// A bitmap loaded from the node's image; `readonly` when the node is read-only.
    pub fn loaded(p: PersistentBitmap, readonly: bool) -> Self {
        Self::with_state(
            p.name,
            BitmapState {
                bits: p.bits,
                enabled: p.enabled && !p.inconsistent,
                busy: false,
                readonly,
                inconsistent: p.inconsistent,
                persistent: true,
                successor: None,
            },
        )
    }

    /// What to store in the image at close: `None` for bitmaps that are not persistent or
    /// whose bits were lost. Writes recorded by a successor are kept.
    pub fn to_store(&self) -> Option<PersistentBitmap> {
        let s = self.lock();
        if !s.persistent || s.inconsistent || s.readonly {
            return None;
        }
        let mut bits = s.bits.clone();
        let mut enabled = s.enabled;
        if let Some(succ) = &s.successor {
            let _ = bits.merge(&succ.bits);
            enabled = succ.enabled;
        }
        Some(PersistentBitmap {
            name: self.name.clone(),
            enabled,
            inconsistent: false,
            bits,
        })
    }
}

/// What query-named-block-nodes shows of a bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// `None` for a driver's own bitmaps (a copy-before-write filter's).
    pub name: Option<String>,
    /// Dirty bytes (whole chunks).
    pub count: u64,
    pub granularity: u64,
    pub recording: bool,
    pub busy: bool,
    pub persistent: bool,
    pub inconsistent: bool,
}

impl BitmapInfo {
    /// A driver's own bitmap: no name, not recording, not persistent, not busy.
    pub fn anonymous(b: &crate::driver::DirtyBitmapInfo) -> Self {
        Self {
            name: None,
            count: b.count,
            granularity: b.granularity,
            recording: false,
            busy: false,
            persistent: false,
            inconsistent: false,
        }
    }
}

/// A node's bitmaps, newest first.
#[derive(Debug, Default)]
pub struct Bitmaps {
    list: Mutex<Vec<Arc<NodeBitmap>>>,
}

impl Bitmaps {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<NodeBitmap>>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bitmap called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<NodeBitmap>> {
        self.lock().iter().find(|b| b.name == name).cloned()
    }

    /// Every bitmap, newest first.
    pub fn all(&self) -> Vec<Arc<NodeBitmap>> {
        self.lock().clone()
    }

    /// Adds `bitmap` as the newest; false if the name is taken.
    pub fn add(&self, bitmap: Arc<NodeBitmap>) -> bool {
        let mut list = self.lock();
        if list.iter().any(|b| b.name == bitmap.name) {
            return false;
        }
        list.insert(0, bitmap);
        true
    }

    /// Removes the bitmap called `name`; returns it and where it was.
    pub fn remove(&self, name: &str) -> Option<(usize, Arc<NodeBitmap>)> {
        let mut list = self.lock();
        let at = list.iter().position(|b| b.name == name)?;
        Some((at, list.remove(at)))
    }

    /// Makes the bitmap called `name` the newest (a successor that took its place).
    pub fn move_to_front(&self, name: &str) {
        let mut list = self.lock();
        if let Some(at) = list.iter().position(|b| b.name == name) {
            let b = list.remove(at);
            list.insert(0, b);
        }
    }

    /// Marks a finished write in every bitmap.
    pub fn mark(&self, offset: u64, len: u64) {
        let list = self.lock();
        for b in list.iter() {
            b.mark(offset, len);
        }
    }

    /// Follows a resize of the node.
    pub fn resize(&self, size: u64) {
        for b in self.lock().iter() {
            b.resize(size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g64k() -> Granularity {
        Granularity::new(65536).unwrap()
    }

    #[test]
    fn a_frozen_bitmap_keeps_its_bits_and_the_successor_records() {
        let b = NodeBitmap::new("b".into(), 1 << 20, g64k(), true);
        b.mark(0, 1);
        let frozen = b.freeze();
        assert_eq!(frozen.count(), 65536);
        b.mark(65536 * 3, 1);
        assert_eq!(b.lock().bits.count(), 65536);
        assert!(b.info().busy && b.info().recording);
        assert!(b.check(Check::BusyReadonly).is_err());
        b.reclaim();
        assert_eq!(b.lock().bits.count(), 2 * 65536);
        assert!(!b.info().busy);
    }

    #[test]
    fn abdicate_keeps_only_the_writes_since_the_freeze() {
        let b = NodeBitmap::new("b".into(), 1 << 20, g64k(), true);
        b.mark(0, 1);
        b.freeze();
        b.mark(65536 * 2, 1);
        b.abdicate();
        let s = b.lock();
        assert!(!s.bits.get(0) && s.bits.get(65536 * 2));
    }

    #[test]
    fn disabled_readonly_and_inconsistent_bitmaps_do_not_record() {
        let b = NodeBitmap::new("b".into(), 1 << 20, g64k(), false);
        b.mark(0, 1);
        assert_eq!(b.info().count, 0);
        b.lock().enabled = true;
        b.lock().inconsistent = true;
        b.mark(0, 1);
        assert_eq!(b.info().count, 0);
        assert!(b.check(Check::BusyInconsistent).is_err());
        assert!(b.check(Check::BusyReadonly).is_ok());
    }

    #[test]
    fn the_list_is_newest_first_and_names_are_unique() {
        let l = Bitmaps::default();
        assert!(l.add(Arc::new(NodeBitmap::new("a".into(), 4096, g64k(), true))));
        assert!(l.add(Arc::new(NodeBitmap::new("b".into(), 4096, g64k(), true))));
        assert!(!l.add(Arc::new(NodeBitmap::new("a".into(), 4096, g64k(), true))));
        let names: Vec<_> = l.all().iter().map(|b| b.name().to_string()).collect();
        assert_eq!(names, ["b", "a"]);
        let (at, _) = l.remove("a").unwrap();
        assert_eq!(at, 1);
        assert!(l.get("a").is_none());
    }
}
