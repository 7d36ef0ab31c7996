//! The small, safe expression language of `scale` and arithmetic `expr` strings.
//!
//! Python-like, as Ceilometer's `eval` saw them, but never a general interpreter: numbers
//! (integers stay exact, `/` is true division), `+ - * / % **`, unary minus/plus, comparisons,
//! `and`/`or`/`not` returning an operand as in Python, `True`/`False`/`None`, string literals,
//! `min`/`max`/`abs`/`float`/`int`/`round`, dotted access to the sample (`volume`,
//! `resource_metadata.flavor.vcpus`) and, in arithmetic expressions, meter references
//! `$(memory.usage)` optionally followed by `.field`. A missing attribute is a falsy value
//! (`resource_metadata.cpu_number or 1` works) and an error when used in arithmetic.
//! Expressions are parsed once at load; evaluation allocates nothing for numeric work.
//!
//! Where things are: this file holds the values, the tree and the entry points;
//! `lexer.rs` makes tokens, `parser.rs` the tree (with its bounds), `eval.rs` evaluates it.

use eval::eval;
use lexer::Lexer;
use lexer::Tok;
use parser::Parser;
use std::borrow::Cow;
use std::fmt;

mod eval;
mod lexer;
mod parser;

pub use parser::{MAX_NESTING, MAX_TOKENS, MAX_TREE_DEPTH};

/// A parse error with the byte offset where it happened.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} at offset {offset} in expression {source_text:?}")]
pub struct ParseError {
    pub message: String,
    pub offset: usize,
    pub source_text: String,
}

/// An evaluation error; the sample being evaluated is dropped and counted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);

/// A value during evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Val<'a> {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(Cow<'a, str>),
    None,
    /// An attribute that does not exist: falsy, unusable in arithmetic.
    Missing,
    /// A JSON object or array from the metadata (truthy when non-empty).
    Json(&'a serde_json::Value),
}

impl<'a> Val<'a> {
    /// Python truthiness.
    pub fn truthy(&self) -> bool {
        match self {
            Val::Int(i) => *i != 0,
            Val::Float(f) => *f != 0.0,
            Val::Bool(b) => *b,
            Val::Str(s) => !s.is_empty(),
            Val::None | Val::Missing => false,
            Val::Json(serde_json::Value::Object(o)) => !o.is_empty(),
            Val::Json(serde_json::Value::Array(a)) => !a.is_empty(),
            Val::Json(_) => true,
        }
    }

    /// Converts a JSON value found in the sample.
    pub fn from_json(v: &'a serde_json::Value) -> Val<'a> {
        match v {
            serde_json::Value::Null => Val::None,
            serde_json::Value::Bool(b) => Val::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Val::Int(i),
                None => Val::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Val::Str(Cow::Borrowed(s)),
            other => Val::Json(other),
        }
    }

    /// The numeric value, or an error naming what was found.
    pub fn as_f64(&self) -> Result<f64, EvalError> {
        match self {
            Val::Int(i) => Ok(*i as f64),
            Val::Float(f) => Ok(*f),
            Val::Bool(b) => Ok(if *b { 1.0 } else { 0.0 }),
            other => Err(EvalError(format!(
                "expected a number, found {}",
                other.type_name()
            ))),
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Val::Int(_) => "int",
            Val::Float(_) => "float",
            Val::Bool(_) => "bool",
            Val::Str(_) => "str",
            Val::None => "None",
            Val::Missing => "a missing attribute",
            Val::Json(serde_json::Value::Array(_)) => "list",
            Val::Json(_) => "dict",
        }
    }
}

/// Where names are looked up during evaluation.
pub trait Scope {
    /// The value at a dotted path such as `["resource_metadata", "cpu_number"]`.
    fn attr(&self, path: &[String]) -> Val<'_>;
    /// The value at `path` of the sample of meter `meter` (arithmetic only).
    fn meter(&self, meter: &str, path: &[String]) -> Val<'_> {
        let _ = (meter, path);
        Val::Missing
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Pow,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    None,
    Attr(Vec<String>),
    Meter(String, Vec<String>),
    Neg(Box<Node>),
    Not(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Bin(BinOp, Box<Node>, Box<Node>),
    Call(Func, Vec<Node>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Func {
    Min,
    Max,
    Abs,
    Float,
    Int,
    Round,
}

/// A compiled expression.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    root: Node,
    text: String,
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Expr {
    /// Parses a `scale` expression (no meter references).
    pub fn parse(text: &str) -> Result<Expr, ParseError> {
        Self::parse_inner(text, false)
    }

    /// Parses an arithmetic `expr` (meter references allowed).
    pub fn parse_arithmetic(text: &str) -> Result<Expr, ParseError> {
        Self::parse_inner(text, true)
    }

    fn parse_inner(text: &str, meters: bool) -> Result<Expr, ParseError> {
        let toks = Lexer { src: text, pos: 0 }.tokens(meters)?;
        if toks.len() > MAX_TOKENS {
            return Err(ParseError {
                message: format!("longer than {MAX_TOKENS} tokens"),
                offset: toks[MAX_TOKENS].1,
                source_text: text.to_string(),
            });
        }
        let mut p = Parser {
            toks,
            i: 0,
            src: text,
            depth: 0,
        };
        let root = p.or()?;
        if *p.peek() != Tok::End {
            return Err(p.err("unexpected trailing input"));
        }
        if root.depth(MAX_TREE_DEPTH) > MAX_TREE_DEPTH {
            return Err(ParseError {
                message: format!("more than {MAX_TREE_DEPTH} operations deep"),
                offset: 0,
                source_text: text.to_string(),
            });
        }
        Ok(Expr {
            root,
            text: text.to_string(),
        })
    }

    /// Meter names referenced with `$(...)`, in order of first appearance.
    pub fn meters(&self) -> Vec<String> {
        fn walk(n: &Node, out: &mut Vec<String>) {
            match n {
                Node::Meter(m, _) if !out.contains(m) => out.push(m.clone()),
                Node::Neg(a) | Node::Not(a) => walk(a, out),
                Node::And(a, b) | Node::Or(a, b) | Node::Bin(_, a, b) => {
                    walk(a, out);
                    walk(b, out);
                }
                Node::Call(_, args) => args.iter().for_each(|a| walk(a, out)),
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }

    /// Evaluates to a number (the expression's value must be numeric, a bool counts as 0/1).
    pub fn eval_f64(&self, scope: &dyn Scope) -> Result<f64, EvalError> {
        eval(&self.root, scope)?.as_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct S(serde_json::Value);
    impl Scope for S {
        fn attr(&self, path: &[String]) -> Val<'_> {
            let mut v = &self.0;
            for p in path {
                match v.get(p) {
                    Some(x) => v = x,
                    None => return Val::Missing,
                }
            }
            Val::from_json(v)
        }
        fn meter(&self, m: &str, path: &[String]) -> Val<'_> {
            let Some(mut v) = self.0.get("meters").and_then(|x| x.get(m)) else {
                return Val::Missing;
            };
            if path.is_empty() {
                return v.get("volume").map(Val::from_json).unwrap_or(Val::Missing);
            }
            for p in path {
                match v.get(p) {
                    Some(x) => v = x,
                    None => return Val::Missing,
                }
            }
            Val::from_json(v)
        }
    }

    fn ev(e: &str, scope: serde_json::Value) -> Result<f64, EvalError> {
        Expr::parse_arithmetic(e).unwrap().eval_f64(&S(scope))
    }

    #[test]
    fn cpu_util_scale_matches_python() {
        let s = json!({"volume": 1, "resource_metadata": {"cpu_number": 4, "user_metadata": {}}});
        let e = "(resource_metadata.user_metadata.autoscaling_weight or 1.0)* (resource_metadata.non.existent or 1.0)* (100.0 / (10**9 * (resource_metadata.cpu_number or 1)))";
        assert_eq!(ev(e, s).unwrap(), 1.0 * 1.0 * (100.0 / 4e9));
        assert_eq!(
            ev(
                "100.0 / (10**9 * (resource_metadata.cpu_number or 1))",
                json!({})
            )
            .unwrap(),
            100.0 / 1e9
        );
    }

    #[test]
    fn python_semantics() {
        let s = json!({"volume": 7});
        assert_eq!(ev("-2**2", s.clone()).unwrap(), -4.0);
        assert_eq!(ev("2**3**2", s.clone()).unwrap(), 512.0);
        assert_eq!(ev("7 / 2", s.clone()).unwrap(), 3.5);
        assert_eq!(ev("-7 % 3", s.clone()).unwrap(), 2.0);
        assert_eq!(ev("7.5 % -2", s.clone()).unwrap(), -0.5);
        assert_eq!(ev("2**-1", s.clone()).unwrap(), 0.5);
        assert_eq!(ev("0 or 5", s.clone()).unwrap(), 5.0);
        assert_eq!(ev("3 and 5", s.clone()).unwrap(), 5.0);
        assert_eq!(ev("not 0", s.clone()).unwrap(), 1.0);
        assert_eq!(ev("volume > 5 and volume < 8", s.clone()).unwrap(), 1.0);
        assert_eq!(
            ev("min(3, volume, 9) + max(1.5, 2) + abs(-3)", s.clone()).unwrap(),
            8.0
        );
        assert_eq!(
            ev(
                "int(7.9) + float('1.5') + round(2.5) + round(2.71828, 2)",
                s.clone()
            )
            .unwrap(),
            7.0 + 1.5 + 2.0 + 2.72
        );
        assert_eq!(
            ev("volume / ((10**6) * 60)", json!({"volume": 1200000000})).unwrap(),
            20.0
        );
        assert_eq!(ev("10**20 / 10**18", s).unwrap(), 100.0);
    }

    #[test]
    fn missing_is_falsy_but_not_a_number() {
        assert_eq!(ev("resource_metadata.x or 2", json!({})).unwrap(), 2.0);
        assert!(
            ev("resource_metadata.x * 2", json!({}))
                .unwrap_err()
                .0
                .contains("missing")
        );
        assert!(
            ev("1 / 0", json!({}))
                .unwrap_err()
                .0
                .contains("division by zero")
        );
    }

    #[test]
    fn meter_references() {
        let e = Expr::parse_arithmetic(
            "100.0 * $(memory.usage) / $(memory) + $(memory).resource_metadata.x * 0",
        )
        .unwrap();
        assert_eq!(
            e.meters(),
            vec!["memory.usage".to_string(), "memory".to_string()]
        );
        let s = json!({"meters": {"memory": {"volume": 1024.0, "resource_metadata": {"x": 1}}, "memory.usage": {"volume": 512.0}}});
        assert_eq!(e.eval_f64(&S(s)).unwrap(), 50.0);
        assert!(
            Expr::parse("$(cpu) * 2").is_err(),
            "no meter refs in scale expressions"
        );
    }

    #[test]
    fn rejects_what_is_not_the_language() {
        for bad in [
            "",
            "1 +",
            "(1",
            "__import__('os')",
            "x = 1",
            "lambda: 1",
            "volume.",
            "1 2",
            "foo(1)",
            "1 < 2 < 3",
            "'abc",
            "$(",
            "min()",
            "abs(1, 2)",
        ] {
            assert!(
                Expr::parse_arithmetic(bad).is_err(),
                "{bad:?} should not parse"
            );
        }
    }

    #[test]
    fn hostile_nesting_and_length_are_errors_not_crashes() {
        // Each of these would overflow the stack of a parser or evaluator without limits.
        let deep_parens = format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000));
        let deep_neg = format!("{}1", "-".repeat(100_000));
        let deep_not = format!("{}1", "not ".repeat(100_000));
        let deep_pow = vec!["2"; 50_000].join("**");
        let long_sum = vec!["1"; 3000].join("+");
        for (name, text) in [
            ("parentheses", &deep_parens),
            ("negations", &deep_neg),
            ("nots", &deep_not),
            ("powers", &deep_pow),
            ("a long chain", &long_sum),
        ] {
            let e = Expr::parse_arithmetic(text).expect_err(name);
            assert!(
                e.message.contains("deeper")
                    || e.message.contains("tokens")
                    || e.message.contains("deep"),
                "{name}: {}",
                e.message
            );
        }
        // Within the limits, nesting still works.
        let ok = format!("{}volume{}", "(".repeat(30), ")".repeat(30));
        assert!(Expr::parse(&ok).is_ok());
        assert_eq!(
            ev(&vec!["1"; 200].join("+"), serde_json::json!({})).unwrap(),
            200.0
        );
    }
}
