//! Runs the deterministic simulator over many seeds: a soak, or the replay of one failure.
//!
//! ```text
//! cargo run --release -p asched-tests --bin asched-sim -- --seeds 10000 --steps 5000
//! cargo run -p asched-tests --bin asched-sim -- --seed 1234 --steps 5000 --variant shipped
//! cargo run -p asched-tests --bin asched-sim -- --seeds 1000 --swaps
//! ```
//!
//! `--swaps` also swaps the plugin to another build (the test build that traps on request,
//! which otherwise behaves the same) at random steps.

use std::process::ExitCode;
use std::time::Instant;

use asched_tests::sim::{Compiled, run_seed, run_seed_with_swaps};
use asched_tests::variants::Variant;

fn main() -> ExitCode {
    let mut seeds = 100u64;
    let mut first = 0u64;
    let mut steps = 5_000u64;
    let mut variant = Variant::Shipped;
    let mut swaps = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--seeds" => {
                seeds = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--seeds takes a number"))
            }
            "--first-seed" => {
                first = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--first-seed takes a number"))
            }
            "--seed" => {
                first = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--seed takes a number"));
                seeds = 1;
            }
            "--swaps" => swaps = true,
            "--steps" => {
                steps = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--steps takes a number"))
            }
            "--variant" => {
                let name = value();
                variant = Variant::from_name(&name)
                    .unwrap_or_else(|| usage(&format!("unknown variant {name:?}")));
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let compiled = Compiled::new(variant);
    let other = swaps.then(|| Compiled::new(Variant::Traps));
    let started = Instant::now();
    let mut total_steps = 0u64;
    let mut failures = 0u64;
    let mut swaps_done = 0u64;
    for seed in first..first + seeds {
        let result = match &other {
            Some(other) => run_seed_with_swaps(&compiled, other, seed, steps),
            None => run_seed(&compiled, seed, steps),
        };
        if (seed - first + 1) % 500 == 0 {
            eprintln!(
                "{} of {seeds} seeds done, {failures} failed",
                seed - first + 1
            );
        }
        match result {
            Ok(report) => {
                total_steps += report.steps;
                swaps_done += report.swaps;
            }
            Err(failure) => {
                failures += 1;
                eprintln!("{failure}\n");
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{seeds} seeds of {steps} steps ({}): {failures} failed; {total_steps} steps ({swaps_done} swaps) in {seconds:.1} s, {:.0} steps/s",
        variant.name(),
        total_steps as f64 / seconds
    );
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn usage(problem: &str) -> ! {
    eprintln!("error: {problem}");
    eprintln!(
        "usage: asched-sim [--seeds N] [--first-seed S | --seed S] [--steps N] [--variant NAME]"
    );
    eprintln!(
        "variants: shipped, test-traps, fault-reuse-txn-id, fault-ack-before-persist, fault-double-send"
    );
    std::process::exit(2)
}
