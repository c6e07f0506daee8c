//! The scenario file format (TOML) and its validation.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// A simulated workload: a backend, its clients and the phases of offered load, as read from a TOML file.
///
/// The format is described in the [module documentation](super). A `Scenario` obtained from
/// [`Scenario::from_toml`] or [`Scenario::load`] has been validated; one built or changed by hand is validated
/// again when it is run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Unique name, used in reports and chart file names.
    pub name: String,
    /// What the scenario shows.
    #[serde(default)]
    pub description: Option<String>,
    /// RNG seed: the same scenario with the same seed gives the same report, byte for byte.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The backend at the start of the run.
    pub backend: Backend,
    /// How clients behave.
    pub client: Client,
    /// Request classes; empty means one class `default` with priority `critical`.
    #[serde(default, rename = "class")]
    pub classes: Vec<Class>,
    /// Phases of offered load, run back to back.
    #[serde(rename = "phase")]
    pub phases: Vec<Phase>,
}

fn default_seed() -> u64 {
    1
}

/// The simulated backend: `workers` requests are served at once, the others wait in its own FIFO queue.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// Requests served at once.
    pub workers: usize,
    /// Service time distribution.
    pub service: ServiceTime,
    /// Fraction of served requests that fail with HTTP 500.
    #[serde(default)]
    pub error_rate: f64,
}

/// A change of the backend from a phase on; absent fields keep their value.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendChange {
    /// New service time distribution.
    #[serde(default)]
    pub service: Option<ServiceTime>,
    /// New error rate.
    #[serde(default)]
    pub error_rate: Option<f64>,
}

/// A service time distribution.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(tag = "dist", rename_all = "lowercase", deny_unknown_fields)]
pub enum ServiceTime {
    /// Always `ms` milliseconds.
    Constant {
        /// Milliseconds.
        ms: f64,
    },
    /// Exponentially distributed with mean `mean_ms`.
    Exponential {
        /// Mean in milliseconds.
        mean_ms: f64,
    },
    /// Log-normally distributed with median `median_ms` and shape `sigma`.
    Lognormal {
        /// Median in milliseconds.
        median_ms: f64,
        /// Standard deviation of the underlying normal distribution.
        sigma: f64,
    },
}

impl ServiceTime {
    /// The mean service time in milliseconds.
    pub fn mean_ms(&self) -> f64 {
        match *self {
            ServiceTime::Constant { ms } => ms,
            ServiceTime::Exponential { mean_ms } => mean_ms,
            ServiceTime::Lognormal { median_ms, sigma } => median_ms * (sigma * sigma / 2.0).exp(),
        }
    }

    /// The service time for a request whose random demand is `normal` (standard normal) and `exp` (standard
    /// exponential). Drawing these per request rather than per distribution keeps each request's demand the
    /// same across strategies and phases, so strategies are compared on identical work.
    pub(crate) fn sample(&self, normal: f64, exp: f64) -> Duration {
        let ms = match *self {
            ServiceTime::Constant { ms } => ms,
            ServiceTime::Exponential { mean_ms } => mean_ms * exp,
            ServiceTime::Lognormal { median_ms, sigma } => median_ms * (sigma * normal).exp(),
        };
        Duration::from_nanos((ms * 1e6).max(0.0) as u64)
    }

    fn validate(&self, key: &str) -> Result<(), (String, String)> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err((
                    format!("{key}.{name}"),
                    format!("must be a positive number of milliseconds, got {v}"),
                ))
            }
        };
        match *self {
            ServiceTime::Constant { ms } => positive("ms", ms),
            ServiceTime::Exponential { mean_ms } => positive("mean_ms", mean_ms),
            ServiceTime::Lognormal { median_ms, sigma } => {
                positive("median_ms", median_ms)?;
                if sigma.is_finite() && sigma >= 0.0 {
                    Ok(())
                } else {
                    Err((
                        format!("{key}.sigma"),
                        format!("must be a non-negative number, got {sigma}"),
                    ))
                }
            }
        }
    }
}

/// How clients behave.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    /// The client gives up after this many milliseconds (all attempts included).
    pub timeout_ms: u64,
    /// Send the remaining budget to the server as a `grpc-timeout` header.
    #[serde(default)]
    pub send_deadline: bool,
    /// Drop the request future when the client gives up (otherwise the server keeps working on it, as across a
    /// real network).
    #[serde(default)]
    pub cancel_on_timeout: bool,
    /// Immediate retries after a rejection or an error, within the timeout.
    #[serde(default)]
    pub retries: u32,
    /// How arrivals are spaced.
    #[serde(default)]
    pub arrivals: Arrivals,
}

/// How client arrivals are spaced in time, at the phase's rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrivals {
    /// Independent arrivals (a Poisson process): open-loop traffic from many clients. The default.
    #[default]
    Poisson,
    /// Evenly spaced arrivals: no burstiness at all, for answers known in advance.
    Uniform,
}

/// A request class.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Class {
    /// Name, unique in the scenario; used in `class_rps` and in report rows.
    pub name: String,
    /// Priority, sent in the [`PRIORITY_HEADER`](super::PRIORITY_HEADER) request header.
    pub priority: Priority,
    /// Overrides the client's timeout for this class.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Request priority, from most to least important.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Must not be shed while anything else can be.
    CriticalPlus,
    /// User-facing; the default.
    Critical,
    /// Degradable.
    SheddablePlus,
    /// Background work, shed first.
    Sheddable,
}

impl Priority {
    /// The header value: `critical_plus`, `critical`, `sheddable_plus` or `sheddable`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::CriticalPlus => "critical_plus",
            Priority::Critical => "critical",
            Priority::SheddablePlus => "sheddable_plus",
            Priority::Sheddable => "sheddable",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A phase of offered load.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Name, used in report rows.
    pub name: String,
    /// Length in seconds (may be fractional).
    pub duration_s: f64,
    /// Poisson arrival rate per second, split evenly across classes.
    #[serde(default)]
    pub rps: Option<f64>,
    /// The rate ramps linearly from `rps` to `rps_end` across the phase.
    #[serde(default)]
    pub rps_end: Option<f64>,
    /// Per-class arrival rates, instead of `rps`.
    #[serde(default)]
    pub class_rps: Option<BTreeMap<String, f64>>,
    /// The backend changes from this phase on.
    #[serde(default)]
    pub backend: Option<BackendChange>,
}

/// A scenario that could not be read: names the file, the key and the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError {
    file: String,
    key: String,
    problem: String,
}

impl ScenarioError {
    fn new(file: &str, key: impl Into<String>, problem: impl Into<String>) -> Self {
        ScenarioError {
            file: file.to_owned(),
            key: key.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn runtime(scenario: &str, error: std::io::Error) -> Self {
        ScenarioError::new(
            scenario,
            "",
            format!("cannot start the simulation runtime: {error}"),
        )
    }

    /// The file (or the name given to [`Scenario::from_toml`]).
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The offending key, as a path such as `phase[2].rps`; empty when the problem concerns the whole file.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What is wrong.
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.problem)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.problem)
        }
    }
}

impl std::error::Error for ScenarioError {}

impl Scenario {
    /// Parses and validates a scenario; `file` names the source in error messages.
    pub fn from_toml(text: &str, file: &str) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| {
            let (key, problem) = describe_toml_error(text, &e);
            ScenarioError::new(file, key, problem)
        })?;
        scenario
            .check()
            .map_err(|(key, problem)| ScenarioError::new(file, key, problem))?;
        Ok(scenario)
    }

    /// Reads, parses and validates a scenario file.
    pub fn load(path: impl AsRef<Path>) -> Result<Scenario, ScenarioError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScenarioError::new(&file, "", e.to_string()))?;
        Scenario::from_toml(&text, &file)
    }

    /// The ten scenarios shipped with the crate (`scenarios/*.toml`), in order.
    pub fn builtin() -> Vec<Scenario> {
        BUILTIN
            .iter()
            .map(|(file, text)| {
                Scenario::from_toml(text, file).expect("built-in scenarios are valid")
            })
            .collect()
    }

    /// Checks the values the file format cannot: ranges, cross references, uniqueness. Scenarios read from TOML
    /// are already checked; this is for scenarios built or changed in code (the error names the scenario
    /// instead of a file).
    pub fn validate(&self) -> Result<(), ScenarioError> {
        self.check()
            .map_err(|(key, problem)| ScenarioError::new(&self.name, key, problem))
    }

    fn check(&self) -> Result<(), (String, String)> {
        if self.name.trim().is_empty() {
            return Err(("name".into(), "must not be empty".into()));
        }
        if self.backend.workers == 0 {
            return Err(("backend.workers".into(), "must be at least 1".into()));
        }
        self.backend.service.validate("backend.service")?;
        check_fraction("backend.error_rate", self.backend.error_rate)?;
        check_timeout("client.timeout_ms", self.client.timeout_ms)?;
        for (i, class) in self.classes.iter().enumerate() {
            if class.name.is_empty() {
                return Err((format!("class[{i}].name"), "must not be empty".into()));
            }
            if self.classes[..i].iter().any(|c| c.name == class.name) {
                return Err((
                    format!("class[{i}].name"),
                    format!("duplicate class `{}`", class.name),
                ));
            }
            if class.name == "all" {
                return Err((
                    format!("class[{i}].name"),
                    "`all` names the rows that sum the classes".into(),
                ));
            }
            if let Some(timeout) = class.timeout_ms {
                check_timeout(&format!("class[{i}].timeout_ms"), timeout)?;
            }
        }
        if self.phases.is_empty() {
            return Err(("phase".into(), "at least one [[phase]] is required".into()));
        }
        for (i, phase) in self.phases.iter().enumerate() {
            let key = |field: &str| format!("phase[{i}].{field}");
            if self.phases[..i].iter().any(|p| p.name == phase.name) {
                return Err((key("name"), format!("duplicate phase `{}`", phase.name)));
            }
            if !(phase.duration_s > 0.0 && phase.duration_s <= MAX_PHASE_S) {
                return Err((
                    key("duration_s"),
                    format!(
                        "must be a positive number of seconds up to {MAX_PHASE_S} (a day), got {}",
                        phase.duration_s
                    ),
                ));
            }
            match (&phase.rps, &phase.class_rps) {
                (Some(_), Some(_)) => {
                    return Err((
                        key("class_rps"),
                        "give either rps or class_rps, not both".into(),
                    ))
                }
                (None, None) => return Err((key("rps"), "missing: give rps or class_rps".into())),
                (Some(rps), None) => check_rate(&key("rps"), *rps)?,
                (None, Some(rates)) => {
                    if self.classes.is_empty() {
                        return Err((key("class_rps"), "needs [[class]] definitions".into()));
                    }
                    if phase.rps_end.is_some() {
                        return Err((key("rps_end"), "only ramps `rps`, not `class_rps`".into()));
                    }
                    for (name, rate) in rates {
                        if !self.classes.iter().any(|c| &c.name == name) {
                            return Err((
                                format!("{}.{name}", key("class_rps")),
                                "no such class".into(),
                            ));
                        }
                        check_rate(&format!("{}.{name}", key("class_rps")), *rate)?;
                    }
                }
            }
            if let Some(end) = phase.rps_end {
                check_rate(&key("rps_end"), end)?;
            }
            if let Some(change) = &phase.backend {
                if let Some(service) = &change.service {
                    service.validate(&key("backend.service"))?;
                }
                if let Some(rate) = change.error_rate {
                    check_fraction(&key("backend.error_rate"), rate)?;
                }
            }
        }
        Ok(())
    }

    /// The end of the scenario, from its start.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.phases.iter().map(|p| p.duration_s).sum())
    }
}

/// The longest client timeout: the range of the latency histograms.
const MAX_TIMEOUT_MS: u64 = 3_600_000;

/// The longest phase: runs are in simulated time, but a phase far longer than any scenario needs would only run
/// for hours of real time (or, beyond 584 billion years, overflow the run's length).
const MAX_PHASE_S: f64 = 86_400.0;

fn check_timeout(key: &str, ms: u64) -> Result<(), (String, String)> {
    if (1..=MAX_TIMEOUT_MS).contains(&ms) {
        Ok(())
    } else {
        Err((
            key.into(),
            format!("must be between 1 and {MAX_TIMEOUT_MS} (an hour), got {ms}"),
        ))
    }
}

fn check_rate(key: &str, rate: f64) -> Result<(), (String, String)> {
    if rate.is_finite() && rate >= 0.0 {
        Ok(())
    } else {
        Err((
            key.into(),
            format!("must be a non-negative rate per second, got {rate}"),
        ))
    }
}

fn check_fraction(key: &str, v: f64) -> Result<(), (String, String)> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err((key.into(), format!("must be between 0 and 1, got {v}")))
    }
}

/// Turns a TOML/serde error into a key path and a one-line problem. toml reports the span of the offending
/// item but no key path, so the path is rebuilt from the table headers above the span and the key at it.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> (String, String) {
    let problem = error
        .message()
        .lines()
        .next()
        .unwrap_or("invalid TOML")
        .trim()
        .to_owned();
    let Some(span) = error.span() else {
        return (String::new(), problem);
    };
    let mut table = String::new();
    let mut counts: Vec<(String, usize)> = Vec::new();
    let mut offset = 0;
    let mut line_key = String::new();
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if offset + line.len() > span.start || offset >= span.start {
            let prefix = &text[offset..span.start.max(offset)];
            if !trimmed.starts_with('[') {
                line_key = key_at(prefix.trim_start().trim_end_matches('\n'), trimmed);
                break;
            }
        }
        if let Some(name) = trimmed
            .strip_prefix("[[")
            .and_then(|s| s.split("]]").next())
        {
            let name = name.trim().to_owned();
            let index = match counts.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => {
                    *c += 1;
                    *c
                }
                None => {
                    counts.push((name.clone(), 0));
                    0
                }
            };
            table = format!("{name}[{index}]");
        } else if let Some(name) = trimmed.strip_prefix('[').and_then(|s| s.split(']').next()) {
            table = name.trim().to_owned();
        }
        offset += line.len();
        if offset > span.start {
            break;
        }
    }
    let mut key = table;
    for part in [line_key, quoted_after(&problem, "field `")] {
        if !part.is_empty() && !key.ends_with(&part) {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(&part);
        }
    }
    (key, problem)
}

/// The key path on a line up to the error: `service.dist` for `service = { dist = "gamma" }`.
fn key_at(prefix: &str, line: &str) -> String {
    let leading = line.split('=').next().unwrap_or("").trim();
    if leading.is_empty() || leading.starts_with('#') {
        return String::new();
    }
    let mut key = leading.to_owned();
    if let Some(inner) = prefix.rfind('{').map(|i| &prefix[i + 1..]) {
        if let Some(eq) = inner.rfind('=') {
            let before = &inner[..eq];
            let inner_key = before.rsplit([',', '{']).next().unwrap_or("").trim();
            if !inner_key.is_empty() {
                key.push('.');
                key.push_str(inner_key);
            }
        }
    }
    key
}

fn quoted_after(message: &str, marker: &str) -> String {
    if !message.starts_with("missing field") {
        return String::new();
    }
    message
        .split_once(marker)
        .and_then(|(_, rest)| rest.split('`').next())
        .unwrap_or("")
        .to_owned()
}

const BUILTIN: [(&str, &str); 10] = [
    (
        "scenarios/s1-step.toml",
        include_str!("../../scenarios/s1-step.toml"),
    ),
    (
        "scenarios/s2-sustained.toml",
        include_str!("../../scenarios/s2-sustained.toml"),
    ),
    (
        "scenarios/s3-convergence.toml",
        include_str!("../../scenarios/s3-convergence.toml"),
    ),
    (
        "scenarios/s4-slowdown.toml",
        include_str!("../../scenarios/s4-slowdown.toml"),
    ),
    (
        "scenarios/s5a-hang.toml",
        include_str!("../../scenarios/s5a-hang.toml"),
    ),
    (
        "scenarios/s5b-creep.toml",
        include_str!("../../scenarios/s5b-creep.toml"),
    ),
    (
        "scenarios/s6-priority.toml",
        include_str!("../../scenarios/s6-priority.toml"),
    ),
    (
        "scenarios/s7-deadline.toml",
        include_str!("../../scenarios/s7-deadline.toml"),
    ),
    (
        "scenarios/s8-bursts.toml",
        include_str!("../../scenarios/s8-bursts.toml"),
    ),
    (
        "scenarios/s9-outage.toml",
        include_str!("../../scenarios/s9-outage.toml"),
    ),
];
