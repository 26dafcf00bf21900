//! Scenario files: a daemon command line plus a list of QMP steps, replayed
//! against two daemons whose normalized transcripts must match.
//!
//! The format is described in `tests/scenarios/README.md`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::daemon::{find_tool, start_retrying, Daemon, Session};
use crate::qmp::{is_timeout, Qmp};

/// Placeholder for the daemon's working directory in scenario files and in
/// normalized transcripts.
pub const DIR_VAR: &str = "$DIR";

const MASKED: &str = "<masked>";

/// One parsed scenario file.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub setup: Vec<Value>,
    pub args: Vec<String>,
    pub negotiate: bool,
    pub greeting_mask: Vec<String>,
    pub settle: Duration,
    pub reply_timeout: Duration,
    pub steps: Vec<Value>,
    /// The oracle: qemu-storage-daemon, or QEMU's system emulator for what QSD lacks.
    pub reference: Reference,
}

/// Which QEMU program a scenario's reference transcript comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// `qemu-storage-daemon` (the default).
    StorageDaemon,
    /// `qemu-system-x86_64 -machine none` (`"reference": "qemu-system"`).
    SystemEmulator,
}

impl Reference {
    /// The reference program's path.
    pub fn binary(self) -> PathBuf {
        match self {
            Reference::StorageDaemon => crate::qsd_path(),
            Reference::SystemEmulator => crate::daemon::qemu_system_path(),
        }
    }
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .context("scenario file name")?
            .to_string();
        Self::from_value(name, &value).with_context(|| format!("in {}", path.display()))
    }

    /// Builds a scenario from its JSON form.
    pub fn from_value(name: String, value: &Value) -> Result<Self> {
        let obj = value.as_object().context("a scenario is a JSON object")?;
        for key in obj.keys() {
            ensure!(
                [
                    "description",
                    "setup",
                    "args",
                    "negotiate",
                    "greeting_mask",
                    "settle_ms",
                    "reply_timeout_ms",
                    "steps",
                    "reference"
                ]
                .contains(&key.as_str()),
                "unknown scenario key {key:?}"
            );
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            match obj.get(key) {
                None => Ok(Vec::new()),
                Some(v) => v
                    .as_array()
                    .with_context(|| format!("{key} is a list of strings"))?
                    .iter()
                    .map(|s| {
                        s.as_str()
                            .map(str::to_string)
                            .with_context(|| format!("{key} is a list of strings"))
                    })
                    .collect(),
            }
        };
        let millis = |key: &str, default: u64| -> Result<Duration> {
            Ok(Duration::from_millis(match obj.get(key) {
                None => default,
                Some(v) => v.as_u64().with_context(|| format!("{key} is an integer"))?,
            }))
        };
        let steps = obj
            .get("steps")
            .and_then(Value::as_array)
            .context("steps is a list")?
            .clone();
        for (i, step) in steps.iter().enumerate() {
            check_step(step).with_context(|| format!("step {i}: {step}"))?;
        }
        Ok(Self {
            name,
            description: obj
                .get("description")
                .and_then(Value::as_str)
                .context("description is a string")?
                .to_string(),
            setup: obj
                .get("setup")
                .map(|v| v.as_array().cloned().context("setup is a list"))
                .transpose()?
                .unwrap_or_default(),
            args: strings("args")?,
            negotiate: obj
                .get("negotiate")
                .map(|v| v.as_bool().context("negotiate is a boolean"))
                .transpose()?
                .unwrap_or(true),
            greeting_mask: if obj.contains_key("greeting_mask") {
                strings("greeting_mask")?
            } else {
                vec!["/QMP/version/package".to_string()]
            },
            settle: millis("settle_ms", 20)?,
            reply_timeout: millis("reply_timeout_ms", 10_000)?,
            steps,
            reference: match obj.get("reference").map(|v| v.as_str()) {
                None | Some(Some("qemu-storage-daemon")) => Reference::StorageDaemon,
                Some(Some("qemu-system")) => Reference::SystemEmulator,
                Some(_) => bail!("reference is \"qemu-storage-daemon\" or \"qemu-system\""),
            },
        })
    }
}

fn check_step(step: &Value) -> Result<()> {
    let obj = step.as_object().context("a step is an object")?;
    let kinds = [
        "send",
        "send_raw",
        "wait_events",
        "quiesce_ms",
        "expect_exit",
    ];
    let present: Vec<&str> = kinds
        .iter()
        .copied()
        .filter(|k| obj.contains_key(*k))
        .collect();
    ensure!(
        present.len() == 1,
        "a step has exactly one of {kinds:?}, found {present:?}"
    );
    for key in obj.keys() {
        ensure!(
            kinds.contains(&key.as_str())
                || [
                    "replies",
                    "mask",
                    "mask_desc",
                    "sort",
                    "settle_ms",
                    "timeout_ms",
                    "comment"
                ]
                .contains(&key.as_str()),
            "unknown step key {key:?}"
        );
    }
    if let Some(raw) = obj.get("send_raw") {
        ensure!(raw.is_string(), "send_raw is a string");
    }
    if let Some(events) = obj.get("wait_events") {
        let events = events.as_array().context("wait_events is a list")?;
        for e in events {
            ensure!(
                e.is_string() || e.get("event").is_some_and(Value::is_string),
                "wait_events items are names or {{\"event\": name, \"data\": {{..}}}}"
            );
        }
    }
    Ok(())
}

/// What one daemon did in one group of steps: a `send`/`send_raw` step and
/// the `wait_events`/`quiesce_ms`/`expect_exit` steps after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Index of the step that opened the group (`None` for greeting,
    /// negotiation and the final drain).
    pub step: Option<usize>,
    pub label: String,
    pub replies: Vec<Value>,
    pub events: Vec<Value>,
    /// Timeouts, closed connection, exit status.
    pub notes: Vec<String>,
}

impl Group {
    fn new(step: Option<usize>, label: String) -> Self {
        Self {
            step,
            label,
            replies: Vec::new(),
            events: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn observed(&self) -> Value {
        json!({ "replies": self.replies, "events": self.events, "notes": self.notes })
    }
}

/// A normalized transcript of one run.
#[derive(Debug, Clone)]
pub struct Transcript {
    pub binary: PathBuf,
    pub groups: Vec<Group>,
    /// Lines that did not end in `"\r\n"`.
    pub bad_line_endings: Vec<String>,
    pub stderr: String,
}

impl Transcript {
    /// Whether some request went unanswered within the reply timeout.
    pub fn has_unanswered_request(&self) -> bool {
        self.groups
            .iter()
            .any(|g| g.notes.iter().any(|n| n.starts_with("no reply within")))
    }
}

struct Runner<'a> {
    scenario: &'a Scenario,
    dir: String,
    qmp: Qmp,
    daemon: Daemon,
    closed: bool,
    bad_line_endings: Vec<String>,
}

/// Replays `scenario` against `binary` in a fresh temporary directory.
pub fn run(scenario: &Scenario, binary: &Path) -> Result<Transcript> {
    run_on(scenario, binary, false)
}

/// [`run`]; a `reference` daemon is started with [`start_retrying`], so
/// that the replay begins on a monitor known to be served.
fn run_on(scenario: &Scenario, binary: &Path, reference: bool) -> Result<Transcript> {
    let tempdir = tempfile::Builder::new()
        .prefix("scenario-")
        .tempdir()
        .context("cannot create temporary directory")?;
    let dir = tempdir
        .path()
        .to_str()
        .context("non-UTF-8 temporary directory")?
        .to_string();
    for (i, item) in scenario.setup.iter().enumerate() {
        run_setup(item, &dir).with_context(|| format!("setup item {i}: {item}"))?;
    }
    let args: Vec<String> = scenario
        .args
        .iter()
        .map(|a| a.replace(DIR_VAR, &dir))
        .collect();
    let (daemon, mut qmp) = if reference {
        // The probe is refused in negotiation mode and changes nothing.
        start_retrying(
            binary,
            Some(tempdir.path()),
            &args,
            Session::Negotiating,
            |_| Ok(()),
        )?
    } else {
        let mut daemon = Daemon::start_in(binary, tempdir.path(), &args)?;
        let qmp = daemon.connect()?;
        (daemon, qmp)
    };
    qmp.set_timeout(scenario.reply_timeout);
    let mut runner = Runner {
        scenario,
        dir,
        qmp,
        daemon,
        closed: false,
        bad_line_endings: Vec::new(),
    };
    let mut groups = Vec::new();
    let mut greeting = Group::new(None, "greeting".into());
    let mut value = runner.qmp.greeting().clone();
    for pointer in &scenario.greeting_mask {
        mask_pointer(&mut value, pointer);
    }
    greeting.replies.push(value);
    groups.push(greeting);
    if scenario.negotiate {
        let mut group = Group::new(None, r#"{"execute": "qmp_capabilities"}"#.into());
        runner.send(
            &mut group,
            br#"{"execute": "qmp_capabilities"}"#,
            1,
            &Value::Null,
        )?;
        groups.push(group);
    }
    for (i, step) in scenario.steps.iter().enumerate() {
        let opens_group = step.get("send").is_some() || step.get("send_raw").is_some();
        if opens_group || groups.is_empty() {
            groups.push(Group::new(Some(i), step_label(step)));
        }
        let group = groups.last_mut().expect("a group exists");
        runner.step(group, step)?;
    }
    let mut drain = Group::new(None, "final drain".into());
    runner.quiesce(&mut drain, Duration::from_millis(100), &Value::Null)?;
    groups.push(drain);
    let stderr = runner.daemon.stderr().replace(&runner.dir, DIR_VAR);
    runner.daemon.kill();
    Ok(Transcript {
        binary: binary.to_path_buf(),
        groups,
        bad_line_endings: runner.bad_line_endings,
        stderr,
    })
}

fn step_label(step: &Value) -> String {
    let mut step = step.clone();
    if let Some(obj) = step.as_object_mut() {
        obj.remove("comment");
    }
    step.to_string()
}

fn run_setup(item: &Value, dir: &str) -> Result<()> {
    if let Some(argv) = item.get("run") {
        let argv: Vec<String> = argv
            .as_array()
            .context("run is a list of strings")?
            .iter()
            .map(|a| a.as_str().map(|s| s.replace(DIR_VAR, dir)))
            .collect::<Option<_>>()
            .context("run is a list of strings")?;
        let (program, rest) = argv.split_first().context("run is empty")?;
        let package = if program.starts_with("qemu-") {
            "qemu-utils"
        } else {
            "coreutils"
        };
        let path = find_tool(program, package);
        let output = Command::new(path)
            .args(rest)
            .current_dir(dir)
            .output()
            .with_context(|| format!("cannot run {program}"))?;
        ensure!(
            output.status.success(),
            "{argv:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        return Ok(());
    }
    if let Some(name) = item.get("write").and_then(Value::as_str) {
        let content = item
            .get("content")
            .and_then(Value::as_str)
            .context("write needs content")?;
        std::fs::write(Path::new(dir).join(name), content.replace(DIR_VAR, dir))
            .with_context(|| format!("cannot write {name}"))?;
        return Ok(());
    }
    bail!("a setup item is {{\"run\": [..]}} or {{\"write\": name, \"content\": text}}")
}

impl Runner<'_> {
    fn step(&mut self, group: &mut Group, step: &Value) -> Result<()> {
        let settle = step
            .get("settle_ms")
            .and_then(Value::as_u64)
            .map(Duration::from_millis)
            .unwrap_or(self.scenario.settle);
        if let Some(request) = step.get("send") {
            let text = serde_json::to_string(request)?.replace(DIR_VAR, &self.dir);
            self.send(group, text.as_bytes(), 1, step)?;
            self.quiesce(group, settle, step)?;
        } else if let Some(raw) = step.get("send_raw").and_then(Value::as_str) {
            let count = step.get("replies").and_then(Value::as_u64).unwrap_or(1);
            let text = raw.replace(DIR_VAR, &self.dir);
            self.send(group, text.as_bytes(), count, step)?;
            self.quiesce(group, settle, step)?;
        } else if let Some(specs) = step.get("wait_events").and_then(Value::as_array) {
            let timeout = step
                .get("timeout_ms")
                .and_then(Value::as_u64)
                .map_or(Duration::from_secs(10), Duration::from_millis);
            self.wait_events(group, specs, timeout, step)?;
        } else if let Some(ms) = step.get("quiesce_ms").and_then(Value::as_u64) {
            self.quiesce(group, Duration::from_millis(ms), step)?;
        } else if step.get("expect_exit").is_some() {
            self.quiesce(group, Duration::from_millis(50), step)?;
            match self.daemon.wait_exit(Duration::from_secs(10)) {
                Ok(status) => group
                    .notes
                    .push(format!("exit status: {:?}", status.code())),
                Err(err) => group.notes.push(format!("{err:#}")),
            }
        }
        Ok(())
    }

    fn send(&mut self, group: &mut Group, bytes: &[u8], replies: u64, step: &Value) -> Result<()> {
        if self.closed {
            group.notes.push("not sent: connection closed".into());
            return Ok(());
        }
        if let Err(err) = self.qmp.send_raw(bytes) {
            group.notes.push(format!("send failed: {err:#}"));
            return Ok(());
        }
        let mut got = 0;
        while got < replies {
            match self.read(self.scenario.reply_timeout)? {
                Some(msg) => {
                    if self.record(group, msg, step) {
                        got += 1;
                    }
                }
                None => {
                    group
                        .notes
                        .push(format!("no reply within {:?}", self.scenario.reply_timeout));
                    // A daemon that stopped answering will not answer the next
                    // steps either: stop here instead of timing out on each one.
                    self.closed = true;
                    break;
                }
            }
            if self.closed {
                break;
            }
        }
        Ok(())
    }

    /// Reads until no message arrives for `quiet`.
    fn quiesce(&mut self, group: &mut Group, quiet: Duration, step: &Value) -> Result<()> {
        while !self.closed && !quiet.is_zero() {
            match self.read(quiet)? {
                Some(msg) => {
                    self.record(group, msg, step);
                }
                None => break,
            }
        }
        Ok(())
    }

    fn wait_events(
        &mut self,
        group: &mut Group,
        specs: &[Value],
        timeout: Duration,
        step: &Value,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = first_unmatched(specs, &group.events);
            let Some(missing) = missing else {
                return Ok(());
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if self.closed || left.is_zero() {
                group.notes.push(format!(
                    "wait_events: {} did not arrive within {timeout:?}",
                    specs[missing]
                ));
                return Ok(());
            }
            if let Some(msg) = self.read(left)? {
                self.record(group, msg, step);
            }
        }
    }

    /// One message, `None` on timeout; end of stream sets `closed` and is
    /// noted by the caller's next `record`.
    fn read(&mut self, timeout: Duration) -> Result<Option<Value>> {
        match self.qmp.read_raw_timeout(timeout) {
            Ok(Some(msg)) => {
                if !msg.has_crlf() {
                    self.bad_line_endings.push(msg.line.clone());
                }
                Ok(Some(msg.value))
            }
            Ok(None) => {
                self.closed = true;
                Ok(Some(json!({ "<connection closed>": true })))
            }
            Err(err) if is_timeout(&err) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Normalizes and files a message; returns whether it was a reply.
    fn record(&mut self, group: &mut Group, mut msg: Value, step: &Value) -> bool {
        if msg.get("<connection closed>").is_some() {
            group.notes.push("connection closed".into());
            return false;
        }
        normalize(&mut msg, &self.dir, step);
        if msg.get("event").is_some() {
            group.events.push(msg);
            false
        } else {
            group.replies.push(msg);
            true
        }
    }
}

fn first_unmatched(specs: &[Value], events: &[Value]) -> Option<usize> {
    let mut next = 0;
    for (i, spec) in specs.iter().enumerate() {
        let found = events[next..].iter().position(|e| event_matches(spec, e));
        match found {
            Some(pos) => next += pos + 1,
            None => return Some(i),
        }
    }
    None
}

fn event_matches(spec: &Value, event: &Value) -> bool {
    match spec {
        Value::String(name) => event["event"] == *name,
        _ => {
            event["event"] == spec["event"]
                && spec
                    .get("data")
                    .is_none_or(|data| is_subset(data, &event["data"]))
        }
    }
}

fn is_subset(want: &Value, have: &Value) -> bool {
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w
            .iter()
            .all(|(k, v)| h.get(k).is_some_and(|hv| is_subset(v, hv))),
        _ => want == have,
    }
}

/// Masks timestamps, the working directory and whatever the step asks for.
fn normalize(msg: &mut Value, dir: &str, step: &Value) {
    if let Some(ts) = msg.get_mut("timestamp") {
        let well_formed = ts.get("seconds").is_some_and(Value::is_i64)
            && ts.get("microseconds").is_some_and(Value::is_i64)
            && ts.as_object().is_some_and(|o| o.len() == 2);
        if well_formed {
            *ts = Value::String("<timestamp>".into());
        }
    }
    replace_dir(msg, dir);
    if step.get("mask_desc").and_then(Value::as_bool) == Some(true) {
        mask_pointer(msg, "/error/desc");
    }
    for pointer in step
        .get("mask")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        mask_pointer(msg, pointer);
    }
    for pointer in step
        .get("sort")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        sort_pointer(msg, pointer);
    }
}

fn replace_dir(value: &mut Value, dir: &str) {
    match value {
        Value::String(s) => {
            if s.contains(dir) {
                *s = s.replace(dir, DIR_VAR);
            }
            if s.contains(AUTO_NODE_PREFIX) {
                *s = mask_auto_node_names(s);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| replace_dir(v, dir)),
        Value::Object(map) => map.values_mut().for_each(|v| replace_dir(v, dir)),
        _ => {}
    }
}

const AUTO_NODE_PREFIX: &str = "#block";

/// QEMU names anonymous nodes `#block` + a counter + two random
/// digits; the random digits are replaced by `??`.
fn mask_auto_node_names(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find(AUTO_NODE_PREFIX) {
        let (head, tail) = rest.split_at(pos + AUTO_NODE_PREFIX.len());
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        if digits >= 3 {
            out.push_str(&tail[..digits - 2]);
            out.push_str("??");
        } else {
            out.push_str(&tail[..digits]);
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

/// Applies `f` to every value addressed by a JSON pointer in which `*`
/// matches every array element or object member.
fn for_pointer(value: &mut Value, tokens: &[String], f: &mut dyn FnMut(&mut Value)) {
    let Some((first, rest)) = tokens.split_first() else {
        f(value);
        return;
    };
    match value {
        Value::Array(items) if first == "*" => {
            items.iter_mut().for_each(|v| for_pointer(v, rest, f));
        }
        Value::Array(items) => {
            if let Some(v) = first.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                for_pointer(v, rest, f);
            }
        }
        Value::Object(map) if first == "*" => {
            map.values_mut().for_each(|v| for_pointer(v, rest, f));
        }
        Value::Object(map) => {
            if let Some(v) = map.get_mut(first.as_str()) {
                for_pointer(v, rest, f);
            }
        }
        _ => {}
    }
}

fn pointer_tokens(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// Replaces the values at `pointer` (if present) with `"<masked>"`.
pub fn mask_pointer(value: &mut Value, pointer: &str) {
    for_pointer(value, &pointer_tokens(pointer), &mut |v| {
        *v = Value::String(MASKED.into());
    });
}

/// Sorts the arrays at `pointer` (if present) by their serialized elements.
pub fn sort_pointer(value: &mut Value, pointer: &str) {
    for_pointer(value, &pointer_tokens(pointer), &mut |v| {
        if let Value::Array(items) = v {
            items.sort_by_cached_key(canonical_text);
        }
    });
}

/// Compares two transcripts of the same scenario; `Err` holds a readable
/// report of every difference.
pub fn compare(scenario: &Scenario, left: &Transcript, right: &Transcript) -> Result<(), String> {
    let mut report = String::new();
    let (l, r) = (left.binary.display(), right.binary.display());
    for (side, t) in [(&l, left), (&r, right)] {
        if !t.bad_line_endings.is_empty() {
            let _ = writeln!(
                report,
                "{side}: messages not ending in \\r\\n: {:?}",
                t.bad_line_endings
            );
        }
    }
    let count = left.groups.len().max(right.groups.len());
    for i in 0..count {
        let (a, b) = (left.groups.get(i), right.groups.get(i));
        if a == b {
            continue;
        }
        let label = a.or(b).map(|g| g.label.as_str()).unwrap_or_default();
        let step = a.or(b).and_then(|g| g.step);
        let show = |g: Option<&Group>| {
            g.map_or("  <missing>\n".to_string(), |g| {
                let mut out = String::new();
                for (kind, items) in [("reply", &g.replies), ("event", &g.events)] {
                    for item in items {
                        let _ = writeln!(out, "  {kind}: {item}");
                    }
                }
                for note in &g.notes {
                    let _ = writeln!(out, "  note: {note}");
                }
                out
            })
        };
        let observed = |g: Option<&Group>| g.map_or(Value::Null, Group::observed);
        let mut paths = Vec::new();
        json_diff("", &observed(a), &observed(b), &mut paths);
        let _ = writeln!(
            report,
            "--- scenario {}, {}: {label}",
            scenario.name,
            step.map_or("(implicit)".to_string(), |s| format!("step {s}")),
        );
        for line in paths.iter().take(20) {
            let _ = writeln!(report, "  differs at {line}");
        }
        if paths.len() > 20 {
            let _ = writeln!(report, "  ... and {} more", paths.len() - 20);
        }
        let _ = writeln!(report, "[{l}]\n{}[{r}]\n{}", show(a), show(b));
    }
    if report.is_empty() {
        Ok(())
    } else {
        let _ = writeln!(
            report,
            "stderr [{l}]:\n{}\nstderr [{r}]:\n{}",
            left.stderr, right.stderr
        );
        Err(report)
    }
}

/// Collects `pointer: left != right` for every differing leaf.
fn json_diff(path: &str, left: &Value, right: &Value, out: &mut Vec<String>) {
    match (left, right) {
        (Value::Object(l), Value::Object(r)) => {
            for (k, lv) in l {
                let p = format!("{path}/{k}");
                match r.get(k) {
                    Some(rv) => json_diff(&p, lv, rv, out),
                    None => out.push(format!("{p}: {lv} != <absent>")),
                }
            }
            for (k, rv) in r.iter().filter(|(k, _)| !l.contains_key(*k)) {
                out.push(format!("{path}/{k}: <absent> != {rv}"));
            }
        }
        (Value::Array(l), Value::Array(r)) => {
            for i in 0..l.len().max(r.len()) {
                let p = format!("{path}/{i}");
                match (l.get(i), r.get(i)) {
                    (Some(lv), Some(rv)) => json_diff(&p, lv, rv, out),
                    (Some(lv), None) => out.push(format!("{p}: {lv} != <absent>")),
                    (None, Some(rv)) => out.push(format!("{p}: <absent> != {rv}")),
                    (None, None) => {}
                }
            }
        }
        _ if left != right => out.push(format!("{path}: {left} != {right}")),
        _ => {}
    }
}

/// How often the reference daemon is started before its transcript is taken as it is.
const REFERENCE_ATTEMPTS: usize = 3;

/// Runs the scenario against the reference daemon. qemu-storage-daemon 10.0.2
/// occasionally stops serving a freshly accepted monitor connection (its monitor
/// thread blocks in `accept` on the listening socket while the main loop took the
/// client): the daemon is started until its monitor answers a probe (see
/// [`start_retrying`]), and a reference run in which the daemon stopped answering
/// all the same is repeated. The candidate gets no such second chance.
fn run_reference(scenario: &Scenario, reference: &Path) -> Transcript {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match run_on(scenario, reference, true) {
            Ok(t) if attempt >= REFERENCE_ATTEMPTS || !t.has_unanswered_request() => return t,
            Err(e) if attempt >= REFERENCE_ATTEMPTS => {
                panic!("{}: {}: {e:#}", scenario.name, reference.display())
            }
            Ok(_) | Err(_) => {}
        }
        eprintln!(
            "{}: the reference daemon stopped answering; starting it again",
            scenario.name
        );
    }
}

/// Runs the scenario file at `path` against `reference` and `candidate` and
/// panics with a readable diff when their normalized transcripts differ.
///
/// `reference` is None for the scenario's own reference program.
pub fn assert_same(path: &Path, reference: Option<&Path>, candidate: &Path) {
    let scenario = Scenario::load(path).unwrap_or_else(|e| panic!("{e:#}"));
    let own;
    let reference = match reference {
        Some(r) => r,
        None => {
            own = scenario.reference.binary();
            &own
        }
    };
    let left = run_reference(&scenario, reference);
    // A QEMU program checked against itself (determinism) gets the reference's care on
    // both sides: its monitor may fail a fresh connection.
    let right = if candidate == reference {
        run_reference(&scenario, candidate)
    } else {
        run(&scenario, candidate)
            .unwrap_or_else(|e| panic!("{}: {}: {e:#}", scenario.name, candidate.display()))
    };
    if let Err(report) = compare(&scenario, &left, &right) {
        panic!("normalized transcripts differ\n{report}");
    }
}

/// The scenario directory of the workspace (`tests/scenarios`), found from a
/// crate's `CARGO_MANIFEST_DIR`.
pub fn scenario_dir(manifest_dir: &Path) -> PathBuf {
    manifest_dir
        .ancestors()
        .map(|d| d.join("tests/scenarios"))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| panic!("no tests/scenarios above {}", manifest_dir.display()))
}

/// Names (file stems) of all `*.json` scenarios in `dir`, sorted.
pub fn scenario_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| p.file_stem().and_then(|s| s.to_str()).map(str::to_string))
        .collect();
    names.sort();
    names
}

/// The text of `value` with every object's keys sorted, so that sorting does not
/// depend on the order in which a daemon happens to print members.
fn canonical_text(value: &Value) -> String {
    fn canonical(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                Value::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), canonical(&map[k])))
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
            other => other.clone(),
        }
    }
    canonical(value).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_node_names_keep_counter_and_mask_random_digits() {
        let masked = mask_auto_node_names("json:{\"file\": \"#block12345\"} #block070 #blk1");

        assert_eq!(masked, "json:{\"file\": \"#block123??\"} #block0?? #blk1");
    }

    #[test]
    fn wait_events_match_in_order_with_data_subsets() {
        let events = vec![
            json!({"event": "JOB_STATUS_CHANGE", "data": {"id": "a", "status": "created"}}),
            json!({"event": "JOB_STATUS_CHANGE", "data": {"id": "a", "status": "concluded"}}),
        ];
        let specs = [
            json!("JOB_STATUS_CHANGE"),
            json!({"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded"}}),
            json!({"event": "JOB_STATUS_CHANGE", "data": {"status": "null"}}),
        ];

        assert_eq!(first_unmatched(&specs, &events), Some(2));
    }

    #[test]
    fn normalize_masks_timestamp_dir_and_pointers() {
        let mut msg = json!({
            "event": "X",
            "timestamp": {"seconds": 1, "microseconds": 2},
            "data": {"list": [{"f": "/tmp/d/a.img", "n": 1}, {"f": "b", "n": 2}]}
        });
        let step = json!({"mask": ["/data/list/*/n"]});

        normalize(&mut msg, "/tmp/d", &step);

        assert_eq!(
            msg,
            json!({
                "event": "X",
                "timestamp": "<timestamp>",
                "data": {"list": [{"f": "$DIR/a.img", "n": MASKED}, {"f": "b", "n": MASKED}]}
            })
        );
    }

    #[test]
    fn json_diff_names_the_differing_paths() {
        let mut out = Vec::new();

        json_diff(
            "",
            &json!({"a": [1, 2], "b": 1}),
            &json!({"a": [1], "c": 1}),
            &mut out,
        );

        assert_eq!(
            out,
            [
                "/a/1: 2 != <absent>",
                "/b: 1 != <absent>",
                "/c: <absent> != 1"
            ]
        );
    }
}
