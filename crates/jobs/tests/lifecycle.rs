//! Lifecycle tests: real workers on tokio, asserting the exact event sequences of jobs.md §9.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobs::{
    ErrorAction, IoOperation, IoStatus, JobContext, JobDriver, JobEvent, JobManager, JobOptions,
    JobStatus, JobType, NoticeReceiver, OnError,
};

/// The control-side context: a log of driver hook calls.
type Log = Vec<String>;

/// Knobs the test turns while the worker runs.
#[derive(Default)]
struct Knobs {
    finish: AtomicBool,
    io_error: AtomicBool,
}

#[derive(Default, Clone)]
struct Script {
    len: u64,
    fail: Option<String>,
    ready: bool,
    completable: bool,
    soft_cancel: bool,
    policy: OnError,
    prepare_error: Option<String>,
}

struct TestDriver {
    id: String,
    job_type: JobType,
    script: Script,
    knobs: Arc<Knobs>,
}

#[async_trait::async_trait]
impl JobDriver<Log> for TestDriver {
    fn job_type(&self) -> JobType {
        self.job_type
    }

    async fn run(&self, ctx: JobContext) -> Result<(), String> {
        ctx.set_progress(0, self.script.len);
        if self.script.ready {
            ctx.progress_add(self.script.len);
            ctx.set_ready();
            loop {
                ctx.pause_point().await?;
                if ctx.complete_requested() || ctx.cancel_requested() {
                    return Ok(());
                }
                ctx.sleep(Duration::from_millis(1)).await?;
            }
        }
        loop {
            ctx.pause_point().await?;
            if self.knobs.io_error.swap(false, SeqCst) {
                match ctx
                    .io_error(self.script.policy, IoOperation::Write, false)
                    .await
                {
                    ErrorAction::Report => return Err("Input/output error".into()),
                    ErrorAction::Ignore | ErrorAction::Stop => continue,
                }
            }
            if self.knobs.finish.load(SeqCst) {
                break;
            }
            ctx.sleep(Duration::from_millis(1)).await?;
        }
        if self.job_type.is_block_job() {
            ctx.set_progress(self.script.len, self.script.len);
        } else {
            ctx.set_progress(1, 1);
        }
        match &self.script.fail {
            Some(text) => Err(text.clone()),
            None => Ok(()),
        }
    }

    fn prepare(&self, c: &mut Log) -> Result<(), String> {
        c.push(format!("prepare {}", self.id));
        match &self.script.prepare_error {
            Some(text) => Err(text.clone()),
            None => Ok(()),
        }
    }

    fn commit(&self, c: &mut Log) {
        c.push(format!("commit {}", self.id));
    }

    fn abort(&self, c: &mut Log) {
        c.push(format!("abort {}", self.id));
    }

    fn clean(&self, c: &mut Log) {
        c.push(format!("clean {}", self.id));
    }

    fn complete(&self, c: &mut Log) -> Result<(), jobs::CompleteError> {
        if self.script.completable {
            c.push(format!("complete {}", self.id));
            Ok(())
        } else {
            Err(jobs::CompleteError::Unsupported)
        }
    }

    fn cancel(&self, _c: &mut Log, force: bool, ready: bool) -> bool {
        !self.script.soft_cancel || force || !ready
    }
}

struct Harness {
    jobs: JobManager<Log>,
    notices: NoticeReceiver,
    log: Log,
    events: Arc<Mutex<Vec<String>>>,
}

fn render(event: &JobEvent) -> String {
    match event {
        JobEvent::StatusChange { id, status } => format!("{id}:{status}"),
        other => format!("{} {}", other.name(), other.data()),
    }
}

impl Harness {
    fn new() -> Self {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let (jobs, notices) = JobManager::new(Box::new(move |e: JobEvent| {
            sink.lock().unwrap().push(render(&e));
        }));
        Harness {
            jobs,
            notices,
            log: Vec::new(),
            events,
        }
    }

    fn create(&mut self, options: JobOptions, script: Script) -> Arc<Knobs> {
        let knobs = Arc::new(Knobs::default());
        let driver = TestDriver {
            id: options.id.clone().unwrap_or_default(),
            job_type: options.job_type,
            script,
            knobs: knobs.clone(),
        };
        self.jobs.create(options, Arc::new(driver)).unwrap();
        knobs
    }

    fn events(&self) -> Vec<String> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }

    async fn pump_until(&mut self, done: impl Fn(&JobManager<Log>) -> bool) {
        let wait = async {
            while !done(&self.jobs) {
                let notice = self.notices.recv().await.unwrap();
                self.jobs.handle_notice(notice, &mut self.log);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("job did not reach the expected state");
    }

    async fn until_status(&mut self, id: &str, status: JobStatus) {
        let id = id.to_owned();
        self.pump_until(move |m| m.status(&id) == Some(status))
            .await;
    }

    async fn until_gone(&mut self, id: &str) {
        let id = id.to_owned();
        self.pump_until(move |m| m.status(&id).is_none()).await;
    }
}

fn backup(id: &str) -> JobOptions {
    JobOptions::new(id, JobType::Backup)
}

fn create_job(id: &str) -> JobOptions {
    JobOptions {
        auto_dismiss: false,
        ..JobOptions::new(id, JobType::Create)
    }
}

fn copy(len: u64) -> Script {
    Script {
        len,
        ..Script::default()
    }
}

fn mirror_script() -> Script {
    Script {
        len: 64,
        ready: true,
        completable: true,
        soft_cancel: true,
        ..Script::default()
    }
}

fn completed(id: &str, len: u64, offset: u64) -> String {
    format!(
        r#"BLOCK_JOB_COMPLETED {{"type":"backup","device":"{id}","len":{len},"offset":{offset},"speed":0}}"#
    )
}

fn cancelled(id: &str, len: u64, offset: u64) -> String {
    format!(
        r#"BLOCK_JOB_CANCELLED {{"type":"backup","device":"{id}","len":{len},"offset":{offset},"speed":0}}"#
    )
}

/// Starts a backup as QSD's transaction does: inside a drained section.
async fn start_drained(h: &mut Harness, id: &str) {
    h.jobs.pause_internal(id).unwrap();
    h.jobs.start(id).unwrap();
    h.jobs.resume_internal(id).unwrap();
    // RUNNING comes at once, before the worker ran; let it get into its body.
    assert_eq!(h.jobs.status(id), Some(JobStatus::Running));
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
    h.until_status(id, JobStatus::Running).await;
}

#[tokio::test]
async fn create_job_success_emits_sequence_h() {
    let mut h = Harness::new();
    let knobs = h.create(create_job("c1"), Script::default());
    h.jobs.start("c1").unwrap();
    knobs.finish.store(true, SeqCst);
    h.until_status("c1", JobStatus::Concluded).await;
    let info = h.jobs.query_jobs();
    h.jobs.dismiss("c1").unwrap();

    assert_eq!(
        h.events(),
        [
            "c1:created",
            "c1:running",
            "c1:waiting",
            "c1:pending",
            "c1:concluded",
            "c1:null"
        ]
    );
    assert_eq!(
        serde_json::to_value(&info).unwrap(),
        serde_json::json!([{"id": "c1", "type": "create", "status": "concluded",
            "current-progress": 1, "total-progress": 1}])
    );
    assert_eq!(h.log, ["prepare c1", "commit c1", "clean c1"]);
}

#[tokio::test]
async fn create_job_progress_starts_at_zero_of_zero() {
    let mut h = Harness::new();
    h.create(create_job("c1"), Script::default());
    h.jobs.start("c1").unwrap();
    h.until_status("c1", JobStatus::Running).await;

    let info = &h.jobs.query_jobs()[0];

    assert_eq!((info.current_progress, info.total_progress), (0, 0));
}

#[tokio::test]
async fn create_job_failure_emits_sequence_h_with_error() {
    let mut h = Harness::new();
    let text = "Cluster size must be a power of two between 512 and 2048k";
    let knobs = h.create(
        create_job("c1"),
        Script {
            fail: Some(text.into()),
            ..Script::default()
        },
    );
    h.jobs.start("c1").unwrap();
    knobs.finish.store(true, SeqCst);
    h.until_status("c1", JobStatus::Concluded).await;
    let info = h.jobs.query_jobs();
    h.jobs.dismiss("c1").unwrap();

    assert_eq!(
        h.events(),
        [
            "c1:created",
            "c1:running",
            "c1:aborting",
            "c1:concluded",
            "c1:null"
        ]
    );
    assert_eq!(info[0].error.as_deref(), Some(text));
    assert_eq!(h.log, ["abort c1", "clean c1"]);
}

#[tokio::test]
async fn backup_defaults_emit_sequence_a() {
    let mut h = Harness::new();
    let knobs = h.create(backup("j1"), copy(100));
    start_drained(&mut h, "j1").await;
    let started = h.events();
    knobs.finish.store(true, SeqCst);
    h.until_gone("j1").await;

    assert_eq!(
        started,
        ["j1:created", "j1:running", "j1:paused", "j1:running"]
    );
    assert_eq!(
        h.events(),
        [
            "j1:waiting".to_owned(),
            "j1:pending".to_owned(),
            completed("j1", 100, 100),
            "j1:concluded".to_owned(),
            "j1:null".to_owned()
        ]
    );
}

#[tokio::test]
async fn manual_finalize_and_dismiss_emit_sequence_b() {
    let mut h = Harness::new();
    let options = JobOptions {
        auto_finalize: false,
        auto_dismiss: false,
        ..backup("j1")
    };
    let knobs = h.create(options, copy(100));
    start_drained(&mut h, "j1").await;
    h.events();
    knobs.finish.store(true, SeqCst);
    h.until_status("j1", JobStatus::Pending).await;
    let finished = h.events();
    h.jobs.finalize("j1", &mut h.log).unwrap();
    let finalized = h.events();
    let info = h.jobs.query_jobs();
    h.jobs.dismiss("j1").unwrap();

    assert_eq!(
        finished,
        [
            "j1:waiting",
            "j1:pending",
            r#"BLOCK_JOB_PENDING {"type":"backup","id":"j1"}"#
        ]
    );
    assert_eq!(
        finalized,
        [completed("j1", 100, 100), "j1:concluded".to_owned()]
    );
    assert_eq!(info[0].error, None);
    assert_eq!(h.events(), ["j1:null"]);
}

#[tokio::test]
async fn cancel_running_backup_emits_sequence_c() {
    let mut h = Harness::new();
    h.create(backup("j1"), copy(100));
    start_drained(&mut h, "j1").await;
    h.events();
    h.jobs.cancel("j1", true, &mut h.log).unwrap();
    h.until_gone("j1").await;

    assert_eq!(
        h.events(),
        [
            "j1:aborting".to_owned(),
            cancelled("j1", 100, 0),
            "j1:concluded".to_owned(),
            "j1:null".to_owned()
        ]
    );
    assert_eq!(h.log, ["abort j1", "clean j1"]);
}

#[tokio::test]
async fn cancel_without_auto_dismiss_keeps_operation_canceled_error() {
    let mut h = Harness::new();
    let options = JobOptions {
        auto_dismiss: false,
        ..backup("j1")
    };
    h.create(options, copy(100));
    start_drained(&mut h, "j1").await;
    h.events();
    h.jobs.cancel("j1", true, &mut h.log).unwrap();
    h.until_status("j1", JobStatus::Concluded).await;
    let info = h.jobs.query_block_jobs();
    h.jobs.dismiss("j1").unwrap();

    assert_eq!(info[0].error.as_deref(), Some("Operation canceled"));
    assert_eq!(
        h.events(),
        [
            "j1:aborting".to_owned(),
            cancelled("j1", 100, 0),
            "j1:concluded".to_owned(),
            "j1:null".to_owned()
        ]
    );
}

#[tokio::test]
async fn io_error_with_report_fails_job_as_sequence_d() {
    let mut h = Harness::new();
    let knobs = h.create(backup("j1"), copy(100));
    start_drained(&mut h, "j1").await;
    h.events();
    knobs.io_error.store(true, SeqCst);
    h.until_gone("j1").await;

    assert_eq!(
        h.events(),
        [
            r#"BLOCK_JOB_ERROR {"device":"j1","operation":"write","action":"report"}"#.to_owned(),
            "j1:aborting".to_owned(),
            r#"BLOCK_JOB_COMPLETED {"type":"backup","device":"j1","len":100,"offset":0,"speed":0,"error":"Input/output error"}"#.to_owned(),
            "j1:concluded".to_owned(),
            "j1:null".to_owned()
        ]
    );
}

#[tokio::test]
async fn io_error_with_stop_pauses_until_resume() {
    let mut h = Harness::new();
    let script = Script {
        policy: OnError::Stop,
        ..copy(100)
    };
    let knobs = h.create(backup("j1"), script);
    start_drained(&mut h, "j1").await;
    h.events();
    knobs.io_error.store(true, SeqCst);
    h.until_status("j1", JobStatus::Paused).await;
    let stopped = h.events();
    let info = h.jobs.query_block_jobs();
    h.jobs.resume("j1").unwrap();
    h.until_status("j1", JobStatus::Running).await;
    let resumed = h.jobs.query_block_jobs();

    assert_eq!(
        stopped,
        [
            r#"BLOCK_JOB_ERROR {"device":"j1","operation":"write","action":"stop"}"#,
            "j1:paused"
        ]
    );
    assert!(info[0].paused);
    assert_eq!(info[0].io_status, IoStatus::Failed);
    assert_eq!(resumed[0].io_status, IoStatus::Ok);
    assert_eq!(h.events(), ["j1:running"]);
}

#[tokio::test]
async fn cancel_of_stopped_job_runs_then_aborts() {
    let mut h = Harness::new();
    let script = Script {
        policy: OnError::Stop,
        ..copy(100)
    };
    let knobs = h.create(backup("j1"), script);
    start_drained(&mut h, "j1").await;
    knobs.io_error.store(true, SeqCst);
    h.until_status("j1", JobStatus::Paused).await;
    h.events();
    h.jobs.cancel("j1", true, &mut h.log).unwrap();
    h.until_gone("j1").await;

    assert_eq!(
        h.events(),
        [
            "j1:running".to_owned(),
            "j1:aborting".to_owned(),
            cancelled("j1", 100, 0),
            "j1:concluded".to_owned(),
            "j1:null".to_owned()
        ]
    );
}

#[tokio::test]
async fn pause_and_resume_emit_sequence_f() {
    let mut h = Harness::new();
    let knobs = h.create(backup("j1"), copy(100));
    start_drained(&mut h, "j1").await;
    h.events();
    h.jobs.pause("j1").unwrap();
    h.until_status("j1", JobStatus::Paused).await;
    let info = h.jobs.query_block_jobs();
    h.jobs.resume("j1").unwrap();
    h.until_status("j1", JobStatus::Running).await;
    let resumed = h.events();
    knobs.finish.store(true, SeqCst);
    h.until_gone("j1").await;

    assert!(info[0].paused);
    assert_eq!(info[0].status, JobStatus::Paused);
    assert_eq!(resumed, ["j1:paused", "j1:running"]);
    assert_eq!(h.events().last().map(String::as_str), Some("j1:null"));
}

#[tokio::test]
async fn pause_of_ready_job_goes_standby_without_second_ready_event() {
    let mut h = Harness::new();
    h.create(JobOptions::new("m1", JobType::Mirror), mirror_script());
    h.jobs.start("m1").unwrap();
    h.until_status("m1", JobStatus::Ready).await;
    let ready = h.events();
    h.jobs.pause("m1").unwrap();
    h.until_status("m1", JobStatus::Standby).await;
    h.jobs.resume("m1").unwrap();
    h.until_status("m1", JobStatus::Ready).await;

    assert_eq!(
        ready,
        [
            "m1:created",
            "m1:running",
            "m1:ready",
            r#"BLOCK_JOB_READY {"type":"mirror","device":"m1","len":64,"offset":64,"speed":0}"#
        ]
    );
    assert_eq!(h.events(), ["m1:standby", "m1:ready"]);
}

#[tokio::test]
async fn complete_of_ready_job_finishes_it() {
    let mut h = Harness::new();
    h.create(JobOptions::new("m1", JobType::Mirror), mirror_script());
    h.jobs.start("m1").unwrap();
    h.until_status("m1", JobStatus::Ready).await;
    h.events();
    h.jobs.complete("m1", &mut h.log).unwrap();
    h.until_gone("m1").await;

    assert_eq!(
        h.events(),
        [
            "m1:waiting",
            "m1:pending",
            r#"BLOCK_JOB_COMPLETED {"type":"mirror","device":"m1","len":64,"offset":64,"speed":0}"#,
            "m1:concluded",
            "m1:null"
        ]
    );
    assert_eq!(
        h.log,
        ["complete m1", "prepare m1", "commit m1", "clean m1"]
    );
}

#[tokio::test]
async fn soft_cancel_of_ready_mirror_completes_without_error() {
    let mut h = Harness::new();
    h.create(JobOptions::new("m1", JobType::Mirror), mirror_script());
    h.jobs.start("m1").unwrap();
    h.until_status("m1", JobStatus::Ready).await;
    h.events();
    h.jobs.cancel("m1", false, &mut h.log).unwrap();
    h.until_gone("m1").await;

    assert_eq!(
        h.events(),
        [
            "m1:waiting",
            "m1:pending",
            r#"BLOCK_JOB_COMPLETED {"type":"mirror","device":"m1","len":64,"offset":64,"speed":0}"#,
            "m1:concluded",
            "m1:null"
        ]
    );
}

#[tokio::test]
async fn force_cancel_of_ready_mirror_is_cancelled() {
    let mut h = Harness::new();
    h.create(JobOptions::new("m1", JobType::Mirror), mirror_script());
    h.jobs.start("m1").unwrap();
    h.until_status("m1", JobStatus::Ready).await;
    h.events();
    h.jobs.cancel("m1", true, &mut h.log).unwrap();
    h.until_gone("m1").await;

    assert_eq!(
        h.events(),
        [
            "m1:aborting",
            r#"BLOCK_JOB_CANCELLED {"type":"mirror","device":"m1","len":64,"offset":64,"speed":0}"#,
            "m1:concluded",
            "m1:null"
        ]
    );
}

/// Two backups in one grouped transaction, g1 created first, g2 started first.
async fn grouped(h: &mut Harness) -> (Arc<Knobs>, Arc<Knobs>) {
    let txn = h.jobs.new_txn();
    let g1 = h.create(
        JobOptions {
            txn: Some(txn),
            ..backup("g1")
        },
        copy(10),
    );
    let g2 = h.create(
        JobOptions {
            txn: Some(txn),
            ..backup("g2")
        },
        copy(20),
    );
    start_drained(h, "g2").await;
    start_drained(h, "g1").await;
    h.events();
    (g1, g2)
}

#[tokio::test]
async fn grouped_success_emits_sequence_g() {
    let mut h = Harness::new();
    let (g1, g2) = grouped(&mut h).await;
    g1.finish.store(true, SeqCst);
    h.until_status("g1", JobStatus::Waiting).await;
    g2.finish.store(true, SeqCst);
    h.until_gone("g1").await;

    assert_eq!(
        h.events(),
        [
            "g1:waiting".to_owned(),
            "g2:waiting".to_owned(),
            "g2:pending".to_owned(),
            "g1:pending".to_owned(),
            completed("g2", 20, 20),
            "g2:concluded".to_owned(),
            "g2:null".to_owned(),
            completed("g1", 10, 10),
            "g1:concluded".to_owned(),
            "g1:null".to_owned()
        ]
    );
}

#[tokio::test]
async fn grouped_failure_cancels_the_other_member() {
    let mut h = Harness::new();
    let (_g1, g2) = grouped(&mut h).await;
    g2.io_error.store(true, SeqCst);
    h.until_gone("g1").await;

    assert_eq!(
        h.events(),
        [
            r#"BLOCK_JOB_ERROR {"device":"g2","operation":"write","action":"report"}"#.to_owned(),
            "g2:aborting".to_owned(),
            "g1:aborting".to_owned(),
            r#"BLOCK_JOB_COMPLETED {"type":"backup","device":"g2","len":20,"offset":0,"speed":0,"error":"Input/output error"}"#.to_owned(),
            "g2:concluded".to_owned(),
            "g2:null".to_owned(),
            cancelled("g1", 10, 0),
            "g1:concluded".to_owned(),
            "g1:null".to_owned()
        ]
    );
}

#[tokio::test]
async fn grouped_cancel_cancels_both_members() {
    let mut h = Harness::new();
    grouped(&mut h).await;
    h.jobs.cancel("g1", true, &mut h.log).unwrap();
    h.until_gone("g2").await;
    h.until_gone("g1").await;

    assert_eq!(
        h.events(),
        [
            "g1:aborting".to_owned(),
            "g2:aborting".to_owned(),
            cancelled("g2", 20, 0),
            "g2:concluded".to_owned(),
            "g2:null".to_owned(),
            cancelled("g1", 10, 0),
            "g1:concluded".to_owned(),
            "g1:null".to_owned()
        ]
    );
}

#[tokio::test]
async fn cancel_of_waiting_member_aborts_the_group() {
    let mut h = Harness::new();
    let (g1, _g2) = grouped(&mut h).await;
    g1.finish.store(true, SeqCst);
    h.until_status("g1", JobStatus::Waiting).await;
    h.events();
    h.jobs.cancel("g1", true, &mut h.log).unwrap();
    h.until_gone("g1").await;

    assert_eq!(
        h.events(),
        [
            "g2:aborting".to_owned(),
            cancelled("g2", 20, 0),
            "g2:concluded".to_owned(),
            "g2:null".to_owned(),
            "g1:aborting".to_owned(),
            cancelled("g1", 10, 10),
            "g1:concluded".to_owned(),
            "g1:null".to_owned()
        ]
    );
}

#[tokio::test]
async fn failed_prepare_aborts_the_transaction() {
    let mut h = Harness::new();
    let script = Script {
        prepare_error: Some("Conflicts with use by someone".into()),
        ..copy(8)
    };
    let knobs = h.create(backup("j1"), script);
    start_drained(&mut h, "j1").await;
    h.events();
    knobs.finish.store(true, SeqCst);
    h.until_gone("j1").await;

    assert_eq!(
        h.events(),
        [
            "j1:waiting".to_owned(),
            "j1:pending".to_owned(),
            "j1:aborting".to_owned(),
            r#"BLOCK_JOB_COMPLETED {"type":"backup","device":"j1","len":8,"offset":8,"speed":0,"error":"Conflicts with use by someone"}"#.to_owned(),
            "j1:concluded".to_owned(),
            "j1:null".to_owned()
        ]
    );
    assert_eq!(h.log, ["prepare j1", "abort j1", "clean j1"]);
}

#[tokio::test]
async fn cancel_of_never_started_job_goes_created_aborting_concluded_null() {
    let mut h = Harness::new();
    h.create(backup("j1"), copy(100));
    h.jobs.cancel("j1", true, &mut h.log).unwrap();

    assert_eq!(
        h.events(),
        ["j1:created", "j1:aborting", "j1:concluded", "j1:null"]
    );
    assert!(h.jobs.is_empty());
    assert_eq!(h.log, ["abort j1", "clean j1"]);
}

#[tokio::test]
async fn discard_of_created_job_goes_straight_to_null() {
    let mut h = Harness::new();
    h.create(backup("j1"), copy(1));
    h.jobs.discard("j1").unwrap();

    assert_eq!(h.events(), ["j1:created", "j1:null"]);
    assert!(h.log.is_empty());
}

#[tokio::test]
async fn negative_speed_at_creation_fails_after_created() {
    let mut h = Harness::new();
    let options = JobOptions {
        speed: -1,
        ..backup("j1")
    };
    let driver = TestDriver {
        id: "j1".into(),
        job_type: JobType::Backup,
        script: copy(1),
        knobs: Arc::default(),
    };
    let err = h.jobs.create(options, Arc::new(driver)).unwrap_err();

    assert_eq!(
        err.to_string(),
        "Parameter 'speed' expects a non-negative value"
    );
    assert_eq!(h.events(), ["j1:created", "j1:null"]);
}

#[tokio::test]
async fn dismiss_of_pending_job_is_rejected_by_verb_table() {
    let mut h = Harness::new();
    let options = JobOptions {
        auto_finalize: false,
        ..backup("j2")
    };
    let knobs = h.create(options, copy(1));
    h.jobs.start("j2").unwrap();
    knobs.finish.store(true, SeqCst);
    h.until_status("j2", JobStatus::Pending).await;

    let err = h.jobs.dismiss("j2").unwrap_err();

    assert_eq!(
        err.to_string(),
        "Job 'j2' in state 'pending' cannot accept command verb 'dismiss'"
    );
}

#[tokio::test]
async fn resume_of_unpaused_pending_job_says_not_paused() {
    let mut h = Harness::new();
    let options = JobOptions {
        auto_finalize: false,
        ..backup("j2")
    };
    let knobs = h.create(options, copy(1));
    h.jobs.start("j2").unwrap();
    knobs.finish.store(true, SeqCst);
    h.until_status("j2", JobStatus::Pending).await;

    let err = h.jobs.resume("j2").unwrap_err();

    assert_eq!(err.to_string(), "Can't resume a job that was not paused");
}

#[tokio::test]
async fn second_pause_says_already_paused() {
    let mut h = Harness::new();
    h.create(backup("j1"), copy(1));
    h.jobs.pause("j1").unwrap();

    let err = h.jobs.pause("j1").unwrap_err();

    assert_eq!(err.to_string(), "Job is already paused");
}

#[tokio::test]
async fn user_pause_before_start_pauses_at_first_pause_point() {
    let mut h = Harness::new();
    h.create(backup("j1"), copy(1));
    h.jobs.pause("j1").unwrap();
    h.jobs.start("j1").unwrap();

    assert_eq!(h.events(), ["j1:created", "j1:running", "j1:paused"]);
    assert_eq!(h.jobs.status("j1"), Some(JobStatus::Paused));
}

#[tokio::test]
async fn complete_of_running_job_is_rejected_by_verb_table() {
    let mut h = Harness::new();
    h.create(backup("j1"), copy(1));
    h.jobs.start("j1").unwrap();

    let err = h.jobs.complete("j1", &mut h.log).unwrap_err();

    assert_eq!(
        err.to_string(),
        "Job 'j1' in state 'running' cannot accept command verb 'complete'"
    );
}

#[tokio::test]
async fn complete_of_ready_job_without_completion_cannot_be_completed() {
    let mut h = Harness::new();
    let script = Script {
        completable: false,
        ..mirror_script()
    };
    h.create(JobOptions::new("j1", JobType::Commit), script);
    h.jobs.start("j1").unwrap();
    h.until_status("j1", JobStatus::Ready).await;

    let err = h.jobs.complete("j1", &mut h.log).unwrap_err();

    assert_eq!(
        err.to_string(),
        "The active block job 'j1' cannot be completed"
    );
}

#[tokio::test]
async fn soft_cancel_of_user_paused_job_is_refused() {
    let mut h = Harness::new();
    h.create(backup("j1"), copy(1));
    h.jobs.pause("j1").unwrap();

    let err = h.jobs.cancel("j1", false, &mut h.log).unwrap_err();

    assert_eq!(
        err.to_string(),
        "The block job for device 'j1' is currently paused"
    );
}

#[tokio::test]
async fn duplicate_id_is_in_use() {
    let mut h = Harness::new();
    h.create(backup("j1"), copy(1));
    let driver = TestDriver {
        id: "j1".into(),
        job_type: JobType::Backup,
        script: copy(1),
        knobs: Arc::default(),
    };

    let err = h.jobs.create(backup("j1"), Arc::new(driver)).unwrap_err();

    assert_eq!(err.to_string(), "Job ID 'j1' already in use");
}

#[tokio::test]
async fn unknown_id_is_job_not_found() {
    let mut h = Harness::new();

    let err = h.jobs.pause("nope").unwrap_err();

    assert_eq!(err.to_string(), "Job not found");
}

#[tokio::test]
async fn negative_set_speed_is_rejected() {
    let mut h = Harness::new();
    h.create(backup("j1"), copy(1));

    let err = h.jobs.set_speed("j1", -5).unwrap_err();

    assert_eq!(
        err.to_string(),
        "Parameter 'speed' expects a non-negative value"
    );
}

#[tokio::test]
async fn set_speed_shows_in_query_block_jobs() {
    let mut h = Harness::new();
    h.create(backup("j1"), copy(1));
    h.jobs.set_speed("j1", 65536).unwrap();

    let info = serde_json::to_value(h.jobs.query_block_jobs()).unwrap();

    assert_eq!(
        info,
        serde_json::json!([{"type": "backup", "device": "j1", "len": 0, "offset": 0,
            "busy": false, "paused": true, "speed": 65536, "io-status": "ok", "ready": false,
            "status": "created", "auto-finalize": true, "auto-dismiss": true}])
    );
}

#[tokio::test]
async fn non_block_jobs_are_not_block_jobs() {
    let mut h = Harness::new();
    h.create(create_job("c1"), Script::default());

    assert!(h.jobs.query_block_jobs().is_empty());
    assert_eq!(
        h.jobs.check_block_job("c1").unwrap_err().to_string(),
        "Block job 'c1' not found"
    );
}

#[tokio::test]
async fn queries_list_newest_first() {
    let mut h = Harness::new();
    h.create(backup("a"), copy(1));
    h.create(backup("b"), copy(1));

    let ids: Vec<String> = h.jobs.query_jobs().into_iter().map(|j| j.id).collect();

    assert_eq!(ids, ["b", "a"]);
}

#[tokio::test]
async fn shutdown_cancels_and_dismisses_every_job() {
    let mut h = Harness::new();
    h.create(backup("run"), copy(5));
    h.jobs.start("run").unwrap();
    let knobs = h.create(create_job("done"), Script::default());
    h.jobs.start("done").unwrap();
    knobs.finish.store(true, SeqCst);
    h.until_status("done", JobStatus::Concluded).await;
    h.create(backup("new"), copy(5));
    h.events();

    let shutdown = h.jobs.shutdown(&mut h.notices, &mut h.log);
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .unwrap();

    assert!(h.jobs.is_empty());
    assert_eq!(
        h.events(),
        [
            // Shutdown drains first: the running block job pauses, then the cancel wakes it.
            "run:paused".to_owned(),
            "new:aborting".to_owned(),
            "new:concluded".to_owned(),
            "new:null".to_owned(),
            "done:null".to_owned(),
            "run:running".to_owned(),
            "run:aborting".to_owned(),
            cancelled("run", 5, 0),
            "run:concluded".to_owned(),
            "run:null".to_owned()
        ]
    );
}

/// A worker that spends `bytes` of its rate budget, then waits for it.
struct RateDriver {
    bytes: u64,
}

#[async_trait::async_trait]
impl JobDriver<Log> for RateDriver {
    fn job_type(&self) -> JobType {
        JobType::Stream
    }

    async fn run(&self, ctx: JobContext) -> Result<(), String> {
        ctx.rate_limit(self.bytes).await?;
        Ok(())
    }
}

fn rate_job(h: &mut Harness, speed: i64, bytes: u64) {
    let options = JobOptions {
        speed,
        ..JobOptions::new("r1", JobType::Stream)
    };
    h.jobs
        .create(options, Arc::new(RateDriver { bytes }))
        .unwrap();
}

#[tokio::test]
async fn rate_limited_worker_waits_for_its_budget() {
    let mut h = Harness::new();
    rate_job(&mut h, 1_000_000, 300_000);
    let began = std::time::Instant::now();
    h.jobs.start("r1").unwrap();
    h.until_gone("r1").await;

    assert!(began.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn lifting_the_speed_limit_wakes_a_throttled_worker() {
    let mut h = Harness::new();
    rate_job(&mut h, 1000, 1_000_000);
    h.jobs.start("r1").unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    h.jobs.set_speed("r1", 0).unwrap();
    h.until_gone("r1").await;

    assert_eq!(h.events().last().map(String::as_str), Some("r1:null"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_failure_on_multi_thread_runtime_cancels_the_other_member() {
    let mut h = Harness::new();
    let (_g1, g2) = grouped(&mut h).await;
    g2.io_error.store(true, SeqCst);
    h.until_gone("g1").await;

    let events = h.events();

    assert_eq!(events[1..3], ["g2:aborting", "g1:aborting"]);
    assert_eq!(events.last().map(String::as_str), Some("g1:null"));
}

#[tokio::test]
async fn concluded_block_job_is_not_busy() {
    let mut h = Harness::new();
    let options = JobOptions {
        auto_dismiss: false,
        ..backup("j1")
    };
    h.create(options, copy(4));
    h.jobs.start("j1").unwrap();
    h.jobs.cancel("j1", true, &mut h.log).unwrap();
    h.until_status("j1", JobStatus::Concluded).await;

    let info = &h.jobs.query_block_jobs()[0];

    assert!(!info.busy);
    assert!(!info.paused);
}

#[tokio::test]
async fn io_error_with_ignore_reports_and_keeps_running() {
    let mut h = Harness::new();
    let script = Script {
        policy: OnError::Ignore,
        ..copy(3)
    };
    let knobs = h.create(backup("j1"), script);
    h.jobs.start("j1").unwrap();
    h.events();
    knobs.io_error.store(true, SeqCst);
    knobs.finish.store(true, SeqCst);
    h.until_gone("j1").await;

    assert_eq!(
        h.events(),
        [
            r#"BLOCK_JOB_ERROR {"device":"j1","operation":"write","action":"ignore"}"#.to_owned(),
            "j1:waiting".to_owned(),
            "j1:pending".to_owned(),
            completed("j1", 3, 3),
            "j1:concluded".to_owned(),
            "j1:null".to_owned()
        ]
    );
}
