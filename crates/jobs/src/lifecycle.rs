//! The completion path of jobs, run on the control task: a worker's result, WAITING and
//! PENDING across a transaction, finalization (prepare, commit or abort, clean, the
//! `BLOCK_JOB_COMPLETED`/`BLOCK_JOB_CANCELLED` event, CONCLUDED, dismissal) and transaction
//! abort. Follows the order of QEMU's `job.c`; where QEMU waits synchronously for the other
//! members of an aborting transaction, this engine resumes the abort when their workers'
//! results arrive.

use std::sync::atomic::Ordering::SeqCst;

use crate::manager::TxnId;
use crate::{JobEvent, JobManager, JobStatus};

impl<C: 'static> JobManager<C> {
    /// The worker returned: record its result and complete the job.
    pub(crate) fn worker_finished(&mut self, key: u64, c: &mut C) {
        let Some(job) = self.job_mut(key) else {
            return;
        };
        if job.finished {
            return;
        }
        job.finished = true;
        job.handle = None;
        let result = job
            .shared
            .take_result()
            .unwrap_or_else(|| Err("Job worker vanished".to_owned()));
        if let Err(text) = result {
            job.error.get_or_insert(text);
        }
        self.job_completed(key, c);
    }

    /// QEMU's `job_completed`: the work is over (or the job never started).
    fn job_completed(&mut self, key: u64, c: &mut C) {
        self.update_rc(key);
        if self.job(key).is_some_and(|j| j.error.is_some()) {
            self.txn_abort(key, c);
        } else {
            self.txn_success(key, c);
        }
    }

    /// A forced cancel turns success into `Operation canceled`; a failed job goes ABORTING.
    fn update_rc(&mut self, key: u64) {
        let Some(job) = self.job_mut(key) else {
            return;
        };
        if job.error.is_none() && job.is_cancelled() {
            job.error = Some(crate::Cancelled.to_string());
        }
        if job.error.is_some() {
            self.transition(key, JobStatus::Aborting);
        }
    }

    fn members(&self, txn: TxnId) -> Vec<u64> {
        self.txns
            .get(&txn)
            .map(|t| t.members.clone())
            .unwrap_or_default()
    }

    fn all_completed(&self, members: &[u64]) -> bool {
        members
            .iter()
            .all(|&m| self.job(m).is_none_or(|j| j.status.is_completed()))
    }

    fn txn_success(&mut self, key: u64, c: &mut C) {
        let Some(txn) = self.job(key).map(|j| j.txn) else {
            return;
        };
        self.transition(key, JobStatus::Waiting);
        let members = self.members(txn);
        if !self.all_completed(&members) {
            return;
        }
        for &member in &members {
            self.transition(member, JobStatus::Pending);
            let Some(job) = self.job(member) else {
                continue;
            };
            if !job.auto_finalize && job.job_type.is_block_job() {
                let event = JobEvent::BlockJobPending {
                    job_type: job.job_type,
                    id: job.id.to_string(),
                };
                self.emit(event);
            }
        }
        let manual = members
            .iter()
            .any(|&m| self.job(m).is_some_and(|j| !j.auto_finalize));
        if !manual {
            self.do_finalize(txn, c);
        }
    }

    /// QEMU's `job_do_finalize`: prepare every member; a failure aborts the transaction,
    /// otherwise each member is finalized.
    pub(crate) fn do_finalize(&mut self, txn: TxnId, c: &mut C) {
        let members = self.members(txn);
        for &member in &members {
            let Some(job) = self.job(member) else {
                continue;
            };
            if job.error.is_some() {
                self.txn_abort(member, c);
                return;
            }
            let driver = job.driver.clone();
            if let Err(text) = driver.prepare(c) {
                if let Some(job) = self.job_mut(member) {
                    job.error = Some(text);
                }
                self.update_rc(member);
                self.txn_abort(member, c);
                return;
            }
        }
        for member in members {
            self.finalize_single(member, c);
        }
    }

    fn finalize_single(&mut self, key: u64, c: &mut C) {
        self.update_rc(key);
        let Some(job) = self.job(key) else {
            return;
        };
        let driver = job.driver.clone();
        let failed = job.error.clone();
        let (started, cancelled) = (job.started, job.is_cancelled());
        if failed.is_none() {
            driver.commit(c);
        } else {
            driver.abort(c);
        }
        driver.clean(c);
        if started {
            self.drain_blip(driver.drains().0);
            if cancelled {
                self.emit_block_event(key, JobEvent::BlockJobCancelled);
            } else {
                self.emit_block_event(key, |info| JobEvent::BlockJobCompleted {
                    info,
                    error: failed,
                });
            }
        }
        self.remove_from_txn(key);
        self.transition(key, JobStatus::Concluded);
        if self.job(key).is_some_and(|j| j.auto_dismiss || !j.started) {
            self.do_dismiss(key);
        }
    }

    /// QEMU's `job_completed_txn_abort`: force-cancel the other members, and once every member
    /// is completed, finalize them all (in list order, newest first) with `abort`.
    fn txn_abort(&mut self, key: u64, c: &mut C) {
        let Some(txn_id) = self.job(key).map(|j| j.txn) else {
            return;
        };
        let Some(txn) = self.txns.get_mut(&txn_id) else {
            return;
        };
        if !txn.aborting {
            txn.aborting = true;
            let members = txn.members.clone();
            for &other in members.iter().filter(|&&m| m != key) {
                self.cancel_async(other, true, c);
            }
            for &other in &members {
                let never_started = self
                    .job(other)
                    .is_some_and(|j| !j.started && !j.status.is_completed());
                if never_started {
                    self.update_rc(other);
                }
            }
        }
        let members = self.members(txn_id);
        if self.all_completed(&members) {
            for member in members {
                self.finalize_single(member, c);
            }
        }
    }

    /// QEMU's `job_cancel`: request the cancel, then complete a never-started job at once and
    /// abort the transaction of a job whose work is already over.
    pub(crate) fn cancel_job(&mut self, key: u64, force: bool, c: &mut C) {
        self.cancel_async(key, force, c);
        let Some(job) = self.job(key) else {
            return;
        };
        if !job.started {
            self.job_completed(key, c);
        } else if job.finished && job.is_cancelled() {
            self.txn_abort(key, c);
        }
    }

    /// QEMU's `job_cancel_async`: the driver decides whether the cancel is forced; a user pause
    /// is dropped so the worker can reach its cancel point; a soft cancel of finished work is
    /// ignored.
    fn cancel_async(&mut self, key: u64, force: bool, c: &mut C) {
        let Some(job) = self.job(key) else {
            return;
        };
        let driver = job.driver.clone();
        let ready = matches!(job.status, JobStatus::Ready | JobStatus::Standby);
        let force = driver.cancel(c, force, ready);
        let Some(job) = self.job_mut(key) else {
            return;
        };
        if job.user_paused {
            job.user_paused = false;
            job.io_status = crate::IoStatus::Ok;
            job.pause_count = job.pause_count.saturating_sub(1);
            job.shared.pause_count.store(job.pause_count, SeqCst);
        }
        if force || !job.finished {
            job.cancelled = true;
            job.force_cancel |= force;
            job.shared.force.store(job.force_cancel, SeqCst);
            job.shared.cancelled.store(true, SeqCst);
        }
        job.shared.wake.notify_waiters();
    }

    /// QEMU's `job_do_dismiss`: NULL (announced) and the job is gone.
    pub(crate) fn do_dismiss(&mut self, key: u64) {
        let after = self
            .job(key)
            .filter(|j| j.started)
            .map_or(0, |j| j.driver.drains().1);
        self.remove_from_txn(key);
        self.transition(key, JobStatus::Null);
        if let Some(index) = self.index(key) {
            self.jobs.remove(index);
        }
        self.drain_blip(after);
    }

    pub(crate) fn remove_from_txn(&mut self, key: u64) {
        let Some(txn_id) = self.job(key).map(|j| j.txn) else {
            return;
        };
        let Some(txn) = self.txns.get_mut(&txn_id) else {
            return;
        };
        txn.members.retain(|&m| m != key);
        if txn.members.is_empty() {
            self.txns.remove(&txn_id);
        }
    }
}
