//! The @mathia assistant's rule-based intent parser: pure, offline, tested
//! against a table of phrasings. It only *understands*; the reactor then acts
//! through the same commands the user could send, with the user's authority,
//! and never moves money (a payment is only proposed, for the user to confirm
//! with their own command).
//!
//! A follow-up fills what the last request left open ([`Pending`], kept per
//! user and room by the reactor): "remind me to call John" → "when?" → "in 10
//! mins"; "plan a trip to Lamu on the 15th" → "and back on the 20th?".

use std::sync::LazyLock;

use chrono::{Datelike, Duration, NaiveDate, NaiveDateTime, NaiveTime};
use regex::Regex;
use serde::{Deserialize, Serialize};

/// When a reminder rings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum When {
    /// After this many seconds.
    In(i64),
    /// At this wall-clock time (the user's zone).
    At(NaiveDateTime),
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// Set a reminder.
    SetReminder {
        /// What.
        content: String,
        /// When.
        when: When,
    },
    /// A reminder without a time: ask when.
    AskReminderTime {
        /// What.
        content: String,
    },
    /// Wallet balances.
    Balance,
    /// Recent wallet movements.
    Transactions,
    /// Create a trip.
    CreateTrip {
        /// Where to.
        destination: String,
        /// First day.
        start: NaiveDate,
        /// Last day.
        end: NaiveDate,
    },
    /// A trip with a missing date: ask for it.
    AskTripDates {
        /// Where to.
        destination: String,
        /// First day, if said.
        start: Option<NaiveDate>,
    },
    /// Add an activity to one of the user's trips.
    AddTripItem {
        /// What.
        title: String,
        /// Which trip (its destination or title, as said).
        trip: String,
        /// On which day, if said.
        date: Option<NaiveDate>,
        /// At what time, if said.
        time: Option<NaiveTime>,
    },
    /// Summarise the room's recent messages.
    Summarise,
    /// Convert an amount between currencies.
    Convert {
        /// The amount as written (`12.50`).
        amount: String,
        /// ISO code, upper case.
        from: String,
        /// ISO code, upper case.
        to: String,
    },
    /// Search the room's messages.
    Search {
        /// Words.
        query: String,
    },
    /// Money: proposed only, the user confirms with their own command.
    ProposePayment {
        /// The amount as written.
        amount: String,
        /// ISO code, if said.
        currency: Option<String>,
        /// Who, as written.
        to: String,
    },
    /// What the assistant can do.
    Help,
    /// Not understood: say so and offer help.
    Unknown,
}

/// What a follow-up may fill in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pending {
    /// A reminder waiting for its time.
    ReminderTime {
        /// What.
        content: String,
    },
    /// A trip waiting for a date.
    TripDates {
        /// Where to.
        destination: String,
        /// First day, if known.
        start: Option<NaiveDate>,
    },
}

fn re(s: &str) -> Regex {
    Regex::new(&format!("(?i){s}")).expect("a valid built-in pattern")
}

static IN: LazyLock<Regex> = LazyLock::new(|| {
    re(r"\bin\s+(an?|\d+)\s*(seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h|days?|d|weeks?)\b")
});
static AT: LazyLock<Regex> = LazyLock::new(|| re(r"\bat\s+(\d{1,2})(?::(\d{2}))?\s*(am|pm)?\b"));
static DAY: LazyLock<Regex> = LazyLock::new(|| re(r"\b(today|tonight|tomorrow)\b"));
static CONVERT: LazyLock<Regex> =
    LazyLock::new(|| re(r"(\d+(?:\.\d{1,4})?)\s*([a-z]{3})\s+(?:to|in|into)\s+([a-z]{3})\b"));
static PAY: LazyLock<Regex> = LazyLock::new(|| {
    re(r"\b(?:send|pay|transfer)\s+(\d+(?:\.\d{1,2})?)\s*([a-z]{3})?\s+to\s+@?([\w.@-]+)")
});
static TRIP: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"\b(?:create|plan|start|make|new|book)\s+(?:a\s+|an\s+|my\s+)?(?:new\s+)?(?:trip|itinerary|holiday|vacation)\s+(?:to|for)\s+([a-z][a-z .'-]*?)(?:\s+(?:from|on|starting)\b|$)",
    )
});
static ADD_ITEM: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"\badd\s+(.+?)\s+to\s+(?:my|the|our)\s+(?:trip|itinerary)\s+(?:to|for)\s+([a-z][a-z .'-]*?)(?:\s+(?:on|at|for)\b.*)?$",
    )
});
static ISO_DATE: LazyLock<Regex> = LazyLock::new(|| re(r"\b(\d{4})-(\d{2})-(\d{2})\b"));
static ORDINAL: LazyLock<Regex> = LazyLock::new(|| re(r"\b(?:the\s+)?(\d{1,2})(?:st|nd|rd|th)\b"));
static SEARCH: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"\b(?:search|find|look)\s+(?:for\s+|up\s+)?(?:messages?\s+)?(?:about\s+|for\s+|with\s+|mentioning\s+)?(.+)$",
    )
});

static MENTION: LazyLock<Regex> = LazyLock::new(|| re(r"@mathia\b"));

/// The text without the mention, whitespace collapsed, case kept.
fn words(text: &str) -> String {
    let t = MENTION.replace_all(text, " ");
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `s` without `prefix`, ignoring case.
fn strip_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    s.get(..prefix.len())
        .filter(|p| p.eq_ignore_ascii_case(prefix))
        .map(|_| &s[prefix.len()..])
}

fn secs(n: &str, unit: &str) -> Option<i64> {
    let n: i64 = if n == "a" || n == "an" {
        1
    } else {
        n.parse().ok()?
    };
    let k = match unit.chars().next()? {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        'w' => 7 * 86_400,
        _ => return None,
    };
    Some(n * k).filter(|s| (1..=366 * 86_400).contains(s))
}

/// A time said in `t`, relative to `now` (the user's wall clock).
fn when(t: &str, now: NaiveDateTime) -> Option<When> {
    if let Some(c) = IN.captures(t) {
        return secs(&c[1], &c[2]).map(When::In);
    }
    let day = DAY.captures(t).map(|c| c[1].to_owned());
    let at = AT.captures(t).and_then(|c| {
        let mut h: u32 = c[1].parse().ok()?;
        let m: u32 = c.get(2).map_or(Some(0), |m| m.as_str().parse().ok())?;
        match c.get(3).map(|m| m.as_str()) {
            Some("pm") if h < 12 => h += 12,
            Some("am") if h == 12 => h = 0,
            _ => {}
        }
        NaiveTime::from_hms_opt(h, m, 0)
    });
    let date = match day.as_deref() {
        Some("tomorrow") => now.date() + Duration::days(1),
        _ => now.date(),
    };
    match (at, day.as_deref()) {
        (Some(time), _) => {
            let mut at = date.and_time(time);
            // "at 5pm" said at 6pm means tomorrow.
            if at <= now && day.is_none() {
                at += Duration::days(1);
            }
            Some(When::At(at))
        }
        (None, Some("tomorrow")) => Some(When::At(date.and_hms_opt(9, 0, 0)?)),
        (None, Some("tonight")) => Some(When::At(now.date().and_hms_opt(20, 0, 0)?)),
        _ => None,
    }
}

/// Remove the time phrases and the request words, leaving what to remind of.
fn reminder_content(t: &str) -> String {
    let mut c = IN.replace_all(t, " ").into_owned();
    c = AT.replace_all(&c, " ").into_owned();
    c = DAY.replace_all(&c, " ").into_owned();
    let mut c = c.trim();
    for lead in ["please ", "can you ", "set a reminder", "remind me"] {
        if let Some(rest) = strip_ci(c, lead) {
            c = rest.trim();
        }
    }
    let c = ["to ", "about ", "that ", "of ", ": ", "to: "]
        .iter()
        .find_map(|p| strip_ci(c, p))
        .unwrap_or(c);
    c.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .trim_end_matches(['.', '!', '?'])
        .to_owned()
}

/// A day said in `t`: an ISO date, or "the 20th" (this month, or next if past).
fn date_in(t: &str, today: NaiveDate) -> Option<NaiveDate> {
    if let Some(c) = ISO_DATE.captures(t) {
        return NaiveDate::from_ymd_opt(c[1].parse().ok()?, c[2].parse().ok()?, c[3].parse().ok()?);
    }
    let day: u32 = ORDINAL.captures(t)?[1].parse().ok()?;
    let this = NaiveDate::from_ymd_opt(today.year(), today.month(), day);
    match this {
        Some(d) if d >= today => Some(d),
        _ => {
            let next = today.with_day(1)? + chrono::Months::new(1);
            NaiveDate::from_ymd_opt(next.year(), next.month(), day)
        }
    }
}

/// Understand `text` (a message mentioning @mathia), said at wall-clock `now`,
/// given what the previous request left open.
pub fn parse(text: &str, now: NaiveDateTime, pending: Option<&Pending>) -> Intent {
    let said = words(text);
    let said = said.trim_matches(|c: char| c == ',' || c == ':' || c.is_whitespace());
    let lower = said.to_lowercase();
    let t = lower.as_str();
    // Follow-ups first: they are short and only make sense with what is pending.
    match pending {
        Some(Pending::ReminderTime { content }) => {
            if let Some(w) = when(t, now) {
                return Intent::SetReminder {
                    content: content.clone(),
                    when: w,
                };
            }
        }
        Some(Pending::TripDates { destination, start }) => {
            let dates: Vec<NaiveDate> = ISO_DATE
                .find_iter(t)
                .chain(ORDINAL.find_iter(t))
                .filter_map(|m| date_in(m.as_str(), now.date()))
                .collect();
            match (start, dates.as_slice()) {
                (Some(s), [e, ..]) if e >= s => {
                    return Intent::CreateTrip {
                        destination: destination.clone(),
                        start: *s,
                        end: *e,
                    };
                }
                (None, [s, e, ..]) if e >= s => {
                    return Intent::CreateTrip {
                        destination: destination.clone(),
                        start: *s,
                        end: *e,
                    };
                }
                (None, [s]) => {
                    return Intent::AskTripDates {
                        destination: destination.clone(),
                        start: Some(*s),
                    };
                }
                _ => {}
            }
        }
        None => {}
    }
    if t.is_empty()
        || [
            "help",
            "what can you do",
            "commands",
            "how do i use you",
            "?",
        ]
        .iter()
        .any(|h| t == *h || t.starts_with(&format!("{h} ")) || t.starts_with(&format!("{h}?")))
    {
        return Intent::Help;
    }
    if t.contains("remind me") || t.starts_with("set a reminder") || t.starts_with("reminder") {
        let content = reminder_content(said);
        let content = if content.is_empty() || content == "reminder" {
            "Reminder".to_owned()
        } else {
            content
        };
        return match when(t, now) {
            Some(w) => Intent::SetReminder { content, when: w },
            None => Intent::AskReminderTime { content },
        };
    }
    if let Some(c) = PAY.captures(t) {
        return Intent::ProposePayment {
            amount: c[1].to_owned(),
            currency: c.get(2).map(|m| m.as_str().to_uppercase()),
            to: c[3].to_owned(),
        };
    }
    if let Some(c) = CONVERT.captures(t)
        && (t.contains("convert")
            || t.contains("how much")
            || t.contains(" in ")
            || t.contains(" to "))
    {
        return Intent::Convert {
            amount: c[1].to_owned(),
            from: c[2].to_uppercase(),
            to: c[3].to_uppercase(),
        };
    }
    if t.contains("balance") || t.contains("how much money") || t.contains("how much do i have") {
        return Intent::Balance;
    }
    if [
        "transaction",
        "payments",
        "statement",
        "spent",
        "spend",
        "movements",
    ]
    .iter()
    .any(|w| t.contains(w))
    {
        return Intent::Transactions;
    }
    if let Some(c) = ADD_ITEM.captures(said) {
        let rest = &t[c.get(2).map_or(t.len(), |m| m.end()).min(t.len())..];
        let time = AT.captures(rest).and_then(|a| {
            let mut h: u32 = a[1].parse().ok()?;
            let m: u32 = a.get(2).map_or(Some(0), |m| m.as_str().parse().ok())?;
            if a.get(3)
                .is_some_and(|p| p.as_str().eq_ignore_ascii_case("pm"))
                && h < 12
            {
                h += 12;
            }
            NaiveTime::from_hms_opt(h, m, 0)
        });
        return Intent::AddTripItem {
            title: c[1].trim().to_owned(),
            trip: title_case(c[2].trim()),
            date: ISO_DATE
                .find(rest)
                .or_else(|| ORDINAL.find(rest))
                .and_then(|m| date_in(m.as_str(), now.date())),
            time,
        };
    }
    if let Some(c) = TRIP.captures(said) {
        let destination = title_case(c[1].trim());
        let mut dates: Vec<NaiveDate> = ISO_DATE
            .find_iter(t)
            .chain(ORDINAL.find_iter(t))
            .filter_map(|m| date_in(m.as_str(), now.date()))
            .collect();
        dates.sort();
        return match dates.as_slice() {
            [s, .., e] if e >= s => Intent::CreateTrip {
                destination,
                start: *s,
                end: *e,
            },
            [s] => Intent::AskTripDates {
                destination,
                start: Some(*s),
            },
            _ => Intent::AskTripDates {
                destination,
                start: None,
            },
        };
    }
    if t.contains("summar")
        || t.contains("tl;dr")
        || t.contains("tldr")
        || t.contains("catch me up")
        || t.contains("what did i miss")
    {
        return Intent::Summarise;
    }
    if let Some(c) = SEARCH.captures(said) {
        let query = c[1].trim_end_matches(['?', '.', '!']).trim().to_owned();
        if query.chars().filter(|c| c.is_alphanumeric()).count() >= 2 {
            return Intent::Search { query };
        }
    }
    Intent::Unknown
}

fn title_case(s: &str) -> String {
    s.split(' ')
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the assistant says it can do.
pub const HELP: &str = "I can: set reminders (\"remind me to call John in 10 mins\", \"at 5pm tomorrow\"), \
show your balance and last transactions, plan a trip (\"plan a trip to Lamu from 2026-12-20 to 2026-12-24\"), \
summarise this room, convert currencies (\"convert 100 USD to KES\"), and search messages (\"search for ferry\"). \
I never move money: I can only prepare a payment for you to confirm.";

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> NaiveDateTime {
        NaiveDate::from_ymd_opt(2026, 12, 1)
            .unwrap()
            .and_hms_opt(18, 0, 0)
            .unwrap()
    }

    fn at(d: u32, h: u32, m: u32) -> When {
        When::At(
            NaiveDate::from_ymd_opt(2026, 12, d)
                .unwrap()
                .and_hms_opt(h, m, 0)
                .unwrap(),
        )
    }

    fn remind(content: &str, when: When) -> Intent {
        Intent::SetReminder {
            content: content.into(),
            when,
        }
    }

    fn date(m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, m, d).unwrap()
    }

    #[test]
    fn forty_phrasings_yield_the_right_intent_and_nothing_else() {
        let trip = |dest: &str, s: NaiveDate, e: NaiveDate| Intent::CreateTrip {
            destination: dest.into(),
            start: s,
            end: e,
        };
        let table: Vec<(&str, Intent)> = vec![
            (
                "@mathia remind me to call John in 10 mins",
                remind("call John", When::In(600)),
            ),
            (
                "@mathia remind me in 2 hours to stretch",
                remind("stretch", When::In(7200)),
            ),
            (
                "@mathia remind me to buy milk at 5pm tomorrow",
                remind("buy milk", at(2, 17, 0)),
            ),
            (
                "@mathia remind me at 9:30 to join the stand-up",
                remind("join the stand-up", at(2, 9, 30)),
            ),
            (
                "@mathia remind me tomorrow to pay rent",
                remind("pay rent", at(2, 9, 0)),
            ),
            (
                "@mathia set a reminder to water the plants in 1 day",
                remind("water the plants", When::In(86_400)),
            ),
            (
                "@mathia remind me about the dentist at 8pm",
                remind("the dentist", at(1, 20, 0)),
            ),
            (
                "@mathia please remind me to call mum in an hour",
                remind("call mum", When::In(3600)),
            ),
            (
                "@mathia remind me to check the oven in 15m",
                remind("check the oven", When::In(900)),
            ),
            (
                "@mathia remind me to leave at 7 am tomorrow",
                remind("leave", at(2, 7, 0)),
            ),
            (
                "@mathia remind me to call John",
                Intent::AskReminderTime {
                    content: "call John".into(),
                },
            ),
            ("@mathia what's my balance?", Intent::Balance),
            ("@mathia check balance", Intent::Balance),
            ("@mathia how much money do I have", Intent::Balance),
            ("@mathia balance please", Intent::Balance),
            ("@mathia show my last transactions", Intent::Transactions),
            ("@mathia recent payments", Intent::Transactions),
            ("@mathia what did I spend", Intent::Transactions),
            ("@mathia my statement", Intent::Transactions),
            (
                "@mathia plan a trip to Lamu from 2026-12-20 to 2026-12-24",
                trip("Lamu", date(12, 20), date(12, 24)),
            ),
            (
                "@mathia create an itinerary for Diani from the 22nd to the 27th",
                trip("Diani", date(12, 22), date(12, 27)),
            ),
            (
                "@mathia new trip to Zanzibar on the 15th",
                Intent::AskTripDates {
                    destination: "Zanzibar".into(),
                    start: Some(date(12, 15)),
                },
            ),
            (
                "@mathia plan a trip to Mombasa",
                Intent::AskTripDates {
                    destination: "Mombasa".into(),
                    start: None,
                },
            ),
            (
                "@mathia add snorkelling to my trip to Lamu on the 21st at 10am",
                Intent::AddTripItem {
                    title: "snorkelling".into(),
                    trip: "Lamu".into(),
                    date: Some(date(12, 21)),
                    time: NaiveTime::from_hms_opt(10, 0, 0),
                },
            ),
            (
                "@mathia add the dhow tour to our itinerary for Diani",
                Intent::AddTripItem {
                    title: "the dhow tour".into(),
                    trip: "Diani".into(),
                    date: None,
                    time: None,
                },
            ),
            ("@mathia summarise this room", Intent::Summarise),
            ("@mathia summarize please", Intent::Summarise),
            ("@mathia tl;dr", Intent::Summarise),
            ("@mathia catch me up", Intent::Summarise),
            ("@mathia what did I miss?", Intent::Summarise),
            (
                "@mathia convert 100 USD to KES",
                Intent::Convert {
                    amount: "100".into(),
                    from: "USD".into(),
                    to: "KES".into(),
                },
            ),
            (
                "@mathia how much is 50 eur in kes",
                Intent::Convert {
                    amount: "50".into(),
                    from: "EUR".into(),
                    to: "KES".into(),
                },
            ),
            (
                "@mathia 12.50 gbp to usd",
                Intent::Convert {
                    amount: "12.50".into(),
                    from: "GBP".into(),
                    to: "USD".into(),
                },
            ),
            (
                "@mathia search for ferry",
                Intent::Search {
                    query: "ferry".into(),
                },
            ),
            (
                "@mathia find messages about the jetty fee",
                Intent::Search {
                    query: "the jetty fee".into(),
                },
            ),
            (
                "@mathia look up dhow",
                Intent::Search {
                    query: "dhow".into(),
                },
            ),
            (
                "@mathia send 500 KES to bob",
                Intent::ProposePayment {
                    amount: "500".into(),
                    currency: Some("KES".into()),
                    to: "bob".into(),
                },
            ),
            (
                "@mathia pay 20 to @amina",
                Intent::ProposePayment {
                    amount: "20".into(),
                    currency: None,
                    to: "amina".into(),
                },
            ),
            (
                "@mathia transfer 1000 kes to baraka@example.com",
                Intent::ProposePayment {
                    amount: "1000".into(),
                    currency: Some("KES".into()),
                    to: "baraka@example.com".into(),
                },
            ),
            ("@mathia help", Intent::Help),
            ("@mathia what can you do?", Intent::Help),
            ("@mathia", Intent::Help),
            ("@mathia sing me a song", Intent::Unknown),
            ("@mathia search x", Intent::Unknown),
        ];
        assert!(table.len() >= 40);
        let wrong: Vec<String> = table
            .into_iter()
            .filter_map(|(text, want)| {
                let got = parse(text, now(), None);
                (got != want).then(|| format!("{text}: got {got:?}, want {want:?}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn follow_ups_fill_what_was_left_open() {
        let pending = Pending::ReminderTime {
            content: "call John".into(),
        };
        assert_eq!(
            parse("@mathia in 10 mins", now(), Some(&pending)),
            remind("call John", When::In(600))
        );
        let trip = Pending::TripDates {
            destination: "Lamu".into(),
            start: Some(date(12, 15)),
        };
        assert_eq!(
            parse("@mathia and back on the 20th?", now(), Some(&trip)),
            Intent::CreateTrip {
                destination: "Lamu".into(),
                start: date(12, 15),
                end: date(12, 20)
            }
        );
        // Something else entirely is understood on its own.
        assert_eq!(
            parse("@mathia what's my balance", now(), Some(&trip)),
            Intent::Balance
        );
    }
}
