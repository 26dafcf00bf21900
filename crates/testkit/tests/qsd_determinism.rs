//! Every scenario replayed twice against its reference (qemu-storage-daemon, or
//! QEMU's system emulator for the snapshot jobs) must give the
//! same normalized transcript; otherwise the scenario (or the normalization)
//! depends on timing and cannot judge another daemon.

use std::path::Path;

use testkit::scenario::{assert_same, scenario_dir, scenario_names, Scenario};

#[test]
fn every_scenario_is_deterministic_under_qsd() {
    let dir = scenario_dir(Path::new(env!("CARGO_MANIFEST_DIR")));
    let names = scenario_names(&dir);
    assert!(!names.is_empty(), "no scenarios in {}", dir.display());
    for name in names {
        let path = dir.join(format!("{name}.json"));
        let reference = Scenario::load(&path)
            .unwrap_or_else(|e| panic!("{e:#}"))
            .reference
            .binary();
        assert_same(&path, Some(&reference), &reference);
    }
}
