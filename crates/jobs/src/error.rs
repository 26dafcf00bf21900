//! Errors of the job engine. Each `Display` text is QEMU's `desc` for the same failure, since
//! management tools match on it (`job.c`, `job-qmp.c`, `blockjob.c`, `blockdev.c`).

/// Why a job operation failed. All map to `GenericError` at the QMP edge, except
/// [`JobError::BlockJobNotFound`], which is `DeviceNotActive`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// An internal job was given an id.
    #[error("Cannot specify job ID for internal job")]
    InternalWithId,
    /// The id is not well formed (a letter, then letters, digits, `-`, `.` or `_`).
    #[error("Invalid job ID '{0}'")]
    InvalidId(String),
    /// Another job already has this id.
    #[error("Job ID '{0}' already in use")]
    IdInUse(String),
    /// A user job was created without an id.
    #[error("An explicit job ID is required")]
    IdRequired,
    /// No job has this id (`job-*` commands).
    #[error("Job not found")]
    NotFound,
    /// No block job has this id (`block-job-*` commands; class `DeviceNotActive`).
    #[error("Block job '{0}' not found")]
    BlockJobNotFound(String),
    /// The job's status does not accept the verb (QEMU's verb table).
    #[error("Job '{id}' in state '{status}' cannot accept command verb '{verb}'")]
    VerbRejected {
        /// The job's id.
        id: String,
        /// Its current status name.
        status: &'static str,
        /// The rejected verb name.
        verb: &'static str,
    },
    /// `job-pause` on a job that the user already paused.
    #[error("Job is already paused")]
    AlreadyPaused,
    /// `job-resume` on a job that the user did not pause.
    #[error("Can't resume a job that was not paused")]
    NotPaused,
    /// `job-complete` on a job that cannot complete, or whose cancel was requested.
    #[error("The active block job '{0}' cannot be completed")]
    CannotComplete(String),
    /// A soft `block-job-cancel` of a user-paused job.
    #[error("The block job for device '{0}' is currently paused")]
    CancelPaused(String),
    /// A negative `speed`.
    #[error("Parameter 'speed' expects a non-negative value")]
    NegativeSpeed,
    /// `block-job-change` on a job type without changeable options.
    #[error("Job type does not support change")]
    ChangeUnsupported,
    /// A driver hook failed with this text.
    #[error("{0}")]
    Driver(String),
}
