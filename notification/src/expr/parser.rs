//! Tokens to a tree, within bounds on tokens, nesting and depth.

use super::lexer::Tok;
use super::{BinOp, Func, Node, ParseError};

/// Deepest nesting of parentheses, unary operators and `not` the parser follows: its
/// recursion, and so its stack use, is bounded whatever the text.
pub const MAX_NESTING: usize = 64;

/// Most tokens in one expression (real `scale` expressions have a few dozen).
pub const MAX_TOKENS: usize = 4096;

/// Deepest syntax tree accepted (evaluation recurses over it): a chain such as
/// `1 + 1 + … + 1` is as deep as it is long.
pub const MAX_TREE_DEPTH: usize = 256;

pub(super) struct Parser<'s> {
    pub(super) toks: Vec<(Tok, usize)>,
    pub(super) i: usize,
    pub(super) src: &'s str,
    /// Current nesting (see [`MAX_NESTING`]).
    pub(super) depth: usize,
}

impl Node {
    /// Depth of the tree, walking at most `limit + 1` levels.
    pub(super) fn depth(&self, limit: usize) -> usize {
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
    pub(super) fn peek(&self) -> &Tok {
        &self.toks[self.i].0
    }
    pub(super) fn offset(&self) -> usize {
        self.toks[self.i].1
    }
    pub(super) fn err(&self, message: impl Into<String>) -> ParseError {
        ParseError {
            message: message.into(),
            offset: self.offset(),
            source_text: self.src.to_string(),
        }
    }
    pub(super) fn eat_op(&mut self, op: &str) -> bool {
        if matches!(self.peek(), Tok::Op(o) if *o == op) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    pub(super) fn eat_kw(&mut self, kw: &str) -> bool {
        if matches!(self.peek(), Tok::Ident(k) if k == kw) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    pub(super) fn or(&mut self) -> Result<Node, ParseError> {
        let mut l = self.and()?;
        while self.eat_kw("or") {
            l = Node::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    pub(super) fn and(&mut self) -> Result<Node, ParseError> {
        let mut l = self.not()?;
        while self.eat_kw("and") {
            l = Node::And(Box::new(l), Box::new(self.not()?));
        }
        Ok(l)
    }
    pub(super) fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(self.err(format!("nested deeper than {MAX_NESTING} levels")));
        }
        Ok(())
    }
    pub(super) fn not(&mut self) -> Result<Node, ParseError> {
        self.enter()?;
        let n = if self.eat_kw("not") {
            self.not().map(|n| Node::Not(Box::new(n)))
        } else {
            self.cmp()
        };
        self.depth -= 1;
        n
    }
    pub(super) fn cmp(&mut self) -> Result<Node, ParseError> {
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
    pub(super) fn sum(&mut self) -> Result<Node, ParseError> {
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
    pub(super) fn term(&mut self) -> Result<Node, ParseError> {
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
    pub(super) fn unary(&mut self) -> Result<Node, ParseError> {
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
    pub(super) fn power(&mut self) -> Result<Node, ParseError> {
        let base = self.primary()?;
        if self.eat_op("**") {
            // Right-associative and binds tighter than a unary minus on its left: -2**2 == -4.
            let exp = self.unary()?;
            return Ok(Node::Bin(BinOp::Pow, Box::new(base), Box::new(exp)));
        }
        Ok(base)
    }
    pub(super) fn path_tail(&mut self, path: &mut Vec<String>) -> Result<(), ParseError> {
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
    pub(super) fn primary(&mut self) -> Result<Node, ParseError> {
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
