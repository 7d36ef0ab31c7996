//! The sample contract: what every sample must satisfy to enter or move through vmeter.
//!
//! One definition, checked at every door: the API refuses a violating POST with a 400 that
//! names the rule; the agent drops (and counts) what it would otherwise publish; the
//! notification and the collector dead-letter violating samples one by one (the rest of
//! their message goes on) with the rule as the reason. Nothing that violates it is stored
//! half or retried.
//!
//! The limits exist because PostgreSQL and the services have hard ones that a single hostile
//! sample could otherwise hit downstream, where they cost every tenant: a btree entry is at
//! most ~2.7 kB, `text` and `jsonb` cannot hold NUL, a timestamp decides which daily
//! partition is created (so any year would create one), and nested metadata is walked
//! recursively by the API's flattening and by JSON encoders.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sample::{Metadata, Sample};

/// The configurable limits (`contract:` section of every service's config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Contract {
    /// Longest meter name, unit, resource id, user id, project id or source, in bytes
    /// (Ceilometer's SQL columns were 255 characters).
    pub max_id_bytes: usize,
    /// Largest `resource_metadata`, in bytes of its JSON encoding (agent metadata is
    /// ~0.5 kB).
    pub max_metadata_bytes: usize,
    /// Deepest nesting of `resource_metadata` (maps and lists), the top-level map being 1.
    pub max_metadata_depth: usize,
    /// Oldest timestamp accepted, in days before now; `null` (from the environment: an
    /// empty value) accepts any age down to 1970-01-01 (e.g. to import history). Spooled agent batches are at most as old as the
    /// longest broker outage.
    pub max_age_days: Option<u32>,
    /// Furthest a timestamp may lie in the future, s: clocks of hypervisors disagree by
    /// seconds, not hours, and a far-future sample would stay the "newest" of its resource.
    pub max_future_secs: u64,
}

impl Default for Contract {
    fn default() -> Self {
        Contract {
            max_id_bytes: 255,
            max_metadata_bytes: 65_536,
            max_metadata_depth: 8,
            max_age_days: Some(90),
            max_future_secs: 600,
        }
    }
}

/// A text field of a sample that the contract checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Name,
    Unit,
    ResourceId,
    UserId,
    ProjectId,
    Source,
}

impl Field {
    /// The Ceilometer field name.
    pub fn as_str(self) -> &'static str {
        match self {
            Field::Name => "name",
            Field::Unit => "unit",
            Field::ResourceId => "resource_id",
            Field::UserId => "user_id",
            Field::ProjectId => "project_id",
            Field::Source => "source",
        }
    }
}

/// Why a sample violates the contract. [`reason`](Violation::reason) is the short label of
/// metrics (`vmeter_samples_dropped_total{reason}`) and of the dead-letter reason header.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Violation {
    #[error("{} is empty", .0.as_str())]
    Empty(Field),
    #[error("{f} is {len} bytes long (at most {max})", f = .0.as_str(), len = .1, max = .2)]
    TooLong(Field, usize, usize),
    #[error("{} contains a control character", .0.as_str())]
    ControlChar(Field),
    #[error("volume is not a finite number")]
    VolumeNotFinite,
    #[error("timestamp {0} is older than the accepted window")]
    TooOld(DateTime<Utc>),
    #[error("timestamp {0} lies in the future beyond the accepted window")]
    InFuture(DateTime<Utc>),
    #[error("resource_metadata is nested deeper than {0} levels")]
    MetadataTooDeep(usize),
    #[error("resource_metadata is larger than {0} bytes")]
    MetadataTooLarge(usize),
    #[error("resource_metadata contains a NUL character")]
    MetadataNul,
    #[error("resource_metadata contains a number that is not finite")]
    MetadataNotFinite,
}

impl Violation {
    /// The rule broken.
    pub fn rule(&self) -> Rule {
        match self {
            Violation::Empty(_) => Rule::EmptyField,
            Violation::TooLong(..) => Rule::FieldTooLong,
            Violation::ControlChar(_) => Rule::ControlCharacter,
            Violation::VolumeNotFinite => Rule::VolumeNotFinite,
            Violation::TooOld(_) => Rule::TimestampTooOld,
            Violation::InFuture(_) => Rule::TimestampInFuture,
            Violation::MetadataTooDeep(_) => Rule::MetadataTooDeep,
            Violation::MetadataTooLarge(_) => Rule::MetadataTooLarge,
            Violation::MetadataNul => Rule::MetadataNul,
            Violation::MetadataNotFinite => Rule::MetadataNotFinite,
        }
    }

    /// Short label for metrics and the dead-letter reason header.
    pub fn reason(&self) -> &'static str {
        self.rule().label()
    }
}

/// A rule of the contract, without the particulars of one violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    EmptyField,
    FieldTooLong,
    ControlCharacter,
    VolumeNotFinite,
    TimestampTooOld,
    TimestampInFuture,
    MetadataTooDeep,
    MetadataTooLarge,
    MetadataNul,
    MetadataNotFinite,
}

impl Rule {
    /// Short label for metrics and the dead-letter reason header.
    pub fn label(self) -> &'static str {
        match self {
            Rule::EmptyField => "contract_empty_field",
            Rule::FieldTooLong => "contract_field_too_long",
            Rule::ControlCharacter => "contract_control_character",
            Rule::VolumeNotFinite => "contract_volume_not_finite",
            Rule::TimestampTooOld => "contract_timestamp_too_old",
            Rule::TimestampInFuture => "contract_timestamp_in_future",
            Rule::MetadataTooDeep => "contract_metadata_too_deep",
            Rule::MetadataTooLarge => "contract_metadata_too_large",
            Rule::MetadataNul => "contract_metadata_nul",
            Rule::MetadataNotFinite => "contract_metadata_not_finite",
        }
    }
}

/// Whether `s` holds a control character (Unicode's Cc: U+0000–U+001F, U+007F–U+009F).
/// Printable ASCII, what ids almost always are, is answered by one pass over the bytes.
fn has_control(s: &str) -> bool {
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return false;
    }
    s.chars().any(char::is_control)
}

/// The earliest timestamp any configuration accepts: storage partitions are named by day,
/// and timestamps before the epoch have no use in metering.
fn floor() -> DateTime<Utc> {
    DateTime::UNIX_EPOCH
}

/// The latest timestamp any configuration accepts: the last microsecond of year 9999
/// (partition names hold the year in four digits).
fn ceiling() -> DateTime<Utc> {
    // 10000-01-01T00:00:00Z is 253,402,300,800 s after the epoch.
    DateTime::from_timestamp_micros(253_402_300_800_000_000 - 1).expect("in chrono's range")
}

fn in_window(
    t: DateTime<Utc>,
    (oldest, newest): (DateTime<Utc>, DateTime<Utc>),
) -> Result<(), Violation> {
    if t < oldest {
        return Err(Violation::TooOld(t));
    }
    if t > newest {
        return Err(Violation::InFuture(t));
    }
    Ok(())
}

impl Contract {
    /// Checks one sample against the contract at wall-clock time `now`.
    pub fn check(&self, s: &Sample, now: DateTime<Utc>) -> Result<(), Violation> {
        self.check_fields(s, now)?;
        self.check_metadata(&s.resource_metadata)
    }

    /// Everything but the metadata (see [`Checker`], which checks each metadata map once).
    pub fn check_fields(&self, s: &Sample, now: DateTime<Utc>) -> Result<(), Violation> {
        self.check_fields_in(s, self.window(now))
    }

    fn check_fields_in(&self, s: &Sample, window: Window) -> Result<(), Violation> {
        self.id(Field::Name, &s.name, false)?;
        self.id(Field::Unit, &s.unit, true)?;
        self.check_owner(
            &s.resource_id,
            s.user_id.as_deref(),
            s.project_id.as_deref(),
            &s.source,
        )?;
        if !s.volume.is_finite() {
            return Err(Violation::VolumeNotFinite);
        }
        in_window(s.timestamp, window)
    }

    /// The fields a producer sets once per resource: resource id, owner, source (the agent
    /// checks them, with [`check_metadata`](Self::check_metadata), when it reads a domain's
    /// XML, not per sample).
    pub fn check_owner(
        &self,
        resource_id: &str,
        user_id: Option<&str>,
        project_id: Option<&str>,
        source: &str,
    ) -> Result<(), Violation> {
        self.id(Field::ResourceId, resource_id, false)?;
        self.id(Field::Source, source, true)?;
        if let Some(u) = user_id {
            self.id(Field::UserId, u, true)?;
        }
        if let Some(p) = project_id {
            self.id(Field::ProjectId, p, true)?;
        }
        Ok(())
    }

    /// A timestamp within the window around `now` (and always within 1970..=9999).
    pub fn check_timestamp(&self, t: DateTime<Utc>, now: DateTime<Utc>) -> Result<(), Violation> {
        in_window(t, self.window(now))
    }

    /// The timestamps accepted at `now`, both ends included. Checked arithmetic: any
    /// configured window, however large, is clamped to 1970..=9999, never a panic.
    pub fn window(&self, now: DateTime<Utc>) -> Window {
        let oldest = self
            .max_age_days
            .and_then(|d| now.checked_sub_signed(Duration::days(i64::from(d))))
            .map_or(floor(), |t| t.max(floor()));
        let newest = i64::try_from(self.max_future_secs)
            .ok()
            .and_then(Duration::try_seconds)
            .and_then(|d| now.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
            .min(ceiling());
        (oldest, newest)
    }

    fn id(&self, f: Field, v: &str, may_be_empty: bool) -> Result<(), Violation> {
        if v.is_empty() && !may_be_empty {
            return Err(Violation::Empty(f));
        }
        if v.len() > self.max_id_bytes {
            return Err(Violation::TooLong(f, v.len(), self.max_id_bytes));
        }
        if has_control(v) {
            return Err(Violation::ControlChar(f));
        }
        Ok(())
    }

    /// Depth, size (JSON bytes, counted without building the JSON: numbers as their longest
    /// form, an escaped character as one byte), NUL and non-finite numbers. Stops at the first level past the depth limit, so its own recursion is
    /// bounded by the limit whatever the input's depth.
    pub fn check_metadata(&self, md: &Metadata) -> Result<(), Violation> {
        let mut size = 2usize;
        for (k, v) in md {
            self.walk_entry(k, v, 1, &mut size)?;
        }
        Ok(())
    }

    fn walk_entry(
        &self,
        k: &str,
        v: &Value,
        depth: usize,
        size: &mut usize,
    ) -> Result<(), Violation> {
        if k.contains('\0') {
            return Err(Violation::MetadataNul);
        }
        *size += k.len() + 4;
        self.walk(v, depth, size)
    }

    fn walk(&self, v: &Value, depth: usize, size: &mut usize) -> Result<(), Violation> {
        if *size > self.max_metadata_bytes {
            return Err(Violation::MetadataTooLarge(self.max_metadata_bytes));
        }
        match v {
            Value::Null | Value::Bool(_) => *size += 5,
            Value::Number(n) => {
                if n.as_f64().is_some_and(|f| !f.is_finite()) {
                    return Err(Violation::MetadataNotFinite);
                }
                // The longest f64 in JSON (`-2.2250738585072014e-308`) is 24 bytes.
                *size += 24;
            }
            Value::String(s) => {
                if s.contains('\0') {
                    return Err(Violation::MetadataNul);
                }
                *size += s.len() + 3;
            }
            Value::Array(a) => {
                if depth + 1 > self.max_metadata_depth {
                    return Err(Violation::MetadataTooDeep(self.max_metadata_depth));
                }
                *size += 2;
                for x in a {
                    *size += 1;
                    self.walk(x, depth + 1, size)?;
                }
            }
            Value::Object(m) => {
                if depth + 1 > self.max_metadata_depth {
                    return Err(Violation::MetadataTooDeep(self.max_metadata_depth));
                }
                *size += 2;
                for (k, x) in m {
                    self.walk_entry(k, x, depth + 1, size)?;
                }
            }
        }
        if *size > self.max_metadata_bytes {
            return Err(Violation::MetadataTooLarge(self.max_metadata_bytes));
        }
        Ok(())
    }

    /// Splits `samples` into those that keep the contract and the violators (see
    /// [`Checker::partition`]; a service keeps one [`Checker`] instead).
    pub fn partition(
        &self,
        samples: Vec<Sample>,
        now: DateTime<Utc>,
    ) -> (Vec<Sample>, Vec<(Sample, Violation)>) {
        Checker::new(self).partition(samples, now)
    }
}

/// The timestamps accepted: oldest and newest, both included.
pub type Window = (DateTime<Utc>, DateTime<Utc>);

/// Metadata maps a [`Checker`] remembers as passed before it starts over.
const REMEMBERED: usize = 65_536;

/// Checks many samples, walking each distinct metadata map once: the samples of one
/// resource share their metadata (`Arc`), and a service's decoder hands out the same `Arc`
/// for the same metadata in every message, so a long-lived checker walks each resource's
/// metadata once, not once per sample.
pub struct Checker<'a> {
    contract: &'a Contract,
    /// The window at the `now` it was computed for.
    window: Option<(DateTime<Utc>, Window)>,
    /// Maps that passed, by address. The weak reference keeps the allocation, so no other
    /// map can take the address while it is remembered, and the map's contents cannot change
    /// (`Arc::get_mut` refuses while a weak reference exists); it does not keep the map
    /// alive: remembering costs a few dozen bytes per map, not the map.
    passed:
        std::collections::HashMap<usize, std::sync::Weak<Metadata>, foldhash::fast::RandomState>,
    /// The address that passed last (most samples share their predecessor's map).
    last: Option<usize>,
}

impl<'a> Checker<'a> {
    pub fn new(contract: &'a Contract) -> Self {
        Checker {
            contract,
            window: None,
            passed: Default::default(),
            last: None,
        }
    }

    /// [`Contract::check`], skipping the metadata walk for a map that passed before.
    pub fn check(&mut self, s: &Sample, now: DateTime<Utc>) -> Result<(), Violation> {
        let window = match self.window {
            Some((at, w)) if at == now => w,
            _ => {
                let w = self.contract.window(now);
                self.window = Some((now, w));
                w
            }
        };
        self.contract.check_fields_in(s, window)?;
        let md = &s.resource_metadata;
        let at = std::sync::Arc::as_ptr(md) as usize;
        if self.last == Some(at) || self.passed.contains_key(&at) {
            self.last = Some(at);
            return Ok(());
        }
        self.contract.check_metadata(md)?;
        if self.passed.len() >= REMEMBERED {
            self.passed.clear();
        }
        self.passed.insert(at, std::sync::Arc::downgrade(md));
        self.last = Some(at);
        Ok(())
    }

    /// Splits `samples` into those that keep the contract and the violators with their
    /// violation, keeping order within each. Without violators the vector is returned as it
    /// came (no sample moved).
    pub fn partition(
        &mut self,
        samples: Vec<Sample>,
        now: DateTime<Utc>,
    ) -> (Vec<Sample>, Vec<(Sample, Violation)>) {
        let mut verdicts: Vec<(usize, Violation)> = Vec::new();
        for (i, s) in samples.iter().enumerate() {
            if let Err(v) = self.check(s, now) {
                verdicts.push((i, v));
            }
        }
        if verdicts.is_empty() {
            return (samples, Vec::new());
        }
        let mut bad = Vec::with_capacity(verdicts.len());
        let mut good = Vec::with_capacity(samples.len() - verdicts.len());
        let mut next = verdicts.into_iter().peekable();
        for (i, s) in samples.into_iter().enumerate() {
            match next.next_if(|(j, _)| *j == i) {
                Some((_, v)) => bad.push((s, v)),
                None => good.push(s),
            }
        }
        (good, bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::SampleType;
    use std::sync::Arc;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-05T00:00:00Z")
            .unwrap()
            .into()
    }

    fn sample() -> Sample {
        let mut md = Metadata::new();
        md.insert("name".into(), "instance-1".into());
        md.insert(
            "flavor".into(),
            serde_json::json!({"name": "m1.small", "vcpus": 1}),
        );
        Sample {
            name: "cpu".into(),
            kind: SampleType::Cumulative,
            unit: "ns".into(),
            volume: 1.0,
            user_id: Some("u".into()),
            project_id: Some("p".into()),
            resource_id: "9b3e4f5a-0002-4c2d-8e1f-000000000002".into(),
            timestamp: now(),
            resource_metadata: Arc::new(md),
            source: "openstack".into(),
            message_id: uuid::Uuid::nil(),
            monotonic_time: None,
        }
    }

    fn reason(s: &Sample) -> &'static str {
        Contract::default()
            .check(s, now())
            .map_or_else(|v| v.reason(), |()| "ok")
    }

    #[test]
    fn an_agent_sample_passes() {
        assert_eq!(reason(&sample()), "ok");
    }

    #[test]
    fn ids_are_bounded_and_free_of_control_characters() {
        let mut s = sample();
        s.resource_id = "a".repeat(255);
        assert_eq!(reason(&s), "ok");
        s.resource_id = "a".repeat(256);
        assert_eq!(reason(&s), "contract_field_too_long");
        s.resource_id = "a\0b".into();
        assert_eq!(reason(&s), "contract_control_character");
        s.resource_id = String::new();
        assert_eq!(reason(&s), "contract_empty_field");
        let mut s = sample();
        s.project_id = Some("p\n".into());
        assert_eq!(reason(&s), "contract_control_character");
        let mut s = sample();
        s.name = "x".repeat(4000);
        assert_eq!(
            Contract::default().check(&s, now()),
            Err(Violation::TooLong(Field::Name, 4000, 255))
        );
    }

    #[test]
    fn control_characters_beyond_ascii() {
        for (text, control) in [
            ("plain-id_1.2:3", false),
            ("ünïcödé-ok", false),
            ("tab\there", true),
            ("del\u{7f}", true),
            ("c1-\u{85}-next-line", true),
            ("c1-\u{9f}", true),
            ("\u{a0}-nbsp-is-not-Cc", false),
        ] {
            assert_eq!(has_control(text), control, "{text:?}");
        }
    }

    #[test]
    fn volume_must_be_finite() {
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut s = sample();
            s.volume = v;
            assert_eq!(reason(&s), "contract_volume_not_finite");
        }
    }

    #[test]
    fn timestamps_within_the_window() {
        let c = Contract::default();
        let mut s = sample();
        s.timestamp = now() + Duration::seconds(600);
        assert_eq!(c.check(&s, now()), Ok(()));
        s.timestamp = now() + Duration::seconds(601);
        assert_eq!(reason(&s), "contract_timestamp_in_future");
        s.timestamp = now() - Duration::days(90);
        assert_eq!(c.check(&s, now()), Ok(()));
        s.timestamp = now() - Duration::days(90) - Duration::seconds(1);
        assert_eq!(reason(&s), "contract_timestamp_too_old");
        // Without an age limit: down to the epoch, never before, never past year 9999.
        let open = Contract {
            max_age_days: None,
            max_future_secs: u64::MAX,
            ..Contract::default()
        };
        s.timestamp = DateTime::UNIX_EPOCH;
        assert_eq!(open.check(&s, now()), Ok(()));
        s.timestamp = DateTime::UNIX_EPOCH - Duration::microseconds(1);
        assert!(matches!(open.check(&s, now()), Err(Violation::TooOld(_))));
        s.timestamp = crate::sample::parse_timestamp("+10000-01-01T00:00:00Z")
            .unwrap_or_else(|| DateTime::from_timestamp(253_402_300_800, 0).unwrap());
        assert!(matches!(open.check(&s, now()), Err(Violation::InFuture(_))));
    }

    #[test]
    fn metadata_depth_size_and_nul() {
        let deep = |levels: usize| {
            let mut v = Value::from(1);
            for _ in 0..levels {
                let mut m = serde_json::Map::new();
                m.insert("a".into(), v);
                v = Value::Object(m);
            }
            match v {
                Value::Object(m) => m,
                _ => unreachable!("levels > 0"),
            }
        };
        let mut s = sample();
        s.resource_metadata = Arc::new(deep(8));
        assert_eq!(reason(&s), "ok");
        s.resource_metadata = Arc::new(deep(9));
        assert_eq!(reason(&s), "contract_metadata_too_deep");
        // Deep input far beyond the limit is refused without walking it all.
        let very = deep(100_000);
        s.resource_metadata = Arc::new(very);
        assert_eq!(reason(&s), "contract_metadata_too_deep");
        // Dropping 100,000 nested maps recursively would overflow the stack: unnest first.
        let mut v = Arc::try_unwrap(std::mem::take(&mut s.resource_metadata)).unwrap();
        while let Some(Value::Object(m)) = v.remove("a") {
            v = m;
        }

        let mut md = Metadata::new();
        md.insert("big".into(), "x".repeat(70_000).into());
        s.resource_metadata = Arc::new(md);
        assert_eq!(reason(&s), "contract_metadata_too_large");
        let mut md = Metadata::new();
        for i in 0..10_000 {
            md.insert(format!("key{i}"), Value::from(i));
        }
        s.resource_metadata = Arc::new(md);
        assert_eq!(reason(&s), "contract_metadata_too_large");
        let mut md = Metadata::new();
        md.insert("a\0".into(), 1.into());
        s.resource_metadata = Arc::new(md);
        assert_eq!(reason(&s), "contract_metadata_nul");
        let mut md = Metadata::new();
        md.insert("list".into(), serde_json::json!(["ok", "n\0"]));
        s.resource_metadata = Arc::new(md);
        assert_eq!(reason(&s), "contract_metadata_nul");
    }

    #[test]
    fn size_estimate_is_at_least_the_json_length() {
        // The estimate must not undercount, or a map just under the limit could encode larger.
        let s = sample();
        let json = serde_json::to_vec(&*s.resource_metadata).unwrap();
        let tight = Contract {
            max_metadata_bytes: json.len() - 1,
            ..Contract::default()
        };
        assert!(tight.check(&s, now()).is_err());
    }

    #[test]
    fn a_long_lived_checker_walks_each_map_once_and_still_catches_new_ones() {
        let c = Contract::default();
        let mut checker = Checker::new(&c);
        let good = sample();
        let mut bad = sample();
        let mut md = Metadata::new();
        md.insert("k".into(), "a\0".into());
        bad.resource_metadata = Arc::new(md);
        for _ in 0..3 {
            assert_eq!(checker.check(&good, now()), Ok(()));
            assert_eq!(checker.check(&bad, now()), Err(Violation::MetadataNul));
        }
        assert_eq!(
            checker.passed.len(),
            1,
            "only the map that passed is remembered"
        );
        assert_eq!(
            Arc::strong_count(&good.resource_metadata),
            1,
            "remembering does not keep the map alive"
        );
        // Interleaved violators keep their positions, the rest their order.
        let mut nan = sample();
        nan.volume = f64::NAN;
        let mut a = sample();
        a.name = "a".into();
        let mut b = sample();
        b.name = "b".into();
        let (ok, rejected) = checker.partition(vec![nan.clone(), a, bad, b, nan], now());
        assert_eq!(
            ok.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(
            rejected.iter().map(|(_, v)| v.reason()).collect::<Vec<_>>(),
            [
                "contract_volume_not_finite",
                "contract_metadata_nul",
                "contract_volume_not_finite"
            ]
        );
    }

    #[test]
    fn partition_keeps_order_and_names_each_violation() {
        let mut bad = sample();
        bad.volume = f64::NAN;
        let (good, rejected) = Contract::default().partition(vec![sample(), bad, sample()], now());
        assert_eq!(good.len(), 2);
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].1, Violation::VolumeNotFinite);
    }
}
