//! containerd walk filters (containerd's `filters` package), the subset containerd itself
//! sends to snapshotters: conjunctions (`,`) of `FIELD==VALUE`, `FIELD!=VALUE` or a bare
//! `FIELD` (present), over `name`, `parent`, `kind` and `labels.KEY` / `labels."KEY"`;
//! several filters are alternatives. Anything else (e.g. `~=` regular expressions) is refused,
//! since answering a walk with the wrong snapshots would be wrong data. Hand-written: no
//! maintained Rust crate parses containerd's filter language.

use std::collections::HashMap;

/// One clause.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Clause {
    Eq(Vec<String>, String),
    Ne(Vec<String>, String),
    Present(Vec<String>),
}

/// A parsed filter: clauses that must all hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter(Vec<Clause>);

/// Fields of a snapshot a filter looks at.
pub struct Fields<'a> {
    pub name: &'a str,
    pub parent: &'a str,
    pub kind: &'a str,
    pub labels: &'a HashMap<String, String>,
}

/// Splits `s` at `sep` outside double quotes.
fn split_unquoted<'a>(s: &'a str, sep: &str) -> Vec<&'a str> {
    let (mut out, mut start, mut quoted) = (Vec::new(), 0, false);
    let mut i = 0;
    let b = s.as_bytes();
    while i < b.len() {
        match b[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            _ if !quoted && s[i..].starts_with(sep) => {
                out.push(&s[start..i]);
                start = i + sep.len();
                i = start;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(&s[start..]);
    out
}

fn unquote(s: &str) -> Result<String, String> {
    let s = s.trim();
    match s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) => Ok(inner.replace("\\\"", "\"").replace("\\\\", "\\")),
        None if s.contains('"') => Err(format!("badly quoted {s:?}")),
        None => Ok(s.to_string()),
    }
}

fn field(s: &str) -> Result<Vec<String>, String> {
    split_unquoted(s.trim(), ".")
        .into_iter()
        .map(unquote)
        .collect()
}

impl Filter {
    pub fn parse(s: &str) -> Result<Filter, String> {
        let mut clauses = Vec::new();
        for c in split_unquoted(s, ",") {
            if c.contains("~=") {
                return Err(format!("unsupported operator in {c:?}"));
            }
            clauses.push(
                match (
                    split_unquoted(c, "==").as_slice(),
                    split_unquoted(c, "!=").as_slice(),
                ) {
                    ([f, v], _) => Clause::Eq(field(f)?, unquote(v)?),
                    (_, [f, v]) => Clause::Ne(field(f)?, unquote(v)?),
                    ([f], [_]) => Clause::Present(field(f)?),
                    _ => return Err(format!("cannot parse filter clause {c:?}")),
                },
            );
        }
        Ok(Filter(clauses))
    }

    pub fn matches(&self, f: &Fields) -> Result<bool, String> {
        let get = |path: &[String]| -> Result<Option<String>, String> {
            Ok(match path {
                [n] if n == "name" => Some(f.name.to_string()),
                [n] if n == "parent" => Some(f.parent.to_string()),
                [n] if n == "kind" => Some(f.kind.to_string()),
                [l, key] if l == "labels" => f.labels.get(key).cloned(),
                [l, rest @ ..] if l == "labels" => f.labels.get(&rest.join(".")).cloned(),
                _ => return Err(format!("unsupported filter field {path:?}")),
            })
        };
        for c in &self.0 {
            let ok = match c {
                Clause::Eq(p, v) => get(p)?.as_deref() == Some(v.as_str()),
                Clause::Ne(p, v) => get(p)?.as_deref() != Some(v.as_str()),
                Clause::Present(p) => get(p)?.is_some_and(|x| !x.is_empty()),
            };
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerds_target_lookup() {
        let f = Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:ab,parent=="""#)
            .expect("parse");
        let mut labels = HashMap::new();
        labels.insert(
            "containerd.io/snapshot.ref".to_string(),
            "sha256:ab".to_string(),
        );
        let fields = |parent| Fields {
            name: "x",
            parent,
            kind: "committed",
            labels: &labels,
        };
        assert!(f.matches(&fields("")).expect("match"));
        assert!(!f.matches(&fields("p")).expect("match"));
        assert!(Filter::parse("name~=x").is_err());
        let p = Filter::parse("labels.a,kind!=active").expect("parse");
        assert!(!p.matches(&fields("")).expect("match"), "no label a");
    }
}
