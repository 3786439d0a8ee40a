//! Summaries of the runs: min/median/max per (scenario, contender), the
//! final table and one JSON line per (scenario, contender).

use crate::measure::RunResult;
use crate::scenario::{Broker, Contender};
use serde_json::{Value, json};

/// Every run of one contender in one scenario (a run that could not even
/// report is an `Err` with the reason).
#[derive(Debug)]
pub(crate) struct Series {
    pub(crate) scenario: &'static str,
    pub(crate) broker: Broker,
    pub(crate) contender: Contender,
    pub(crate) messages: u64,
    pub(crate) runs: Vec<Result<RunResult, String>>,
}

/// The summary of one series.
#[derive(Debug, Clone)]
pub(crate) struct Summary {
    pub(crate) scenario: &'static str,
    pub(crate) contender: &'static str,
    pub(crate) messages: u64,
    pub(crate) runs: usize,
    pub(crate) rates: Vec<f64>,
    pub(crate) min: f64,
    pub(crate) median: f64,
    pub(crate) max: f64,
    pub(crate) ratio: Option<f64>,
    pub(crate) peak_rss_mib: f64,
    pub(crate) allocs_per_msg: f64,
    pub(crate) correct: String,
    /// Every run as the child reported it (or the error), in run order.
    pub(crate) details: Vec<Value>,
}

impl Summary {
    pub(crate) fn is_correct(&self) -> bool {
        self.correct == "correct"
    }
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

impl Series {
    /// Summarises; `raw_median` is the raw contender's median of the same scenario.
    pub(crate) fn summary(&self, raw_median: Option<f64>) -> Summary {
        let ok: Vec<&RunResult> = self.runs.iter().filter_map(|r| r.as_ref().ok()).collect();
        let mut rates: Vec<f64> = ok.iter().map(|r| r.rate).collect();
        rates.sort_by(f64::total_cmp);
        let mut allocs: Vec<f64> = ok.iter().map(|r| r.allocs_per_msg).collect();
        allocs.sort_by(f64::total_cmp);
        let mut wrong: Vec<String> = Vec::new();
        for (i, r) in self.runs.iter().enumerate() {
            match r {
                Ok(r) if r.is_correct() => {}
                Ok(r) => wrong.push(format!("run {}: {}", i + 1, r.correct)),
                Err(e) => wrong.push(format!("run {}: {e}", i + 1)),
            }
        }
        let med = median(&rates);
        Summary {
            scenario: self.scenario,
            contender: self.contender.label(self.broker),
            messages: self.messages,
            runs: self.runs.len(),
            min: rates.first().copied().unwrap_or(f64::NAN),
            max: rates.last().copied().unwrap_or(f64::NAN),
            median: med,
            ratio: raw_median.filter(|r| *r > 0.0).map(|r| med / r),
            peak_rss_mib: ok.iter().map(|r| r.peak_rss_mib).fold(f64::NAN, f64::max),
            allocs_per_msg: median(&allocs),
            correct: if wrong.is_empty() && !self.runs.is_empty() {
                "correct".to_owned()
            } else {
                wrong.join(" | ")
            },
            rates,
            details: self
                .runs
                .iter()
                .map(|r| match r {
                    Ok(r) => serde_json::to_value(r).unwrap_or(Value::Null),
                    Err(e) => json!({ "error": e }),
                })
                .collect(),
        }
    }
}

/// `v` with `decimals`, or `-` when there is no number.
pub(crate) fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "-".to_owned()
    }
}

/// A ratio with three decimals, in scientific notation below 0.01.
fn ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r.is_finite() && r < 0.01 => format!("{r:.1e}"),
        Some(r) => num(r, 3),
        None => "-".to_owned(),
    }
}

/// The final table.
pub(crate) fn table(summaries: &[Summary]) -> String {
    let mut out = format!(
        "{:<17} {:<15} {:>9} {:>9} {:>9} {:>7} {:>8} {:>11}  {}\n",
        "scenario",
        "contender",
        "min",
        "median",
        "max",
        "ratio",
        "RSS MiB",
        "allocs/msg",
        "correct"
    );
    for s in summaries {
        out.push_str(&format!(
            "{:<17} {:<15} {:>9} {:>9} {:>9} {:>7} {:>8} {:>11}  {}\n",
            s.scenario,
            s.contender,
            num(s.min, 0),
            num(s.median, 0),
            num(s.max, 0),
            ratio(s.ratio),
            num(s.peak_rss_mib, 1),
            num(s.allocs_per_msg, 1),
            s.correct
        ));
    }
    out
}

/// One JSON object with every field of a summary.
pub(crate) fn json_line(s: &Summary) -> Value {
    let finite = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
    json!({
        "scenario": s.scenario,
        "contender": s.contender,
        "messages": s.messages,
        "runs": s.runs,
        "rates_msg_per_s": s.rates,
        "min_msg_per_s": finite(s.min),
        "median_msg_per_s": finite(s.median),
        "max_msg_per_s": finite(s.max),
        "ratio_of_medians_to_raw": s.ratio.and_then(|r| r.is_finite().then_some(r)),
        "peak_rss_mib": finite(s.peak_rss_mib),
        "allocs_per_msg": finite(s.allocs_per_msg),
        "correct": s.correct,
        "run_results": s.details,
    })
}
