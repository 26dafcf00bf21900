//! The QMP monitor: one session per client connection.
//!
//! A session sends the greeting, holds the connection in capability
//! negotiation mode until `qmp_capabilities`, frames requests with QEMU's JSON
//! streamer, checks each request's shape and arguments against the schema,
//! hands valid commands to a [`Handler`] (the daemon's control task) and
//! writes replies and events in QEMU's output form. Events reach every session
//! in command mode through its own queue on the event bus; sessions still
//! negotiating drop them, as QEMU does.
//!
//! The session answers `qmp_capabilities` itself: capabilities are state of the
//! connection, not of the daemon.

mod event;
mod session;

pub use event::{Event, EventBus};
pub use session::{serve, Handler, SessionOptions};

/// The QEMU version blockd speaks for: clients decide features by it.
pub const QEMU_VERSION: (u32, u32, u32) = (10, 0, 2);
