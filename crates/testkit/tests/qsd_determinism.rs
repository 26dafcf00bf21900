//! Every scenario replayed twice against qemu-storage-daemon must give the
//! same normalized transcript; otherwise the scenario (or the normalization)
//! depends on timing and cannot judge another daemon.

use std::path::Path;

use testkit::scenario::{assert_same, scenario_dir, scenario_names};

#[test]
fn every_scenario_is_deterministic_under_qsd() {
    let qsd = testkit::qsd_path();
    let dir = scenario_dir(Path::new(env!("CARGO_MANIFEST_DIR")));
    let names = scenario_names(&dir);
    assert!(!names.is_empty(), "no scenarios in {}", dir.display());
    for name in names {
        assert_same(&dir.join(format!("{name}.json")), &qsd, &qsd);
    }
}
