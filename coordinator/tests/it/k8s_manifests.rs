//! The files in jobsets/ agree with the code: the CRD is what `lockstep crd` prints, and the
//! coordinator's Role grants exactly the calls the controller makes.

use std::collections::BTreeSet;
use std::path::Path;

use lockstep_coordinator::k8s::API_CALLS;

fn jobsets(file: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../jobsets")
        .join(file);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_crd_file_is_what_lockstep_crd_prints() {
    let generated = lockstep_coordinator::k8s::crd::crd_yaml().unwrap();
    assert!(
        jobsets("crd.yaml") == generated,
        "jobsets/crd.yaml is stale: regenerate it with `cargo run -- crd > jobsets/crd.yaml`"
    );
}

/// (group, resource, verb) triples.
fn triples<'a>(
    rules: impl Iterator<Item = (&'a str, &'a str, &'a str)>,
) -> BTreeSet<(String, String, String)> {
    rules
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_coordinator_role_grants_exactly_what_the_code_calls() {
    let text = jobsets("rbac.yaml");
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let role = |name: &str| {
        docs.iter()
            .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Role {name} in jobsets/rbac.yaml"))
    };
    let mut granted = Vec::new();
    for rule in role("lockstep-coordinator")["rules"].as_sequence().unwrap() {
        assert!(rule.get("resourceNames").is_none(), "{rule:?}");
        for g in rule["apiGroups"].as_sequence().unwrap() {
            for r in rule["resources"].as_sequence().unwrap() {
                for v in rule["verbs"].as_sequence().unwrap() {
                    let s = |x: &serde_yaml::Value| x.as_str().unwrap().to_string();
                    granted.push((s(g), s(r), s(v)));
                }
            }
        }
    }
    let granted: BTreeSet<_> = granted.into_iter().collect();
    let called = triples(
        API_CALLS
            .iter()
            .flat_map(|(g, r, verbs)| verbs.iter().map(move |v| (*g, *r, *v))),
    );
    assert_eq!(
        granted, called,
        "jobsets/rbac.yaml's Role and API_CALLS differ"
    );
    // The rollout Role: patch, on named Deployments only.
    let rollout = &role("lockstep-rollout")["rules"][0];
    assert_eq!(rollout["resources"][0], "deployments");
    assert_eq!(rollout["verbs"].as_sequence().unwrap().len(), 1);
    assert_eq!(rollout["verbs"][0], "patch");
    assert!(!rollout["resourceNames"].as_sequence().unwrap().is_empty());
}
