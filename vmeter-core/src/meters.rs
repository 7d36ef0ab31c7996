//! Meter selection of a pipeline source: shell globs with `!` exclusions (Ceilometer rules).

/// A validated meter filter.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterFilter {
    includes: Vec<String>,
    excludes: Vec<String>,
    /// `["*"]`: every meter, answered without matching.
    all: bool,
}

impl MeterFilter {
    /// Validates a source's `meters` list as Ceilometer did: non-empty; not includes mixed
    /// with excludes; not `*` mixed with includes. A glob like `disk.*` counts as an include.
    pub fn new(meters: &[String]) -> Result<Self, String> {
        if meters.is_empty() {
            return Err("No meters specified".into());
        }
        let (excludes, includes): (Vec<_>, Vec<_>) =
            meters.iter().cloned().partition(|m| m.starts_with('!'));
        let plain = includes.iter().any(|m| m != "*");
        if plain && !excludes.is_empty() {
            return Err("Both included and excluded meters specified".into());
        }
        if plain && includes.iter().any(|m| m == "*") {
            return Err("Included meters specified with wildcard".into());
        }
        let excludes: Vec<String> = excludes.into_iter().map(|m| m[1..].to_string()).collect();
        let all = excludes.is_empty() && includes.iter().any(|m| m == "*");
        Ok(MeterFilter {
            includes,
            excludes,
            all,
        })
    }

    /// Whether meter `name` passes this filter.
    pub fn matches(&self, name: &str) -> bool {
        if self.all {
            return true;
        }
        if self.excludes.iter().any(|p| fnmatch(p, name)) {
            return false;
        }
        if self.includes.iter().any(|p| fnmatch(p, name)) {
            return true;
        }
        self.includes.is_empty()
    }
}

/// Shell-style glob match (`*`, `?`, `[abc]`, `[!abc]`, `[a-z]`), case-sensitive.
pub fn fnmatch(pattern: &str, name: &str) -> bool {
    // The common patterns without allocating: a plain meter name, or `*`.
    if !pattern.contains(['*', '?', '[']) {
        return pattern == name;
    }
    if pattern == "*" {
        return true;
    }
    // Meter names and patterns are ASCII in practice: match their bytes without
    // allocating (the agent filters every sample it builds); anything else by `char`.
    if pattern.is_ascii() && name.is_ascii() {
        return go(pattern.as_bytes(), name.as_bytes());
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// The glob match over bytes (ASCII) or `char`s.
fn go<T: Copy + PartialOrd + From<u8>>(p: &[T], n: &[T]) -> bool {
    let c = T::from;
    {
        let (mut pi, mut ni) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ni < n.len() {
            if pi < p.len() {
                let x = p[pi];
                if x == c(b'*') {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                } else if x == c(b'?') {
                    pi += 1;
                    ni += 1;
                    continue;
                } else if x == c(b'[') {
                    if let Some((matched, len)) = class(&p[pi..], n[ni]) {
                        if matched {
                            pi += len;
                            ni += 1;
                            continue;
                        }
                    } else if n[ni] == c(b'[') {
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                } else if x == n[ni] {
                    pi += 1;
                    ni += 1;
                    continue;
                }
            }
            match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            }
        }
        p[pi..].iter().all(|x| *x == c(b'*'))
    }
}

/// Matches a `[...]` class at the start of `p`; returns (matched, pattern length) or `None`
/// when the bracket is not closed (then it is a literal `[`).
fn class<T: Copy + PartialOrd + From<u8>>(p: &[T], ch: T) -> Option<(bool, usize)> {
    let c = T::from;
    let mut i = 1;
    let negate = p.get(1) == Some(&c(b'!'));
    if negate {
        i += 1;
    }
    let start = i;
    let mut hit = false;
    while i < p.len() {
        if p[i] == c(b']') && i > start {
            return Some((hit != negate, i + 1));
        }
        if i + 2 < p.len() && p[i + 1] == c(b'-') && p[i + 2] != c(b']') {
            if p[i] <= ch && ch <= p[i + 2] {
                hit = true;
            }
            i += 3;
        } else {
            if p[i] == ch {
                hit = true;
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(m: &[&str]) -> Result<MeterFilter, String> {
        MeterFilter::new(&m.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn globs() {
        assert!(fnmatch("disk.*", "disk.read.bytes"));
        assert!(!fnmatch("disk.*", "disk"));
        assert!(fnmatch("*", ""));
        assert!(fnmatch("cpu?", "cpu1"));
        assert!(fnmatch("net[a-c]", "netb"));
        assert!(!fnmatch("net[!a-c]", "netb"));
        assert!(fnmatch("a*b*c", "aXXbYYc"));
        assert!(!fnmatch("a*b*c", "aXXbYY"));
        assert!(!fnmatch("CPU", "cpu"));
        assert!(fnmatch("x[", "x["));
        // Non-ASCII goes through chars: `?` is one character, not one byte.
        assert!(fnmatch("?", "é"));
        assert!(fnmatch("d?sk.*", "dïsk.read"));
        assert!(fnmatch("[à-ü]x", "éx"));
        assert!(!fnmatch("??", "é"));
    }

    #[test]
    fn ceilometer_validation_rules() {
        assert_eq!(f(&[]).unwrap_err(), "No meters specified");
        assert_eq!(
            f(&["a", "!b"]).unwrap_err(),
            "Both included and excluded meters specified"
        );
        assert_eq!(
            f(&["a", "!a"]).unwrap_err(),
            "Both included and excluded meters specified"
        );
        assert_eq!(
            f(&["*", "a"]).unwrap_err(),
            "Included meters specified with wildcard"
        );
        assert!(f(&["*", "!a"]).is_ok());
        assert!(f(&["!a", "!b"]).is_ok());
        assert!(f(&["cpu", "disk.*"]).is_ok());
    }

    #[test]
    fn matching() {
        let w = f(&["*", "!a"]).unwrap();
        assert!(!w.matches("a") && w.matches("b"));
        let ex = f(&["!cpu", "!disk.*"]).unwrap();
        assert!(!ex.matches("cpu") && !ex.matches("disk.x") && ex.matches("memory"));
        let inc = f(&["cpu", "disk.*"]).unwrap();
        assert!(inc.matches("cpu") && inc.matches("disk.read.bytes") && !inc.matches("instance"));
    }
}
