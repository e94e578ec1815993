//! What of a URL may be shown: errors, logs, `/metrics` and NBD error replies name a server by
//! scheme, host and path only. A query string (a presigned URL's signature), a fragment and
//! `user:password@` never leave the process.

/// `url` without userinfo, query or fragment: `https://host:port/path?X-Sig=…` →
/// `https://host:port/path?…`.
pub fn url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let cut = rest.find(['?', '#']).unwrap_or(rest.len());
    let (hostpath, tail) = rest.split_at(cut);
    let (authority, path) = match hostpath.find('/') {
        Some(i) => hostpath.split_at(i),
        None => (hostpath, ""),
    };
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let mut out = String::with_capacity(url.len());
    if let Some(s) = scheme {
        out.push_str(s);
        out.push_str("://");
    }
    out.push_str(host);
    out.push_str(path);
    if !tail.is_empty() {
        out.push_str("?…");
    }
    out
}

/// Replaces every URL-looking word of `text` (`http://…`, `https://…`) by [`url`] of it: for
/// messages made by libraries that print the URL they were given.
pub fn text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("http") {
        let (before, from) = rest.split_at(i);
        out.push_str(before);
        if from.starts_with("http://") || from.starts_with("https://") {
            let end = from
                .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '>')
                .unwrap_or(from.len());
            out.push_str(&url(&from[..end]));
            rest = &from[end..];
        } else {
            out.push_str("http");
            rest = &from[4..];
        }
    }
    out.push_str(rest);
    out
}

/// `host[:port]` of a URL (lowercase), `""` if it has none.
pub fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, h)| h)
        .to_ascii_lowercase()
}

/// The host of a URL without its port (`[::1]` → `::1`).
pub fn hostname_of(url: &str) -> String {
    let h = host_of(url);
    if let Some(v6) = h.strip_prefix('[') {
        return v6.split(']').next().unwrap_or_default().to_string();
    }
    h.rsplit_once(':').map_or(h.clone(), |(n, _)| n.to_string())
}

/// True for `localhost`, 127.0.0.0/8 and ::1: plain HTTP to these never leaves the machine.
pub fn is_loopback(url: &str) -> bool {
    let h = hostname_of(url);
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_cut() {
        assert_eq!(
            url("https://u:p@bucket.s3:443/a/b?X-Amz-Signature=abc#f"),
            "https://bucket.s3:443/a/b?…"
        );
        assert_eq!(url("http://h/x"), "http://h/x");
        assert_eq!(
            text("GET https://h/x?sig=1: 403, then http://u:pw@g/?t=2 failed"),
            "GET https://h/x?… 403, then http://g/?… failed"
        );
        assert_eq!(host_of("https://u:p@Reg.io:5000/v2/"), "reg.io:5000");
        assert_eq!(hostname_of("http://[::1]:80/x"), "::1");
        assert!(is_loopback("http://127.0.0.2:9/token"));
        assert!(!is_loopback("http://10.0.0.1/token"));
    }
}
