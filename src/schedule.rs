//! When periodic upkeep runs (CRL refresh, certificate checks): a plain interval such as `30s`, or a cron expression
//! as dojot's `*_TIME` variables used (`0 */2 * * *`, seconds field optional), evaluated in UTC.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;

/// A parsed schedule.
#[derive(Clone)]
pub enum Schedule {
    /// Every so often, counted from the previous run.
    Every(Duration),
    /// At the times a cron expression names.
    Cron(Box<Cron>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{input:?} is neither a duration (`30s`, `10m`, `2h`) nor a cron expression (`0 */2 * * *`): {problem}")]
pub struct ScheduleError {
    input: String,
    problem: String,
}

/// Shortest interval accepted: a schedule of `0s` would spin.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let text = input.trim();
        let error = |problem: String| ScheduleError { input: input.to_string(), problem };
        // A cron expression always has at least five space-separated fields; a duration never has a space.
        if text.split_whitespace().count() >= 5 {
            return text.parse::<Cron>().map(|cron| Self::Cron(Box::new(cron))).map_err(|e| error(e.to_string()));
        }
        let interval = humantime::parse_duration(text).map_err(|e| error(e.to_string()))?;
        if interval < MIN_INTERVAL {
            return Err(error(format!("the interval must be at least {MIN_INTERVAL:?}")));
        }
        Ok(Self::Every(interval))
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Every(interval) => write!(f, "every {}", humantime::format_duration(*interval)),
            Self::Cron(cron) => write!(f, "cron {:?}", cron.pattern.to_string()),
        }
    }
}

impl Schedule {
    /// How long to wait from `now` until the next run. A cron expression that never matches again waits a day and
    /// asks again, so a bad expression cannot make the caller spin.
    pub fn delay_from(&self, now: DateTime<Utc>) -> Duration {
        match self {
            Self::Every(interval) => *interval,
            Self::Cron(cron) => cron
                .find_next_occurrence(&now, false)
                .ok()
                .and_then(|next| (next - now).to_std().ok())
                .unwrap_or(Duration::from_secs(24 * 3600)),
        }
    }

    /// Sleeps until the next run.
    pub async fn wait(&self) {
        tokio::time::sleep(self.delay_from(Utc::now())).await;
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, h, m, s).single().unwrap()
    }

    #[test]
    fn durations() {
        let every = |text: &str| match text.parse::<Schedule>().unwrap() {
            Schedule::Every(d) => d,
            Schedule::Cron(_) => panic!("{text} parsed as cron"),
        };
        assert_eq!(every("30s"), Duration::from_secs(30));
        assert_eq!(every(" 10m "), Duration::from_secs(600));
        assert_eq!(every("2h"), Duration::from_secs(7200));
        assert_eq!(every("1m 30s"), Duration::from_secs(90));
        assert_eq!("45s".parse::<Schedule>().unwrap().delay_from(at(0, 0, 0)), Duration::from_secs(45));
    }

    #[test]
    fn dojot_cron_expressions() {
        // dojot's defaults: CRL every two hours, expiry check at 01:00, revocation check every three hours.
        let crl: Schedule = "0 */2 * * *".parse().unwrap();
        assert_eq!(crl.delay_from(at(1, 30, 0)), Duration::from_secs(30 * 60));
        assert_eq!(crl.delay_from(at(2, 0, 0)), Duration::from_secs(2 * 3600), "exactly on time: the next one");
        let daily: Schedule = "0 1 * * *".parse().unwrap();
        assert_eq!(daily.delay_from(at(0, 59, 0)), Duration::from_secs(60));
        assert_eq!(daily.delay_from(at(1, 0, 1)), Duration::from_secs(24 * 3600 - 1));
        // The seconds field is optional (cert-sidecar's six-field form).
        let with_seconds: Schedule = "0 0 */2 * * *".parse().unwrap();
        assert_eq!(with_seconds.delay_from(at(1, 30, 0)), Duration::from_secs(30 * 60));
        let every_ten: Schedule = "*/10 * * * *".parse().unwrap();
        assert_eq!(every_ten.delay_from(at(3, 4, 0)), Duration::from_secs(6 * 60));
    }

    #[test]
    fn bad_input_is_refused_with_the_input_named() {
        for bad in ["", "soon", "0s", "10", "-5s", "61 * * * *", "* * * * * * * *", "0 */2 * *"] {
            let err = bad.parse::<Schedule>().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn debug_names_the_schedule() {
        assert_eq!(format!("{:?}", "90s".parse::<Schedule>().unwrap()), "every 1m 30s");
        assert!(format!("{:?}", "0 1 * * *".parse::<Schedule>().unwrap()).starts_with("cron "));
    }
}
