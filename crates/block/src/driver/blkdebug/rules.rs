//! blkdebug's rules and state machine, with QEMU's semantics (`block/blkdebug.c`).
//!
//! State: a current state number (1 when the node opens), every rule by event, and the
//! list of *active* error rules.
//!
//! - When an event is raised, the rules for that event whose `state` is 0 or the current
//!   state act, in QEMU's list order (rules are kept newest first, error rules added before
//!   state rules): the first error rule among them replaces the active list, the others
//!   join it; a `set-state` rule sets the state that takes effect once all rules ran.
//! - A request checks the active list in order: the first rule whose `sector` lies in the
//!   request (or has none) and whose `iotype` matches decides. Error 0 lets the request
//!   through; otherwise the request fails with that error, and a `once` rule is deleted.
//!
//! Invariant: every id in `active` and in `by_event` names a rule that was not deleted.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use crate::debug::{DebugEvent, IoType};

/// Offset meaning "any offset".
const ANY_OFFSET: u64 = u64::MAX;
/// Bytes per `sector` of a rule.
const SECTOR: u64 = 512;

/// An `inject-error` rule, with QEMU's defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectRule {
    pub event: DebugEvent,
    /// 0 = in any state.
    pub state: i32,
    /// Bit per [`IoType`].
    pub iotype_mask: u8,
    /// The errno to fail with; 0 lets the request through.
    pub errno: i32,
    /// Byte offset (`sector` * 512) a request must cover, or [`ANY_OFFSET`].
    pub offset: u64,
    pub once: bool,
    pub immediately: bool,
}

impl InjectRule {
    /// A rule for `event` with QEMU's defaults (EIO, any offset, every type but
    /// block-status, any state).
    pub fn new(event: DebugEvent) -> Self {
        let iotype_mask = [
            IoType::Read,
            IoType::Write,
            IoType::WriteZeroes,
            IoType::Discard,
            IoType::Flush,
        ]
        .iter()
        .fold(0, |mask, t| mask | t.bit());
        Self {
            event,
            state: 0,
            iotype_mask,
            errno: libc::EIO,
            offset: ANY_OFFSET,
            once: false,
            immediately: false,
        }
    }

    /// Sets the offset from a `sector` number as QEMU does (-1 = any, others wrap).
    pub fn set_sector(&mut self, sector: i64) {
        self.offset = if sector == -1 {
            ANY_OFFSET
        } else {
            (sector as u64).wrapping_mul(SECTOR)
        };
    }

    fn covers(&self, offset: u64, bytes: u64, iotype: IoType) -> bool {
        let at = self.offset == ANY_OFFSET
            || (bytes > 0 && self.offset >= offset && self.offset - offset < bytes);
        at && self.iotype_mask & iotype.bit() != 0
    }
}

/// A `set-state` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetStateRule {
    pub event: DebugEvent,
    /// 0 = in any state.
    pub state: i32,
    pub new_state: i32,
}

#[derive(Debug)]
enum Rule {
    Inject(InjectRule),
    SetState(SetStateRule),
}

impl Rule {
    fn state(&self) -> i32 {
        match self {
            Rule::Inject(r) => r.state,
            Rule::SetState(r) => r.state,
        }
    }
}

/// What a request must do after the check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injection {
    /// Fail with this errno (a negative one makes the request succeed without I/O, as a
    /// positive return does in QEMU).
    pub errno: i32,
    /// Fail at once rather than after yielding once.
    pub immediately: bool,
}

#[derive(Debug, Default)]
struct Inner {
    state: i32,
    rules: Vec<Option<Rule>>,
    /// Rule ids per event, newest first.
    by_event: HashMap<DebugEvent, Vec<usize>>,
    active: Vec<usize>,
}

/// The rules of one blkdebug node.
#[derive(Debug, Default)]
pub struct Rules {
    inner: Mutex<Inner>,
}

impl Rules {
    /// Rules in QEMU's insertion order: every error rule, then every state rule. The state
    /// starts at 1.
    pub fn new(inject: Vec<InjectRule>, set_state: Vec<SetStateRule>) -> Self {
        let mut inner = Inner {
            state: 1,
            ..Inner::default()
        };
        let all = inject
            .into_iter()
            .map(Rule::Inject)
            .chain(set_state.into_iter().map(Rule::SetState));
        for rule in all {
            let event = match &rule {
                Rule::Inject(r) => r.event,
                Rule::SetState(r) => r.event,
            };
            let id = inner.rules.len();
            inner.rules.push(Some(rule));
            inner.by_event.entry(event).or_default().insert(0, id);
        }
        Self {
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The current state.
    pub fn state(&self) -> i32 {
        self.lock().state
    }

    /// Raises `event`: arms its error rules and applies its state rules.
    pub fn event(&self, event: DebugEvent) {
        let mut inner = self.lock();
        let Some(ids) = inner.by_event.get(&event).cloned() else {
            return;
        };
        let current = inner.state;
        let mut new_state = current;
        let mut armed = 0usize;
        for id in ids {
            let Some(rule) = inner.rules.get(id).and_then(Option::as_ref) else {
                continue;
            };
            if rule.state() != 0 && rule.state() != current {
                continue;
            }
            match rule {
                Rule::Inject(_) => {
                    if armed == 0 {
                        inner.active.clear();
                    }
                    armed += 1;
                    inner.active.insert(0, id);
                }
                Rule::SetState(r) => new_state = r.new_state,
            }
        }
        inner.state = new_state;
    }

    /// Checks a request of `bytes` at `offset` against the active rules.
    pub fn check(&self, offset: u64, bytes: u64, iotype: IoType) -> Option<Injection> {
        let mut inner = self.lock();
        let (position, rule) =
            inner.active.iter().enumerate().find_map(|(pos, &id)| {
                match inner.rules.get(id).and_then(Option::as_ref) {
                    Some(Rule::Inject(rule)) if rule.covers(offset, bytes, iotype) => {
                        Some((pos, rule.clone()))
                    }
                    _ => None,
                }
            })?;
        if rule.errno == 0 {
            return None;
        }
        if rule.once {
            let id = inner.active.remove(position);
            inner.rules[id] = None;
            if let Some(list) = inner.by_event.get_mut(&rule.event) {
                list.retain(|&other| other != id);
            }
        }
        Some(Injection {
            errno: rule.errno,
            immediately: rule.immediately,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(event: DebugEvent, errno: i32) -> InjectRule {
        InjectRule {
            errno,
            ..InjectRule::new(event)
        }
    }

    #[test]
    fn rules_are_inactive_until_their_event() {
        let rules = Rules::new(vec![rule(DebugEvent::WriteAio, 5)], vec![]);
        assert_eq!(rules.check(0, 512, IoType::Write), None);
        rules.event(DebugEvent::WriteAio);
        assert_eq!(rules.check(0, 512, IoType::Write).map(|i| i.errno), Some(5));
    }

    #[test]
    fn an_armed_rule_fails_every_default_type_but_block_status() {
        let rules = Rules::new(vec![rule(DebugEvent::ReadAio, 5)], vec![]);
        rules.event(DebugEvent::ReadAio);
        assert!(rules.check(0, 512, IoType::Flush).is_some());
        assert!(rules.check(0, 512, IoType::BlockStatus).is_none());
    }

    #[test]
    fn once_rules_fire_once_and_never_again() {
        let once = InjectRule {
            once: true,
            ..rule(DebugEvent::WriteAio, 28)
        };
        let rules = Rules::new(vec![once], vec![]);
        rules.event(DebugEvent::WriteAio);
        assert!(rules.check(0, 512, IoType::Write).is_some());
        assert!(rules.check(0, 512, IoType::Write).is_none());
        rules.event(DebugEvent::WriteAio);
        assert!(rules.check(0, 512, IoType::Write).is_none());
    }

    #[test]
    fn sector_rules_fire_only_for_requests_covering_the_sector() {
        let mut at = rule(DebugEvent::ReadAio, 5);
        at.set_sector(8);
        let rules = Rules::new(vec![at], vec![]);
        rules.event(DebugEvent::ReadAio);
        assert!(rules.check(0, 4096, IoType::Read).is_none());
        assert!(rules.check(4096, 512, IoType::Read).is_some());
        assert!(rules.check(0, 0, IoType::Read).is_none());
    }

    #[test]
    fn state_rules_switch_which_error_rules_arm() {
        let in_two = InjectRule {
            state: 2,
            ..rule(DebugEvent::WriteAio, 5)
        };
        let step = SetStateRule {
            event: DebugEvent::FlushToDisk,
            state: 1,
            new_state: 2,
        };
        let rules = Rules::new(vec![in_two], vec![step]);
        rules.event(DebugEvent::WriteAio);
        assert!(rules.check(0, 512, IoType::Write).is_none());
        rules.event(DebugEvent::FlushToDisk);
        assert_eq!(rules.state(), 2);
        rules.event(DebugEvent::WriteAio);
        assert!(rules.check(0, 512, IoType::Write).is_some());
    }

    #[test]
    fn a_new_event_replaces_the_active_rules() {
        let rules = Rules::new(
            vec![rule(DebugEvent::WriteAio, 5), rule(DebugEvent::ReadAio, 0)],
            vec![],
        );
        rules.event(DebugEvent::WriteAio);
        rules.event(DebugEvent::ReadAio);
        assert!(rules.check(0, 512, IoType::Write).is_none());
    }

    #[test]
    fn the_first_defined_matching_rule_decides() {
        let rules = Rules::new(
            vec![
                rule(DebugEvent::WriteAio, 28),
                rule(DebugEvent::WriteAio, 5),
            ],
            vec![],
        );
        rules.event(DebugEvent::WriteAio);
        assert_eq!(
            rules.check(0, 512, IoType::Write).map(|i| i.errno),
            Some(28)
        );
    }
}
