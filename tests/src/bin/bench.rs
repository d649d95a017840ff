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
    // `--from results.json`: only write the report again, from an earlier run's results.
    if let Some(from) = value("--from") {
        let r: bench::Results = match std::fs::read(&from)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("weft-bench: {}: {e}", from.display());
                return ExitCode::FAILURE;
            }
        };
        return match bench::report::write(&r, &report) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weft-bench: writing {}: {e}", report.display());
                ExitCode::FAILURE
            }
        };
    }
    if !is_root() {
        eprintln!("weft-bench: needs root (network namespaces, cgroups, eBPF)");
        return ExitCode::FAILURE;
    }
    let mut opts = bench::Options::new(quick, out.clone(), report.clone());
    // `--only paths,services,pods`: part of the run, for working on one case.
    opts.only = value("--only")
        .map(|v| {
            v.display()
                .to_string()
                .split(',')
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
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
