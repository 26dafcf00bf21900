//! The worker's side of a job: pause points, cancellation, progress, rate limiting and error
//! policy. Workers share only this small state with the control task; every status change they
//! cause travels as a [`Notice`] to the [`crate::JobManager`], which alone changes statuses and
//! emits events.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

use crate::ratelimit::RateLimit;
use crate::{ErrorAction, IoOperation};

/// Returned by a pause point of a job that was force-cancelled. Its text is QEMU's
/// `strerror(ECANCELED)`, the error a cancelled job reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Operation canceled")
    }
}

impl std::error::Error for Cancelled {}

impl From<Cancelled> for String {
    fn from(c: Cancelled) -> String {
        c.to_string()
    }
}

/// A block job's error policy (`BlockdevOnError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Fail the job (the default).
    #[default]
    Report,
    /// Retry.
    Ignore,
    /// Stop on ENOSPC, otherwise report.
    Enospc,
    /// Stop.
    Stop,
    /// Same as `Enospc` for jobs.
    Auto,
}

impl OnError {
    /// Parses the QMP name.
    pub fn parse(name: &str) -> Option<OnError> {
        Some(match name {
            "report" => OnError::Report,
            "ignore" => OnError::Ignore,
            "enospc" => OnError::Enospc,
            "stop" => OnError::Stop,
            "auto" => OnError::Auto,
            _ => return None,
        })
    }

    /// The action for an error; `nospace` says whether it was ENOSPC.
    pub fn action(self, nospace: bool) -> ErrorAction {
        match self {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto if nospace => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto => ErrorAction::Report,
        }
    }
}

/// A message from a worker to the control task; pass it to
/// [`crate::JobManager::handle_notice`].
pub struct Notice {
    pub(crate) key: u64,
    pub(crate) kind: NoticeKind,
}

impl fmt::Debug for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notice")
            .field("key", &self.key)
            .field("kind", &self.kind)
            .finish()
    }
}

#[derive(Debug)]
pub(crate) enum NoticeKind {
    /// The worker stopped at a pause point.
    Paused,
    /// The worker left a pause point.
    Resumed,
    /// The worker converged (RUNNING → READY).
    Ready,
    /// The worker returned; its result is in `Shared::result`.
    Finished,
    /// The worker hit an I/O error; the manager acknowledges once it has acted on it.
    IoError {
        operation: IoOperation,
        action: ErrorAction,
        nospace: bool,
        ack: oneshot::Sender<()>,
    },
    /// The worker drains every node `times` times (QEMU's drain-all); the manager
    /// acknowledges once the other jobs showed it.
    DrainAll {
        times: u32,
        ack: oneshot::Sender<()>,
    },
}

/// The receiving end of workers' notices, owned by the daemon's control loop.
#[derive(Debug)]
pub struct NoticeReceiver(pub(crate) mpsc::UnboundedReceiver<Notice>);

impl NoticeReceiver {
    /// The next notice. Never returns `None` while the manager lives (it keeps a sender).
    pub async fn recv(&mut self) -> Option<Notice> {
        self.0.recv().await
    }

    /// A notice that is already waiting, if any.
    pub fn try_recv(&mut self) -> Option<Notice> {
        self.0.try_recv().ok()
    }
}

/// State shared between a job's record (control task) and its worker.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Mirror of the manager's pause counter.
    pub pause_count: AtomicU32,
    /// A cancel was requested (soft or forced).
    pub cancelled: AtomicBool,
    /// The cancel is forced.
    pub force: AtomicBool,
    /// `job-complete` was accepted.
    pub complete_requested: AtomicBool,
    /// The worker is active (not parked at a pause point or asleep).
    pub busy: AtomicBool,
    /// The manager shows the job PAUSED at its first pause point (announced at start); a
    /// drained section that ended before the worker got there clears it.
    pub shown_paused: AtomicBool,
    pub current: AtomicU64,
    pub total: AtomicU64,
    pub limit: Mutex<RateLimit>,
    /// Wakes the worker from pause points and sleeps.
    pub wake: Notify,
    pub result: Mutex<Option<Result<(), String>>>,
}

impl Shared {
    pub fn new(speed: u64) -> Self {
        Shared {
            pause_count: AtomicU32::new(1),
            cancelled: AtomicBool::new(false),
            force: AtomicBool::new(false),
            complete_requested: AtomicBool::new(false),
            shown_paused: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            limit: Mutex::new(RateLimit::new(speed)),
            wake: Notify::new(),
            result: Mutex::new(None),
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(SeqCst) && self.force.load(SeqCst)
    }

    /// Whether the worker should stay at a pause point: a forced cancel overrides pauses.
    pub fn should_pause(&self) -> bool {
        self.pause_count.load(SeqCst) > 0 && !self.is_cancelled()
    }

    pub fn limit(&self) -> MutexGuard<'_, RateLimit> {
        // A poisoned limiter only means a worker panicked mid-update; its numbers are still usable.
        self.limit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn store_result(&self, result: Result<(), String>) {
        let mut slot = self
            .result
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(result);
        }
    }

    pub fn take_result(&self) -> Option<Result<(), String>> {
        self.result
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// What a job's worker holds: handed to [`crate::JobDriver::run`].
#[derive(Clone)]
pub struct JobContext {
    pub(crate) key: u64,
    pub(crate) shared: Arc<Shared>,
    pub(crate) tx: mpsc::UnboundedSender<Notice>,
}

impl fmt::Debug for JobContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobContext")
            .field("key", &self.key)
            .finish()
    }
}

impl JobContext {
    pub(crate) fn notify(&self, kind: NoticeKind) {
        // The manager keeps the receiver for as long as jobs exist; a send can only fail while
        // the daemon is tearing down, when nobody cares about the notice any more.
        let _ = self.tx.send(Notice {
            key: self.key,
            kind,
        });
    }

    /// A point where the job may pause and where cancellation is noticed. Call it between
    /// chunks of work. Returns `Err(Cancelled)` once the job is force-cancelled.
    pub async fn pause_point(&self) -> Result<(), Cancelled> {
        self.pause_point_announced(false).await
    }

    /// A pause point; `announced` says the manager already counts the job as paused (its first
    /// pause point, passed synchronously at start as QEMU does), so leaving must be announced
    /// even if the pause was lifted before the worker got here.
    pub(crate) async fn pause_point_announced(&self, announced: bool) -> Result<(), Cancelled> {
        if announced || self.shared.should_pause() {
            self.shared.busy.store(false, SeqCst);
            // Whether the manager shows this pause; the start announces the first one, unless
            // the manager already moved the job on.
            let mut shown = announced && self.shared.shown_paused.swap(false, SeqCst);
            if !announced {
                self.notify(NoticeKind::Paused);
                shown = true;
            }
            loop {
                let woken = self.shared.wake.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                if !self.shared.should_pause() {
                    break;
                }
                if !shown {
                    self.notify(NoticeKind::Paused);
                    shown = true;
                }
                woken.await;
            }
            self.shared.busy.store(true, SeqCst);
            if shown {
                self.notify(NoticeKind::Resumed);
            }
        }
        if self.is_cancelled() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }

    /// Whether the job was force-cancelled (QEMU's `job_is_cancelled`).
    pub fn is_cancelled(&self) -> bool {
        self.shared.is_cancelled()
    }

    /// Whether any cancel was requested, soft or forced (QEMU's `job_cancel_requested`). A soft
    /// cancel of a ready mirror means: stop copying and finish successfully without pivoting.
    pub fn cancel_requested(&self) -> bool {
        self.shared.cancelled.load(SeqCst)
    }

    /// Whether `job-complete` was accepted for this job.
    pub fn complete_requested(&self) -> bool {
        self.shared.complete_requested.load(SeqCst)
    }

    /// Sets the progress total.
    pub fn set_progress_total(&self, total: u64) {
        self.shared.total.store(total, SeqCst);
    }

    /// Sets the total to what is done plus `remaining` (QEMU's `progress_set_remaining`).
    pub fn set_progress_remaining(&self, remaining: u64) {
        let current = self.shared.current.load(SeqCst);
        self.shared
            .total
            .store(current.saturating_add(remaining), SeqCst);
    }

    /// Adds `done` to the progress.
    pub fn progress_add(&self, done: u64) {
        self.shared.current.fetch_add(done, SeqCst);
    }

    /// Sets both progress counters.
    pub fn set_progress(&self, current: u64, total: u64) {
        self.shared.current.store(current, SeqCst);
        self.shared.total.store(total, SeqCst);
    }

    /// The progress as (current, total).
    pub fn progress(&self) -> (u64, u64) {
        (
            self.shared.current.load(SeqCst),
            self.shared.total.load(SeqCst),
        )
    }

    /// Announces that the job converged: RUNNING → READY and `BLOCK_JOB_READY`.
    pub fn set_ready(&self) {
        self.notify(NoticeKind::Ready);
    }

    /// The current rate limit in bytes/s (0 = unlimited).
    pub fn speed(&self) -> u64 {
        self.shared.limit().speed()
    }

    /// Sleeps for `duration` (woken early by pause, cancel or a speed change), then passes a
    /// pause point (QEMU's `job_sleep_ns`).
    pub async fn sleep(&self, duration: Duration) -> Result<(), Cancelled> {
        let woken = self.shared.wake.notified();
        tokio::pin!(woken);
        // Registered before the checks, so a wake-up between check and sleep is not lost.
        woken.as_mut().enable();
        if !duration.is_zero() && !self.shared.should_pause() && !self.is_cancelled() {
            self.shared.busy.store(false, SeqCst);
            tokio::select! {
                () = tokio::time::sleep(duration) => {}
                () = woken => {}
            }
            self.shared.busy.store(true, SeqCst);
        }
        self.pause_point().await
    }

    /// Whether the speed limit lets new work start now (a worker that starts several copies
    /// asks before each, as QEMU's block-copy does).
    pub fn may_start(&self) -> bool {
        self.shared.limit().delay(Instant::now()).is_zero()
    }

    /// Accounts `bytes` of work that starts now against the speed limit, without waiting.
    pub fn account(&self, bytes: u64) {
        self.shared.limit().account(bytes, Instant::now());
    }

    /// Accounts `bytes` of work against the speed limit and waits until more may be done.
    /// Always passes a pause point.
    pub async fn rate_limit(&self, bytes: u64) -> Result<(), Cancelled> {
        self.shared.limit().account(bytes, Instant::now());
        loop {
            let delay = self.shared.limit().delay(Instant::now());
            if delay.is_zero() || self.is_cancelled() {
                return self.pause_point().await;
            }
            self.sleep(delay).await?;
        }
    }

    /// Reports an I/O error under `policy` (QEMU's `block_job_error_action`): emits
    /// `BLOCK_JOB_ERROR` and, for `stop`, takes a user pause and sets the io-status. Returns the
    /// action: on `Report` fail the job with the error; on `Ignore` or `Stop` pass a pause point
    /// and retry.
    /// Has every other running block job show what QEMU's drain of all nodes shows, `times`
    /// times over (see [`crate::JobManager::drain_blip`]); returns once they did, so events
    /// the worker emits next come after theirs.
    pub async fn drain_all(&self, times: u32) {
        let (ack, acked) = oneshot::channel();
        self.notify(NoticeKind::DrainAll { times, ack });
        // If the manager is gone the daemon is shutting down; there is nothing to wait for.
        let _ = acked.await;
    }

    pub async fn io_error(
        &self,
        policy: OnError,
        operation: IoOperation,
        nospace: bool,
    ) -> ErrorAction {
        let action = policy.action(nospace);
        let (ack, acked) = oneshot::channel();
        self.notify(NoticeKind::IoError {
            operation,
            action,
            nospace,
            ack,
        });
        // If the manager is gone the daemon is shutting down; there is nothing to wait for.
        let _ = acked.await;
        action
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_policy_stops_only_on_nospace() {
        assert_eq!(OnError::Enospc.action(true), ErrorAction::Stop);
        assert_eq!(OnError::Enospc.action(false), ErrorAction::Report);
    }

    #[test]
    fn auto_policy_acts_like_enospc() {
        assert_eq!(OnError::Auto.action(true), ErrorAction::Stop);
        assert_eq!(OnError::Auto.action(false), ErrorAction::Report);
    }

    #[test]
    fn fixed_policies_ignore_the_error_kind() {
        assert_eq!(OnError::Stop.action(false), ErrorAction::Stop);
        assert_eq!(OnError::Ignore.action(true), ErrorAction::Ignore);
        assert_eq!(OnError::Report.action(true), ErrorAction::Report);
    }

    #[test]
    fn cancelled_text_is_strerror_ecanceled() {
        assert_eq!(String::from(Cancelled), "Operation canceled");
    }
}
