//! Prints the normalized transcript of a scenario against one daemon:
//! `cargo run -p testkit --example transcript -- SCENARIO.json [BINARY]`
//! (BINARY defaults to the scenario's reference program).

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;
use testkit::scenario::{run, Scenario};

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let path = PathBuf::from(
        args.next()
            .context("usage: transcript SCENARIO.json [BINARY]")?,
    );
    let scenario = Scenario::load(&path)?;
    let binary = args
        .next()
        .map_or_else(|| scenario.reference.binary(), PathBuf::from);
    let transcript = run(&scenario, &binary)?;
    for group in &transcript.groups {
        println!("=== {:?} {}", group.step, group.label);
        for reply in &group.replies {
            println!("  <- {reply}");
        }
        for event in &group.events {
            println!("  ev {event}");
        }
        for note in &group.notes {
            println!("  !! {note}");
        }
    }
    if !transcript.bad_line_endings.is_empty() {
        println!(
            "{}",
            json!({ "bad_line_endings": transcript.bad_line_endings })
        );
    }
    if !transcript.stderr.is_empty() {
        println!("stderr:\n{}", transcript.stderr);
    }
    Ok(())
}
