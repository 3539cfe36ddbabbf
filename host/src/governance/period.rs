//! Durations as the management API writes them (`30s`, `30m`, `24h`, `7d`, `1w`, `1mo`), budget
//! periods anchored at a fixed instant, and UTC timestamps in ISO 8601.
//!
//! Times are Unix milliseconds (`i64`) throughout: both databases store them as `BIGINT`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECOND: i64 = 1_000;
const DAY: i64 = 86_400 * SECOND;

/// A budget period or a key's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Millis(i64),
    /// Calendar months: a period starting on the 31st ends on the last day of a shorter month.
    Months(i64),
}

impl Span {
    /// `30s`, `30m`, `24h`, `7d`, `1w` or `1mo`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Span> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit())?;
        let (number, unit) = text.split_at(split);
        let n: i64 = number.parse().ok().filter(|n| *n > 0)?;
        let unit_ms = match unit {
            "s" => SECOND,
            "m" => 60 * SECOND,
            "h" => 3_600 * SECOND,
            "d" => DAY,
            "w" => 7 * DAY,
            "mo" => return Some(Span::Months(n)),
            _ => return None,
        };
        n.checked_mul(unit_ms).map(Span::Millis)
    }

    /// `start` moved forward by `times` spans.
    fn after(self, start: i64, times: i64) -> i64 {
        match self {
            Span::Millis(ms) => start.saturating_add(ms.saturating_mul(times)),
            Span::Months(n) => add_months(start, n.saturating_mul(times)),
        }
    }

    /// The end of one span that starts at `start`.
    pub fn end_of(self, start: i64) -> i64 {
        self.after(start, 1)
    }

    /// The start of the period that holds `now`, for periods of this span back to back from
    /// `anchor`. Before the anchor, the first period.
    pub fn period_start(self, anchor: i64, now: i64) -> i64 {
        if now <= anchor {
            return anchor;
        }
        let guess = match self {
            Span::Millis(ms) => (now - anchor) / ms,
            Span::Months(n) => {
                let (ay, am, _) = civil_from_days(anchor.div_euclid(DAY));
                let (ny, nm, _) = civil_from_days(now.div_euclid(DAY));
                ((ny - ay) * 12 + i64::from(nm) - i64::from(am)) / n
            }
        };
        // The month guess can be one too high (the day of month not reached yet).
        let mut k = guess.max(0);
        while k > 0 && self.after(anchor, k) > now {
            k -= 1;
        }
        while self.after(anchor, k + 1) <= now {
            k += 1;
        }
        self.after(anchor, k)
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// `time` in Unix milliseconds (0 for times before 1970, which the gateway never records).
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `2026-12-02T00:41:13.123Z`, as `/admin/status` writes its times.
pub fn iso(ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(time).to_string()
}

/// `YYYY-MM-DD` (midnight UTC) or an RFC 3339 time; `None` if neither.
pub fn parse_date(text: &str) -> Option<i64> {
    let text = text.trim();
    let time = if text.len() == 10 {
        humantime::parse_rfc3339(&format!("{text}T00:00:00Z"))
    } else {
        humantime::parse_rfc3339_weak(text)
    };
    time.ok().map(unix_ms)
}

fn add_months(ms: i64, months: i64) -> i64 {
    let days = ms.div_euclid(DAY);
    let in_day = ms.rem_euclid(DAY);
    let (y, m, d) = civil_from_days(days);
    let index = y * 12 + i64::from(m) - 1 + months;
    let (ny, nm) = (index.div_euclid(12), (index.rem_euclid(12) + 1) as u32);
    let nd = d.min(days_in_month(ny, nm));
    days_from_civil(ny, nm, nd) * DAY + in_day
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's civil-calendar algorithms: days since 1970-01-01 to and from (y, m, d).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_nonsense_does_not() {
        assert_eq!(Span::parse("30s"), Some(Span::Millis(30_000)));
        assert_eq!(Span::parse("30m"), Some(Span::Millis(1_800_000)));
        assert_eq!(Span::parse("24h"), Some(Span::Millis(DAY)));
        assert_eq!(Span::parse("7d"), Some(Span::Millis(7 * DAY)));
        assert_eq!(Span::parse("1w"), Some(Span::Millis(7 * DAY)));
        assert_eq!(Span::parse("1mo"), Some(Span::Months(1)));
        for bad in ["banana", "", "10", "s", "0s", "-1d", "1y", "1.5h"] {
            assert_eq!(Span::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn dates_round_trip_through_the_calendar() {
        assert_eq!(iso(0), "1970-01-01T00:00:00.000Z");
        let t = parse_date("2024-02-29").expect("a leap day");
        assert_eq!(iso(t), "2024-02-29T00:00:00.000Z");
        assert_eq!(parse_date("2023-02-29"), None);
        assert_eq!(
            parse_date("2026-12-02T00:41:13.5Z").map(iso).as_deref(),
            Some("2026-12-02T00:41:13.500Z")
        );
        for days in [-800_000, -1, 0, 59, 11_016, 20_000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn fixed_periods_start_on_multiples_of_the_span_from_the_anchor() {
        let span = Span::Millis(10_000);
        assert_eq!(span.period_start(5_000, 5_000), 5_000);
        assert_eq!(span.period_start(5_000, 14_999), 5_000);
        assert_eq!(span.period_start(5_000, 15_000), 15_000);
        assert_eq!(span.period_start(5_000, 1_000), 5_000);
        assert_eq!(span.end_of(15_000), 25_000);
    }

    #[test]
    fn monthly_periods_follow_the_calendar() {
        let jan31 = parse_date("2025-01-31").expect("date");
        let span = Span::Months(1);
        let feb28 = parse_date("2025-02-28").expect("date");
        assert_eq!(span.end_of(jan31), feb28);
        let mar10 = parse_date("2025-03-10").expect("date");
        // The second period started on Feb 28 (Jan 31 + one month); the third starts Mar 31.
        assert_eq!(span.period_start(jan31, mar10), feb28);
        let mar31 = parse_date("2025-03-31").expect("date");
        assert_eq!(span.period_start(jan31, mar31), mar31);
    }
}
