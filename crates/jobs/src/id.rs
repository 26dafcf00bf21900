//! Job identifiers and their validation (`job_create` in QEMU's `job.c`).

use std::fmt;

use crate::JobError;

/// A well-formed job id: an ASCII letter, then ASCII letters, digits, `-`, `.` or `_`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

impl JobId {
    /// Checks that `id` is well formed (`Invalid job ID '<id>'` otherwise; empty is invalid).
    pub fn parse(id: &str) -> Result<JobId, JobError> {
        let mut chars = id.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if first_ok && rest_ok {
            Ok(JobId(id.to_owned()))
        } else {
            Err(JobError::InvalidId(id.to_owned()))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a new job's id in QEMU's order: internal jobs take no id; the id must be well formed;
/// it must not be in use (`in_use`); a user job must have one.
///
/// Returns the parsed id, or `None` for an internal job without id.
pub fn validate_job_id(
    id: Option<&str>,
    internal: bool,
    in_use: impl Fn(&str) -> bool,
) -> Result<Option<JobId>, JobError> {
    match id {
        Some(_) if internal => Err(JobError::InternalWithId),
        Some(id) => {
            let id = JobId::parse(id)?;
            if in_use(id.as_str()) {
                return Err(JobError::IdInUse(id.0));
            }
            Ok(Some(id))
        }
        None if internal => Ok(None),
        None => Err(JobError::IdRequired),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_letter_then_name_characters() {
        assert_eq!(JobId::parse("j1-a.b_c").unwrap().as_str(), "j1-a.b_c");
    }

    #[test]
    fn parse_rejects_empty_id() {
        assert_eq!(
            JobId::parse("").unwrap_err().to_string(),
            "Invalid job ID ''"
        );
    }

    #[test]
    fn parse_rejects_leading_digit() {
        assert_eq!(
            JobId::parse("1job").unwrap_err().to_string(),
            "Invalid job ID '1job'"
        );
    }

    #[test]
    fn parse_rejects_other_punctuation() {
        assert_eq!(
            JobId::parse("job#1").unwrap_err(),
            JobError::InvalidId("job#1".into())
        );
    }

    #[test]
    fn validate_rejects_id_on_internal_job_first() {
        let err = validate_job_id(Some("1bad"), true, |_| true).unwrap_err();
        assert_eq!(err.to_string(), "Cannot specify job ID for internal job");
    }

    #[test]
    fn validate_checks_form_before_use() {
        let err = validate_job_id(Some("-x"), false, |_| true).unwrap_err();
        assert_eq!(err.to_string(), "Invalid job ID '-x'");
    }

    #[test]
    fn validate_rejects_id_in_use() {
        let err = validate_job_id(Some("j1"), false, |id| id == "j1").unwrap_err();
        assert_eq!(err.to_string(), "Job ID 'j1' already in use");
    }

    #[test]
    fn validate_requires_id_for_user_job() {
        let err = validate_job_id(None, false, |_| false).unwrap_err();
        assert_eq!(err.to_string(), "An explicit job ID is required");
    }

    #[test]
    fn validate_allows_internal_job_without_id() {
        assert_eq!(validate_job_id(None, true, |_| false).unwrap(), None);
    }
}
