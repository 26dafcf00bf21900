//! The only crate of blockd with `unsafe` code: thin, safe wrappers around the
//! system calls the rest of the daemon needs (file I/O helpers, locks, process
//! control). Every `unsafe` block states the invariants it relies on.
#![allow(unsafe_code)]

pub mod file;
pub mod process;
