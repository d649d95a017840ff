//! What a benchmark run measured: samples grouped by case and metric, with medians and
//! ranges over repetitions, and the machine they were taken on.

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
}

impl Machine {
    pub fn describe() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default();
        let mem_kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Self {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        }
    }
}

/// Every value of one metric of one case, over the repetitions.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct Series {
    pub group: String,
    pub case: String,
    pub metric: String,
    pub unit: String,
    pub values: Vec<f64>,
}

impl Series {
    pub fn median(&self) -> f64 {
        let mut v: Vec<f64> = self
            .values
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    pub fn min(&self) -> f64 {
        self.values
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .fold(f64::INFINITY, f64::min)
    }

    pub fn max(&self) -> f64 {
        self.values
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .fold(f64::NEG_INFINITY, f64::max)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    pub quick: bool,
    pub started_unix: u64,
    pub seconds: f64,
    /// Load generator and flags, per group.
    pub method: Vec<(String, String)>,
    pub series: Vec<Series>,
    /// Things the reader must know to read the numbers.
    pub notes: Vec<String>,
    /// Measurements that could not be taken (a tool failed, a change was not applied):
    /// these fail the run.
    pub failures: Vec<String>,
}

impl Results {
    pub fn new(quick: bool) -> Self {
        let started_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            machine: Machine::describe(),
            quick,
            started_unix,
            seconds: 0.0,
            method: vec![],
            series: vec![],
            notes: vec![],
            failures: vec![],
        }
    }

    /// Add one measurement.
    pub fn record(&mut self, group: &str, case: &str, metric: &str, unit: &str, value: f64) {
        match self
            .series
            .iter_mut()
            .find(|s| s.group == group && s.case == case && s.metric == metric)
        {
            Some(s) => s.values.push(value),
            None => self.series.push(Series {
                group: group.into(),
                case: case.into(),
                metric: metric.into(),
                unit: unit.into(),
                values: vec![value],
            }),
        }
    }

    /// Record several numbers of a tool's JSON output: `(metric, unit, key)` each; a
    /// missing key is recorded as NaN, so the case shows it produced no number.
    pub fn record_fields(
        &mut self,
        group: &str,
        case: &str,
        v: &serde_json::Value,
        fields: &[(&str, &str, &str)],
    ) {
        for (metric, unit, key) in fields {
            self.record(
                group,
                case,
                metric,
                unit,
                v[*key].as_f64().unwrap_or(f64::NAN),
            );
        }
    }

    pub fn get(&self, group: &str, case: &str, metric: &str) -> Option<&Series> {
        self.series
            .iter()
            .find(|s| s.group == group && s.case == case && s.metric == metric)
    }

    /// Cases of a group, in the order they were first recorded.
    pub fn cases(&self, group: &str) -> Vec<String> {
        let mut out: Vec<String> = vec![];
        for s in self.series.iter().filter(|s| s.group == group) {
            if !out.contains(&s.case) {
                out.push(s.case.clone());
            }
        }
        out
    }

    pub fn metrics(&self, group: &str) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = vec![];
        for s in self.series.iter().filter(|s| s.group == group) {
            if !out.iter().any(|(m, _)| *m == s.metric) {
                out.push((s.metric.clone(), s.unit.clone()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges_over_repetitions() {
        let mut r = Results::new(true);
        for v in [3.0, 1.0, 2.0, f64::NAN] {
            r.record("g", "c", "m", "ms", v);
        }
        let s = r.get("g", "c", "m").unwrap();
        assert_eq!((s.median(), s.min(), s.max()), (2.0, 1.0, 3.0));
        r.record("g", "d", "m", "ms", 1.0);
        assert_eq!(r.cases("g"), ["c", "d"]);
        assert_eq!(r.metrics("g"), [("m".to_owned(), "ms".to_owned())]);
    }
}
