//! The job table, owned by the control task: creation, client verbs, notices from workers and
//! queries. The completion path (waiting, pending, finalize, transaction abort) is in
//! `lifecycle.rs`.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::context::{NoticeKind, Shared};
use crate::{
    validate_job_id, BlockJobSnapshot, CompleteError, JobContext, JobDriver, JobError, JobEvent,
    JobId, JobStatus, JobType, JobVerb, Notice, NoticeReceiver,
};

/// A job transaction (`JobTxn`): jobs that finish, finalize and fail together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnId(u64);

/// The block-job error status (`BlockDeviceIoStatus`), reset by resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoStatus {
    /// No error.
    Ok,
    /// An I/O error stopped the job.
    Failed,
    /// ENOSPC stopped the job.
    Nospace,
}

/// How to create a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOptions {
    /// The job id; `None` fails with `An explicit job ID is required`.
    pub id: Option<String>,
    /// The job type.
    pub job_type: JobType,
    /// Finalize as soon as the transaction finished (default true).
    pub auto_finalize: bool,
    /// Dismiss as soon as concluded (default true; `blockdev-create` uses false).
    pub auto_dismiss: bool,
    /// The transaction to join; `None` puts the job in a transaction of its own.
    pub txn: Option<TxnId>,
    /// Initial rate limit in bytes/s; negative is rejected after the job was created.
    pub speed: i64,
}

impl JobOptions {
    /// Options with QEMU's defaults: auto-finalize, auto-dismiss, own transaction, no limit.
    pub fn new(id: impl Into<String>, job_type: JobType) -> Self {
        JobOptions {
            id: Some(id.into()),
            job_type,
            auto_finalize: true,
            auto_dismiss: true,
            txn: None,
            speed: 0,
        }
    }
}

/// One entry of `query-jobs` (`JobInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// The job id.
    pub id: String,
    /// The job type.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The status.
    pub status: JobStatus,
    /// Progress so far.
    pub current_progress: u64,
    /// Progress total.
    pub total_progress: u64,
    /// Present iff the job failed or was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One entry of `query-block-jobs` (`BlockJobInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    /// The job type.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The job id.
    pub device: String,
    /// Progress total.
    pub len: u64,
    /// Progress so far.
    pub offset: u64,
    /// The worker is active (not parked or asleep).
    pub busy: bool,
    /// The pause counter is above zero.
    pub paused: bool,
    /// Rate limit, 0 = unlimited.
    pub speed: u64,
    /// Error status.
    pub io_status: IoStatus,
    /// Status is ready or standby.
    pub ready: bool,
    /// The status.
    pub status: JobStatus,
    /// The auto-finalize flag.
    pub auto_finalize: bool,
    /// The auto-dismiss flag.
    pub auto_dismiss: bool,
    /// Present iff the job failed or was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Mirror only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actively_synced: Option<bool>,
}

/// The control task's record of one job.
pub(crate) struct Job<C> {
    pub key: u64,
    pub id: JobId,
    pub job_type: JobType,
    pub driver: Arc<dyn JobDriver<C>>,
    pub shared: Arc<Shared>,
    pub status: JobStatus,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    pub txn: TxnId,
    pub pause_count: u32,
    pub user_paused: bool,
    pub started: bool,
    pub cancelled: bool,
    pub force_cancel: bool,
    /// The worker's result was processed (QEMU's `deferred_to_main_loop`).
    pub finished: bool,
    /// Set once the job failed; the text of `error` in queries and events.
    pub error: Option<String>,
    pub io_status: IoStatus,
    pub handle: Option<JoinHandle<()>>,
}

impl<C> Job<C> {
    /// QEMU's `job_is_cancelled`: only a forced cancel counts.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled && self.force_cancel
    }

    fn sync_pause(&self) {
        self.shared.pause_count.store(self.pause_count, SeqCst);
    }
}

#[derive(Debug, Default)]
pub(crate) struct Txn {
    /// Member keys, newest first.
    pub members: Vec<u64>,
    pub aborting: bool,
}

/// Sink for the manager's events.
pub type EventSink = Box<dyn FnMut(JobEvent) + Send>;

/// Every job of the daemon. Owned by the single control task; see the crate docs for how the
/// control loop drives it.
pub struct JobManager<C> {
    /// Newest first, like QEMU's global job list.
    pub(crate) jobs: Vec<Job<C>>,
    pub(crate) txns: HashMap<TxnId, Txn>,
    next_key: u64,
    next_txn: u64,
    events: EventSink,
    tx: mpsc::UnboundedSender<Notice>,
}

impl<C> fmt::Debug for JobManager<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobManager")
            .field("jobs", &self.jobs.len())
            .field("txns", &self.txns.len())
            .finish()
    }
}

impl<C> Drop for JobManager<C> {
    fn drop(&mut self) {
        for job in &mut self.jobs {
            if let Some(handle) = job.handle.take() {
                handle.abort();
            }
        }
    }
}

impl<C: 'static> JobManager<C> {
    /// A manager that passes every event to `events`, and the receiver of workers' notices.
    pub fn new(events: EventSink) -> (JobManager<C>, NoticeReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let manager = JobManager {
            jobs: Vec::new(),
            txns: HashMap::new(),
            next_key: 0,
            next_txn: 0,
            events,
            tx,
        };
        (manager, NoticeReceiver(rx))
    }

    pub(crate) fn emit(&mut self, event: JobEvent) {
        (self.events)(event);
    }

    pub(crate) fn index(&self, key: u64) -> Option<usize> {
        self.jobs.iter().position(|j| j.key == key)
    }

    pub(crate) fn job(&self, key: u64) -> Option<&Job<C>> {
        self.jobs.iter().find(|j| j.key == key)
    }

    pub(crate) fn job_mut(&mut self, key: u64) -> Option<&mut Job<C>> {
        self.jobs.iter_mut().find(|j| j.key == key)
    }

    fn find(&self, id: &str) -> Result<u64, JobError> {
        self.jobs
            .iter()
            .find(|j| j.id.as_str() == id)
            .map(|j| j.key)
            .ok_or(JobError::NotFound)
    }

    /// Moves a job to `to`, announcing it if the status changed.
    pub(crate) fn transition(&mut self, key: u64, to: JobStatus) {
        let Some(job) = self.job_mut(key) else {
            return;
        };
        let from = job.status;
        debug_assert!(
            from.can_transition_to(to),
            "job {}: illegal transition {from} -> {to}",
            job.id
        );
        job.status = to;
        if from != to {
            let id = job.id.to_string();
            self.emit(JobEvent::StatusChange { id, status: to });
        }
    }

    pub(crate) fn snapshot(&self, key: u64) -> Option<BlockJobSnapshot> {
        let job = self.job(key)?;
        Some(BlockJobSnapshot {
            job_type: job.job_type,
            device: job.id.to_string(),
            len: job.shared.total.load(SeqCst),
            offset: job.shared.current.load(SeqCst),
            speed: job.shared.limit().speed(),
        })
    }

    fn apply_verb_key(&self, key: u64, verb: JobVerb) -> Result<(), JobError> {
        let job = self.job(key).ok_or(JobError::NotFound)?;
        if job.status.allows(verb) {
            Ok(())
        } else {
            Err(JobError::VerbRejected {
                id: job.id.to_string(),
                status: job.status.as_str(),
                verb: verb.as_str(),
            })
        }
    }

    /// Checks that the job's status accepts `verb` (for verbs the daemon implements itself,
    /// such as `change`).
    pub fn apply_verb(&self, id: &str, verb: JobVerb) -> Result<(), JobError> {
        self.apply_verb_key(self.find(id)?, verb)
    }

    /// What every running job shows when QEMU drains all nodes `times` times (a graph change
    /// elsewhere): RUNNING jobs go PAUSED and back, READY ones STANDBY and back. The workers
    /// are not stopped; requests they make meanwhile wait at the drained nodes' gates.
    pub fn drain_blip(&mut self, times: u32) {
        for _ in 0..times {
            let keys: Vec<(u64, JobStatus)> = self
                .jobs
                .iter()
                .filter(|j| j.started && !j.finished && !j.user_paused && j.pause_count == 0)
                // Drains pause block jobs only (not a create, amend or snapshot job).
                .filter(|j| j.job_type.is_block_job())
                .map(|j| (j.key, j.status))
                .collect();
            for (key, status) in keys {
                let (away, back) = match status {
                    JobStatus::Running => (JobStatus::Paused, JobStatus::Running),
                    JobStatus::Ready => (JobStatus::Standby, JobStatus::Ready),
                    _ => continue,
                };
                self.transition(key, away);
                self.transition(key, back);
            }
        }
    }

    /// A new, empty job transaction (grouped completion mode).
    pub fn new_txn(&mut self) -> TxnId {
        self.next_txn += 1;
        let txn = TxnId(self.next_txn);
        self.txns.insert(txn, Txn::default());
        txn
    }

    /// Creates a job in status CREATED (announced), at the head of the job list and of its
    /// transaction. A negative speed is rejected after creation: the job goes to NULL again,
    /// as QEMU's `block_job_create` does.
    pub fn create(
        &mut self,
        options: JobOptions,
        driver: Arc<dyn JobDriver<C>>,
    ) -> Result<JobId, JobError> {
        let id = validate_job_id(options.id.as_deref(), false, |id| {
            self.jobs.iter().any(|j| j.id.as_str() == id)
        })?
        .ok_or(JobError::IdRequired)?;
        let txn = match options.txn {
            Some(txn) => txn,
            None => self.new_txn(),
        };
        self.next_key += 1;
        let key = self.next_key;
        let speed = u64::try_from(options.speed).unwrap_or(0);
        self.jobs.insert(
            0,
            Job {
                key,
                id: id.clone(),
                job_type: options.job_type,
                driver,
                shared: Arc::new(Shared::new(speed)),
                status: JobStatus::Undefined,
                auto_finalize: options.auto_finalize,
                auto_dismiss: options.auto_dismiss,
                txn,
                pause_count: 1,
                user_paused: false,
                started: false,
                cancelled: false,
                force_cancel: false,
                finished: false,
                error: None,
                io_status: IoStatus::Ok,
                handle: None,
            },
        );
        self.txns.entry(txn).or_default().members.insert(0, key);
        self.transition(key, JobStatus::Created);
        if options.speed < 0 {
            self.fail_early(key);
            return Err(JobError::NegativeSpeed);
        }
        Ok(id)
    }

    /// Drops a job that was created but never started, because setting it up failed after
    /// creation: CREATED → NULL, no hooks, no block-job events (QEMU's `job_early_fail`).
    pub fn discard(&mut self, id: &str) -> Result<(), JobError> {
        let key = self.find(id)?;
        self.fail_early(key);
        Ok(())
    }

    fn fail_early(&mut self, key: u64) {
        let Some(job) = self.job(key) else {
            return;
        };
        debug_assert!(!job.started && job.status == JobStatus::Created);
        self.remove_from_txn(key);
        self.transition(key, JobStatus::Null);
        self.jobs.retain(|j| j.key != key);
    }

    /// Starts a created job: RUNNING (announced) and its worker is spawned. A job that is
    /// still paused (an internal pause taken before start) passes its first pause point at
    /// once, as in QEMU, so PAUSED follows RUNNING here.
    pub fn start(&mut self, id: &str) -> Result<(), JobError> {
        let key = self.find(id)?;
        let tx = self.tx.clone();
        let Some(job) = self.job_mut(key) else {
            return Err(JobError::NotFound);
        };
        if job.started || job.status != JobStatus::Created {
            return Ok(());
        }
        job.started = true;
        job.pause_count = job.pause_count.saturating_sub(1);
        job.sync_pause();
        job.shared.busy.store(true, SeqCst);
        let parked = job.shared.should_pause();
        job.shared.shown_paused.store(parked, SeqCst);
        let ctx = JobContext {
            key,
            shared: job.shared.clone(),
            tx,
        };
        let driver = job.driver.clone();
        job.handle = Some(tokio::spawn(run_worker(ctx, driver, parked)));
        self.transition(key, JobStatus::Running);
        if parked {
            self.transition(key, JobStatus::Paused);
        }
        Ok(())
    }

    /// `job-pause`: takes the user pause. The job becomes PAUSED (or STANDBY) when its worker
    /// reaches a pause point.
    pub fn pause(&mut self, id: &str) -> Result<(), JobError> {
        let key = self.find(id)?;
        self.apply_verb_key(key, JobVerb::Pause)?;
        let job = self.job_mut(key).ok_or(JobError::NotFound)?;
        if job.user_paused {
            return Err(JobError::AlreadyPaused);
        }
        job.user_paused = true;
        job.pause_count += 1;
        job.sync_pause();
        job.shared.wake.notify_waiters();
        Ok(())
    }

    /// `job-resume`: drops the user pause and resets the io-status.
    pub fn resume(&mut self, id: &str) -> Result<(), JobError> {
        let key = self.find(id)?;
        if !self.job(key).is_some_and(|j| j.user_paused) {
            return Err(JobError::NotPaused);
        }
        self.apply_verb_key(key, JobVerb::Resume)?;
        let job = self.job_mut(key).ok_or(JobError::NotFound)?;
        job.io_status = IoStatus::Ok;
        job.user_paused = false;
        Self::drop_pause(job);
        Ok(())
    }

    /// Takes an internal pause (a drained section near the job); invisible to the user except
    /// as a PAUSED/RUNNING pair if the worker reaches a pause point meanwhile.
    pub fn pause_internal(&mut self, id: &str) -> Result<(), JobError> {
        let key = self.find(id)?;
        let job = self.job_mut(key).ok_or(JobError::NotFound)?;
        job.pause_count += 1;
        job.sync_pause();
        job.shared.wake.notify_waiters();
        Ok(())
    }

    /// Drops an internal pause taken by [`JobManager::pause_internal`]. A job paused at a
    /// pause point runs again at once (QEMU enters the job's coroutine right away, so the
    /// RUNNING event precedes the reply of the command that ended the drained section); the
    /// worker's own notice then changes nothing.
    pub fn resume_internal(&mut self, id: &str) -> Result<(), JobError> {
        let key = self.find(id)?;
        let job = self.job_mut(key).ok_or(JobError::NotFound)?;
        Self::drop_pause(job);
        if job.pause_count == 0 && job.shared.shown_paused.swap(false, SeqCst) {
            match job.status {
                JobStatus::Paused => self.transition(key, JobStatus::Running),
                JobStatus::Standby => self.transition(key, JobStatus::Ready),
                _ => {}
            }
        }
        Ok(())
    }

    fn drop_pause(job: &mut Job<C>) {
        debug_assert!(job.pause_count > 0, "job {}: unbalanced resume", job.id);
        job.pause_count = job.pause_count.saturating_sub(1);
        job.sync_pause();
        if job.pause_count == 0 {
            job.shared.wake.notify_waiters();
        }
    }

    /// `job-cancel` (`force = true`) and `block-job-cancel`. A soft cancel of a user-paused job
    /// is refused; otherwise the driver decides whether a soft cancel stays soft.
    pub fn cancel(&mut self, id: &str, force: bool, c: &mut C) -> Result<(), JobError> {
        let key = self.find(id)?;
        if !force && self.job(key).is_some_and(|j| j.user_paused) {
            return Err(JobError::CancelPaused(id.to_owned()));
        }
        self.apply_verb_key(key, JobVerb::Cancel)?;
        self.cancel_job(key, force, c);
        Ok(())
    }

    /// `job-complete`.
    pub fn complete(&mut self, id: &str, c: &mut C) -> Result<(), JobError> {
        let key = self.find(id)?;
        self.apply_verb_key(key, JobVerb::Complete)?;
        let job = self.job(key).ok_or(JobError::NotFound)?;
        if job.cancelled {
            return Err(JobError::CannotComplete(id.to_owned()));
        }
        let driver = job.driver.clone();
        match driver.complete(c) {
            Ok(()) => {}
            Err(CompleteError::Unsupported) => return Err(JobError::CannotComplete(id.to_owned())),
            Err(CompleteError::Failed(text)) => return Err(JobError::Driver(text)),
        }
        if let Some(job) = self.job(key) {
            job.shared.complete_requested.store(true, SeqCst);
            job.shared.wake.notify_waiters();
        }
        Ok(())
    }

    /// `job-finalize`: finalizes the job's whole transaction now.
    pub fn finalize(&mut self, id: &str, c: &mut C) -> Result<(), JobError> {
        let key = self.find(id)?;
        self.apply_verb_key(key, JobVerb::Finalize)?;
        if let Some(txn) = self.job(key).map(|j| j.txn) {
            self.do_finalize(txn, c);
        }
        Ok(())
    }

    /// `job-dismiss`: a concluded job goes to NULL and disappears.
    pub fn dismiss(&mut self, id: &str) -> Result<(), JobError> {
        let key = self.find(id)?;
        self.apply_verb_key(key, JobVerb::Dismiss)?;
        self.do_dismiss(key);
        Ok(())
    }

    /// `block-job-set-speed`: bytes/s, 0 = unlimited.
    pub fn set_speed(&mut self, id: &str, speed: i64) -> Result<(), JobError> {
        let key = self.find(id)?;
        self.apply_verb_key(key, JobVerb::SetSpeed)?;
        let speed = u64::try_from(speed).map_err(|_| JobError::NegativeSpeed)?;
        let job = self.job(key).ok_or(JobError::NotFound)?;
        job.shared.limit().set_speed(speed);
        job.shared.wake.notify_waiters();
        Ok(())
    }

    /// Handles one notice from a worker. Call it from the control loop for every notice
    /// received; notices of jobs that are gone are ignored.
    pub fn handle_notice(&mut self, notice: Notice, c: &mut C) {
        let key = notice.key;
        let Some(status) = self.job(key).map(|j| j.status) else {
            return;
        };
        match notice.kind {
            NoticeKind::Paused => match status {
                JobStatus::Running => self.transition(key, JobStatus::Paused),
                JobStatus::Ready => self.transition(key, JobStatus::Standby),
                _ => {}
            },
            NoticeKind::Resumed => match status {
                JobStatus::Paused => self.transition(key, JobStatus::Running),
                JobStatus::Standby => self.transition(key, JobStatus::Ready),
                _ => {}
            },
            NoticeKind::Ready => {
                if status == JobStatus::Running {
                    self.transition(key, JobStatus::Ready);
                    self.emit_block_event(key, JobEvent::BlockJobReady);
                }
            }
            NoticeKind::Finished => self.worker_finished(key, c),
            NoticeKind::IoError {
                operation,
                action,
                nospace,
                ack,
            } => {
                self.io_error(key, operation, action, nospace);
                // The worker may have been dropped meanwhile; then nobody waits for the ack.
                let _ = ack.send(());
            }
            NoticeKind::DrainAll { times, ack } => {
                self.drain_blip(times);
                let _ = ack.send(());
            }
        }
    }

    fn io_error(
        &mut self,
        key: u64,
        operation: crate::IoOperation,
        action: crate::ErrorAction,
        nospace: bool,
    ) {
        let Some(job) = self.job_mut(key) else {
            return;
        };
        let device = job.id.to_string();
        let is_block = job.job_type.is_block_job();
        if action == crate::ErrorAction::Stop {
            if !job.user_paused {
                job.user_paused = true;
                job.pause_count += 1;
                job.sync_pause();
            }
            if job.io_status == IoStatus::Ok {
                job.io_status = if nospace {
                    IoStatus::Nospace
                } else {
                    IoStatus::Failed
                };
            }
        }
        if is_block {
            self.emit(JobEvent::BlockJobError {
                device,
                operation,
                action,
            });
        }
    }

    pub(crate) fn emit_block_event(
        &mut self,
        key: u64,
        make: impl FnOnce(BlockJobSnapshot) -> JobEvent,
    ) {
        if !self.job(key).is_some_and(|j| j.job_type.is_block_job()) {
            return;
        }
        if let Some(snapshot) = self.snapshot(key) {
            self.emit(make(snapshot));
        }
    }

    /// `query-jobs`: every job, newest first.
    pub fn query_jobs(&self) -> Vec<JobInfo> {
        self.jobs
            .iter()
            .map(|j| JobInfo {
                id: j.id.to_string(),
                job_type: j.job_type,
                status: j.status,
                current_progress: j.shared.current.load(SeqCst),
                total_progress: j.shared.total.load(SeqCst),
                error: j.error.clone(),
            })
            .collect()
    }

    /// `query-block-jobs`: every block job, newest first.
    pub fn query_block_jobs(&self) -> Vec<BlockJobInfo> {
        self.jobs
            .iter()
            .filter(|j| j.job_type.is_block_job())
            .map(|j| BlockJobInfo {
                job_type: j.job_type,
                device: j.id.to_string(),
                len: j.shared.total.load(SeqCst),
                offset: j.shared.current.load(SeqCst),
                busy: j.started && j.shared.busy.load(SeqCst),
                paused: j.pause_count > 0,
                speed: j.shared.limit().speed(),
                io_status: j.io_status,
                ready: matches!(j.status, JobStatus::Ready | JobStatus::Standby),
                status: j.status,
                auto_finalize: j.auto_finalize,
                auto_dismiss: j.auto_dismiss,
                error: j.error.clone(),
                actively_synced: j.driver.actively_synced(),
            })
            .collect()
    }

    /// The job's status, if it exists.
    pub fn status(&self, id: &str) -> Option<JobStatus> {
        self.jobs
            .iter()
            .find(|j| j.id.as_str() == id)
            .map(|j| j.status)
    }

    /// The job's type, if it exists.
    pub fn job_type(&self, id: &str) -> Option<JobType> {
        self.jobs
            .iter()
            .find(|j| j.id.as_str() == id)
            .map(|j| j.job_type)
    }

    /// The job's driver, for type-specific commands (`block-job-change`).
    pub fn driver(&self, id: &str) -> Option<Arc<dyn JobDriver<C>>> {
        self.jobs
            .iter()
            .find(|j| j.id.as_str() == id)
            .map(|j| j.driver.clone())
    }

    /// For `block-job-*`: the id must name a block job (`Block job '<id>' not found`).
    pub fn check_block_job(&self, id: &str) -> Result<(), JobError> {
        match self.job_type(id) {
            Some(t) if t.is_block_job() => Ok(()),
            _ => Err(JobError::BlockJobNotFound(id.to_owned())),
        }
    }

    /// Whether no job exists.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Force-cancels every job and waits for each to end, dismissing concluded ones (QSD's quit
    /// path, `job_cancel_sync_all`). `notices` is the receiver returned by
    /// [`JobManager::new`]; notices meanwhile are handled here.
    pub async fn shutdown(&mut self, notices: &mut NoticeReceiver, c: &mut C) {
        // QEMU drains every node first: running block jobs pause at their next pause
        // point (PAUSED), and the forced cancel then wakes them (RUNNING, ABORTING, ...).
        let drained: Vec<u64> = self
            .jobs
            .iter()
            .filter(|j| {
                j.started
                    && j.job_type.is_block_job()
                    && matches!(j.status, JobStatus::Running | JobStatus::Ready)
            })
            .map(|j| j.key)
            .collect();
        for &key in &drained {
            if let Some(job) = self.job_mut(key) {
                job.pause_count += 1;
                job.sync_pause();
                job.shared.wake.notify_waiters();
            }
        }
        while drained.iter().any(|&key| {
            self.job(key).is_some_and(|j| {
                matches!(j.status, JobStatus::Running | JobStatus::Ready) && !j.finished
            })
        }) {
            let Some(notice) = notices.recv().await else {
                return;
            };
            self.handle_notice(notice, c);
        }
        while let Some(job) = self.jobs.first() {
            let key = job.key;
            match job.status {
                JobStatus::Concluded => self.do_dismiss(key),
                JobStatus::Aborting => {}
                _ => self.cancel_job(key, true, c),
            }
            while self
                .job(key)
                .is_some_and(|j| j.status != JobStatus::Concluded)
            {
                let Some(notice) = notices.recv().await else {
                    return;
                };
                self.handle_notice(notice, c);
            }
        }
    }
}

/// Runs as the job's task: the first pause point, the body, then the result as a notice.
async fn run_worker<C: 'static>(ctx: JobContext, driver: Arc<dyn JobDriver<C>>, parked: bool) {
    let guard = FinishGuard(ctx.clone());
    let result = match ctx.pause_point_announced(parked).await {
        Ok(()) => driver.run(ctx.clone()).await,
        Err(cancelled) => Err(cancelled.into()),
    };
    ctx.shared.store_result(result);
    drop(guard);
}

/// Reports the worker's end even if the body panicked, so the job cannot hang.
struct FinishGuard(JobContext);

impl Drop for FinishGuard {
    fn drop(&mut self) {
        self.0
            .shared
            .store_result(Err("Job worker panicked".to_owned()));
        // A finished job reports `busy: false` in query-block-jobs, as QSD does.
        self.0.shared.busy.store(false, SeqCst);
        self.0.notify(NoticeKind::Finished);
    }
}
