//! Config file templates (`files[].template`): one minijinja environment,
//! the names a template may use, and rendering.
//!
//! A template sees `secrets.<name>` (the app's declared secrets, `-`
//! written `_`), `facts.<name>` (simple facts about the node and the app)
//! and the function `rpcauth(user, password, salt)`. Undefined values are
//! errors (strict), and the names a template uses are checked when the
//! manifest is validated, so a typo is refused by `archy-agent validate`,
//! not found on a node at run time.
//!
//! Pure: no file or host access here. The caller reads secret values and
//! facts and writes the result (`crate::files`).

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use minijinja::{Environment, ErrorKind, UndefinedBehavior, Value};
use serde::Serialize;
use sha2::Sha256;

use super::{SecretKind, SecretSpec};

/// The top-level names a template may use besides functions.
const SECRETS: &str = "secrets";
const FACTS: &str = "facts";
/// Plain facts, `facts.<name>`.
pub const PLAIN_FACTS: &[&str] = &["app", "container", "network", "network_subnet", "dev", "hostname"];
/// The fact only apps on a network with a fixed subnet have
/// ([`super::network_subnet`]).
const NETWORK_SUBNET: &str = "network_subnet";
/// `facts.containers.<app>`: the container names of the app and its
/// dependencies, resolvable by name on the app's network.
const CONTAINERS: &str = "containers";
/// The function that renders bitcoind's `rpcauth` value.
pub const RPCAUTH: &str = "rpcauth";

/// How a secret or app id is written in a template: ids have `-`, which a
/// template attribute cannot; they can never have `_`, so this is one-to-one.
pub fn template_key(name: &str) -> String {
    name.replace('-', "_")
}

/// The facts a template is rendered with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Facts {
    /// The app's id.
    pub app: String,
    /// The app's container name (dev names included).
    pub container: String,
    pub network: String,
    /// The IPv4 subnet (CIDR) of `network`, for apps on a network the
    /// agent gives a fixed one ([`super::network_subnet`]); `None` leaves
    /// `facts.network_subnet` undefined.
    pub network_subnet: Option<String>,
    /// Whether the agent runs in dev mode.
    pub dev: bool,
    /// The node's host name.
    pub hostname: String,
    /// Container names by app id (template key), for the app and every app
    /// it depends on.
    pub containers: BTreeMap<String, String>,
}

impl Facts {
    fn to_value(&self) -> Value {
        let containers: BTreeMap<String, Value> = self
            .containers
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        let mut map: BTreeMap<&str, Value> = BTreeMap::from([
            ("app", Value::from(self.app.as_str())),
            ("container", Value::from(self.container.as_str())),
            ("network", Value::from(self.network.as_str())),
            ("dev", Value::from(self.dev)),
            ("hostname", Value::from(self.hostname.as_str())),
            (CONTAINERS, Value::from(containers)),
        ]);
        if let Some(subnet) = &self.network_subnet {
            map.insert(NETWORK_SUBNET, Value::from(subnet.as_str()));
        }
        Value::from(map)
    }
}

/// bitcoind's `rpcauth` value, `<user>:<salt>$<hex(HMAC-SHA256(key=salt,
/// msg=password))>`, the format of Bitcoin Core's `share/rpcauth/rpcauth.py`:
/// the salt is used as written (its text, not decoded hex) as the HMAC key.
pub fn rpcauth(user: &str, password: &str, salt: &str) -> Result<String, String> {
    let bad = |s: &str, extra: &[char]| s.is_empty() || s.chars().any(|c| c.is_whitespace() || extra.contains(&c));
    if bad(user, &[':']) {
        return Err("rpcauth: the user must be non-empty, without ':' or spaces".to_owned());
    }
    if bad(salt, &[':', '$']) {
        return Err("rpcauth: the salt must be non-empty, without ':', '$' or spaces".to_owned());
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(salt.as_bytes()).map_err(|e| format!("rpcauth: {e}"))?;
    mac.update(password.as_bytes());
    let hash: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{user}:{salt}${hash}"))
}

/// The environment every config template is compiled in: strict about
/// undefined values, keeping the final newline, with `{% %}` lines
/// leaving no blank lines behind.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(true)
            .build()
            // The default delimiters with whitespace options always build.
            .unwrap_or_default(),
    );
    env.add_function(RPCAUTH, |user: &str, password: &str, salt: &str| {
        rpcauth(user, password, salt).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e))
    });
    env
}

/// One problem with a template: the offending name or text, and what is
/// allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateProblem {
    pub value: String,
    pub problem: String,
}

/// Checks `template` for an app on `network` that declares `secrets` and
/// may name the containers `containers` (template keys of itself and its
/// dependencies). Returns the declared names of the secrets it reads.
pub fn check(
    template: &str,
    network: &str,
    secrets: &[SecretSpec],
    containers: &[String],
) -> Result<Vec<String>, TemplateProblem> {
    let env = environment();
    let compiled = env.template_from_str(template).map_err(|e| TemplateProblem {
        value: e.line().map_or_else(String::new, |l| format!("line {l}")),
        problem: format!("is not a valid template: {e}"),
    })?;
    let functions: Vec<String> = env.globals().map(|(name, _)| name.to_owned()).collect();
    let mut names: Vec<String> = compiled.undeclared_variables(true).into_iter().collect();
    names.sort();
    let allowed_secrets: Vec<String> = secrets
        .iter()
        .map(|s| format!("{SECRETS}.{}", template_key(&s.name)))
        .collect();
    let subnet = super::network_subnet(network);
    let allowed_facts: Vec<String> = PLAIN_FACTS
        .iter()
        .filter(|f| subnet.is_some() || **f != NETWORK_SUBNET)
        .map(|f| format!("{FACTS}.{f}"))
        .chain(containers.iter().map(|c| format!("{FACTS}.{CONTAINERS}.{c}")))
        .collect();
    let mut used = Vec::new();
    for name in names {
        if functions.contains(&name) {
            continue;
        }
        if name == format!("{FACTS}.{NETWORK_SUBNET}") && subnet.is_none() {
            return Err(TemplateProblem {
                value: name,
                problem: format!(
                    "is known only for apps on {} (its subnet is fixed: {}); this app is on {network}",
                    super::DEFAULT_NETWORK,
                    super::DEFAULT_NETWORK_SUBNET
                ),
            });
        }
        let allowed = if name == SECRETS || name.starts_with("secrets.") {
            &allowed_secrets
        } else if name == FACTS || name.starts_with("facts.") {
            &allowed_facts
        } else {
            return Err(TemplateProblem {
                value: name,
                problem: format!(
                    "is not a name a template may use; allowed: secrets.<name>, facts.<name>, the functions {}",
                    functions.join(", ")
                ),
            });
        };
        match secrets
            .iter()
            .position(|s| format!("{SECRETS}.{}", template_key(&s.name)) == name)
        {
            Some(i) => used.push(secrets[i].name.clone()),
            None if allowed.contains(&name) => {}
            None => {
                return Err(TemplateProblem {
                    problem: format!(
                        "names an unknown {}; allowed: [{}] (written as attributes, `-` as `_`)",
                        if allowed == &allowed_secrets {
                            "secret (declare it in `secrets`)"
                        } else {
                            "fact"
                        },
                        allowed.join(", ")
                    ),
                    value: name,
                })
            }
        }
    }
    // A trial render with stand-in values finds what only running the
    // template shows (a function called with the wrong arguments).
    let stand_in: BTreeMap<String, String> = secrets
        .iter()
        .map(|s| {
            let len = match s.kind {
                SecretKind::Hex16 => 32,
                SecretKind::Hex32 => 64,
            };
            (s.name.clone(), "0".repeat(len))
        })
        .collect();
    let facts = Facts {
        app: "app".to_owned(),
        container: "container".to_owned(),
        network: network.to_owned(),
        network_subnet: subnet.map(str::to_owned),
        dev: false,
        hostname: "host".to_owned(),
        containers: containers.iter().map(|c| (c.clone(), c.clone())).collect(),
    };
    render(template, &stand_in, &facts).map_err(|e| TemplateProblem {
        value: String::new(),
        problem: e,
    })?;
    Ok(used)
}

/// Renders `template` with `secrets` (declared name to value) and `facts`.
/// The error never holds a value, only what went wrong and where.
pub fn render(template: &str, secrets: &BTreeMap<String, String>, facts: &Facts) -> Result<String, String> {
    let env = environment();
    let compiled = env
        .template_from_str(template)
        .map_err(|e| format!("is not a valid template: {e}"))?;
    let secrets: BTreeMap<String, Value> = secrets
        .iter()
        .map(|(k, v)| (template_key(k), Value::from(v.as_str())))
        .collect();
    let ctx = BTreeMap::from([(SECRETS, Value::from(secrets)), (FACTS, facts.to_value())]);
    compiled.render(ctx).map_err(|e| format!("cannot be rendered: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str, kind: SecretKind) -> SecretSpec {
        SecretSpec {
            name: name.to_owned(),
            kind,
        }
    }

    fn facts() -> Facts {
        Facts {
            app: "electrs".to_owned(),
            container: "electrs".to_owned(),
            network: "archy-net".to_owned(),
            network_subnet: Some("10.89.200.0/24".to_owned()),
            dev: false,
            hostname: "node".to_owned(),
            containers: BTreeMap::from([
                ("electrs".to_owned(), "electrs".to_owned()),
                ("bitcoin_core".to_owned(), "bitcoin".to_owned()),
            ]),
        }
    }

    #[test]
    fn secrets_and_facts_render_with_the_final_newline_kept() {
        let secrets = BTreeMap::from([("rpc-password".to_owned(), "s3cret".to_owned())]);
        let out = render(
            "addr = \"{{ facts.containers.bitcoin_core }}:8332\"\n{% if not facts.dev %}\npass = {{ secrets.rpc_password }}\n{% endif %}\n",
            &secrets,
            &facts(),
        )
        .expect("renders");
        assert_eq!(out, "addr = \"bitcoin:8332\"\npass = s3cret\n");
    }

    #[test]
    fn undefined_values_are_errors_at_render_time_and_name_no_value() {
        let secrets = BTreeMap::from([("rpc-password".to_owned(), "s3cret".to_owned())]);
        let err = render("{{ secrets.other }} {{ secrets.rpc_password }}", &secrets, &facts()).expect_err("strict");
        assert!(err.contains("undefined"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn check_returns_the_secrets_a_template_reads() {
        let secrets = [
            secret("rpc-password", SecretKind::Hex32),
            secret("rpc-salt", SecretKind::Hex16),
        ];
        let used = check(
            "rpcauth={{ rpcauth('archy', secrets.rpc_password, secrets.rpc_salt) }}\n{{ facts.hostname }}",
            "archy-net",
            &secrets,
            &["app".to_owned()],
        )
        .expect("valid");
        assert_eq!(used, ["rpc-password", "rpc-salt"]);
    }

    #[test]
    fn check_refuses_an_unknown_secret_naming_the_allowed_ones() {
        let secrets = [secret("rpc-password", SecretKind::Hex32)];
        let p = check("{{ secrets.rpc_pasword }}", "archy-net", &secrets, &[]).expect_err("unknown");
        assert_eq!(p.value, "secrets.rpc_pasword");
        assert!(p.problem.contains("unknown secret"), "{p:?}");
        assert!(p.problem.contains("secrets.rpc_password"), "{p:?}");
    }

    #[test]
    fn the_network_subnet_is_a_fact_on_archy_net_only() {
        let out = render("rpcallowip={{ facts.network_subnet }}\n", &BTreeMap::new(), &facts()).expect("renders");
        assert_eq!(out, "rpcallowip=10.89.200.0/24\n");
        check("{{ facts.network_subnet }}", "archy-net", &[], &[]).expect("known on archy-net");
        let p = check("{{ facts.network_subnet }}", "other-net", &[], &[]).expect_err("not on another network");
        assert_eq!(p.value, "facts.network_subnet");
        assert!(
            p.problem.contains("archy-net") && p.problem.contains("10.89.200.0/24") && p.problem.contains("other-net"),
            "{p:?}"
        );
        let mut other = facts();
        other.network_subnet = None;
        let err = render("{{ facts.network_subnet }}", &BTreeMap::new(), &other).expect_err("undefined");
        assert!(err.contains("undefined"), "{err}");
    }

    #[test]
    fn check_refuses_unknown_facts_other_containers_and_other_names() {
        let deps = ["electrs".to_owned(), "bitcoin_core".to_owned()];
        let p = check("{{ facts.ip }}", "archy-net", &[], &deps).expect_err("unknown fact");
        assert_eq!(p.value, "facts.ip");
        assert!(p.problem.contains("facts.hostname") && p.problem.contains("facts.containers.bitcoin_core"));
        let p = check("{{ facts.containers.lnd }}", "archy-net", &[], &deps).expect_err("not a dependency");
        assert_eq!(p.value, "facts.containers.lnd");
        let p = check("{{ password }}", "archy-net", &[], &deps).expect_err("unknown name");
        assert_eq!(p.value, "password");
        assert!(p.problem.contains("rpcauth"), "{p:?}");
    }

    #[test]
    fn check_refuses_lookups_it_cannot_check() {
        let secrets = [secret("rpc-password", SecretKind::Hex32)];
        let p = check("{{ secrets['rpc-password'] }}", "archy-net", &secrets, &[]).expect_err("subscript");
        assert_eq!(p.value, "secrets");
    }

    #[test]
    fn check_refuses_syntax_errors_and_bad_calls() {
        let p = check("line\n{{ facts.app ", "archy-net", &[], &[]).expect_err("syntax");
        assert!(p.problem.contains("is not a valid template"), "{p:?}");
        assert_eq!(p.value, "line 2");
        let p = check("{{ rpcauth('u') }}", "archy-net", &[], &[]).expect_err("arguments");
        assert!(p.problem.contains("cannot be rendered"), "{p:?}");
    }

    #[test]
    fn variables_a_template_sets_itself_are_allowed() {
        check("{% set user = 'archy' %}{{ user }}", "archy-net", &[], &[]).expect("assigned locally");
    }

    #[test]
    fn rpcauth_matches_bitcoin_cores_rpcauth_py() {
        // Computed with the algorithm of Bitcoin Core's share/rpcauth/rpcauth.py:
        // python3 -c "import hmac; print(hmac.new(SALT.encode('utf-8'),
        //   PASSWORD.encode('utf-8'), 'SHA256').hexdigest())"
        // and cross-checked with `printf %s PASSWORD | openssl dgst -sha256 -hmac SALT`.
        let salt = "8c1f0b5e2d4a6f7091a3b5c7d9e1f203";
        let password = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
        assert_eq!(
            rpcauth("archy", password, salt).expect("valid"),
            "archy:8c1f0b5e2d4a6f7091a3b5c7d9e1f203$e71e566dc8108b5323a8c60090062db7aec90bf144edb5a072601c9982087406"
        );
    }

    #[test]
    fn rpcauth_refuses_separators_in_user_and_salt() {
        assert!(rpcauth("a:b", "p", "s").is_err());
        assert!(rpcauth("a", "p", "s$").is_err());
        assert!(rpcauth("", "p", "s").is_err());
        let line = rpcauth("archy", "p", "00ff").expect("valid");
        assert!(
            line.starts_with("archy:00ff$") && line.len() == "archy:00ff$".len() + 64,
            "{line}"
        );
    }
}
