//! weft-bench: runs the benchmark (see `weft_e2e::bench`); `cargo xtask bench` builds
//! and starts it.

use std::{path::PathBuf, process::ExitCode};

use weft_e2e::{bench, is_root};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
    };
    let out = value("--out").unwrap_or_else(|| PathBuf::from("target/bench"));
    let report = value("--report").unwrap_or_else(|| out.join("benchmarks.md"));
    if !is_root() {
        eprintln!("weft-bench: needs root (network namespaces, cgroups, eBPF)");
        return ExitCode::FAILURE;
    }
    let opts = bench::Options::new(quick, out.clone(), report.clone());
    match bench::run(&opts) {
        Ok(r) => {
            println!(
                "bench: {} series in {:.0} s; results in {}, report in {}",
                r.series.len(),
                r.seconds,
                out.join("results.json").display(),
                report.display()
            );
            for n in &r.notes {
                println!("bench: note: {n}");
            }
            let problems = bench::problems(&r);
            if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!("bench: FAILED:\n  {}", problems.join("\n  "));
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("weft-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
