//! Differential tests: every scenario in `tests/scenarios/` is replayed
//! against QEMU's qemu-storage-daemon and against blockd, and their
//! normalized transcripts must match. See `tests/scenarios/README.md`.
//!
//! `BLOCKD_DIFF_CANDIDATE=PATH` replaces blockd by another binary (use
//! qemu-storage-daemon itself to check that a scenario is deterministic).

use std::path::{Path, PathBuf};

use testkit::scenario::{assert_same, scenario_dir, scenario_names};

fn candidate() -> PathBuf {
    std::env::var_os("BLOCKD_DIFF_CANDIDATE").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_blockd")),
        PathBuf::from,
    )
}

fn scenarios() -> PathBuf {
    scenario_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
}

fn check(name: &str) {
    let path = scenarios().join(format!("{name}.json"));
    assert_same(&path, None, &candidate());
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        const LISTED: &[&str] = &[$(stringify!($name)),*];
        $(
            #[test]
            fn $name() {
                check(stringify!($name));
            }
        )*
    };
}

scenarios!(
    backup,
    backup_enospc,
    backup_faults,
    backup_incremental,
    backup_options,
    backup_quit,
    blkdebug,
    bitmaps_persistent,
    blockdev,
    blockdev_create,
    cmdline_blockdev,
    drive_backup,
    fleecing,
    job_verbs,
    malformed_input,
    nbd_bitmaps,
    nbd_exports,
    negotiation,
    negotiation_without_oob,
    object,
    qcow2_amend,
    qcow2_blockdev,
    qcow2_create,
    quit,
    snapshot_blockdev,
    snapshot_external,
    snapshot_internal,
    snapshot_jobs,
    snapshot_parents,
    transaction,
);

#[test]
fn every_scenario_file_is_listed() {
    let unlisted: Vec<String> = scenario_names(&scenarios())
        .into_iter()
        .filter(|name| !LISTED.contains(&name.as_str()))
        .collect();
    assert!(
        unlisted.is_empty(),
        "add these scenarios to scenarios!() in differential.rs: {unlisted:?}"
    );
}
