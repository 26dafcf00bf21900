//! The job engine: QEMU's generic jobs and transactions of jobs, as a state machine owned by
//! the control task plus one worker task per job.
//!
//! This crate knows nothing of the block graph, QMP or other blockd crates: it is generic over
//! the control-side context `C` that the daemon supplies to the driver hooks.
//!
//! # States
//!
//! `undefined → created → running ⇄ paused`, `running → ready ⇄ standby`,
//! `running/ready → waiting → pending → concluded → null`, and `aborting` from
//! created/running/ready/waiting/pending. [`JobStatus::can_transition_to`] is QEMU's exact
//! table and [`JobStatus::allows`] its verb table.
//!
//! # Invariants
//!
//! * Only [`JobManager`] changes statuses and emits events, in one place
//!   (`JobManager::transition`); a `JOB_STATUS_CHANGE` fires only when the value changes.
//! * Workers share with the manager only atomics, a `Notify` and the rate limiter; they report
//!   pause points, readiness, I/O errors and their result as [`Notice`]s.
//! * A job becomes PAUSED/STANDBY only at a pause point while its pause counter is above zero.
//!   The counter starts at 1, `start` takes 1 away; the user pause adds at most 1 (flag
//!   `user_paused`); internal pauses add and remove 1 each. A forced cancel overrides pauses.
//! * Every job is in exactly one transaction. Success: WAITING until every member finished,
//!   then all PENDING, then finalization unless a member has `auto-finalize=false`. Failure or
//!   forced cancel of one member force-cancels the others; once all are completed, each is
//!   finalized with `abort`, newest first.
//! * A job that never started emits no `BLOCK_JOB_*` event and is dismissed when concluded.
//!
//! # Driving it
//!
//! ```no_run
//! # use jobs::JobManager;
//! # struct Graph;
//! # enum Request { Cancel(String) }
//! # async fn control(mut graph: Graph, mut requests: tokio::sync::mpsc::Receiver<Request>) {
//! let (mut jobs, mut notices) = JobManager::<Graph>::new(Box::new(|event| {
//!     // Forward to every monitor in command mode.
//!     println!("{} {}", event.name(), event.data());
//! }));
//! loop {
//!     tokio::select! {
//!         Some(notice) = notices.recv() => jobs.handle_notice(notice, &mut graph),
//!         Some(request) = requests.recv() => match request {
//!             // create/start/pause/resume/complete/finalize/dismiss/set_speed likewise
//!             Request::Cancel(id) => {
//!                 let _reply = jobs.cancel(&id, true, &mut graph);
//!             }
//!         },
//!         else => break,
//!     }
//! }
//! // `quit`: force-cancel everything and wait, handling notices meanwhile.
//! jobs.shutdown(&mut notices, &mut graph).await;
//! # }
//! ```

mod context;
mod driver;
mod error;
mod event;
mod id;
mod lifecycle;
mod manager;
mod ratelimit;
mod status;

pub use context::{Cancelled, JobContext, Notice, NoticeReceiver, OnError};
pub use driver::{CompleteError, JobDriver};
pub use error::JobError;
pub use event::{BlockJobSnapshot, ErrorAction, IoOperation, JobEvent};
pub use id::{validate_job_id, JobId};
pub use manager::{BlockJobInfo, EventSink, IoStatus, JobInfo, JobManager, JobOptions, TxnId};
pub use ratelimit::RateLimit;
pub use status::{JobStatus, JobType, JobVerb};
