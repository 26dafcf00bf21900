//! Opening `qcow2` nodes with their children: `file`, `data-file` (explicit, or the one
//! the header names) and `backing` (a node reference, an inline definition, `null`, or
//! the file the header names, opened read-only as implicit `#block…` nodes with the
//! header's backing format).
//!
//! Node order follows QEMU: a format node is listed after its `file` child and before
//! the backing chain it opened, so `query-named-block-nodes` and the graph dump list
//! nodes as QSD does.

use std::sync::Arc;

use super::{precheck_child, BlockGraph, Opened};
use crate::driver::qcow2::{backing_overridden, read_header, resolve_relative, Qcow2Driver};
use crate::error::{Error, Result};
use crate::node::{Child, Node, NodeFlags};
use crate::options::{
    BlockdevOptions, BlockdevRef, CommonOptions, DriverOptions, FileOptions, Qcow2Options,
    RawOptions,
};
use crate::perm::ChildRole;

/// Deepest backing chain opened from image headers (a chain that loops stops here).
const MAX_BACKING_DEPTH: u32 = 256;
/// The first bytes of every qcow2 image.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

fn backing_error(err: Error) -> Error {
    match err {
        already @ Error::BackingOpen(_) => already,
        other => Error::BackingOpen(Box::new(other)),
    }
}

fn read_only_file(filename: String) -> BlockdevOptions {
    BlockdevOptions {
        common: CommonOptions {
            read_only: Some(true),
            ..CommonOptions::default()
        },
        driver: DriverOptions::File(FileOptions {
            filename,
            pr_manager: None,
            locking: None,
            aio: None,
            aio_max_batch: None,
            drop_cache: None,
            x_check_cache_dropped: None,
        }),
    }
}

/// `qcow2` options over the node `file`, everything else as the header says.
fn qcow2_over(file: String) -> Qcow2Options {
    Qcow2Options {
        file: BlockdevRef::Reference(file),
        backing: None,
        data_file: None,
        lazy_refcounts: None,
        pass_discard_request: None,
        pass_discard_snapshot: None,
        pass_discard_other: None,
        discard_no_unref: None,
        overlap_check: None,
        cache_size: None,
        l2_cache_size: None,
        l2_cache_entry_size: None,
        refcount_cache_size: None,
        cache_clean_interval: None,
        encrypt: None,
    }
}

impl BlockGraph {
    /// Opens a `qcow2` node's children and image.
    pub(super) async fn open_qcow2(
        &mut self,
        opts: &Qcow2Options,
        flags: NodeFlags,
        name: &mut Option<String>,
    ) -> Result<Opened> {
        let file = self.open_child(&opts.file, flags.read_only).await?;
        let role = ChildRole::Metadata {
            writable: !flags.read_only,
        };
        let checked = precheck_child(&file, role, "file", name.as_deref());
        let opened = match checked {
            Ok(()) => self.open_qcow2_over(&file, opts, flags, name).await,
            Err(err) => Err(err),
        };
        match opened {
            Ok(opened) => Ok(opened),
            Err(err) => {
                self.forget_orphan(&file).await;
                Err(err)
            }
        }
    }

    async fn open_qcow2_over(
        &mut self,
        file: &Arc<Node>,
        opts: &Qcow2Options,
        flags: NodeFlags,
        name: &mut Option<String>,
    ) -> Result<Opened> {
        let header = read_header(file).await?;
        let image_name = file.driver().filename().exact;
        let data_file = match (&opts.data_file, &header.extensions.data_file) {
            (Some(reference), _) if header.has_data_file() => {
                Some(self.open_child(reference, flags.read_only).await?)
            }
            (None, Some(name)) if header.has_data_file() => {
                let path = resolve_relative(image_name.as_deref(), name).ok_or_else(|| {
                    Error::FormatOption("Could not open data file: no file name".into())
                })?;
                let mut data = read_only_file(path);
                data.common.read_only = Some(flags.read_only);
                Some(self.add_node(data, false).await?)
            }
            _ => None,
        };
        let opened = Qcow2Driver::open(
            file.clone(),
            data_file.clone(),
            opts,
            &header,
            flags.read_only,
        )
        .await;
        let mut driver = match opened {
            Ok(driver) => driver,
            Err(err) => {
                if let Some(data) = &data_file {
                    self.forget_orphan(data).await;
                }
                return Err(err);
            }
        };
        self.name_now(name);
        let position = self.nodes.len();
        let backing = match self
            .open_backing(opts, &header, image_name.as_deref())
            .await
        {
            Ok(backing) => backing,
            Err(err) => {
                let _ = crate::driver::BlockDriver::close(&driver).await;
                if let Some(data) = &data_file {
                    self.forget_orphan(data).await;
                }
                return Err(err);
            }
        };
        let (backing, overridden) = backing;
        driver.set_backing(backing.clone(), overridden);
        let writable = !flags.read_only;
        let mut children = Vec::new();
        if let Some(node) = backing {
            children.push(Child {
                name: "backing".into(),
                node,
                role: ChildRole::Cow,
            });
        }
        if let Some(node) = data_file {
            children.push(Child {
                name: "data-file".into(),
                node,
                role: ChildRole::Metadata { writable },
            });
        }
        children.push(Child {
            name: "file".into(),
            node: file.clone(),
            role: ChildRole::Metadata { writable },
        });
        Ok(Opened {
            driver: Box::new(driver),
            children,
            flags,
            position: Some(position),
        })
    }

    /// The backing node, and whether it differs from what the header names.
    async fn open_backing(
        &mut self,
        opts: &Qcow2Options,
        header: &qcow2::Header,
        image_name: Option<&str>,
    ) -> Result<(Option<Arc<Node>>, bool)> {
        match &opts.backing {
            Some(None) => Ok((
                None,
                backing_overridden(header.backing_file.as_deref(), None),
            )),
            Some(Some(reference)) => {
                let node = self
                    .open_child(reference, true)
                    .await
                    .map_err(backing_error)?;
                let overridden = backing_overridden(header.backing_file.as_deref(), Some(&node));
                Ok((Some(node), overridden))
            }
            None => {
                let Some(name) = &header.backing_file else {
                    return Ok((None, false));
                };
                let path = resolve_relative(image_name, name).ok_or_else(|| {
                    backing_error(Error::FormatOption(format!(
                        "Cannot use relative backing file names for '{}'",
                        image_name.unwrap_or_default()
                    )))
                })?;
                let format = header.extensions.backing_format.clone();
                let node = self
                    .open_implicit_backing(path, format.as_deref())
                    .await
                    .map_err(backing_error)?;
                Ok((Some(node), false))
            }
        }
    }

    /// Opens `path` read-only as the backing file, in `format` (probed when absent).
    async fn open_implicit_backing(
        &mut self,
        path: String,
        format: Option<&str>,
    ) -> Result<Arc<Node>> {
        if self.backing_depth >= MAX_BACKING_DEPTH {
            return Err(Error::FormatOption("Backing file chain is too deep".into()));
        }
        if let Some(other) = format.filter(|f| !matches!(*f, "qcow2" | "raw" | "file")) {
            return Err(Error::FormatOption(format!("Unknown driver '{other}'")));
        }
        self.backing_depth += 1;
        let result = self.open_implicit_backing_at_depth(path, format).await;
        self.backing_depth -= 1;
        result
    }

    async fn open_implicit_backing_at_depth(
        &mut self,
        path: String,
        format: Option<&str>,
    ) -> Result<Arc<Node>> {
        let file = self.add_node(read_only_file(path), false).await?;
        if format == Some("file") {
            return Ok(file);
        }
        let format = match format {
            Some(format) => format.to_string(),
            None => {
                let mut magic = [0u8; 4];
                if let Err(err) = file.read_padded(0, &mut magic).await {
                    self.forget_orphan(&file).await;
                    return Err(err);
                }
                if magic == QCOW2_MAGIC { "qcow2" } else { "raw" }.to_string()
            }
        };
        let reference = file.name().to_string();
        let driver = if format == "qcow2" {
            DriverOptions::Qcow2(Box::new(qcow2_over(reference)))
        } else {
            DriverOptions::Raw(RawOptions {
                file: BlockdevRef::Reference(reference),
                offset: None,
                size: None,
            })
        };
        let opts = BlockdevOptions {
            common: CommonOptions {
                read_only: Some(true),
                ..CommonOptions::default()
            },
            driver,
        };
        match self.add_node(opts, false).await {
            Ok(node) => Ok(node),
            Err(err) => {
                self.forget_orphan(&file).await;
                Err(err)
            }
        }
    }
}
