//! The block layer's one error type. Display texts are qemu-storage-daemon's own `desc`
//! strings where QSD has one, because management tools match on them.

use std::io;

/// Coarse classes of [`Error`]; the daemon maps these to QMP error classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A named node (or device) does not exist.
    NotFound,
    /// The node is still used by a parent or a user.
    InUse,
    /// Options or arguments are invalid.
    InvalidArgument,
    /// An I/O error from the host.
    Io,
    /// Permissions of two users of a node (or of two processes) conflict.
    PermissionConflict,
    /// The node is read-only.
    ReadOnly,
    /// The driver cannot do this.
    NotSupported,
}

/// Everything the block layer can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("'node-name' must be specified for the root node")]
    RootNodeNeedsName,
    #[error("Duplicate nodes with node-name='{0}'")]
    DuplicateNodeName(String),
    #[error("Invalid node-name: '{0}'")]
    InvalidNodeName(String),
    #[error("Node name too long")]
    NodeNameTooLong,
    #[error("Failed to find node with node-name='{0}'")]
    NodeNotFound(String),
    #[error("Cannot find device='{device}' nor node-name='{node}'")]
    DeviceNotFound { device: String, node: String },
    #[error("Node {0} is not owned by the monitor")]
    NotMonitorOwned(String),
    #[error("Node {0} is in use")]
    NodeHasUsers(String),
    #[error("Block device {0} is in use")]
    NodeHasParents(String),
    #[error("Node '{node}' is busy: node is used as backing hd of '{parent}'")]
    BackingInUse { node: String, parent: String },
    #[error("The overlay does not support backing images")]
    BackingNotSupported,
    #[error("Making '{child}' a {role} child of '{parent}' would create a cycle")]
    Cycle {
        child: String,
        role: String,
        parent: String,
    },
    /// An overlay cannot take the node's place for this parent: its driver cannot change
    /// the child (blockd's own message; QEMU moves every parent).
    #[error(
        "Cannot replace node '{node}': it is the '{role}' child of node '{parent}', \
         and a {driver} node cannot change its children"
    )]
    ChildNotReplaceable {
        node: String,
        role: String,
        parent: String,
        driver: &'static str,
    },
    #[error("Node '{0}' is busy: node is drained")]
    Busy(String),
    #[error("Could not open '{path}': {}", Errno(.source))]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Could not create '{path}': {}", Errno(.source))]
    Create {
        path: String,
        #[source]
        source: io::Error,
    },
    /// Another process holds a permission we need; `path` is for the hint
    /// "Is another process using the image [path]?" (see [`Error::hint`]).
    #[error("Failed to get \"{perm}\" lock")]
    LockFailed { perm: &'static str, path: String },
    /// Another process holds a permission we refuse to share.
    #[error("Failed to get shared \"{perm}\" lock")]
    SharedLockFailed { perm: &'static str, path: String },
    #[error("{0}")]
    PermissionConflict(Box<PermConflict>),
    /// Growing or shrinking a file failed (QEMU prints the system error in the text).
    #[error("Could not resize file: {}", Errno(.0))]
    Resize(io::Error),
    #[error("Block node is read-only")]
    NodeReadOnly,
    #[error("Image is read-only")]
    ImageReadOnly,
    #[error("force-share=on can only be used with read-only images")]
    ForceShareNeedsReadOnly,
    #[error(
        "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
    )]
    DetectZeroesUnmapNeedsDiscard,
    #[error("aio=native was specified, but it requires cache.direct=on, which was not specified.")]
    AioNativeNeedsDirect,
    #[error("Offset ({offset}) cannot be greater than size of the containing file ({file_size})")]
    RawOffsetPastEnd { offset: u64, file_size: u64 },
    #[error("Specified size is not multiple of 512")]
    RawSizeUnaligned,
    // Two spaces before "actual": QSD prints it so.
    #[error(
        "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  \
         actual size of the containing file ({file_size})"
    )]
    RawWindowPastEnd {
        offset: u64,
        size: u64,
        file_size: u64,
    },
    #[error("Cannot resize fixed-size raw disks")]
    RawFixedSize,
    #[error("Parameter 'size' expects a >0 size")]
    NegativeSize,
    #[error("Unsupported preallocation mode: {0}")]
    UnsupportedPreallocation(&'static str),
    #[error("Image format driver does not support resize")]
    ResizeNotSupported,
    #[error("Operation not supported")]
    OperationNotSupported,
    #[error("Driver does not support x-blockdev-amend")]
    AmendNotSupported,
    #[error("x-blockdev-amend doesn't support changing the block driver")]
    AmendChangesDriver,
    /// A request reaches past the end of the node.
    #[error("request at {offset:#x} length {len:#x} is beyond the end of the node ({size:#x})")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The caller's handle lacks the permission for this request.
    #[error("request needs the '{0}' permission, which this user did not take")]
    PermissionNotTaken(&'static str),
    /// An image format error (the qcow2 library's message chain, as QEMU words it).
    #[error("{0}")]
    Format(String),
    /// Options a format driver refuses, in QEMU's words.
    #[error("{0}")]
    FormatOption(String),
    /// The backing file named by an image (or given by `backing`) failed to open.
    #[error("Could not open backing file: {0}")]
    BackingOpen(Box<Error>),
    /// A host I/O error, shown as C's strerror text as QEMU shows it.
    #[error("{}", Errno(.0))]
    Io(#[from] io::Error),
}

/// Two parents of one node want incompatible permissions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Permission conflict on node '{node}': permissions '{perms}' are both required by \
     {holder} (uses node '{node}' as '{holder_role}' child) and unshared by {blocker} \
     (uses node '{node}' as '{blocker_role}' child)."
)]
pub struct PermConflict {
    pub node: String,
    pub perms: String,
    pub holder: String,
    pub holder_role: String,
    pub blocker: String,
    pub blocker_role: String,
}

/// Shorthand for block layer results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The coarse class of this error.
    pub fn kind(&self) -> ErrorKind {
        use Error::*;
        match self {
            NodeNotFound(_) | DeviceNotFound { .. } => ErrorKind::NotFound,
            NodeHasUsers(_)
            | NodeHasParents(_)
            | Busy(_)
            | BackingInUse { .. }
            | NotMonitorOwned(_) => ErrorKind::InUse,
            Open { .. } | Create { .. } | Io(_) | Resize(_) => ErrorKind::Io,
            LockFailed { .. } | SharedLockFailed { .. } | PermissionConflict(_) => {
                ErrorKind::PermissionConflict
            }
            NodeReadOnly | ImageReadOnly | PermissionNotTaken(_) => ErrorKind::ReadOnly,
            BackingOpen(inner) => inner.kind(),
            RawFixedSize
            | ResizeNotSupported
            | OperationNotSupported
            | UnsupportedPreallocation(_)
            | AmendNotSupported
            | AmendChangesDriver
            | ChildNotReplaceable { .. } => ErrorKind::NotSupported,
            _ => ErrorKind::InvalidArgument,
        }
    }

    /// The extra line QEMU appends after the message on the command line (QMP drops it).
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::LockFailed { path, .. } | Error::SharedLockFailed { path, .. } => {
                Some(format!("Is another process using the image [{path}]?"))
            }
            _ => None,
        }
    }

    /// The errno behind this error, if it came from the host.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Open { source, .. } | Error::Create { source, .. } | Error::Io(source) => {
                source.raw_os_error()
            }
            Error::OutOfRange { .. } => Some(libc::EIO),
            Error::NodeReadOnly | Error::ImageReadOnly => Some(libc::EPERM),
            Error::OperationNotSupported => Some(libc::ENOTSUP),
            _ => None,
        }
    }
}

/// Formats an `io::Error` as C's `strerror` does: std appends " (os error N)", QEMU does not.
pub(crate) struct Errno<'a>(pub &'a io::Error);

impl std::fmt::Display for Errno<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.0.to_string();
        match text.rfind(" (os error ") {
            Some(cut) if self.0.raw_os_error().is_some() => f.write_str(&text[..cut]),
            _ => f.write_str(&text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_error_reads_like_qemu() {
        let err = Error::Open {
            path: "x.img".into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(
            err.to_string(),
            "Could not open 'x.img': No such file or directory"
        );
        assert_eq!(err.kind(), ErrorKind::Io);
    }

    #[test]
    fn lock_error_has_qemu_hint() {
        let err = Error::LockFailed {
            perm: "write",
            path: "a.img".into(),
        };
        assert_eq!(err.to_string(), "Failed to get \"write\" lock");
        assert_eq!(
            err.hint().as_deref(),
            Some("Is another process using the image [a.img]?")
        );
    }
}
