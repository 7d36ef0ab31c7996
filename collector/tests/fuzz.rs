//! Property tests that fuzz the API's parsers on stable Rust: the query string grammar,
//! sample ids, POST bodies (any bytes, mutations of real bodies, hostile nesting) and
//! metadata flattening. None may panic or overflow the stack; what a POST accepts keeps
//! the sample contract and the caller's project.
//!
//! Cases per property: `VMETER_FUZZ_CASES` (default 1,000: the CI budget); the long local
//! mode is e.g. `VMETER_FUZZ_CASES=200000 cargo test --release -p collector --test fuzz`.

use chrono::Utc;
use collector::api::{Caller, flatten_metadata, parse_post_body, parse_query, parse_sample_id};
use proptest::prelude::*;
use serde_json::{Value, json};
use vmeter_core::contract::Contract;

fn cases() -> u32 {
    std::env::var("VMETER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn no_headers(_: &str) -> Option<String> {
    None
}

fn arb_json(depth: u32) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,10}".prop_map(Value::from),
        "[0-9T:.+-]{0,26}".prop_map(Value::from),
    ];
    leaf.prop_recursive(depth, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-z.]{0,12}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An OldSample with each field present, absent, or of a random shape.
fn arb_posted() -> impl Strategy<Value = Value> {
    let field = |good: Value| prop_oneof![3 => Just(Some(good)), 1 => Just(None), 1 => arb_json(2).prop_map(Some)];
    (
        field(json!("cpu_util")),
        field(json!("gauge")),
        field(json!("%")),
        field(json!(12.5)),
        field(json!("vm-1")),
        field(json!("project-1")),
        field(json!("u")),
        field(json!(Utc::now().format("%Y-%m-%dT%H:%M:%S").to_string())),
        field(json!({"a.b": 1, "flavor": {"vcpus": 2}})),
        field(json!("openstack")),
    )
        .prop_map(|(n, t, u, v, r, p, us, ts, md, src)| {
            let mut o = serde_json::Map::new();
            for (k, x) in [
                ("counter_name", n),
                ("counter_type", t),
                ("counter_unit", u),
                ("counter_volume", v),
                ("resource_id", r),
                ("project_id", p),
                ("user_id", us),
                ("timestamp", ts),
                ("resource_metadata", md),
                ("source", src),
            ] {
                if let Some(x) = x {
                    o.insert(k.into(), x);
                }
            }
            Value::Object(o)
        })
}

proptest! {
    #![proptest_config(config())]

    /// Any query string (percent escapes, repeated keys, orphans): parsed or a 400.
    #[test]
    fn query_parser_never_panics(raw in "([a-z.]{0,12}=?[%0-9A-Za-z+&=:.-]{0,20}&?){0,8}", any_text in ".{0,60}") {
        let _ = parse_query(Some(&raw));
        let _ = parse_query(Some(&any_text));
    }

    /// Sample ids: any text is an id or not, never a panic; ids of real keys round trip.
    #[test]
    fn sample_ids_never_panic(text in "[0-9a-fx-]{0,40}", other in ".{0,30}") {
        let _ = parse_sample_id(&text);
        let _ = parse_sample_id(&other);
    }

    /// Any bytes as a POST body: a 400 or samples, never a panic.
    #[test]
    fn post_body_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_post_body("cpu_util", &body, &Caller::Admin, &no_headers, &Contract::default(), Utc::now());
    }

    /// Structured bodies with fields missing or of the wrong shape: whatever is accepted
    /// keeps the contract, and a project token's samples belong to its project.
    #[test]
    fn accepted_posts_keep_the_contract_and_the_project(list in prop::collection::vec(arb_posted(), 0..4), project in any::<bool>()) {
        let body = serde_json::to_vec(&list).unwrap();
        let who = if project { Caller::Project("project-1".into()) } else { Caller::Admin };
        let contract = Contract::default();
        let now = Utc::now();
        if let Ok(samples) = parse_post_body("cpu_util", &body, &who, &no_headers, &contract, now) {
            prop_assert_eq!(samples.len(), list.len());
            for s in &samples {
                prop_assert!(contract.check(s, now).is_ok());
                if project {
                    prop_assert_eq!(s.project_id.as_deref(), Some("project-1"));
                }
            }
        }
    }

    /// Flattening any metadata (what the API answers with) never panics.
    #[test]
    fn flattening_never_panics(md in prop::collection::btree_map("[a-z.:]{0,8}", arb_json(5), 0..6)) {
        let md: serde_json::Map<String, Value> = md.into_iter().collect();
        let _ = flatten_metadata(&md);
    }
}

/// JSON nested far deeper than any stack allows, and dotted keys of 10,000 parts: a 400 on
/// a thread with tokio's 2 MiB worker stack, not a crash.
#[test]
fn hostile_nesting_in_post_bodies_is_a_400() {
    let ts = Utc::now().format("%Y-%m-%dT%H:%M:%S").to_string();
    let sample = |md: String| {
        format!(
            r#"[{{"counter_name":"cpu_util","counter_type":"gauge","counter_unit":"%","counter_volume":1,"resource_id":"r","timestamp":"{ts}","resource_metadata":{md}}}]"#
        )
    };
    let bodies = [
        sample(format!(
            "{{\"a\":{}1{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        )),
        sample(format!(
            "{{\"a\":{}1{}}}",
            "{\"b\":".repeat(100),
            "}".repeat(100)
        )),
        sample(format!("{{\"{}\":1}}", vec!["a"; 10_000].join("."))),
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
    ];
    for body in bodies {
        let out = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                parse_post_body(
                    "cpu_util",
                    body.as_bytes(),
                    &Caller::Admin,
                    &no_headers,
                    &Contract::default(),
                    Utc::now(),
                )
                .is_err()
            })
            .unwrap()
            .join()
            .expect("parsing must not crash");
        assert!(out, "a hostile body was accepted");
    }
}
