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

use std::borrow::Cow;
use std::fmt;

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

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(Node),
    Str(String),
    Ident(String),
    Meter(String),
    Op(&'static str),
    End,
}

struct Lexer<'s> {
    src: &'s str,
    pos: usize,
}

impl<'s> Lexer<'s> {
    fn err(&self, message: impl Into<String>, offset: usize) -> ParseError {
        ParseError {
            message: message.into(),
            offset,
            source_text: self.src.to_string(),
        }
    }

    fn tokens(mut self, allow_meters: bool) -> Result<Vec<(Tok, usize)>, ParseError> {
        let b = self.src.as_bytes();
        let mut out = Vec::new();
        loop {
            while self.pos < b.len() && b[self.pos].is_ascii_whitespace() {
                self.pos += 1;
            }
            let start = self.pos;
            if self.pos >= b.len() {
                out.push((Tok::End, start));
                return Ok(out);
            }
            let c = b[self.pos];
            let tok = if c.is_ascii_digit()
                || (c == b'.' && b.get(self.pos + 1).is_some_and(u8::is_ascii_digit))
            {
                self.number()?
            } else if c.is_ascii_alphabetic() || c == b'_' {
                while self.pos < b.len()
                    && (b[self.pos].is_ascii_alphanumeric() || b[self.pos] == b'_')
                {
                    self.pos += 1;
                }
                Tok::Ident(self.src[start..self.pos].to_string())
            } else if c == b'$' {
                if !allow_meters {
                    return Err(self.err(
                        "meter references $(...) are only allowed in arithmetic expressions",
                        start,
                    ));
                }
                if b.get(self.pos + 1) != Some(&b'(') {
                    return Err(self.err("expected '(' after '$'", start));
                }
                let close = self.src[self.pos..]
                    .find(')')
                    .ok_or_else(|| self.err("unclosed $(", start))?
                    + self.pos;
                let name = &self.src[self.pos + 2..close];
                if name.is_empty()
                    || !name.chars().all(|ch| {
                        ch.is_alphanumeric() || ch == '_' || ch == '.' || ch == '-' || ch == ':'
                    })
                {
                    return Err(self.err(format!("bad meter name {name:?}"), start));
                }
                self.pos = close + 1;
                Tok::Meter(name.to_string())
            } else if c == b'"' || c == b'\'' {
                let end = self.src[self.pos + 1..]
                    .find(c as char)
                    .ok_or_else(|| self.err("unterminated string", start))?
                    + self.pos
                    + 1;
                let s = self.src[self.pos + 1..end].to_string();
                self.pos = end + 1;
                Tok::Str(s)
            } else {
                const OPS: [&str; 17] = [
                    "**", "<=", ">=", "==", "!=", "+", "-", "*", "/", "%", "<", ">", "(", ")", ",",
                    ".", "=",
                ];
                let op = OPS
                    .iter()
                    .find(|o| self.src[self.pos..].starts_with(**o))
                    .ok_or_else(|| {
                        self.err(format!("unexpected character {:?}", c as char), start)
                    })?;
                if *op == "=" {
                    return Err(self.err("assignment is not allowed (use == to compare)", start));
                }
                self.pos += op.len();
                Tok::Op(op)
            };
            out.push((tok, start));
        }
    }

    fn number(&mut self) -> Result<Tok, ParseError> {
        let b = self.src.as_bytes();
        let start = self.pos;
        let mut float = false;
        while self.pos < b.len() && (b[self.pos].is_ascii_digit() || b[self.pos] == b'_') {
            self.pos += 1;
        }
        if self.pos < b.len() && b[self.pos] == b'.' {
            float = true;
            self.pos += 1;
            while self.pos < b.len() && b[self.pos].is_ascii_digit() {
                self.pos += 1;
            }
        }
        if self.pos < b.len() && (b[self.pos] == b'e' || b[self.pos] == b'E') {
            float = true;
            self.pos += 1;
            if self.pos < b.len() && (b[self.pos] == b'+' || b[self.pos] == b'-') {
                self.pos += 1;
            }
            while self.pos < b.len() && b[self.pos].is_ascii_digit() {
                self.pos += 1;
            }
        }
        let text: String = self.src[start..self.pos]
            .chars()
            .filter(|c| *c != '_')
            .collect();
        if float {
            text.parse::<f64>()
                .map(|f| Tok::Num(Node::Float(f)))
                .map_err(|_| self.err(format!("bad number {text:?}"), start))
        } else {
            match text.parse::<i64>() {
                Ok(i) => Ok(Tok::Num(Node::Int(i))),
                Err(_) => text
                    .parse::<f64>()
                    .map(|f| Tok::Num(Node::Float(f)))
                    .map_err(|_| self.err(format!("bad number {text:?}"), start)),
            }
        }
    }
}

/// Deepest nesting of parentheses, unary operators and `not` the parser follows: its
/// recursion, and so its stack use, is bounded whatever the text.
pub const MAX_NESTING: usize = 64;

/// Most tokens in one expression (real `scale` expressions have a few dozen).
pub const MAX_TOKENS: usize = 4096;

/// Deepest syntax tree accepted (evaluation recurses over it): a chain such as
/// `1 + 1 + … + 1` is as deep as it is long.
pub const MAX_TREE_DEPTH: usize = 256;

struct Parser<'s> {
    toks: Vec<(Tok, usize)>,
    i: usize,
    src: &'s str,
    /// Current nesting (see [`MAX_NESTING`]).
    depth: usize,
}

impl Node {
    /// Depth of the tree, walking at most `limit + 1` levels.
    fn depth(&self, limit: usize) -> usize {
        if limit == 0 {
            return 1;
        }
        let below = |n: &Node| n.depth(limit - 1);
        1 + match self {
            Node::Neg(a) | Node::Not(a) => below(a),
            Node::And(a, b) | Node::Or(a, b) | Node::Bin(_, a, b) => below(a).max(below(b)),
            Node::Call(_, args) => args.iter().map(below).max().unwrap_or(0),
            _ => 0,
        }
    }
}

impl Parser<'_> {
    fn peek(&self) -> &Tok {
        &self.toks[self.i].0
    }
    fn offset(&self) -> usize {
        self.toks[self.i].1
    }
    fn err(&self, message: impl Into<String>) -> ParseError {
        ParseError {
            message: message.into(),
            offset: self.offset(),
            source_text: self.src.to_string(),
        }
    }
    fn eat_op(&mut self, op: &str) -> bool {
        if matches!(self.peek(), Tok::Op(o) if *o == op) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn eat_kw(&mut self, kw: &str) -> bool {
        if matches!(self.peek(), Tok::Ident(k) if k == kw) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<Node, ParseError> {
        let mut l = self.and()?;
        while self.eat_kw("or") {
            l = Node::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Node, ParseError> {
        let mut l = self.not()?;
        while self.eat_kw("and") {
            l = Node::And(Box::new(l), Box::new(self.not()?));
        }
        Ok(l)
    }
    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(self.err(format!("nested deeper than {MAX_NESTING} levels")));
        }
        Ok(())
    }
    fn not(&mut self) -> Result<Node, ParseError> {
        self.enter()?;
        let n = if self.eat_kw("not") {
            self.not().map(|n| Node::Not(Box::new(n)))
        } else {
            self.cmp()
        };
        self.depth -= 1;
        n
    }
    fn cmp(&mut self) -> Result<Node, ParseError> {
        let l = self.sum()?;
        let op = match self.peek() {
            Tok::Op("<") => BinOp::Lt,
            Tok::Op("<=") => BinOp::Le,
            Tok::Op(">") => BinOp::Gt,
            Tok::Op(">=") => BinOp::Ge,
            Tok::Op("==") => BinOp::Eq,
            Tok::Op("!=") => BinOp::Ne,
            _ => return Ok(l),
        };
        self.i += 1;
        let r = self.sum()?;
        if matches!(self.peek(), Tok::Op("<" | "<=" | ">" | ">=" | "==" | "!=")) {
            return Err(self.err("chained comparisons are not supported"));
        }
        Ok(Node::Bin(op, Box::new(l), Box::new(r)))
    }
    fn sum(&mut self) -> Result<Node, ParseError> {
        let mut l = self.term()?;
        loop {
            let op = if self.eat_op("+") {
                BinOp::Add
            } else if self.eat_op("-") {
                BinOp::Sub
            } else {
                return Ok(l);
            };
            l = Node::Bin(op, Box::new(l), Box::new(self.term()?));
        }
    }
    fn term(&mut self) -> Result<Node, ParseError> {
        let mut l = self.unary()?;
        loop {
            let op = if self.eat_op("*") {
                BinOp::Mul
            } else if self.eat_op("/") {
                BinOp::Div
            } else if self.eat_op("%") {
                BinOp::Mod
            } else {
                return Ok(l);
            };
            l = Node::Bin(op, Box::new(l), Box::new(self.unary()?));
        }
    }
    fn unary(&mut self) -> Result<Node, ParseError> {
        self.enter()?;
        let n = if self.eat_op("-") {
            self.unary().map(|n| Node::Neg(Box::new(n)))
        } else if self.eat_op("+") {
            self.unary()
        } else {
            self.power()
        };
        self.depth -= 1;
        n
    }
    fn power(&mut self) -> Result<Node, ParseError> {
        let base = self.primary()?;
        if self.eat_op("**") {
            // Right-associative and binds tighter than a unary minus on its left: -2**2 == -4.
            let exp = self.unary()?;
            return Ok(Node::Bin(BinOp::Pow, Box::new(base), Box::new(exp)));
        }
        Ok(base)
    }
    fn path_tail(&mut self, path: &mut Vec<String>) -> Result<(), ParseError> {
        while self.eat_op(".") {
            match self.peek().clone() {
                Tok::Ident(n) => {
                    self.i += 1;
                    path.push(n);
                }
                _ => return Err(self.err("expected an attribute name after '.'")),
            }
        }
        Ok(())
    }
    fn primary(&mut self) -> Result<Node, ParseError> {
        match self.peek().clone() {
            Tok::Num(n) => {
                self.i += 1;
                Ok(n)
            }
            Tok::Str(s) => {
                self.i += 1;
                Ok(Node::Str(s))
            }
            Tok::Meter(m) => {
                self.i += 1;
                let mut path = Vec::new();
                self.path_tail(&mut path)?;
                Ok(Node::Meter(m, path))
            }
            Tok::Op("(") => {
                self.i += 1;
                let e = self.or()?;
                if !self.eat_op(")") {
                    return Err(self.err("expected ')'"));
                }
                Ok(e)
            }
            Tok::Ident(name) => {
                self.i += 1;
                match name.as_str() {
                    "True" => return Ok(Node::Bool(true)),
                    "False" => return Ok(Node::Bool(false)),
                    "None" => return Ok(Node::None),
                    "and" | "or" | "not" | "lambda" | "import" | "if" | "else" | "for" | "in"
                    | "is" => {
                        return Err(ParseError {
                            message: format!("unexpected keyword {name:?}"),
                            offset: self.toks[self.i - 1].1,
                            source_text: self.src.to_string(),
                        });
                    }
                    _ => {}
                }
                if self.eat_op("(") {
                    let f = match name.as_str() {
                        "min" => Func::Min,
                        "max" => Func::Max,
                        "abs" => Func::Abs,
                        "float" => Func::Float,
                        "int" => Func::Int,
                        "round" => Func::Round,
                        _ => {
                            return Err(ParseError {
                                message: format!(
                                    "unknown function {name:?} (allowed: min, max, abs, float, int, round)"
                                ),
                                offset: self.toks[self.i - 2].1,
                                source_text: self.src.to_string(),
                            });
                        }
                    };
                    let mut args = Vec::new();
                    if !self.eat_op(")") {
                        loop {
                            args.push(self.or()?);
                            if self.eat_op(")") {
                                break;
                            }
                            if !self.eat_op(",") {
                                return Err(self.err("expected ',' or ')'"));
                            }
                        }
                    }
                    let ok = match f {
                        Func::Min | Func::Max => !args.is_empty(),
                        Func::Abs | Func::Float | Func::Int => args.len() == 1,
                        Func::Round => matches!(args.len(), 1 | 2),
                    };
                    if !ok {
                        return Err(self.err(format!("wrong number of arguments for {name}()")));
                    }
                    return Ok(Node::Call(f, args));
                }
                let mut path = vec![name];
                self.path_tail(&mut path)?;
                Ok(Node::Attr(path))
            }
            Tok::End => Err(self.err("unexpected end of expression")),
            Tok::Op(o) => Err(self.err(format!("unexpected {o:?}"))),
        }
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

fn eval<'a>(n: &'a Node, scope: &'a dyn Scope) -> Result<Val<'a>, EvalError> {
    Ok(match n {
        Node::Int(i) => Val::Int(*i),
        Node::Float(f) => Val::Float(*f),
        Node::Str(s) => Val::Str(Cow::Borrowed(s)),
        Node::Bool(b) => Val::Bool(*b),
        Node::None => Val::None,
        Node::Attr(path) => scope.attr(path),
        Node::Meter(m, path) => scope.meter(m, path),
        Node::Neg(a) => match eval(a, scope)? {
            Val::Int(i) => i
                .checked_neg()
                .map(Val::Int)
                .unwrap_or(Val::Float(-(i as f64))),
            v => Val::Float(-num(&v, "unary -")?),
        },
        Node::Not(a) => Val::Bool(!eval(a, scope)?.truthy()),
        Node::And(a, b) => {
            let l = eval(a, scope)?;
            if !l.truthy() { l } else { eval(b, scope)? }
        }
        Node::Or(a, b) => {
            let l = eval(a, scope)?;
            if l.truthy() { l } else { eval(b, scope)? }
        }
        Node::Bin(op, a, b) => binop(*op, eval(a, scope)?, eval(b, scope)?)?,
        Node::Call(f, args) => {
            let vals = args
                .iter()
                .map(|a| eval(a, scope))
                .collect::<Result<Vec<_>, _>>()?;
            call(*f, vals)?
        }
    })
}

fn num(v: &Val<'_>, what: &str) -> Result<f64, EvalError> {
    v.as_f64()
        .map_err(|e| EvalError(format!("{what}: {}", e.0)))
}

fn int_of(v: &Val<'_>) -> Option<i64> {
    match v {
        Val::Int(i) => Some(*i),
        Val::Bool(b) => Some(i64::from(*b)),
        _ => None,
    }
}

fn binop<'a>(op: BinOp, l: Val<'a>, r: Val<'a>) -> Result<Val<'a>, EvalError> {
    use BinOp::*;
    let sym = match op {
        Add => "+",
        Sub => "-",
        Mul => "*",
        Div => "/",
        Mod => "%",
        Pow => "**",
        Lt => "<",
        Le => "<=",
        Gt => ">",
        Ge => ">=",
        Eq => "==",
        Ne => "!=",
    };
    if matches!(op, Eq | Ne) {
        let eq = match (&l, &r) {
            (Val::Str(a), Val::Str(b)) => a == b,
            (Val::None | Val::Missing, Val::None | Val::Missing) => true,
            _ => match (l.as_f64(), r.as_f64()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            },
        };
        return Ok(Val::Bool(if op == Eq { eq } else { !eq }));
    }
    if let (Val::Str(a), Val::Str(b)) = (&l, &r) {
        return match op {
            Add => Ok(Val::Str(Cow::Owned(format!("{a}{b}")))),
            Lt => Ok(Val::Bool(a < b)),
            Le => Ok(Val::Bool(a <= b)),
            Gt => Ok(Val::Bool(a > b)),
            Ge => Ok(Val::Bool(a >= b)),
            _ => Err(EvalError(format!(
                "unsupported operand types for {sym}: str and str"
            ))),
        };
    }
    if let (Some(a), Some(b)) = (int_of(&l), int_of(&r)) {
        let exact = match op {
            Add => a.checked_add(b),
            Sub => a.checked_sub(b),
            Mul => a.checked_mul(b),
            Mod if b != 0 => a.checked_rem(b).map(|m| {
                if m != 0 && ((m < 0) != (b < 0)) {
                    m + b
                } else {
                    m
                }
            }),
            Pow if (0..=u32::MAX as i64).contains(&b) => a.checked_pow(b as u32),
            _ => None,
        };
        if let Some(v) = exact {
            return Ok(Val::Int(v));
        }
    }
    let a = num(&l, sym)?;
    let b = num(&r, sym)?;
    Ok(match op {
        Add => Val::Float(a + b),
        Sub => Val::Float(a - b),
        Mul => Val::Float(a * b),
        Div => {
            if b == 0.0 {
                return Err(EvalError("division by zero".into()));
            }
            Val::Float(a / b)
        }
        Mod => {
            if b == 0.0 {
                return Err(EvalError("modulo by zero".into()));
            }
            let m = a % b;
            Val::Float(if m != 0.0 && ((m < 0.0) != (b < 0.0)) {
                m + b
            } else {
                m
            })
        }
        Pow => {
            if a == 0.0 && b < 0.0 {
                return Err(EvalError("0 cannot be raised to a negative power".into()));
            }
            Val::Float(a.powf(b))
        }
        Lt => Val::Bool(a < b),
        Le => Val::Bool(a <= b),
        Gt => Val::Bool(a > b),
        Ge => Val::Bool(a >= b),
        Eq | Ne => unreachable!("handled above"),
    })
}

fn call<'a>(f: Func, args: Vec<Val<'a>>) -> Result<Val<'a>, EvalError> {
    match f {
        Func::Min | Func::Max => {
            let mut best: Option<Val<'a>> = None;
            for v in args {
                let x = num(&v, if f == Func::Min { "min()" } else { "max()" })?;
                let better = match &best {
                    None => true,
                    Some(b) => {
                        let bx = b.as_f64()?;
                        if f == Func::Min { x < bx } else { x > bx }
                    }
                };
                if better {
                    best = Some(v);
                }
            }
            Ok(best.expect("min/max have at least one argument (checked at parse)"))
        }
        Func::Abs => match &args[0] {
            Val::Int(i) => Ok(i
                .checked_abs()
                .map(Val::Int)
                .unwrap_or(Val::Float((*i as f64).abs()))),
            v => Ok(Val::Float(num(v, "abs()")?.abs())),
        },
        Func::Float => match &args[0] {
            Val::Str(s) => s
                .trim()
                .parse::<f64>()
                .map(Val::Float)
                .map_err(|_| EvalError(format!("could not convert string to float: {s:?}"))),
            v => Ok(Val::Float(num(v, "float()")?)),
        },
        Func::Int => {
            let x = match &args[0] {
                Val::Str(s) => {
                    return s
                        .trim()
                        .parse::<i64>()
                        .map(Val::Int)
                        .map_err(|_| EvalError(format!("invalid literal for int(): {s:?}")));
                }
                v => num(v, "int()")?,
            };
            if !x.is_finite() {
                return Err(EvalError("cannot convert a non-finite float to int".into()));
            }
            Ok(Val::Int(x.trunc() as i64))
        }
        Func::Round => {
            let x = num(&args[0], "round()")?;
            let digits = match args.get(1) {
                Some(d) => int_of(d)
                    .ok_or_else(|| EvalError("round() digits must be an integer".into()))?,
                None => {
                    // Python rounds half to even.
                    let r = x.round();
                    let r = if (x - x.trunc()).abs() == 0.5 {
                        2.0 * (x / 2.0).round()
                    } else {
                        r
                    };
                    return Ok(Val::Int(r as i64));
                }
            };
            let p = 10f64.powi(digits as i32);
            Ok(Val::Float((x * p).round() / p))
        }
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
