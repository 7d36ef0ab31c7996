//! Evaluating a tree against a sample (and, in arithmetic, the meters in scope).

use std::borrow::Cow;

use super::{BinOp, EvalError, Func, Node, Scope, Val};

pub(super) fn eval<'a>(n: &'a Node, scope: &'a dyn Scope) -> Result<Val<'a>, EvalError> {
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

pub(super) fn num(v: &Val<'_>, what: &str) -> Result<f64, EvalError> {
    v.as_f64()
        .map_err(|e| EvalError(format!("{what}: {}", e.0)))
}

pub(super) fn int_of(v: &Val<'_>) -> Option<i64> {
    match v {
        Val::Int(i) => Some(*i),
        Val::Bool(b) => Some(i64::from(*b)),
        _ => None,
    }
}

pub(super) fn binop<'a>(op: BinOp, l: Val<'a>, r: Val<'a>) -> Result<Val<'a>, EvalError> {
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

pub(super) fn call<'a>(f: Func, args: Vec<Val<'a>>) -> Result<Val<'a>, EvalError> {
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
