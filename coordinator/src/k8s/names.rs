//! What Kubernetes accepts as an object name, a resource quantity and an image reference,
//! checked where a LockstepJob's spec enters (so a bad value is refused naming its field,
//! not found out by a pod that never starts).

/// A Kubernetes object name (RFC 1123 subdomain).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(lockstep_api::config::is_dns_label)
}

/// An image reference as the container runtime parses it: `[DOMAIN[:PORT]/]PATH[:TAG][@DIGEST]`,
/// each path component lower-case letters and digits joined by `.`, `_`, `__` or dashes.
pub fn is_image_ref(r: &str) -> bool {
    let (rest, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    if let Some(d) = digest {
        let Some((alg, hex)) = d.split_once(':') else {
            return false;
        };
        let alg_ok = alg.starts_with(|c: char| c.is_ascii_alphabetic())
            && alg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_+.".contains(c));
        if !alg_ok || hex.len() < 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return false;
        }
    }
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[slash..].rfind(':') {
        Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        let ok = t.len() <= 128
            && t.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return false;
        }
    }
    let mut comps: Vec<&str> = name.split('/').collect();
    if comps.len() > 1 && (comps[0].contains(['.', ':']) || comps[0] == "localhost") {
        let domain = comps.remove(0);
        let (host, port) = domain.split_once(':').unwrap_or((domain, "1"));
        let host_ok = !host.is_empty()
            && host
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        if !host_ok || port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) {
            return false;
        }
    }
    let component = |c: &str| {
        let alnum = |ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit();
        c.starts_with(alnum)
            && c.ends_with(alnum)
            && c.chars().all(|ch| alnum(ch) || "._-".contains(ch))
            && !c.contains("..")
            && !c.contains("___")
            && !c.contains("._")
            && !c.contains("_.")
            && !c.contains(".-")
            && !c.contains("-.")
            && !c.contains("_-")
            && !c.contains("-_")
    };
    !comps.is_empty() && comps.iter().all(|c| component(c))
}

/// A Kubernetes quantity: digits (with an optional fraction) and an optional suffix.
pub fn is_quantity(q: &str) -> bool {
    const SUFFIXES: [&str; 14] = [
        "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
    ];
    let digits = q
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(digits);
    !num.is_empty()
        && num.len() <= 20
        && num.chars().filter(|c| *c == '.').count() <= 1
        && num.chars().any(|c| c.is_ascii_digit())
        && SUFFIXES.contains(&suffix)
}

#[cfg(test)]
mod tests {
    #[test]
    fn image_references_are_checked_as_the_runtime_parses_them() {
        for ok in [
            "lockstep",
            "lockstep:1",
            "registry.example.com:5000/ml/lockstep:v0.1.0",
            "localhost/lockstep",
            "ghcr.io/org/lock_step__x-y:latest",
            "lockstep@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(super::is_image_ref(ok), "{ok}");
        }
        for bad in [
            "",
            "Lockstep:BAD",
            "MyRepo/x:v2",
            "two words",
            "lockstep:",
            "lockstep:-x",
            "a//b",
            "lockstep@sha256:12",
            "registry.example.com:port/x",
            "x..y",
        ] {
            assert!(!super::is_image_ref(bad), "{bad}");
        }
    }
}
