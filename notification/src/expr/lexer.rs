//! Tokens of an expression.

use super::{Node, ParseError};

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
    Num(Node),
    Str(String),
    Ident(String),
    Meter(String),
    Op(&'static str),
    End,
}

pub(super) struct Lexer<'s> {
    pub(super) src: &'s str,
    pub(super) pos: usize,
}

impl<'s> Lexer<'s> {
    pub(super) fn err(&self, message: impl Into<String>, offset: usize) -> ParseError {
        ParseError {
            message: message.into(),
            offset,
            source_text: self.src.to_string(),
        }
    }

    pub(super) fn tokens(mut self, allow_meters: bool) -> Result<Vec<(Tok, usize)>, ParseError> {
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

    pub(super) fn number(&mut self) -> Result<Tok, ParseError> {
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
