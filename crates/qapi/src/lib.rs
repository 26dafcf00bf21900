//! QMP wire types and the QAPI schema machinery of blockd.
//!
//! This crate knows JSON as QEMU speaks it (its parser dialect and its output form),
//! QEMU's keyval command-line syntax, the schema that declares every command, event
//! and type blockd offers, and the visitor that checks client input against that
//! schema with QEMU's error messages. It does no I/O and knows nothing of block
//! devices.

pub mod error;
pub mod introspect;
pub mod json;
pub mod keyval;
pub mod output;
pub mod schema;
pub mod visit;

pub use error::{ErrorClass, QmpError};
