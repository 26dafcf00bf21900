//! The command line, parsed as qemu-storage-daemon parses its own.
//!
//! QSD reads its arguments with GNU `getopt_long` twice. Pass 1 acts on `--help`,
//! `--version`, `--daemonize` and `--pidfile` and stops at the first malformed option
//! (unknown option, missing or unwanted argument), in argument order. Pass 2 processes
//! everything else strictly left to right, stopping at the first failure. [`parse`] does
//! pass 1 and turns pass 2 into [`CliItem`]s; a value that is already malformed becomes an
//! [`ItemKind::Invalid`] item rather than an error, so that the caller reports it only
//! when it gets there, after the items before it have been carried out (as QSD would).
//!
//! Started without any argument, blockd (unlike QSD, which would then sit idle) offers a
//! QMP monitor on a unix socket: see [`default_cli`].

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::PathBuf;

use serde_json::Value;

use crate::chardev::{self, Backend, ChardevOption, ChardevSpec, SocketAddr, SocketSpec};

/// What the command line asks for.
#[derive(Debug)]
pub enum CliAction {
    /// Start the daemon.
    Run(Cli),
    /// Print this text on stdout and exit 0.
    Help(String),
    /// Print this text on stdout and exit 0.
    Version(String),
}

/// A command line that passed pass 1.
#[derive(Debug, Default)]
pub struct Cli {
    /// Pass-2 options, in command-line order.
    pub items: Vec<CliItem>,
    /// `--pidfile` (the last one given).
    pub pidfile: Option<PathBuf>,
    pub daemonize: bool,
    /// A line to print on stdout once every option has been carried out (the
    /// default monitor's address, printed only when its socket listens).
    pub announce: Option<String>,
}

/// One pass-2 option.
#[derive(Debug)]
pub struct CliItem {
    /// The option as QSD names it, e.g. `"--blockdev"`; `""` for a stray argument.
    #[allow(dead_code)] // the tests check which option an item came from
    pub option: &'static str,
    /// The value as given.
    #[allow(dead_code)] // kept for messages that quote the value alone
    pub raw: String,
    /// How QSD names the option in messages: `--blockdev VALUE`, `--blockdev=VALUE`, `-TVALUE`.
    pub location: String,
    pub kind: ItemKind,
}

/// What a pass-2 option asks for.
#[derive(Debug)]
pub enum ItemKind {
    Chardev(ChardevSpec),
    /// `--chardev help` or `--chardev TYPE,help`: print `text` on stdout, exit 0 or 1.
    ChardevHelp {
        text: String,
        success: bool,
    },
    Monitor(MonitorSpec),
    Blockdev(OptValue),
    Object(OptValue),
    /// `--object help` (no type) or `--object TYPE,help`: print help and exit 0.
    ObjectHelp {
        qom_type: Option<String>,
    },
    #[allow(dead_code)] // the value is read once NBD exports exist
    NbdServer(OptValue),
    #[allow(dead_code)] // the value is read once NBD exports exist
    Export(OptValue),
    /// `-T/--trace`: accepted and ignored (blockd has no trace events).
    Trace,
    /// A malformed value or a stray argument: fail with this error when reached.
    Invalid(CliError),
}

/// An option value in one of its two syntaxes.
#[derive(Debug, Clone, PartialEq)]
pub enum OptValue {
    /// Keyval syntax: an object tree whose leaves are all strings.
    Keyval(Value),
    /// JSON syntax (the value started with `{`): types are as given.
    Json(Value),
}

/// `--monitor [chardev=]ID[,mode=control][,pretty=on|off][,id=ID]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorSpec {
    pub id: Option<String>,
    pub chardev: String,
    pub pretty: bool,
    /// `mode=readline`: refused ("Only QMP is supported"), but only once the chardev
    /// is known to exist, as QSD's `monitor_init` checks in that order.
    pub readline: bool,
}

/// A command-line error: QSD's whole line after its `program-name: ` prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError(String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

impl CliItem {
    /// An error of this option, prefixed with its location as QSD prints it.
    pub fn error(&self, message: impl fmt::Display) -> CliError {
        CliError(format!("{}: {message}", self.location))
    }

    /// Warnings to print (each after `blockd: `) when this item is processed.
    pub fn warnings(&self) -> Vec<String> {
        match &self.kind {
            ItemKind::Chardev(spec) => spec
                .warnings
                .iter()
                .map(|w| format!("{}: {w}", self.location))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Message for a `--monitor` naming an undefined chardev.
pub fn chardev_not_found(name: &str) -> String {
    format!("chardev \"{name}\" not found")
}

/// Message for a `--monitor` whose chardev already serves another monitor.
pub fn chardev_in_use(name: &str) -> String {
    format!("chardev '{name}' is already in use")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opt {
    Blockdev,
    Chardev,
    Daemonize,
    Export,
    Help,
    Monitor,
    NbdServer,
    Object,
    Pidfile,
    Trace,
    Version,
}

/// getopt's long option table: name, takes an argument, option.
const LONG: &[(&str, bool, Opt)] = &[
    ("blockdev", true, Opt::Blockdev),
    ("chardev", true, Opt::Chardev),
    ("daemonize", false, Opt::Daemonize),
    ("export", true, Opt::Export),
    ("help", false, Opt::Help),
    ("monitor", true, Opt::Monitor),
    ("nbd-server", true, Opt::NbdServer),
    ("object", true, Opt::Object),
    ("pidfile", true, Opt::Pidfile),
    ("trace", true, Opt::Trace),
    ("version", false, Opt::Version),
];

/// One getopt result.
enum Tok {
    Opt {
        opt: Opt,
        value: Option<OsString>,
        location: String,
    },
    /// Pass-1 failure, getopt's message.
    Bad(String),
    /// A non-option argument.
    Stray(String),
}

fn lossy(s: &OsString) -> String {
    s.to_string_lossy().into_owned()
}

/// Runs getopt over `args` (without the program name), as `getopt_long("-hT:V")` does.
fn tokenize(args: &[OsString]) -> Vec<Tok> {
    let mut toks = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = lossy(&args[i]);
        i += 1;
        if arg == "--" {
            break;
        }
        if let Some(body) = arg.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let found = LONG.iter().find(|(n, _, _)| *n == name).or_else(|| {
                let mut hits = LONG.iter().filter(|(n, _, _)| n.starts_with(name));
                match (hits.next(), hits.next()) {
                    (Some(hit), None) => Some(hit),
                    _ => None,
                }
            });
            let Some(&(full, takes_arg, opt)) = found else {
                toks.push(Tok::Bad(format!("unrecognized option '{arg}'")));
                continue;
            };
            let tok = match (takes_arg, inline) {
                (false, Some(_)) => {
                    Tok::Bad(format!("option '--{full}' doesn't allow an argument"))
                }
                (false, None) => Tok::Opt {
                    opt,
                    value: None,
                    location: arg.clone(),
                },
                (true, Some(v)) => Tok::Opt {
                    opt,
                    value: Some(v.into()),
                    location: arg.clone(),
                },
                (true, None) if i < args.len() => {
                    let value = args[i].clone();
                    i += 1;
                    let location = format!("{arg} {}", lossy(&value));
                    Tok::Opt {
                        opt,
                        value: Some(value),
                        location,
                    }
                }
                (true, None) => Tok::Bad(format!("option '--{full}' requires an argument")),
            };
            toks.push(tok);
            continue;
        }
        let Some(cluster) = arg.strip_prefix('-').filter(|c| !c.is_empty()) else {
            toks.push(Tok::Stray(arg));
            continue;
        };
        for (at, c) in cluster.char_indices() {
            match c {
                'h' => toks.push(Tok::Opt {
                    opt: Opt::Help,
                    value: None,
                    location: arg.clone(),
                }),
                'V' => toks.push(Tok::Opt {
                    opt: Opt::Version,
                    value: None,
                    location: arg.clone(),
                }),
                'T' => {
                    let rest = &cluster[at + 1..];
                    if !rest.is_empty() {
                        let tok = Tok::Opt {
                            opt: Opt::Trace,
                            value: Some(rest.into()),
                            location: arg.clone(),
                        };
                        toks.push(tok);
                    } else if i < args.len() {
                        let value = args[i].clone();
                        i += 1;
                        let location = format!("{arg} {}", lossy(&value));
                        toks.push(Tok::Opt {
                            opt: Opt::Trace,
                            value: Some(value),
                            location,
                        });
                    } else {
                        toks.push(Tok::Bad("option requires an argument -- 'T'".into()));
                    }
                    break;
                }
                other => toks.push(Tok::Bad(format!("invalid option -- '{other}'"))),
            }
        }
    }
    toks
}

/// Parses the command line: `args` are the arguments after the program name
/// (`std::env::args_os().skip(1)`). Pass-1 failures are errors; see the module docs.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<CliAction, CliError> {
    let args: Vec<OsString> = args.into_iter().collect();
    let toks = tokenize(&args);
    let mut cli = Cli::default();
    for tok in &toks {
        match tok {
            Tok::Bad(message) => return Err(CliError(message.clone())),
            Tok::Opt { opt: Opt::Help, .. } => return Ok(CliAction::Help(help_text())),
            Tok::Opt {
                opt: Opt::Version, ..
            } => return Ok(CliAction::Version(version_text())),
            Tok::Opt {
                opt: Opt::Daemonize,
                ..
            } => cli.daemonize = true,
            Tok::Opt {
                opt: Opt::Pidfile,
                value: Some(path),
                ..
            } => cli.pidfile = Some(path.into()),
            _ => {}
        }
    }
    for tok in toks {
        match tok {
            Tok::Stray(arg) => {
                let error = CliError(format!("{arg}: Unexpected argument"));
                let kind = ItemKind::Invalid(error);
                cli.items.push(CliItem {
                    option: "",
                    raw: arg.clone(),
                    location: arg,
                    kind,
                });
            }
            Tok::Opt {
                opt,
                value: Some(value),
                location,
            } => {
                let Some((option, kind)) = item(opt, &lossy(&value)) else {
                    continue;
                };
                let kind = match kind {
                    Ok(kind) => kind,
                    Err(message) => ItemKind::Invalid(CliError(format!("{location}: {message}"))),
                };
                cli.items.push(CliItem {
                    option,
                    raw: lossy(&value),
                    location,
                    kind,
                });
            }
            _ => {}
        }
    }
    Ok(CliAction::Run(cli))
}

/// Pass 2 for one option; `None` for pass-1 options.
fn item(opt: Opt, value: &str) -> Option<(&'static str, Result<ItemKind, String>)> {
    let parsed = match opt {
        Opt::Blockdev => (
            "--blockdev",
            opt_value(value, Some("driver")).map(ItemKind::Blockdev),
        ),
        Opt::Export => (
            "--export",
            opt_value(value, Some("type")).map(ItemKind::Export),
        ),
        Opt::NbdServer => (
            "--nbd-server",
            opt_value(value, None).map(ItemKind::NbdServer),
        ),
        Opt::Object => ("--object", object(value)),
        Opt::Monitor => ("--monitor", monitor(value).map(ItemKind::Monitor)),
        Opt::Chardev => ("--chardev", chardev_item(value)),
        Opt::Trace => ("--trace", trace(value).map(|()| ItemKind::Trace)),
        Opt::Help | Opt::Version | Opt::Daemonize | Opt::Pidfile => return None,
    };
    Some(parsed)
}

fn opt_value(value: &str, implied: Option<&str>) -> Result<OptValue, String> {
    if value.starts_with('{') {
        qapi::json::parse_value(value)
            .map(OptValue::Json)
            .map_err(|e| e.to_string())
    } else {
        qapi::keyval::parse(value, implied)
            .map(OptValue::Keyval)
            .map_err(|e| e.to_string())
    }
}

fn object(value: &str) -> Result<ItemKind, String> {
    if value.starts_with('{') {
        return opt_value(value, Some("qom-type")).map(ItemKind::Object);
    }
    let parsed =
        qapi::keyval::parse_with_help(value, Some("qom-type")).map_err(|e| e.to_string())?;
    if parsed.help {
        let qom_type = parsed
            .value
            .get("qom-type")
            .and_then(Value::as_str)
            .map(str::to_string);
        return Ok(ItemKind::ObjectHelp { qom_type });
    }
    Ok(ItemKind::Object(OptValue::Keyval(parsed.value)))
}

fn chardev_item(value: &str) -> Result<ItemKind, String> {
    match chardev::parse(value).map_err(|e| e.to_string())? {
        ChardevOption::Create(spec) => Ok(ItemKind::Chardev(spec)),
        ChardevOption::Help { text, success } => Ok(ItemKind::ChardevHelp { text, success }),
    }
}

/// Checks a `MonitorOptions` value as QEMU's visitor does, in member order, then
/// `monitor_init`'s `mode` check.
fn monitor(value: &str) -> Result<MonitorSpec, String> {
    let (tree, keyval) = match opt_value(value, Some("chardev"))? {
        OptValue::Keyval(tree) => (tree, true),
        OptValue::Json(tree) => (tree, false),
    };
    let Value::Object(map) = tree else {
        return Err("Invalid parameter type for 'null', expected: object".into());
    };
    let string = |key: &str| -> Result<Option<String>, String> {
        match map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!(
                "Invalid parameter type for '{key}', expected: string"
            )),
        }
    };
    let id = string("id")?;
    let mode = string("mode")?;
    if let Some(mode) = &mode {
        if mode != "control" && mode != "readline" {
            return Err(format!("Parameter 'mode' does not accept value '{mode}'"));
        }
    }
    let pretty = match map.get("pretty") {
        None => false,
        Some(Value::Bool(b)) if !keyval => *b,
        Some(Value::String(s)) if keyval => qapi::keyval::parse_bool(s)
            .ok_or_else(|| "Parameter 'pretty' expects 'on' or 'off'".to_string())?,
        Some(_) if keyval => {
            return Err("Invalid parameter type for 'pretty', expected: string".into())
        }
        Some(_) => return Err("Invalid parameter type for 'pretty', expected: boolean".into()),
    };
    let chardev = string("chardev")?.ok_or_else(|| "Parameter 'chardev' is missing".to_string())?;
    if let Some(extra) = map
        .keys()
        .find(|k| !["id", "mode", "pretty", "chardev"].contains(&k.as_str()))
    {
        return Err(format!("Parameter '{extra}' is unexpected"));
    }
    Ok(MonitorSpec {
        id,
        chardev,
        pretty,
        readline: mode.as_deref() == Some("readline"),
    })
}

/// `-T [enable=]PATTERN[,events=FILE][,file=FILE]`: checked for unknown keys, then ignored.
fn trace(value: &str) -> Result<(), String> {
    let unescaped = value.replace(",,", "\u{0}");
    for (n, item) in unescaped.split(',').enumerate() {
        let key = match item.split_once('=') {
            Some((key, _)) => key,
            None if n == 0 => "enable",
            None => item,
        };
        if !["enable", "events", "file"].contains(&key) {
            return Err(format!("Invalid parameter '{}'", key.replace('\u{0}', ",")));
        }
    }
    Ok(())
}

fn help_text() -> String {
    "Usage: blockd [options]
blockd: a memory-safe block storage daemon, a drop-in for qemu-storage-daemon

  -h, --help             print this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         accepted for compatibility; blockd has no trace events
  -V, --version          print the version and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         add a block node, as QMP blockdev-add does

  --chardev <backend>,id=<id>[,<options>]
                         add a character device for a monitor: backends
                         socket (path=<path> or host=<host>,port=<port>,
                         server=on|off, wait=on|off), stdio and null

  --daemonize            run in the background; the starting process exits
                         once start-up has succeeded

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmaps.0=<name>...]
                         export a block node over NBD (needs --nbd-server)

  --monitor [chardev=]<name>[,mode=control][,pretty=on|off]
                         serve QMP on the character device <name>

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start the NBD server that exports are served by

  --object help          list the object types blockd can create
  --object <type>,help   list the properties of an object type
  --object <type>[,<property>=<value>...]
                         create an object (id=<id> is required)

  --pidfile <path>       write the process id to <path> once started

Option values are keyval (key=value,...; ',,' is a literal comma) or JSON
objects (starting with '{'). Options are carried out from left to right.
Without any option, blockd serves QMP on a unix socket:
$XDG_RUNTIME_DIR/blockd/qmp.sock, or /tmp/blockd-<uid>/qmp.sock.
"
    .to_string()
}

fn version_text() -> String {
    format!(
        "blockd version {} (compatible with qemu-storage-daemon 10.0.2)\n\
         blockd: a memory-safe block storage daemon, licensed GPL-2.0-or-later\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// Where blockd serves QMP when started without options: `$XDG_RUNTIME_DIR/blockd/qmp.sock`
/// if that variable is set (and not empty), else `/tmp/blockd-<uid>/qmp.sock`.
pub fn default_monitor_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("blockd").join("qmp.sock"),
        None => PathBuf::from(format!("/tmp/blockd-{}", sys::process::getuid())).join("qmp.sock"),
    }
}

/// The command line blockd assumes when given no arguments at all: a QMP monitor on a
/// unix socket at [`default_monitor_path`], whose folder is created here with mode 0700.
/// A folder that exists already must belong to us and not be open to others. Returns
/// the command line and the socket path (for `blockd: QMP monitor listening on PATH`).
pub fn default_cli() -> io::Result<(Cli, PathBuf)> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let path = default_monitor_path();
    let dir = path.parent().unwrap_or(std::path::Path::new("/"));
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(dir)?;
            if !meta.is_dir() || meta.uid() != sys::process::getuid() || meta.mode() & 0o077 != 0 {
                let text = format!("{} is not a private folder of this user", dir.display());
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, text));
            }
        }
        Err(e) => return Err(e),
    }
    let text = path.to_string_lossy().into_owned();
    let raw = format!(
        "socket,id=blockd-qmp,path={},server=on,wait=off",
        text.replace(',', ",,")
    );
    let spec = ChardevSpec {
        id: "blockd-qmp".into(),
        backend: Backend::Socket(SocketSpec {
            addr: SocketAddr::Unix {
                path: text,
                abstract_ns: false,
            },
            server: true,
            wait: false,
            nodelay: false,
        }),
        warnings: Vec::new(),
    };
    let monitor = MonitorSpec {
        id: None,
        chardev: "blockd-qmp".into(),
        pretty: false,
        readline: false,
    };
    let items = vec![
        CliItem {
            option: "--chardev",
            location: format!("--chardev {raw}"),
            raw,
            kind: ItemKind::Chardev(spec),
        },
        CliItem {
            option: "--monitor",
            raw: "blockd-qmp".into(),
            location: "--monitor blockd-qmp".into(),
            kind: ItemKind::Monitor(monitor),
        },
    ];
    let cli = Cli {
        items,
        pidfile: None,
        daemonize: false,
        announce: Some(format!(
            "blockd: QMP monitor listening on {}",
            path.display()
        )),
    };
    Ok((cli, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(args: &[&str]) -> Cli {
        let argv = args.iter().copied().map(OsString::from);
        match parse(argv).unwrap() {
            CliAction::Run(cli) => cli,
            other => panic!("not run: {other:?}"),
        }
    }

    fn fail(args: &[&str]) -> String {
        let argv = args.iter().copied().map(OsString::from);
        parse(argv).unwrap_err().to_string()
    }

    /// The error of the first invalid item.
    fn item_error(args: &[&str]) -> String {
        let cli = run(args);
        let item = cli
            .items
            .into_iter()
            .find(|i| matches!(i.kind, ItemKind::Invalid(_)))
            .unwrap();
        let ItemKind::Invalid(err) = item.kind else {
            unreachable!()
        };
        err.to_string()
    }

    fn monitor_error(value: &str) -> String {
        item_error(&["--monitor", value])
    }

    #[test]
    fn separate_and_joined_values_are_the_same() {
        let a = run(&["--blockdev", "null-co,node-name=n"]);
        let b = run(&["--blockdev=null-co,node-name=n"]);
        let (ItemKind::Blockdev(va), ItemKind::Blockdev(vb)) = (&a.items[0].kind, &b.items[0].kind)
        else {
            panic!()
        };
        assert_eq!(va, vb);
        assert_eq!(
            va,
            &OptValue::Keyval(json!({"driver": "null-co", "node-name": "n"}))
        );
        assert_eq!(a.items[0].location, "--blockdev null-co,node-name=n");
        assert_eq!(b.items[0].location, "--blockdev=null-co,node-name=n");
        assert_eq!(a.items[0].option, "--blockdev");
    }

    #[test]
    fn brace_selects_json() {
        let cli = run(&["--export", "{\"type\":\"nbd\",\"writable\":true}"]);
        let ItemKind::Export(value) = &cli.items[0].kind else {
            panic!()
        };
        assert_eq!(
            value,
            &OptValue::Json(json!({"type": "nbd", "writable": true}))
        );
    }

    #[test]
    fn implied_keys_per_option() {
        let cli = run(&[
            "--export",
            "nbd",
            "--object",
            "iothread,id=t",
            "--nbd-server",
            "addr.type=unix",
        ]);
        let kinds: Vec<_> = cli.items.iter().map(|i| &i.kind).collect();
        let [ItemKind::Export(OptValue::Keyval(e)), ItemKind::Object(OptValue::Keyval(o)), ItemKind::NbdServer(OptValue::Keyval(n))] =
            kinds[..]
        else {
            panic!()
        };
        assert_eq!(e, &json!({"type": "nbd"}));
        assert_eq!(o, &json!({"qom-type": "iothread", "id": "t"}));
        assert_eq!(n, &json!({"addr": {"type": "unix"}}));
    }

    #[test]
    fn long_option_prefixes_are_accepted() {
        let cli = run(&["--blockd", "null-co", "--pid", "p"]);
        assert_eq!(cli.items[0].option, "--blockdev");
        assert_eq!(cli.pidfile, Some(PathBuf::from("p")));
    }

    #[test]
    fn pass_one_options() {
        let cli = run(&["--daemonize", "--pidfile=/run/x.pid"]);
        assert!(cli.daemonize);
        assert_eq!(cli.pidfile, Some(PathBuf::from("/run/x.pid")));
        assert!(cli.items.is_empty());
    }

    #[test]
    fn help_wins_over_bad_values_and_later_bad_options() {
        let argv = ["--blockdev", "x..y=1", "--help", "--bogus"].map(OsString::from);
        assert!(matches!(parse(argv).unwrap(), CliAction::Help(_)));
    }

    #[test]
    fn version_in_short_cluster() {
        let argv = ["-Vx"].map(OsString::from);
        let CliAction::Version(text) = parse(argv).unwrap() else {
            panic!()
        };
        assert!(text.contains("compatible with qemu-storage-daemon 10.0.2"));
    }

    #[test]
    fn getopt_errors_match_qsd() {
        assert_eq!(fail(&["--bogus"]), "unrecognized option '--bogus'");
        assert_eq!(fail(&["--bogus=1"]), "unrecognized option '--bogus=1'");
        assert_eq!(fail(&["-x"]), "invalid option -- 'x'");
        assert_eq!(
            fail(&["--blockdev"]),
            "option '--blockdev' requires an argument"
        );
        assert_eq!(fail(&["--pid"]), "option '--pidfile' requires an argument");
        assert_eq!(
            fail(&["--daemonize=1"]),
            "option '--daemonize' doesn't allow an argument"
        );
        assert_eq!(
            fail(&["--help="]),
            "option '--help' doesn't allow an argument"
        );
        assert_eq!(fail(&["-T"]), "option requires an argument -- 'T'");
        assert_eq!(
            fail(&["--bogus", "--help"]),
            "unrecognized option '--bogus'"
        );
    }

    #[test]
    fn pass_one_error_beats_earlier_bad_value() {
        assert_eq!(
            fail(&["--blockdev", "x..y=1", "--pidfile"]),
            "option '--pidfile' requires an argument"
        );
    }

    #[test]
    fn bad_values_become_items_in_order() {
        let cli = run(&["--blockdev", "x..y=1", "foo"]);
        assert_eq!(
            item_error(&["--blockdev", "x..y=1", "foo"]),
            "--blockdev x..y=1: Invalid parameter 'x..y'"
        );
        assert_eq!(
            item_error(&["--blockdev=x..y=1"]),
            "--blockdev=x..y=1: Invalid parameter 'x..y'"
        );
        assert_eq!(cli.items.len(), 2);
    }

    #[test]
    fn stray_arguments_are_unexpected() {
        assert_eq!(
            item_error(&["foo", "--blockdev", "x..y=1"]),
            "foo: Unexpected argument"
        );
        assert_eq!(item_error(&["-"]), "-: Unexpected argument");
        assert_eq!(item_error(&[""]), ": Unexpected argument");
    }

    #[test]
    fn double_dash_ends_options() {
        assert!(run(&["--", "foo", "--bogus"]).items.is_empty());
    }

    #[test]
    fn help_is_not_available_for_qapi_options() {
        assert_eq!(
            item_error(&["--blockdev", "help"]),
            "--blockdev help: Help is not available for this option"
        );
        assert_eq!(
            monitor_error("chardev=m,help"),
            "--monitor chardev=m,help: Help is not available for this option"
        );
    }

    #[test]
    fn object_help_forms() {
        let cli = run(&["--object", "help", "--object", "iothread,help"]);
        assert!(matches!(
            &cli.items[0].kind,
            ItemKind::ObjectHelp { qom_type: None }
        ));
        assert!(
            matches!(&cli.items[1].kind, ItemKind::ObjectHelp { qom_type: Some(t) } if t == "iothread")
        );
    }

    #[test]
    fn json_errors_keep_qemu_text() {
        assert_eq!(
            monitor_error("{\"chardev\":\"m\""),
            "--monitor {\"chardev\":\"m\": JSON parse error, premature EOI"
        );
    }

    #[test]
    fn monitor_forms() {
        let cli = run(&[
            "--monitor",
            "m",
            "--monitor",
            "chardev=m,mode=control,pretty=on,id=x",
            "--monitor",
            "m,chardev=n",
        ]);
        let specs: Vec<_> = cli
            .items
            .iter()
            .map(|i| match &i.kind {
                ItemKind::Monitor(m) => m.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            specs[0],
            MonitorSpec {
                id: None,
                chardev: "m".into(),
                pretty: false,
                readline: false
            }
        );
        assert_eq!(
            specs[1],
            MonitorSpec {
                id: Some("x".into()),
                chardev: "m".into(),
                pretty: true,
                readline: false
            }
        );
        assert_eq!(specs[2].chardev, "n");
    }

    #[test]
    fn monitor_json_form() {
        let cli = run(&[
            "--monitor",
            "{\"chardev\":\"m\",\"pretty\":true,\"mode\":\"control\",\"id\":\"x\"}",
        ]);
        let ItemKind::Monitor(m) = &cli.items[0].kind else {
            panic!()
        };
        assert_eq!(
            m,
            &MonitorSpec {
                id: Some("x".into()),
                chardev: "m".into(),
                pretty: true,
                readline: false
            }
        );
    }

    #[test]
    fn monitor_errors_match_qsd() {
        // Refused at start-up, after the chardev lookup (see startup.rs).
        let cli = run(&["--monitor", "m,mode=readline"]);
        assert!(matches!(&cli.items[0].kind, ItemKind::Monitor(m) if m.readline));
        assert_eq!(
            monitor_error("m,mode=bogus"),
            "--monitor m,mode=bogus: Parameter 'mode' does not accept value 'bogus'"
        );
        assert_eq!(
            monitor_error("m,pretty=maybe"),
            "--monitor m,pretty=maybe: Parameter 'pretty' expects 'on' or 'off'"
        );
        assert_eq!(
            monitor_error("m,pretty"),
            "--monitor m,pretty: Expected '=' after parameter 'pretty'"
        );
        assert_eq!(
            monitor_error("m,foo=1"),
            "--monitor m,foo=1: Parameter 'foo' is unexpected"
        );
        assert_eq!(
            monitor_error("id=x"),
            "--monitor id=x: Parameter 'chardev' is missing"
        );
        assert_eq!(
            monitor_error(""),
            "--monitor : Parameter 'chardev' is missing"
        );
        assert_eq!(
            monitor_error("{\"chardev\":\"m\",\"pretty\":\"on\"}"),
            "--monitor {\"chardev\":\"m\",\"pretty\":\"on\"}: Invalid parameter type for 'pretty', expected: boolean"
        );
    }

    #[test]
    fn monitor_helper_messages() {
        assert_eq!(chardev_not_found("zz"), "chardev \"zz\" not found");
        assert_eq!(chardev_in_use("m"), "chardev 'm' is already in use");
    }

    #[test]
    fn chardev_items_and_warnings() {
        let cli = run(&["--chardev", "socket,id=m,path=p,server,wait=off"]);
        assert!(matches!(&cli.items[0].kind, ItemKind::Chardev(spec) if spec.id == "m"));
        assert_eq!(
            cli.items[0].warnings(),
            ["--chardev socket,id=m,path=p,server,wait=off: warning: short-form boolean option 'server' deprecated\nPlease use server=on instead"]
        );
        assert_eq!(
            item_error(&["--chardev", "socket,id=a,foo=1"]),
            "--chardev socket,id=a,foo=1: Invalid parameter 'foo'"
        );
    }

    #[test]
    fn trace_is_accepted_and_checked() {
        assert!(matches!(
            run(&["-Tfoo", "--trace", "enable=x*,file=f"]).items[0].kind,
            ItemKind::Trace
        ));
        assert_eq!(
            item_error(&["--trace", "bogus=1"]),
            "--trace bogus=1: Invalid parameter 'bogus'"
        );
    }

    #[test]
    fn item_error_carries_location() {
        let cli = run(&["--export", "nbd,id=e,node-name=a"]);
        assert_eq!(
            cli.items[0].error("NBD server not running").to_string(),
            "--export nbd,id=e,node-name=a: NBD server not running"
        );
    }

    #[test]
    fn default_cli_serves_qmp_on_a_private_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("XDG_RUNTIME_DIR", dir.path());

        let (cli, path) = default_cli().unwrap();

        assert_eq!(path, dir.path().join("blockd/qmp.sock"));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("blockd"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o700);
        assert!(matches!(&cli.items[0].kind, ItemKind::Chardev(spec) if spec.id == "blockd-qmp"));
        assert!(matches!(&cli.items[1].kind, ItemKind::Monitor(m) if m.chardev == "blockd-qmp"));
    }
}
