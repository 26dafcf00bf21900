//! `blkdebug`: QEMU's fault-injection filter. It passes requests to its `image` child
//! unchanged, except that rules armed by debug events (see [`crate::debug`]) fail them
//! with a chosen errno, and that it imposes the request limits it is given (`align`,
//! `max-transfer`, `opt-write-zero`, `max-write-zero`, `opt-discard`, `max-discard`) the
//! way QEMU's block layer does: unaligned requests are padded (writes by
//! read-modify-write, raising the `pwritev_rmw_*` events), long ones are split, and
//! zero writes or discards too small for the limits fall back to writes or are dropped.
//!
//! Opening follows QEMU's order: the limits must not be negative, the config file and
//! the rules are read, the child is opened, then the limits are checked against the
//! child's alignment; the node raises `none` on itself once it is open. The child can be
//! re-pointed after open (an overlay put in its place by an external snapshot).

use async_trait::async_trait;
use serde_json::{Map, Value};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{BlockDriver, ChildSlot, DriverInfo, Extent, WriteFlags, ZeroFlags};
use crate::debug::{DebugEvent, IoType};
use crate::error::{Errno, Error, Result};
use crate::filename::{bucket, Filename};
use crate::node::Node;
use crate::options::BlkdebugOptions;
use crate::perm::{ChildRole, Perm};

mod config;
mod rules;

pub use rules::{InjectRule, Injection, Rules, SetStateRule};

/// Limits QEMU keeps below `INT_MAX`.
const LIMIT_MAX: u64 = i32::MAX as u64;

/// The size options in schema order, with their QAPI names.
fn size_options(opts: &BlkdebugOptions) -> [(&'static str, Option<i64>); 6] {
    [
        ("align", opts.align),
        ("max-transfer", opts.max_transfer),
        ("opt-write-zero", opts.opt_write_zero),
        ("max-write-zero", opts.max_write_zero),
        ("opt-discard", opts.opt_discard),
        ("max-discard", opts.max_discard),
    ]
}

/// A blkdebug node's options checked up to the point where QEMU opens the child.
#[derive(Debug)]
pub struct Prepared {
    opts: BlkdebugOptions,
    rules: Rules,
    take: Perm,
    unshare: Perm,
}

/// Checks `opts` and reads the rules (config file first), before the child is opened.
pub fn prepare(opts: &BlkdebugOptions) -> Result<Prepared> {
    // QEMU's option parser refuses negative sizes first, in its dictionary's order.
    let mut negative: Vec<(usize, &str, i64)> = size_options(opts)
        .iter()
        .enumerate()
        .filter_map(|(i, (name, value))| value.filter(|v| *v < 0).map(|v| (i, *name, v)))
        .collect();
    negative.sort_by_key(|&(i, name, _)| (bucket(name), std::cmp::Reverse(i)));
    if let Some((_, name, value)) = negative.first() {
        return Err(Error::FormatOption(format!(
            "Value '{value}' is out of range for parameter '{name}'"
        )));
    }
    let (mut inject, mut set_state) = match &opts.config {
        Some(path) => {
            let text = std::fs::read(path).map_err(|e| {
                Error::FormatOption(format!(
                    "Could not read blkdebug config file: {}",
                    Errno(&e)
                ))
            })?;
            config::parse_file(&text)?
        }
        None => (Vec::new(), Vec::new()),
    };
    inject.extend(
        opts.inject_error
            .iter()
            .flatten()
            .map(config::inject_from_options),
    );
    set_state.extend(
        opts.set_state
            .iter()
            .flatten()
            .map(config::set_state_from_options),
    );
    let perms = |list: &Option<Vec<crate::options::BlockPermission>>| {
        list.iter()
            .flatten()
            .fold(Perm::NONE, |acc, p| acc | p.perm())
    };
    Ok(Prepared {
        opts: opts.clone(),
        rules: Rules::new(inject, set_state),
        take: perms(&opts.take_child_perms),
        unshare: perms(&opts.unshare_child_perms),
    })
}

/// Request limits, in bytes (0 = none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Limits {
    /// Request alignment (at least 1).
    align: u64,
    max_transfer: u64,
    zero_align: u64,
    max_zero: u64,
    discard_align: u64,
    max_discard: u64,
}

fn check_limit(name: &str, value: u64, multiple_of: u64) -> Result<()> {
    if value != 0 && (value >= LIMIT_MAX || !value.is_multiple_of(multiple_of)) {
        return Err(Error::FormatOption(format!(
            "Cannot meet constraints with {name} {value}"
        )));
    }
    Ok(())
}

impl Prepared {
    /// How the `image` edge passes permissions.
    pub fn child_role(&self) -> ChildRole {
        ChildRole::Debug {
            take: self.take,
            unshare: self.unshare,
        }
    }

    /// Checks the limits against `child` and opens the node; it raises `none` on itself.
    pub fn open(self, child: Arc<Node>) -> Result<BlkdebugDriver> {
        let get = |v: Option<i64>| v.map_or(0, |v| v.unsigned_abs());
        let o = &self.opts;
        let align = get(o.align);
        if align != 0 && (align >= LIMIT_MAX || !align.is_power_of_two()) {
            return Err(Error::FormatOption(format!(
                "Cannot meet constraints with align {align}"
            )));
        }
        let base = align.max(child.driver().alignment()).max(1);
        let limits = Limits {
            align: base,
            max_transfer: get(o.max_transfer),
            zero_align: get(o.opt_write_zero),
            max_zero: get(o.max_write_zero),
            discard_align: get(o.opt_discard),
            max_discard: get(o.max_discard),
        };
        check_limit("max-transfer", limits.max_transfer, base)?;
        check_limit("opt-write-zero", limits.zero_align, base)?;
        check_limit(
            "max-write-zero",
            limits.max_zero,
            limits.zero_align.max(base),
        )?;
        check_limit("opt-discard", limits.discard_align, base)?;
        check_limit(
            "max-discard",
            limits.max_discard,
            limits.discard_align.max(base),
        )?;
        let driver = BlkdebugDriver {
            child: ChildSlot::new(child),
            opts: self.opts,
            rules: self.rules,
            limits,
            write_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
        };
        driver.rules.event(DebugEvent::None);
        Ok(driver)
    }
}

/// The `blkdebug` driver over its `image` child.
#[derive(Debug)]
pub struct BlkdebugDriver {
    child: ChildSlot,
    opts: BlkdebugOptions,
    rules: Rules,
    limits: Limits,
    /// Writes started through the node, and the count at the last successful flush
    /// (a flush with nothing written does not check the rules, as in QEMU).
    write_gen: AtomicU64,
    flushed_gen: AtomicU64,
}

fn align_down(value: u64, align: u64) -> u64 {
    value - value % align
}

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

/// The longest piece a limit `max` (0 = none) allows, in whole `align` units (at least one).
fn max_piece(max: u64, align: u64) -> u64 {
    let max = if max == 0 { i64::MAX as u64 } else { max };
    align_down(max, align).max(align)
}

/// Splits `len` bytes into pieces of at most `max` (0 = one piece).
fn pieces(len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let step = if max == 0 { len.max(1) } else { max };
    (0..len)
        .step_by(usize::try_from(step).unwrap_or(usize::MAX))
        .map(move |at| (at, step.min(len - at)))
}

fn to_usize(value: u64) -> Result<usize> {
    usize::try_from(value).map_err(|_| Error::Io(io::Error::from_raw_os_error(libc::EINVAL)))
}

impl BlkdebugDriver {
    /// The current state number of the rules.
    pub fn state(&self) -> i32 {
        self.rules.state()
    }

    /// Applies the active rules to a request: `Ok(true)` to go on with the I/O,
    /// `Ok(false)` to succeed without it (a negative errno), or the injected error.
    async fn rule_check(&self, offset: u64, bytes: u64, iotype: IoType) -> Result<bool> {
        let Some(injection) = self.rules.check(offset, bytes, iotype) else {
            return Ok(true);
        };
        if !injection.immediately {
            tokio::task::yield_now().await;
        }
        if injection.errno < 0 {
            return Ok(false);
        }
        Err(Error::Io(io::Error::from_raw_os_error(injection.errno)))
    }

    fn wrote(&self) {
        self.write_gen.fetch_add(1, Ordering::SeqCst);
    }

    /// Reads an aligned range, split by `max-transfer`.
    async fn read_aligned(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        for (at, len) in pieces(buf.len() as u64, self.limits.max_transfer) {
            let range = to_usize(at)?..to_usize(at + len)?;
            if self.rule_check(offset + at, len, IoType::Read).await? {
                self.child
                    .get()
                    .read_padded(offset + at, &mut buf[range])
                    .await?;
            }
        }
        Ok(())
    }

    /// Writes an aligned range, split by `max-transfer`.
    async fn write_aligned(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        for (at, len) in pieces(buf.len() as u64, self.limits.max_transfer) {
            let range = to_usize(at)?..to_usize(at + len)?;
            if self.rule_check(offset + at, len, IoType::Write).await? {
                self.child
                    .get()
                    .write(offset + at, &buf[range], flags)
                    .await?;
            }
        }
        Ok(())
    }

    fn is_aligned(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.limits.align) && len.is_multiple_of(self.limits.align)
    }

    /// Reads the blocks an unaligned write touches at its ends into `bounce` (which
    /// covers `start..start + bounce.len()`), raising the read-modify-write events.
    async fn rmw_read(&self, start: u64, bounce: &mut [u8], head: bool, tail: bool) -> Result<()> {
        let align = self.limits.align;
        let span = bounce.len() as u64;
        let buf_len = if head && tail && span > align {
            2 * align
        } else {
            align
        };
        let merge = span == buf_len;
        if head || merge {
            let len = to_usize(if merge { span } else { align })?;
            if head {
                self.rules.event(DebugEvent::PwritevRmwHead);
            }
            if merge && tail {
                self.rules.event(DebugEvent::PwritevRmwTail);
            }
            self.read_aligned(start, &mut bounce[..len]).await?;
            if head {
                self.rules.event(DebugEvent::PwritevRmwAfterHead);
            }
            if merge && tail {
                self.rules.event(DebugEvent::PwritevRmwAfterTail);
            }
            if merge {
                return Ok(());
            }
        }
        if tail {
            let last = to_usize(span - align)?;
            self.rules.event(DebugEvent::PwritevRmwTail);
            self.read_aligned(start + span - align, &mut bounce[last..])
                .await?;
            self.rules.event(DebugEvent::PwritevRmwAfterTail);
        }
        Ok(())
    }

    /// One zero write the size limits allow: too small for the zero alignment, it falls
    /// back to writing a buffer of zeroes (QEMU's driver says "not supported").
    async fn zero_piece(&self, offset: u64, len: u64, flags: ZeroFlags, align: u64) -> Result<()> {
        if len >= align {
            if self.rule_check(offset, len, IoType::WriteZeroes).await? {
                self.child.get().write_zeroes(offset, len, flags).await?;
            }
            return Ok(());
        }
        if flags.no_fallback {
            return Err(Error::Io(io::Error::from_raw_os_error(libc::ENOTSUP)));
        }
        let zeroes = vec![0u8; to_usize(len)?];
        let write = WriteFlags { fua: flags.fua };
        self.write_aligned(offset, &zeroes, write).await
    }

    /// Zeroes an aligned range in the pieces QEMU's block layer cuts it into.
    async fn zero_aligned(&self, mut offset: u64, mut bytes: u64, flags: ZeroFlags) -> Result<()> {
        let align = self.limits.zero_align.max(self.limits.align);
        let max = max_piece(self.limits.max_zero, align);
        let mut head = offset % align;
        let tail = (offset + bytes) % align;
        while bytes > 0 {
            let mut num = bytes;
            if head != 0 {
                num = bytes.min(align - head);
                head = (head + num) % align;
            } else if tail != 0 && num > align {
                num -= tail;
            }
            num = num.min(max);
            self.zero_piece(offset, num, flags, align).await?;
            offset += num;
            bytes -= num;
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDriver for BlkdebugDriver {
    fn name(&self) -> &'static str {
        "blkdebug"
    }

    fn is_protocol(&self) -> bool {
        true
    }

    fn size(&self) -> u64 {
        self.child.get().size()
    }

    fn alignment(&self) -> u64 {
        self.limits.align
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        if self.is_aligned(offset, len) {
            return self.read_aligned(offset, buf).await;
        }
        let start = align_down(offset, self.limits.align);
        let end = align_up(offset + len, self.limits.align);
        let mut bounce = vec![0u8; to_usize(end - start)?];
        self.read_aligned(start, &mut bounce).await?;
        let skip = to_usize(offset - start)?;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.wrote();
        let len = buf.len() as u64;
        if self.is_aligned(offset, len) {
            self.rules.event(DebugEvent::Pwritev);
            let result = self.write_aligned(offset, buf, flags).await;
            self.rules.event(DebugEvent::PwritevDone);
            return result;
        }
        let align = self.limits.align;
        let start = align_down(offset, align);
        let end = align_up(offset + len, align);
        let mut bounce = vec![0u8; to_usize(end - start)?];
        let head = !offset.is_multiple_of(align);
        let tail = !(offset + len).is_multiple_of(align);
        self.rmw_read(start, &mut bounce, head, tail).await?;
        let skip = to_usize(offset - start)?;
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        self.rules.event(DebugEvent::Pwritev);
        let result = self.write_aligned(start, &bounce, flags).await;
        self.rules.event(DebugEvent::PwritevDone);
        result
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let align = self.limits.align;
        let end = offset + len;
        let first = align_up(offset, align).min(end);
        let last = align_down(end, align).max(first);
        if first > offset {
            // A partial block: written as data, by read-modify-write.
            let zeroes = vec![0u8; to_usize(first - offset)?];
            self.write(offset, &zeroes, WriteFlags { fua: flags.fua })
                .await?;
        }
        if last > first {
            self.wrote();
            self.rules.event(DebugEvent::PwritevZero);
            let result = self.zero_aligned(first, last - first, flags).await;
            self.rules.event(DebugEvent::PwritevDone);
            result?;
        }
        if end > last {
            let zeroes = vec![0u8; to_usize(end - last)?];
            self.write(last, &zeroes, WriteFlags { fua: flags.fua })
                .await?;
        }
        Ok(())
    }

    async fn discard(&self, mut offset: u64, mut bytes: u64) -> Result<()> {
        self.wrote();
        let req = self.limits.align;
        let align = self.limits.discard_align.max(req);
        let max = max_piece(self.limits.max_discard, align);
        let mut head = offset % align;
        let tail = (offset + bytes) % align;
        while bytes > 0 {
            let mut num = bytes;
            if head != 0 {
                num = bytes.min(align - head);
                if !num.is_multiple_of(req) {
                    num %= req;
                }
                head = (head + num) % align;
            } else if tail != 0 {
                if num > align {
                    num -= tail;
                } else if !num.is_multiple_of(req) && num > req {
                    num -= num % req;
                }
            }
            num = num.min(max);
            // Pieces smaller than the request alignment are dropped, as QEMU drops the
            // "not supported" answer of a discard.
            if num >= req && self.rule_check(offset, num, IoType::Discard).await? {
                self.child.get().discard(offset, num).await?;
            }
            offset += num;
            bytes -= num;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let generation = self.write_gen.load(Ordering::SeqCst);
        if self.flushed_gen.load(Ordering::SeqCst) != generation
            && !self.rule_check(0, 0, IoType::Flush).await?
        {
            return Ok(());
        }
        self.child.get().flush().await?;
        self.flushed_gen.store(generation, Ordering::SeqCst);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.rule_check(offset, len, IoType::BlockStatus).await?;
        self.child.get().block_status(offset, len).await
    }

    async fn truncate(&self, size: u64) -> Result<()> {
        self.wrote();
        self.child.get().truncate(size).await
    }

    fn filename(&self) -> Filename {
        let child = self.child.get().driver().filename();
        let o = &self.opts;
        // The strong options as QEMU copies them into the node's full options: in schema
        // order, with lists flattened (`inject-error.0.event`); `driver` and `image` are
        // added after them. The JSON writer prints the newest of a hash bucket first,
        // so they are inserted here in reverse.
        let mut strong: Vec<(String, Value)> = Vec::new();
        if let Some(config) = &o.config {
            strong.push(("config".into(), Value::from(config.clone())));
        }
        for (name, value) in size_options(o) {
            if let Some(value) = value {
                strong.push((name.into(), Value::from(value)));
            }
        }
        let only_config = strong.len() == usize::from(o.config.is_some());
        for (i, rule) in o.inject_error.iter().flatten().enumerate() {
            let fields = [
                ("event", Some(Value::from(rule.event.as_str()))),
                ("state", rule.state.map(Value::from)),
                ("iotype", rule.iotype.map(|t| Value::from(t.as_str()))),
                ("errno", rule.errno.map(Value::from)),
                ("sector", rule.sector.map(Value::from)),
                ("once", rule.once.map(Value::from)),
                ("immediately", rule.immediately.map(Value::from)),
            ];
            for (key, value) in fields {
                if let Some(value) = value {
                    strong.push((format!("inject-error.{i}.{key}"), value));
                }
            }
        }
        for (i, rule) in o.set_state.iter().flatten().enumerate() {
            let fields = [
                ("event", Some(Value::from(rule.event.as_str()))),
                ("state", rule.state.map(Value::from)),
                ("new_state", Some(Value::from(rule.new_state))),
            ];
            for (key, value) in fields {
                if let Some(value) = value {
                    strong.push((format!("set-state.{i}.{key}"), value));
                }
            }
        }
        let plain = only_config
            && o.inject_error.iter().flatten().next().is_none()
            && o.set_state.iter().flatten().next().is_none();
        let exact = child
            .exact
            .as_ref()
            .filter(|_| plain)
            .map(|name| format!("blkdebug:{}:{name}", o.config.as_deref().unwrap_or("")));
        let mut options: Map<String, Value> = strong.into_iter().rev().collect();
        options.insert("driver".into(), Value::from("blkdebug"));
        options.insert("image".into(), Value::Object(child.options));
        Filename { exact, options }
    }

    /// As QEMU's filters: the child's dirty flag and cluster size, nothing else.
    fn info(&self) -> DriverInfo {
        let child = self.child.get().driver().info();
        DriverInfo {
            dirty_flag: child.dirty_flag,
            cluster_size: child.cluster_size,
            ..DriverInfo::default()
        }
    }

    fn debug_event(&self, event: DebugEvent) {
        self.rules.event(event);
    }

    fn can_replace_child(&self, role_name: &str) -> bool {
        role_name == "image"
    }

    /// QEMU checks no limits against the new child either.
    fn replace_child(&self, role_name: &str, node: Arc<Node>) -> Result<()> {
        self.child.replace("image", role_name, node)
    }
}

#[cfg(test)]
mod tests;
