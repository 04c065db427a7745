//! Admission policy with Cedar (`cedar-policy`): the decision on a cell comes before anything is
//! created, and names the policies that made it. Cedar is a small, analysable language with a
//! formal semantics and a default-deny, forbid-overrides-permit evaluation; a user can read a
//! policy file and an auditor can reason about it.

use std::path::Path;
use std::str::FromStr;

use cedar_policy::{
    AuthorizationError, Authorizer, Context, Decision, Entities, EntityUid, PolicyId, PolicySet,
    Request,
};
use serde::Serialize;
use serde_json::json;

/// The policy that ships with IsoCell (`policies/default.cedar`).
pub const DEFAULT_POLICY: &str = include_str!("../../../policies/default.cedar");

/// Policies loaded from named sources; each policy's id is `SOURCE:ID`, with ID its `@id`
/// annotation (or its position in the file).
#[derive(Debug)]
pub struct Policies {
    set: PolicySet,
}

/// What the admission request is about.
#[derive(Clone, Debug, Serialize)]
pub struct AdmissionRequest {
    /// Who asks: `Operator` (the host's operator, `isocell run`) or `Client` (a client of the
    /// daemon, by its identity); the Cedar principal is `IsoCell::<kind>::"<principal>"`.
    pub principal_kind: String,
    /// The principal's id: the operator's name, or the client identity (`unix:uid=1000`,
    /// `x509:CN=...`).
    pub principal: String,
    /// The cell's id.
    pub cell_id: String,
    /// The host profile: id, jurisdiction, zone, operator.
    pub host_id: String,
    /// The host's jurisdiction.
    pub host_jurisdiction: String,
    /// The host's zone.
    pub host_zone: String,
    /// The host's operator.
    pub operator: String,
    /// vCPUs.
    pub cpus: u64,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// The image's identity: the manifest digest of a container image, else `sha256:HEX` of
    /// the block image.
    pub image_digest: String,
    /// The image as the user named it (a registry reference, `oci:DIR:TAG`, or a path).
    pub image_reference: String,
    /// `oci` for a container image, `raw` for a block image used as it is.
    pub image_kind: String,
    /// The name itself pins a digest (`NAME@sha256:…`): a moved tag cannot change what runs.
    pub image_reference_pinned: bool,
    /// The cell's constraints.
    pub jurisdictions: Vec<String>,
    /// Data classification name.
    pub classification: String,
    /// Its rank (public 0 .. restricted 3).
    pub classification_level: i64,
    /// Allowed image digests.
    pub image_digests: Vec<String>,
    /// Maximum lifetime, if bounded.
    pub max_lifetime_secs: Option<u64>,
    /// The VMM runs jailed and seccomp-filtered (not `--no-jail`).
    pub jailed: bool,
    /// The cell starts from this snapshot (its name) instead of a fresh boot.
    pub snapshot: Option<String>,
    /// The cell's egress allowlist; each rule is also asked as action `egress`.
    pub egress: Vec<EgressRequest>,
    /// Its published ports; each is also asked as action `publish`.
    pub publish: Vec<PublishRequest>,
}

/// One published port as policies see it (`context.publish` of action `publish`).
#[derive(Clone, Debug, Serialize)]
pub struct PublishRequest {
    /// As written, `127.0.0.1:8080:80`.
    pub published: String,
    /// The host address it listens on.
    pub host_ip: String,
    /// The host port.
    pub host_port: u16,
    /// The port in the cell.
    pub guest_port: u16,
    /// Whether it listens on a loopback address only (reachable from this host alone).
    pub loopback: bool,
}

/// One egress rule as policies see it (`context.egress` of action `egress`).
#[derive(Clone, Debug, Serialize)]
pub struct EgressRequest {
    /// The rule as written, `api.example.eu:443`.
    pub rule: String,
    /// What it names: `api.example.eu`, `*.example.eu` or `10.0.0.0/8`.
    pub target: String,
    /// `name`, `domain` (a `*.` rule) or `address`.
    pub kind: String,
    /// The TCP port.
    pub port: u16,
}

/// The outcome: allow or deny, which policies determined it, and any evaluation errors.
#[derive(Clone, Debug, Serialize)]
pub struct AdmissionDecision {
    /// Whether the cell may start.
    pub allowed: bool,
    /// Ids of the policies that determined the decision: the permits on an allow; on a denial
    /// the forbids that fired, or, when none fired, the policies that errored (an error
    /// denies); empty for a default deny.
    pub policies: Vec<String>,
    /// Ids of the policies whose evaluation errored. Cedar would skip them, so any error denies
    /// the cell (fail closed).
    pub errored: Vec<String>,
    /// Errors met while evaluating, as Cedar words them.
    pub errors: Vec<String>,
    /// The egress rule or published port that was refused (action `egress` or `publish`),
    /// when that is why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_rule: Option<String>,
}

impl AdmissionDecision {
    /// A one-line explanation for a user.
    pub fn explain(&self) -> String {
        let verdict = match &self.egress_rule {
            Some(rule) if !self.allowed && rule.starts_with("publish ") => format!("{rule} denied"),
            Some(rule) if !self.allowed => format!("egress rule {rule:?} denied"),
            _ if self.allowed => "allowed".to_owned(),
            _ => "denied".to_owned(),
        };
        if !self.allowed && !self.errored.is_empty() && self.policies == self.errored {
            return format!(
                "{verdict} because the policy {} errored, and a policy that errors denies (fail \
                 closed): {}",
                self.errored.join(", "),
                self.errors.join("; ")
            );
        }
        let by = if self.policies.is_empty() {
            "no policy permits it (default deny)".to_owned()
        } else {
            format!("by {}", self.policies.join(", "))
        };
        let errors = if self.errors.is_empty() {
            String::new()
        } else {
            format!(" (evaluation errors: {})", self.errors.join("; "))
        };
        format!("{verdict} {by}{errors}")
    }
}

impl Policies {
    /// Parses each `(source name, text)` and merges them.
    pub fn load(sources: &[(String, String)]) -> Result<Self, String> {
        let mut set = PolicySet::new();
        for (source, text) in sources {
            let parsed = PolicySet::from_str(text)
                .map_err(|e| format!("policy {source} does not parse: {e}"))?;
            for (i, policy) in parsed.policies().enumerate() {
                // By iteration: `annotation("id")` runs Cedar's parser on the key each time.
                let name = policy
                    .annotations()
                    .find_map(|(key, value)| (key == "id").then(|| value.to_owned()))
                    .unwrap_or_else(|| format!("policy{i}"));
                let id = PolicyId::new(format!("{source}:{name}"));
                set.add(policy.new_id(id.clone())).map_err(|e| {
                    format!("policy {source}: {e} (is the @id \"{name}\" used twice?)")
                })?;
            }
        }
        Ok(Policies { set })
    }

    /// The default policy plus every `*.cedar` file in `dir` (if it exists) plus `extra` files.
    pub fn load_standard(dir: &Path, extra: &[std::path::PathBuf]) -> Result<Self, String> {
        let mut sources = vec![("default".to_owned(), DEFAULT_POLICY.to_owned())];
        let mut files: Vec<std::path::PathBuf> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
                .collect(),
            Err(_) => Vec::new(),
        };
        files.sort();
        files.extend(extra.iter().cloned());
        for f in files {
            let text = read_policy_file(&f)?;
            let name =
                f.file_stem().map_or_else(|| "policy".into(), |s| s.to_string_lossy().into_owned());
            sources.push((name, text));
        }
        Policies::load(&sources)
    }

    /// Does now, ahead of the first decision, the work Cedar leaves to it: the entity-name
    /// parser and the extension functions (ip, decimal, datetime) are built once per process,
    /// on first use, some 1.5 M instructions. Needs no policy and decides nothing.
    pub fn warm_up() {
        let uid = |text: &str| EntityUid::from_str(text).ok();
        let (Some(who), Some(action)) =
            (uid("IsoCell::Operator::\"\""), uid("IsoCell::Action::\"warm-up\""))
        else {
            return;
        };
        let context =
            Context::from_json_value(json!({}), None).unwrap_or_else(|_| Context::empty());
        if let Ok(request) = Request::new(who.clone(), action, who, context, None) {
            let _ =
                Authorizer::new().is_authorized(&request, &PolicySet::new(), &Entities::empty());
        }
    }

    /// Decides whether the cell may run (action `run`), then whether each of its egress rules
    /// may stand (action `egress`, with `context.egress`): the first refusal decides.
    pub fn decide(&self, req: &AdmissionRequest) -> Result<AdmissionDecision, String> {
        if !matches!(req.principal_kind.as_str(), "Operator" | "Client") {
            return Err(format!("unknown principal kind {:?}", req.principal_kind));
        }
        let mut context = json!({
            "principal": { "kind": req.principal_kind, "id": req.principal },
            "host": {
                "id": req.host_id,
                "jurisdiction": req.host_jurisdiction,
                "zone": req.host_zone,
                "operator": req.operator,
            },
            "cell": {
                "cpus": req.cpus,
                "memory_mib": req.memory_mib,
                "image_digest": req.image_digest,
                "image_reference": req.image_reference,
                "image_kind": req.image_kind,
                "image_reference_pinned": req.image_reference_pinned,
                "jurisdictions": req.jurisdictions,
                "jurisdiction_constrained": !req.jurisdictions.is_empty(),
                "classification": req.classification,
                "classification_level": req.classification_level,
                "image_digests": req.image_digests,
                "image_pinned": !req.image_digests.is_empty(),
                "has_max_lifetime": req.max_lifetime_secs.is_some(),
                "max_lifetime_secs": req.max_lifetime_secs.unwrap_or(0),
                "jailed": req.jailed,
                "restored": req.snapshot.is_some(),
                "snapshot": req.snapshot.clone().unwrap_or_default(),
                "egress": req.egress.iter().map(|e| e.rule.clone()).collect::<Vec<_>>(),
                "has_egress": !req.egress.is_empty(),
                "publish": req.publish.iter().map(|p| p.published.clone()).collect::<Vec<_>>(),
                "has_published_ports": !req.publish.is_empty(),
            },
        });
        let run = self.evaluate(req, "run", context.clone())?;
        if !run.allowed {
            return Ok(run);
        }
        for e in &req.egress {
            context["egress"] = json!(e);
            let mut d = self.evaluate(req, "egress", context.clone())?;
            if !d.allowed {
                d.egress_rule = Some(e.rule.clone());
                return Ok(d);
            }
        }
        if let Some(o) = context.as_object_mut() {
            o.remove("egress");
        }
        for p in &req.publish {
            context["publish"] = json!(p);
            let mut d = self.evaluate(req, "publish", context.clone())?;
            if !d.allowed {
                d.egress_rule = Some(format!("publish {:?}", p.published));
                return Ok(d);
            }
        }
        Ok(run)
    }

    fn evaluate(
        &self,
        req: &AdmissionRequest,
        action: &str,
        context: serde_json::Value,
    ) -> Result<AdmissionDecision, String> {
        let uid = |kind: &str, id: &str| {
            EntityUid::from_str(&format!("IsoCell::{kind}::{}", json!(id)))
                .map_err(|e| format!("bad entity id {id:?}: {e}"))
        };
        let context = Context::from_json_value(context, None)
            .map_err(|e| format!("admission context: {e}"))?;
        let request = Request::new(
            uid(&req.principal_kind, &req.principal)?,
            uid("Action", action)?,
            uid("Cell", &req.cell_id)?,
            context,
            None,
        )
        .map_err(|e| format!("admission request: {e}"))?;
        let response = Authorizer::new().is_authorized(&request, &self.set, &Entities::empty());
        let mut reason: Vec<String> =
            response.diagnostics().reason().map(|id| id.to_string()).collect();
        reason.sort();
        let errors: Vec<String> = response.diagnostics().errors().map(|e| e.to_string()).collect();
        let mut errored: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| match e {
                AuthorizationError::PolicyEvaluationError(e) => e.policy_id().to_string(),
            })
            .collect();
        errored.sort();
        errored.dedup();
        // Cedar skips a policy whose evaluation errors; a skipped forbid would let the cell
        // through, so any error denies (fail closed).
        let cedar_allows = response.decision() == Decision::Allow;
        let allowed = cedar_allows && errors.is_empty();
        // The evidence must name what decided. On an allow that the errors overturn, Cedar's
        // reasons are the permits, which did not decide; the errored policies did. A forbid that
        // fired decides a denial by itself, errors or not.
        let policies = if !errors.is_empty() && (cedar_allows || reason.is_empty()) {
            errored.clone()
        } else {
            reason
        };
        Ok(AdmissionDecision { allowed, policies, errored, errors, egress_rule: None })
    }
}

impl Policies {
    /// Whether daemon client `principal` may see and operate cell `cell_id`, created by
    /// `owner` (action `IsoCell::Action::"access"`; the default policy lets owners in, and a
    /// site policy may let others). Errors deny.
    pub fn may_access(&self, principal: &str, cell_id: &str, owner: &str) -> bool {
        let uid = |kind: &str, id: &str| {
            EntityUid::from_str(&format!("IsoCell::{kind}::{}", json!(id))).ok()
        };
        let context = json!({
            "principal": { "kind": "Client", "id": principal },
            "owner": owner,
        });
        let (Some(p), Some(a), Some(r), Ok(context)) = (
            uid("Client", principal),
            uid("Action", "access"),
            uid("Cell", cell_id),
            Context::from_json_value(context, None),
        ) else {
            return false;
        };
        let Ok(request) = Request::new(p, a, r, context, None) else { return false };
        let response = Authorizer::new().is_authorized(&request, &self.set, &Entities::empty());
        response.decision() == Decision::Allow && response.diagnostics().errors().next().is_none()
    }
}

/// Largest policy file read: policies are short texts, and a device or a huge file named by
/// mistake must not be read without end.
const MAX_POLICY_BYTES: u64 = 1 << 20;

/// Reads one policy file: a regular file of at most [`MAX_POLICY_BYTES`], opened without
/// blocking (a FIFO put in the policies directory must not hang admission).
fn read_policy_file(path: &Path) -> Result<String, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let cannot = |why: String| format!("cannot read the policy {}: {why}", path.display());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| cannot(e.to_string()))?;
    let meta = f.metadata().map_err(|e| cannot(e.to_string()))?;
    if !meta.is_file() {
        return Err(cannot("not a regular file".into()));
    }
    let mut text = String::new();
    f.take(MAX_POLICY_BYTES + 1).read_to_string(&mut text).map_err(|e| cannot(e.to_string()))?;
    if text.len() as u64 > MAX_POLICY_BYTES {
        return Err(cannot(format!("larger than {MAX_POLICY_BYTES} bytes")));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request() -> AdmissionRequest {
        AdmissionRequest {
            principal_kind: "Operator".into(),
            principal: "ops".into(),
            cell_id: "c1".into(),
            host_id: "h1".into(),
            host_jurisdiction: "EU".into(),
            host_zone: "eu-1".into(),
            operator: "acme".into(),
            cpus: 1,
            memory_mib: 256,
            image_digest: "sha256:aa".into(),
            image_reference: "docker.io/library/app@sha256:aa".into(),
            image_kind: "oci".into(),
            image_reference_pinned: true,
            jurisdictions: vec![],
            classification: "public".into(),
            classification_level: 0,
            image_digests: vec![],
            max_lifetime_secs: None,
            jailed: true,
            snapshot: None,
            egress: vec![],
            publish: vec![],
        }
    }

    fn egress(rule: &str, target: &str, kind: &str) -> EgressRequest {
        EgressRequest { rule: rule.into(), target: target.into(), kind: kind.into(), port: 443 }
    }

    /// Restricted cells have no egress unless a site policy permits it; a site policy can
    /// hold confidential cells to some domains, rule by rule.
    #[test]
    fn egress_rules_are_asked_one_by_one() {
        let p = Policies::load(&[("default".into(), DEFAULT_POLICY.into())]).unwrap();
        let mut r = request();
        r.egress = vec![egress("api.example.eu:443", "api.example.eu", "name")];
        assert!(p.decide(&r).unwrap().allowed);
        r.classification = "restricted".into();
        r.classification_level = 3;
        r.max_lifetime_secs = Some(60);
        let d = p.decide(&r).unwrap();
        assert!(!d.allowed && d.egress_rule.as_deref() == Some("api.example.eu:443"));
        assert!(
            d.explain().starts_with("egress rule \"api.example.eu:443\" denied"),
            "{}",
            d.explain()
        );
        r.egress.clear();
        assert!(p.decide(&r).unwrap().allowed, "restricted cells without a network run");

        let site = r#"
            @id("restricted-to-nhs") permit (principal, action == IsoCell::Action::"egress", resource)
            when { context.cell.classification == "restricted" && context.egress.target like "*.nhs.uk" };
            @id("confidential-eu-only") forbid (principal, action == IsoCell::Action::"egress", resource)
            when { context.cell.classification == "confidential" && !(context.egress.target like "*.eu") };
        "#;
        let p = Policies::load(&[
            ("default".into(), DEFAULT_POLICY.into()),
            ("site".into(), site.into()),
        ])
        .unwrap();
        r.egress = vec![egress("records.nhs.uk:443", "records.nhs.uk", "name")];
        assert!(p.decide(&r).unwrap().allowed, "a site policy permits restricted egress");
        r.classification = "confidential".into();
        r.classification_level = 2;
        r.egress.push(egress("10.0.0.0/8:443", "10.0.0.0/8", "address"));
        let d = p.decide(&r).unwrap();
        assert!(!d.allowed, "{d:?}");
        assert_eq!(d.policies, ["site:confidential-eu-only"]);
        r.egress = vec![egress("*.example.eu:443", "*.example.eu", "domain")];
        assert!(p.decide(&r).unwrap().allowed);
    }

    /// Published ports are asked one by one too: none for restricted cells by default.
    #[test]
    fn published_ports_are_asked_one_by_one() {
        let p = Policies::load(&[("default".into(), DEFAULT_POLICY.into())]).unwrap();
        let mut r = request();
        r.publish = vec![PublishRequest {
            published: "0.0.0.0:8080:80".into(),
            host_ip: "0.0.0.0".into(),
            host_port: 8080,
            guest_port: 80,
            loopback: false,
        }];
        assert!(p.decide(&r).unwrap().allowed);
        r.classification = "restricted".into();
        r.classification_level = 3;
        r.max_lifetime_secs = Some(60);
        let d = p.decide(&r).unwrap();
        assert!(!d.allowed, "{d:?}");
        assert!(d.explain().starts_with("publish \"0.0.0.0:8080:80\" denied"), "{}", d.explain());
    }

    fn default_policies() -> Policies {
        Policies::load(&[("default".into(), DEFAULT_POLICY.into())]).unwrap()
    }

    #[test]
    fn default_policy_allows_an_unconstrained_cell() {
        let d = default_policies().decide(&request()).unwrap();
        assert!(d.allowed, "{}", d.explain());
        assert_eq!(d.policies, ["default:allow-cells"]);
    }

    #[test]
    fn each_default_rule_denies_and_names_itself() {
        let p = default_policies();
        let mut r = request();
        r.jurisdictions = vec!["US".into()];
        let d = p.decide(&r).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.policies, ["default:jurisdiction"]);
        r.jurisdictions = vec!["US".into(), "EU".into()];
        assert!(p.decide(&r).unwrap().allowed);

        let mut r = request();
        r.image_digests = vec!["sha256:bb".into()];
        assert_eq!(p.decide(&r).unwrap().policies, ["default:image-digest"]);
        r.image_digests.push("sha256:aa".into());
        assert!(p.decide(&r).unwrap().allowed);

        let mut r = request();
        r.host_jurisdiction = "unspecified".into();
        r.classification = "confidential".into();
        r.classification_level = 2;
        assert_eq!(p.decide(&r).unwrap().policies, ["default:classified-needs-known-host"]);

        let mut r = request();
        r.classification = "restricted".into();
        r.classification_level = 3;
        assert_eq!(p.decide(&r).unwrap().policies, ["default:restricted-needs-lifetime"]);
        r.max_lifetime_secs = Some(60);
        assert!(p.decide(&r).unwrap().allowed);

        let mut r = request();
        r.classification = "confidential".into();
        r.classification_level = 2;
        r.image_reference = "docker.io/library/app:1".into();
        r.image_reference_pinned = false;
        assert_eq!(p.decide(&r).unwrap().policies, ["default:classified-needs-pinned-image"]);
        r.image_kind = "raw".into();
        assert!(p.decide(&r).unwrap().allowed, "a block image is named by its contents");
        r.image_kind = "oci".into();
        r.classification = "internal".into();
        r.classification_level = 1;
        assert!(p.decide(&r).unwrap().allowed, "internal data may use a tag");

        let mut r = request();
        r.jailed = false;
        assert!(p.decide(&r).unwrap().allowed, "public data may run unjailed");
        r.classification = "internal".into();
        r.classification_level = 1;
        assert_eq!(p.decide(&r).unwrap().policies, ["default:jail-for-non-public"]);

        // A snapshot start is fresh enough for public and internal data, not for more.
        let mut r = request();
        r.snapshot = Some("base".into());
        assert!(p.decide(&r).unwrap().allowed, "public data may start from a snapshot");
        r.classification = "confidential".into();
        r.classification_level = 2;
        r.image_kind = "raw".into();
        r.host_jurisdiction = "EU".into();
        assert_eq!(p.decide(&r).unwrap().policies, ["default:classified-needs-cold-boot"]);
        r.snapshot = None;
        assert!(p.decide(&r).unwrap().allowed, "a cold boot is allowed");
    }

    #[test]
    fn user_policies_add_rules_and_bad_ones_are_refused() {
        let user = r#"@id("small-cells") forbid (principal, action, resource) when { context.cell.memory_mib > 1024 };"#;
        let p = Policies::load(&[
            ("default".into(), DEFAULT_POLICY.into()),
            ("site".into(), user.into()),
        ])
        .unwrap();
        let mut r = request();
        r.memory_mib = 2048;
        let d = p.decide(&r).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.policies, ["site:small-cells"]);
        assert!(Policies::load(&[("bad".into(), "permit(".into())]).unwrap_err().contains("bad"));
    }

    /// The default policy and a site policy that errors: `context.cell.nope` does not exist.
    fn with_broken_policy() -> Policies {
        let user = r#"@id("broken") forbid (principal, action, resource) when { context.cell.nope == 1 };"#;
        Policies::load(&[("default".into(), DEFAULT_POLICY.into()), ("site".into(), user.into())])
            .unwrap()
    }

    #[test]
    fn a_policy_that_errors_denies() {
        // Evaluation errors, and the cell must not start.
        let d = with_broken_policy().decide(&request()).unwrap();
        assert!(!d.allowed, "{}", d.explain());
        assert!(d.errors.iter().any(|e| e.contains("broken")), "{:?}", d.errors);
    }

    #[test]
    fn a_denial_by_error_names_the_policy_that_errored() {
        // The permit `default:allow-cells` matched, but it did not decide: the error did.
        let p = with_broken_policy();
        let d = p.decide(&request()).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.policies, ["site:broken"], "{}", d.explain());
        assert_eq!(d.errored, ["site:broken"]);
        let text = d.explain();
        assert!(text.contains("site:broken errored"), "{text}");
        assert!(!text.contains("allow-cells"), "{text}");

        // A forbid that fires still decides by itself; the error is still on record.
        let mut r = request();
        r.jurisdictions = vec!["US".into()];
        let d = p.decide(&r).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.policies, ["default:jurisdiction"]);
        assert_eq!(d.errored, ["site:broken"]);
        assert!(d.explain().contains("evaluation errors"), "{}", d.explain());

        // An erroring permit alone: nothing permits, and the error is named as the reason.
        let only = r#"@id("bad-permit") permit (principal, action, resource) when { context.cell.nope == 1 };"#;
        let p = Policies::load(&[("site".into(), only.into())]).unwrap();
        let d = p.decide(&request()).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.policies, ["site:bad-permit"]);
    }
}
