//! `deploy/` and `docs/operations.md` stay consistent with the binary.
//!
//! - Every Kubernetes manifest parses, is listed in the kustomization (or is the Secret
//!   example), is namespace-agnostic and locked down; ports, probes, volumes and the command
//!   line agree with the config the ConfigMap is generated from.
//! - The systemd unit (parsed as INI) is sandboxed and its credentials match the config.
//! - The Containerfile builds the plugin, runs it as non-root, and its health check names the
//!   served port and health service.
//! - Every example config loads through `rdp_preflight::config`, as shipped and with its
//!   commented-out examples enabled (the files they name are generated in a temporary root).
//! - The three command lines (unit, image, Deployment) start the real binary, which then
//!   answers SERVING for the service name the probes use.
//! - The configuration reference in `docs/operations.md` names exactly the keys of
//!   `FileConfig`, with their defaults, and each documented environment variable is accepted
//!   by `rdp-preflight config check` and changes the effective value.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use rdp_preflight::config::{Config, FileConfig};
use serde_json::Value as Json;
use yaml_rust2::{Yaml, YamlLoader};

/// The health service name the probes must ask for: the generated server's name.
const HEALTH_SERVICE: &str = rdp_preflight_proto::v1::preflight_server::SERVICE_NAME;
/// Reserved for `/metrics` when `[admin]` is configured.
const METRICS_PORT: i64 = 9464;
/// Where every deployment puts the config file.
const CONFIG_PATH: &str = "/etc/rdp-preflight/config.toml";
/// The binary's path in the unit and the image.
const BINARY_PATH: &str = "/usr/local/bin/rdp-preflight";

// ---------------------------------------------------------------------------------------------
// Files

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn yaml(rel: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn s<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {y:?}"))
}

fn i(y: &Yaml, what: &str) -> i64 {
    y.as_i64()
        .unwrap_or_else(|| panic!("{what}: expected an integer, got {y:?}"))
}

fn v<'a>(y: &'a Yaml, what: &str) -> &'a [Yaml] {
    y.as_vec()
        .unwrap_or_else(|| panic!("{what}: expected a list, got {y:?}"))
}

fn strings(y: &Yaml, what: &str) -> Vec<String> {
    v(y, what).iter().map(|x| s(x, what).to_owned()).collect()
}

/// The Kubernetes objects: (file, object) for every document of every `deploy/k8s/*.yaml`
/// except the kustomization.
fn k8s_objects() -> Vec<(String, Yaml)> {
    let mut files: Vec<_> = std::fs::read_dir(repo().join("deploy/k8s"))
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .filter(|n| n != "kustomization.yaml")
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        for doc in yaml(&format!("deploy/k8s/{f}")) {
            if !doc.is_null() {
                out.push((f.clone(), doc));
            }
        }
    }
    out
}

fn object<'a>(objs: &'a [(String, Yaml)], kind: &str, name: &str) -> &'a Yaml {
    objs.iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("deploy/k8s: no {kind} named {name}"))
}

fn kustomization() -> Yaml {
    yaml("deploy/k8s/kustomization.yaml").remove(0)
}

/// The file the ConfigMap `rdp-preflight-config` is generated from.
fn k8s_config_file() -> String {
    let k = kustomization();
    let generator = v(&k["configMapGenerator"], "configMapGenerator")
        .iter()
        .find(|g| g["name"].as_str() == Some("rdp-preflight-config"))
        .expect("configMapGenerator rdp-preflight-config");
    let files = strings(&generator["files"], "configMapGenerator.files");
    assert_eq!(
        files,
        ["config.toml"],
        "the ConfigMap holds config.toml, under that key"
    );
    format!("deploy/k8s/{}", files[0])
}

/// A systemd unit: section → (key, value) in order; commented-out directives (`#Key=value`)
/// separately.
struct Unit {
    sections: BTreeMap<String, Vec<(String, String)>>,
    commented: Vec<(String, String)>,
}

impl Unit {
    fn parse(text: &str) -> Unit {
        let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        let mut commented = Vec::new();
        let mut current: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(c) = line.strip_prefix('#').or_else(|| line.strip_prefix(';')) {
                if let Some((k, v)) = c.split_once('=') {
                    if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric()) {
                        commented.push((k.to_owned(), v.to_owned()));
                    }
                }
                continue;
            }
            assert!(
                !line.ends_with('\\'),
                "unit line {}: continuation lines not expected",
                n + 1
            );
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                current = Some(name.to_owned());
                sections.entry(name.to_owned()).or_default();
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("unit line {}: not Key=Value: {line:?}", n + 1));
            let section = current
                .clone()
                .unwrap_or_else(|| panic!("unit line {}: directive outside a section", n + 1));
            sections
                .entry(section)
                .or_default()
                .push((k.trim().to_owned(), v.trim().to_owned()));
        }
        Unit { sections, commented }
    }

    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.sections
            .get(section)
            .map(|d| d.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect())
            .unwrap_or_default()
    }

    fn one(&self, section: &str, key: &str) -> &str {
        match self.all(section, key).as_slice() {
            [v] => v,
            other => panic!("[{section}] {key}: expected exactly one, got {other:?}"),
        }
    }
}

/// A Containerfile as (instruction, arguments), continuation lines joined, comments dropped.
fn containerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in read("deploy/container/Containerfile").lines() {
        let t = line.trim();
        if pending.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(t);
        let full = std::mem::take(&mut pending);
        let (ins, rest) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        out.push((ins.to_ascii_uppercase(), rest.trim().to_owned()));
    }
    assert!(pending.is_empty(), "Containerfile ends in a continuation line");
    out
}

fn exec_form(what: &str, args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("{what} must use the JSON exec form: {args:?}: {e}"))
}

fn listen_port(cfg: &Config) -> i64 {
    i64::from(cfg.listen.port())
}

// ---------------------------------------------------------------------------------------------
// Example configs in a temporary root

/// Enables the ready-to-use examples: lines with `#` directly followed by a key, a quoted key
/// or a `[table]` (prose comments have a space after `#`).
fn enable_examples(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_alphabetic() || c == '[' || c == '"' || c == '_') => {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Maps absolute paths of the deployments into `root`.
fn reroot(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

fn ca_pem() -> String {
    rcgen::generate_simple_self_signed(vec!["deploy-test.example".to_owned()])
        .expect("certificate")
        .cert
        .pem()
}

/// Writes what a config names, by key: PEM certificates, a key, secrets, directories.
fn materialize(root: &Path, key: &str, path: &str) {
    if !path.starts_with(&*root.to_string_lossy()) {
        return;
    }
    let p = Path::new(path);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    let body = match key {
        "pin_store" | "unix_socket" => return,
        "dir" => {
            std::fs::create_dir_all(p).expect("mkdir");
            return;
        }
        "tls_key" => rcgen::KeyPair::generate().expect("key").serialize_pem(),
        k if k.ends_with("password_file") || k.ends_with("token_file") => "deploy-test-secret-0123456789\n".to_owned(),
        _ => ca_pem(),
    };
    std::fs::write(p, body).expect("write");
}

fn walk_toml(root: &Path, key: &str, v: &toml::Value) {
    match v {
        toml::Value::String(s) => materialize(root, key, s),
        toml::Value::Array(a) => a.iter().for_each(|x| walk_toml(root, key, x)),
        toml::Value::Table(t) => t.iter().for_each(|(k, x)| walk_toml(root, k, x)),
        _ => {}
    }
}

/// Writes `text` (the examples enabled or not) as `<root>/etc/rdp-preflight/config.toml`, with
/// every absolute path moved into `root` and the files it names generated.
fn install_config(root: &Path, text: &str, examples: bool) -> PathBuf {
    let text = if examples {
        enable_examples(text)
    } else {
        text.to_owned()
    };
    let r = root.to_string_lossy();
    let text = ["/etc/", "/run/", "/var/"].iter().fold(text, |t, prefix| {
        t.replace(&format!("\"{prefix}"), &format!("\"{r}{prefix}"))
    });
    let value: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("TOML: {e}\n{text}"));
    walk_toml(root, "", &toml::Value::Table(value));
    let path = reroot(root, CONFIG_PATH);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&path, text).expect("write config");
    path
}

fn load(rel: &str, examples: bool) -> (tempfile::TempDir, Config) {
    let root = tempfile::tempdir().expect("tmp");
    let path = install_config(root.path(), &read(rel), examples);
    let cfg =
        Config::load(Some(&path)).unwrap_or_else(|e| panic!("{rel} (examples enabled: {examples}) does not load: {e}"));
    (root, cfg)
}

const CONFIGS: [&str; 3] = [
    "deploy/systemd/config.toml",
    "deploy/container/config.toml",
    "deploy/k8s/config.toml",
];

#[test]
fn example_configs_load_as_shipped_and_with_their_examples_enabled() {
    assert_eq!(k8s_config_file(), CONFIGS[2]);
    for rel in CONFIGS {
        let (_root, cfg) = load(rel, false);
        assert!(cfg.log_json, "{rel}: production logs are JSON");
        let (_root, with_examples) = load(rel, true);
        assert!(
            enable_examples(&read(rel)) != read(rel),
            "{rel}: has commented examples (or drop this check)"
        );
        assert_eq!(with_examples.listen, cfg.listen, "{rel}");
    }
    let (_root, host) = load(CONFIGS[0], false);
    assert!(host.listen.ip().is_loopback(), "the host install listens on loopback");
    assert_eq!(host.listen.port(), 50051);
    assert!(!host.trust_anchors.is_empty(), "the host example names trust anchors");
    assert!(host.directory.is_none(), "the [directory] example is commented out");
    let (_root, host) = load(CONFIGS[0], true);
    assert!(host.directory.is_some(), "the [directory] example, enabled, is valid");
    for rel in &CONFIGS[1..] {
        let (_root, c) = load(rel, false);
        assert!(
            c.listen.ip().is_unspecified(),
            "{rel}: reachable from outside its namespace"
        );
        assert_eq!(c.listen.port(), 50051, "{rel}");
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

#[test]
fn every_manifest_parses_is_listed_and_namespace_agnostic() {
    let k = kustomization();
    assert_eq!(k["kind"].as_str(), Some("Kustomization"));
    assert!(
        k["namespace"].is_badvalue(),
        "kustomization.yaml must not pin a namespace"
    );
    let resources: BTreeSet<String> = strings(&k["resources"], "resources").into_iter().collect();
    let objs = k8s_objects();
    let files: BTreeSet<String> = objs.iter().map(|(f, _)| f.clone()).collect();
    let expected: BTreeSet<String> = files.iter().filter(|f| *f != "secret.example.yaml").cloned().collect();
    assert_eq!(resources, expected, "kustomization resources vs deploy/k8s/*.yaml");
    assert!(files.contains("secret.example.yaml"));
    let mut kinds = BTreeSet::new();
    for (f, o) in &objs {
        let what = format!("{f}: {:?}", o["metadata"]["name"]);
        assert!(o["apiVersion"].as_str().is_some(), "{what}: apiVersion");
        kinds.insert(s(&o["kind"], &what).to_owned());
        assert!(o["metadata"]["name"].as_str().is_some(), "{what}: name");
        assert!(o["metadata"]["namespace"].is_badvalue(), "{what}: no namespace");
        assert_eq!(
            o["metadata"]["labels"]["app.kubernetes.io/name"].as_str(),
            Some("rdp-preflight"),
            "{what}: label"
        );
    }
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "Secret",
        "ServiceAccount",
    ] {
        assert!(kinds.contains(kind), "deploy/k8s has no {kind}");
    }
}

#[test]
fn deployment_is_locked_down() {
    let objs = k8s_objects();
    let d = object(&objs, "Deployment", "rdp-preflight");
    let pod = &d["spec"]["template"]["spec"];
    assert!(d["spec"]["replicas"].is_badvalue(), "the HPA owns the replica count");
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(psc["seccompProfile"]["type"].as_str(), Some("RuntimeDefault"));
    let containers = v(&pod["containers"], "containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let csc = &c["securityContext"];
    assert_eq!(csc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(csc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strings(&csc["capabilities"]["drop"], "capabilities.drop"), ["ALL"]);
    for kind in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(
                !c["resources"][kind][r].is_badvalue(),
                "resources.{kind}.{r} must be set"
            );
        }
    }
    // The image's user is the pod's.
    let user = containerfile().into_iter().rfind(|(i, _)| i == "USER").expect("USER").1;
    assert_eq!(
        user,
        format!(
            "{}:{}",
            i(&psc["runAsUser"], "runAsUser"),
            i(&psc["runAsGroup"], "runAsGroup")
        )
    );
    // Draining fits in the grace period.
    let (_root, cfg) = load(&k8s_config_file(), false);
    let grace = i(&pod["terminationGracePeriodSeconds"], "terminationGracePeriodSeconds");
    let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"].as_i64().unwrap_or(0);
    let budget = i64::try_from(cfg.max_budget.as_secs()).expect("secs");
    assert!(
        grace > pre_stop + budget,
        "grace {grace} s <= preStop {pre_stop} s + max budget {budget} s"
    );

    let hpa = object(&objs, "HorizontalPodAutoscaler", "rdp-preflight");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"].as_str(), Some("Deployment"));
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"].as_str(), Some("rdp-preflight"));
    assert!(i(&hpa["spec"]["minReplicas"], "minReplicas") >= 2);
    let metric = &v(&hpa["spec"]["metrics"], "metrics")[0];
    assert_eq!(metric["resource"]["name"].as_str(), Some("cpu"));
    let pdb = object(&objs, "PodDisruptionBudget", "rdp-preflight");
    let pod_labels = &d["spec"]["template"]["metadata"]["labels"];
    for (what, selector) in [
        ("Deployment", &d["spec"]["selector"]["matchLabels"]),
        ("PodDisruptionBudget", &pdb["spec"]["selector"]["matchLabels"]),
        (
            "NetworkPolicy",
            &object(&objs, "NetworkPolicy", "rdp-preflight")["spec"]["podSelector"]["matchLabels"],
        ),
        (
            "Service",
            &object(&objs, "Service", "rdp-preflight")["spec"]["selector"],
        ),
        (
            "headless Service",
            &object(&objs, "Service", "rdp-preflight-headless")["spec"]["selector"],
        ),
    ] {
        let sel = selector.as_hash().unwrap_or_else(|| panic!("{what}: selector"));
        assert!(!sel.is_empty(), "{what}: empty selector");
        for (k, val) in sel {
            assert_eq!(
                &pod_labels[s(k, what)],
                val,
                "{what}: selector {k:?} does not match the pod"
            );
        }
    }
}

#[test]
fn k8s_ports_probes_volumes_and_command_agree_with_the_config() {
    let objs = k8s_objects();
    let rel = k8s_config_file();
    let (_root, cfg) = load(&rel, false);
    let port = listen_port(&cfg);
    let d = object(&objs, "Deployment", "rdp-preflight");
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];

    let ports: BTreeMap<String, i64> = v(&c["ports"], "ports")
        .iter()
        .map(|p| {
            (
                s(&p["name"], "port name").to_owned(),
                i(&p["containerPort"], "containerPort"),
            )
        })
        .collect();
    assert_eq!(
        ports.get("grpc"),
        Some(&port),
        "containerPort grpc = {rel} server.listen"
    );
    assert_eq!(ports.get("metrics"), Some(&METRICS_PORT), "metrics port reserved");
    for probe in ["readinessProbe", "livenessProbe"] {
        let g = &c[probe]["grpc"];
        assert_eq!(i(&g["port"], probe), port, "{probe}: port = server.listen's");
        assert_eq!(
            g["service"].as_str(),
            Some(HEALTH_SERVICE),
            "{probe}: health service name"
        );
    }
    for svc in ["rdp-preflight", "rdp-preflight-headless"] {
        let sp = v(&object(&objs, "Service", svc)["spec"]["ports"], "Service ports");
        let grpc = sp
            .iter()
            .find(|p| p["name"].as_str() == Some("grpc"))
            .expect("grpc port");
        let target = &grpc["targetPort"];
        let target = target
            .as_i64()
            .or_else(|| target.as_str().and_then(|n| ports.get(n).copied()))
            .expect("targetPort names a container port");
        assert_eq!(target, port, "Service {svc}: targetPort");
    }

    // NetworkPolicy: ingress only on the gRPC port; egress RDP, LDAP(S), DNS.
    let np = object(&objs, "NetworkPolicy", "rdp-preflight");
    let types = strings(&np["spec"]["policyTypes"], "policyTypes");
    assert!(types.contains(&"Ingress".to_owned()) && types.contains(&"Egress".to_owned()));
    let rule_ports = |rules: &Yaml| -> BTreeSet<(String, i64)> {
        v(rules, "rules")
            .iter()
            .flat_map(|r| v(&r["ports"], "rule ports").iter())
            .map(|p| {
                (
                    p["protocol"].as_str().unwrap_or("TCP").to_owned(),
                    i(&p["port"], "port"),
                )
            })
            .collect()
    };
    let ingress = rule_ports(&np["spec"]["ingress"]);
    assert_eq!(ingress, BTreeSet::from([("TCP".to_owned(), port)]), "ingress");
    for r in v(&np["spec"]["ingress"], "ingress") {
        assert!(!v(&r["from"], "from").is_empty(), "every ingress rule names its peers");
    }
    let egress = rule_ports(&np["spec"]["egress"]);
    let want: BTreeSet<(String, i64)> = [("TCP", 3389), ("TCP", 636), ("TCP", 389), ("UDP", 53), ("TCP", 53)]
        .into_iter()
        .map(|(p, n)| (p.to_owned(), n))
        .collect();
    assert_eq!(egress, want, "egress: RDP, the directory, DNS and nothing else");

    // The command line: the image's entrypoint with these args, the config where it is mounted.
    let args = strings(&c["args"], "args");
    assert!(c["command"].is_badvalue(), "use the image's entrypoint");
    let cmd = containerfile()
        .into_iter()
        .find(|(i, _)| i == "CMD")
        .map(|(_, a)| exec_form("CMD", &a))
        .expect("CMD");
    assert_eq!(args, cmd, "Deployment args = the image's CMD");
    let config_arg = args
        .iter()
        .skip_while(|a| *a != "--config")
        .nth(1)
        .expect("--config FILE");
    assert_eq!(config_arg, CONFIG_PATH);
    let mounts = v(&c["volumeMounts"], "volumeMounts");
    let volumes = v(&pod["volumes"], "volumes");
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|x| x["name"].as_str() == Some(name))
            .expect("volume")
    };
    let config_mount = mounts
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(config_arg))
        .expect("config mounted at --config");
    assert_eq!(config_mount["subPath"].as_str(), Some("config.toml"));
    assert_eq!(
        volume(s(&config_mount["name"], "mount"))["configMap"]["name"].as_str(),
        Some("rdp-preflight-config")
    );
    // Every mount is read-only except the state directory and /tmp.
    let env: BTreeMap<String, String> = v(&c["env"], "env")
        .iter()
        .filter_map(|e| Some((s(&e["name"], "env").to_owned(), e["value"].as_str()?.to_owned())))
        .collect();
    // The shared store's URL comes from a Secret, never from the manifest.
    let store = v(&c["env"], "env")
        .iter()
        .find(|e| e["name"].as_str() == Some("RDP_PREFLIGHT_STORE__URL"))
        .expect("RDP_PREFLIGHT_STORE__URL");
    assert!(
        store["value"].is_badvalue(),
        "the store URL is not written in the manifest"
    );
    assert_eq!(
        store["valueFrom"]["secretKeyRef"]["name"].as_str(),
        Some("rdp-preflight-store")
    );
    let state_dir = env
        .get("STATE_DIRECTORY")
        .expect("STATE_DIRECTORY for pin_store = \"auto\"");
    for m in mounts {
        let path = s(&m["mountPath"], "mountPath");
        if path == state_dir || path == "/tmp" {
            assert!(volume(s(&m["name"], "mount"))["emptyDir"].is_hash(), "{path}: emptyDir");
        } else {
            assert_eq!(m["readOnly"].as_bool(), Some(true), "{path}: read-only");
        }
    }
    // Secret: the volume names the example's Secret, and every path the config (examples
    // enabled) names under the mount is a key of it.
    let secret = objs
        .iter()
        .find(|(f, _)| f == "secret.example.yaml")
        .map(|(_, o)| o)
        .expect("secret example");
    let secret_name = s(&secret["metadata"]["name"], "Secret name");
    let (sv, sm) = mounts
        .iter()
        .find_map(|m| {
            let vol = volume(s(&m["name"], "mount"));
            vol["secret"].is_hash().then(|| (vol, s(&m["mountPath"], "mountPath")))
        })
        .expect("a Secret volume");
    assert_eq!(sv["secret"]["secretName"].as_str(), Some(secret_name));
    assert_eq!(
        sv["secret"]["optional"].as_bool(),
        Some(true),
        "the default config needs no Secret"
    );
    let keys: BTreeSet<&str> = secret["stringData"]
        .as_hash()
        .expect("stringData")
        .keys()
        .map(|k| s(k, "key"))
        .collect();
    let text = enable_examples(&read(&rel));
    let prefix = format!("\"{sm}/");
    let mut named = 0;
    for part in text.split(&prefix).skip(1) {
        let key = part.split('"').next().expect("key");
        assert!(keys.contains(key), "{rel} names {sm}/{key}, not a key of {secret_name}");
        named += 1;
    }
    assert!(named >= 4, "{rel}: its examples use the Secret");
}

// ---------------------------------------------------------------------------------------------
// systemd

#[test]
fn systemd_unit_is_sandboxed_and_matches_its_config() {
    let text = read("deploy/systemd/rdp-preflight.service");
    let unit = Unit::parse(&text);
    assert!(unit.sections.contains_key("Unit") && unit.sections.contains_key("Install"));
    for (key, want) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("StateDirectory", "rdp-preflight"),
        ("LogsDirectory", "rdp-preflight"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("SystemCallArchitectures", "native"),
        ("RestartPreventExitStatus", &rdp_preflight::cli::EXIT_USAGE.to_string()),
    ] {
        assert_eq!(unit.one("Service", key), want, "[Service] {key}");
    }
    assert!(
        unit.all("Service", "SystemCallFilter").contains(&"@system-service"),
        "SystemCallFilter=@system-service"
    );

    let exec = unit.one("Service", "ExecStart");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(argv[0], BINARY_PATH);
    assert_eq!(argv[1..], ["serve", "--config", CONFIG_PATH]);
    let readme = read("deploy/systemd/README.md");
    assert!(
        readme.contains(BINARY_PATH) && readme.contains(CONFIG_PATH),
        "README installs where the unit looks"
    );

    // Stopping waits for the checks in flight.
    let (_root, cfg) = load("deploy/systemd/config.toml", false);
    let stop = unit.one("Service", "TimeoutStopSec");
    let stop: u64 = stop.trim_end_matches('s').parse().expect("TimeoutStopSec in seconds");
    assert!(
        stop > cfg.max_budget.as_secs(),
        "TimeoutStopSec {stop} s <= check.max_budget_ms"
    );

    // Credentials: every LoadCredential (commented or not) is used by the config's examples,
    // and every credential path there is loaded.
    let creds: BTreeSet<String> = unit
        .all("Service", "LoadCredential")
        .into_iter()
        .map(str::to_owned)
        .chain(
            unit.commented
                .iter()
                .filter(|(k, _)| k == "LoadCredential")
                .map(|(_, v)| v.clone()),
        )
        .map(|v| v.split_once(':').expect("NAME:PATH").0.to_owned())
        .collect();
    let prefix = "/run/credentials/rdp-preflight.service/";
    let used: BTreeSet<String> = enable_examples(&read("deploy/systemd/config.toml"))
        .split(prefix)
        .skip(1)
        .map(|p| p.split('"').next().expect("name").to_owned())
        .collect();
    assert!(!used.is_empty());
    assert_eq!(creds, used, "LoadCredential names vs credential paths in config.toml");
}

// ---------------------------------------------------------------------------------------------
// Container image

#[test]
fn containerfile_builds_the_plugin_and_runs_it_unprivileged() {
    let ins = containerfile();
    let all = |name: &str| -> Vec<String> { ins.iter().filter(|(i, _)| i == name).map(|(_, a)| a.clone()).collect() };
    let froms = all("FROM");
    assert!(froms.len() >= 2, "multi-stage");
    assert!(
        froms[0].contains("rust:") && froms[0].contains("bookworm") && froms[0].ends_with(" AS build"),
        "builder stage: {}",
        froms[0]
    );
    let last = froms.last().expect("runtime stage");
    assert!(last.contains("distroless/cc-debian12:nonroot"), "runtime stage: {last}");
    let runs = all("RUN").join("\n");
    assert!(runs.contains("cargo build --release -p rdp-preflight --locked"));
    assert!(runs.contains("deploy/container/config.toml"));
    assert!(
        runs.contains(&format!("/out{CONFIG_PATH}")),
        "the image has its config at {CONFIG_PATH}"
    );
    assert!(runs.contains(&format!("/out{BINARY_PATH}")));

    // Runtime stage instructions.
    let runtime_start = ins.iter().rposition(|(i, _)| i == "FROM").expect("FROM");
    let runtime = &ins[runtime_start..];
    let one = |name: &str| -> String {
        let found: Vec<_> = runtime.iter().filter(|(i, _)| i == name).collect();
        assert_eq!(found.len(), 1, "runtime stage: one {name}");
        found[0].1.clone()
    };
    let user = one("USER");
    let uid = user.split(':').next().expect("uid");
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "numeric non-root USER: {user}"
    );

    let entry = exec_form("ENTRYPOINT", &one("ENTRYPOINT"));
    assert_eq!(entry, [BINARY_PATH]);
    let cmd = exec_form("CMD", &one("CMD"));
    assert_eq!(cmd, ["serve", "--config", CONFIG_PATH]);

    let (_root, cfg) = load("deploy/container/config.toml", false);
    let port = cfg.listen.port();
    let expose: BTreeSet<String> = one("EXPOSE").split_whitespace().map(str::to_owned).collect();
    assert!(
        expose.contains(&port.to_string()) && expose.contains(&METRICS_PORT.to_string()),
        "EXPOSE"
    );

    let health = one("HEALTHCHECK");
    let (opts, cmd) = health.split_once(" CMD ").expect("HEALTHCHECK ... CMD [...]");
    assert!(
        opts.contains("--interval=") && opts.contains("--timeout="),
        "HEALTHCHECK options"
    );
    let probe = exec_form("HEALTHCHECK CMD", cmd);
    let copied = runtime
        .iter()
        .filter(|(i, _)| i == "COPY")
        .any(|(_, a)| a.ends_with(&format!(" {}", probe[0])));
    assert!(copied, "the health probe binary {} is copied into the image", probe[0]);
    assert!(
        probe.contains(&format!("-addr=127.0.0.1:{port}")),
        "probe address: {probe:?}"
    );
    assert!(
        probe.contains(&format!("-service={HEALTH_SERVICE}")),
        "probe service: {probe:?}"
    );

    // The state directory: $STATE_DIRECTORY, a volume, owned by the runtime user.
    let state = one("ENV")
        .strip_prefix("STATE_DIRECTORY=")
        .expect("ENV STATE_DIRECTORY=")
        .to_owned();
    assert_eq!(exec_form("VOLUME", &one("VOLUME")), std::slice::from_ref(&state));
    assert!(
        runtime.iter().any(|(i, a)| i == "COPY"
            && a.contains(&format!("--chown={user}"))
            && a.trim_end_matches('/').ends_with(&state)),
        "the state directory belongs to {user}"
    );
    assert_eq!(one("STOPSIGNAL"), "SIGTERM");
    let ignore = read("deploy/container/Containerfile.dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "target/ stays out of the build context"
    );
}

// ---------------------------------------------------------------------------------------------
// The real binary

/// The `rdp-preflight` binary of this build, built on first use (a test of another crate gets
/// no `CARGO_BIN_EXE_` for it).
fn plugin_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable");
        // <target>/<profile>/deps/deploy-<hash>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("<target>/<profile>")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("<target>");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo())
            .args([
                "build",
                "--quiet",
                "-p",
                "rdp-preflight",
                "--bin",
                "rdp-preflight",
                "--target-dir",
            ])
            .arg(target_dir);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p rdp-preflight: {status}");
        let bin = profile_dir.join("rdp-preflight");
        assert!(bin.exists(), "{} missing", bin.display());
        bin
    })
}

/// A child process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn plugin_command() -> Command {
    let mut cmd = Command::new(plugin_binary());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RDP_PREFLIGHT_") || k == "RUST_LOG" || k == "STATE_DIRECTORY" {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Runs a deployment's command line (`argv` without the program) with its config installed in
/// a temporary root, on an ephemeral loopback port, and asks the health service for
/// `service`.
fn serve_and_probe(what: &str, argv: &[String], config_rel: &str, state_dir: &str, service: &str) {
    let root = tempfile::tempdir().expect("tmp");
    install_config(root.path(), &read(config_rel), false);
    let args: Vec<PathBuf> = argv
        .iter()
        .map(|a| {
            if a.starts_with('/') {
                reroot(root.path(), a)
            } else {
                PathBuf::from(a)
            }
        })
        .collect();
    let mut cmd = plugin_command();
    cmd.args(&args)
        .env("RDP_PREFLIGHT_SERVER__LISTEN", "127.0.0.1:0")
        .env("RDP_PREFLIGHT_ADMIN__LISTEN", "127.0.0.1:0")
        .env(
            "RDP_PREFLIGHT_AUDIT__DIR",
            reroot(root.path(), "/var/lib/rdp-preflight/audit"),
        )
        .env("STATE_DIRECTORY", reroot(root.path(), state_dir))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Running(cmd.spawn().unwrap_or_else(|e| panic!("{what}: spawn: {e}")));
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(a) => a,
        Err(_) => {
            let _ = child.0.kill();
            let mut err = String::new();
            if let Some(mut e) = child.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("{what}: `rdp-preflight {argv:?}` did not start serving:\n{err}");
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let status = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{what}: connect {addr}: {e}"));
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("{what}: health check of {service:?}: {e}"))
            .into_inner()
            .status
    });
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        "{what}: {service} is not SERVING"
    );
}

#[test]
fn the_deployed_command_lines_start_a_serving_plugin() {
    // systemd: ExecStart, state in StateDirectory.
    let unit = Unit::parse(&read("deploy/systemd/rdp-preflight.service"));
    let exec: Vec<String> = unit
        .one("Service", "ExecStart")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let state = format!("/var/lib/{}", unit.one("Service", "StateDirectory"));
    serve_and_probe(
        "systemd",
        &exec[1..],
        "deploy/systemd/config.toml",
        &state,
        HEALTH_SERVICE,
    );

    // Image: ENTRYPOINT + CMD, the HEALTHCHECK's service.
    let ins = containerfile();
    let last = |name: &str| {
        ins.iter()
            .rfind(|(i, _)| i == name)
            .map(|(_, a)| a.clone())
            .expect(name)
    };
    let mut argv = exec_form("ENTRYPOINT", &last("ENTRYPOINT"));
    argv.extend(exec_form("CMD", &last("CMD")));
    let health = last("HEALTHCHECK");
    let probe = exec_form("HEALTHCHECK", health.split_once(" CMD ").expect("CMD").1);
    let service = probe
        .iter()
        .find_map(|a| a.strip_prefix("-service="))
        .expect("-service=");
    let state = last("ENV").strip_prefix("STATE_DIRECTORY=").expect("ENV").to_owned();
    serve_and_probe("image", &argv[1..], "deploy/container/config.toml", &state, service);

    // Kubernetes: args (entrypoint from the image), the readiness probe's service.
    let objs = k8s_objects();
    let c = &object(&objs, "Deployment", "rdp-preflight")["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&c["args"], "args");
    let service = s(&c["readinessProbe"]["grpc"]["service"], "probe service");
    let state = v(&c["env"], "env")
        .iter()
        .find(|e| e["name"].as_str() == Some("STATE_DIRECTORY"))
        .map(|e| s(&e["value"], "value").to_owned())
        .expect("STATE_DIRECTORY");
    serve_and_probe("kubernetes", &args, &k8s_config_file(), &state, service);
}

// ---------------------------------------------------------------------------------------------
// docs/operations.md

/// A row of the configuration reference.
#[derive(Debug)]
struct DocKey {
    /// `section.key`; for a table of free keys (`severity.<CAUSE>`), the table's path.
    key: String,
    /// Whether the row stands for a table of free keys.
    map: bool,
    default: String,
    env: String,
}

fn cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|').trim_end_matches('|');
    let mut out = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().expect("cell").push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().expect("cell").push(c),
        }
    }
    out.into_iter().map(|c| c.trim().to_owned()).collect()
}

fn code(cell: &str) -> Option<&str> {
    cell.strip_prefix('`').and_then(|c| c.strip_suffix('`'))
}

fn doc_keys() -> Vec<DocKey> {
    let doc = read("docs/operations.md");
    let section = doc
        .split("\n## Configuration reference")
        .nth(1)
        .expect("docs/operations.md: ## Configuration reference");
    let section = section.split("\n## ").next().expect("section");
    let mut out = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let c = cells(line);
        assert!(c.len() >= 4, "reference row with fewer than 4 cells: {line}");
        let key = code(&c[0]).unwrap_or_else(|| panic!("key cell: {line}"));
        let (key, map) = match key.rsplit_once('.') {
            Some((table, free)) if free.trim_matches('"').starts_with('<') => (table.to_owned(), true),
            _ => (key.to_owned(), false),
        };
        out.push(DocKey {
            key,
            map,
            default: c[1].clone(),
            env: c[2].clone(),
        });
    }
    out
}

/// Every key of the config model, with its default: serde_json keeps `None` (as null) and
/// empty tables, which TOML output drops.
fn model_keys() -> BTreeMap<String, Json> {
    fn walk(prefix: &str, v: &Json, out: &mut BTreeMap<String, Json>) {
        match v {
            Json::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, x, out);
                }
            }
            _ => {
                out.insert(prefix.to_owned(), v.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(
        "",
        &serde_json::to_value(FileConfig::default()).expect("json"),
        &mut out,
    );
    out
}

fn env_name(key: &str) -> String {
    let (section, k) = key.split_once('.').expect("section.key");
    format!(
        "{}_{}__{}",
        rdp_preflight::config::ENV_PREFIX,
        section.to_uppercase(),
        k.to_uppercase()
    )
}

#[test]
fn operations_reference_lists_every_key_with_its_default_and_variable() {
    let docs = doc_keys();
    let model = model_keys();
    // The TOML form the plugin prints has the same sections and keys (less unset ones).
    let toml_text = toml::to_string(&FileConfig::default()).expect("toml");
    let toml_table: toml::Table = toml::from_str(&toml_text).expect("parse");
    for (section, t) in &toml_table {
        for k in t.as_table().map(|t| t.keys().collect::<Vec<_>>()).unwrap_or_default() {
            let key = format!("{section}.{k}");
            assert!(
                model.contains_key(&key),
                "{key} in TOML output but not in the model walk"
            );
        }
    }

    let documented: BTreeSet<&str> = docs.iter().map(|d| d.key.as_str()).collect();
    assert_eq!(documented.len(), docs.len(), "a key is documented twice");
    let in_model: BTreeSet<&str> = model.keys().map(String::as_str).collect();
    let missing: Vec<_> = in_model.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&in_model).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/operations.md reference: undocumented keys {missing:?}; documented keys that do not exist {stale:?}"
    );
    for d in &docs {
        let default = &model[&d.key];
        let want = match default {
            Json::Null => "unset".to_owned(),
            Json::Object(_) => "none".to_owned(),
            v => format!("`{}`", toml::Value::try_from(v).expect("toml value")),
        };
        assert_eq!(d.default, want, "{}: documented default", d.key);
        assert_eq!(
            d.map,
            matches!(default, Json::Object(_)),
            "{}: table of free keys",
            d.key
        );
        if d.env.starts_with('—') {
            // A table of free keys, or a key the variables cannot set yet: the next test
            // proves the latter still fails, so that the row is updated when it is fixed.
        } else if d.map {
            let prefix = format!("{}_{}__<", rdp_preflight::config::ENV_PREFIX, d.key.to_uppercase());
            assert!(
                code(&d.env).is_some_and(|e| e.starts_with(&prefix)),
                "{}: variable {} should be {prefix}…>",
                d.key,
                d.env
            );
        } else {
            assert_eq!(code(&d.env), Some(env_name(&d.key).as_str()), "{}: variable", d.key);
        }
    }
}

/// A value for a key whose default (unset or empty) shows nothing, and the keys it needs
/// beside it. A new optional key needs a row here.
fn sample(key: &str, pem: &str, secret: &str, tmp: &Path) -> (String, Vec<(&'static str, String)>) {
    let key_pem = tmp.join("server.key").to_string_lossy().into_owned();
    let key_name = key;
    match key {
        "server.unix_socket" => (tmp.join("p.sock").to_string_lossy().into_owned(), vec![]),
        "server.tls_cert" => (pem.into(), vec![("server.tls_key", key_pem)]),
        "server.tls_key" => (key_pem, vec![("server.tls_cert", pem.into())]),
        "server.client_ca" => (
            pem.into(),
            vec![("server.tls_cert", pem.into()), ("server.tls_key", key_pem)],
        ),
        "server.bearer_token_file" | "directory.service_password_file" => (secret.into(), vec![]),
        "probe.cookie" => ("preflight".into(), vec![]),
        "probe.minimum_protocol" => ("hybrid".into(), vec![]),
        "cert.trust_anchors" | "directory.ca_file" => (pem.into(), vec![]),
        "policy.allow_networks" => ("10.0.0.0/8,192.168.0.0/16".into(), vec![]),
        "policy.allow_dns_suffixes" => ("corp.example.com,example.org".into(), vec![]),
        "policy.allow_ports" => ("3389,3390".into(), vec![]),
        "directory.servers" => (
            "ldaps://dc1.example.test:636,ldaps://dc2.example.test:636".into(),
            vec![("directory.ca_file", pem.into())],
        ),
        "directory.service_dn" => ("cn=svc,dc=example,dc=test".into(), vec![]),
        "directory.service_password_env" => ("DEPLOY_TEST_PASSWORD".into(), vec![]),
        "directory.search_base" => ("dc=example,dc=test".into(), vec![]),
        "directory.default_policy_dn" => ("cn=default,ou=policies,dc=example,dc=test".into(), vec![]),
        "audit.dir" => ("/tmp/rdp-preflight-deploy-test-audit".into(), vec![]),
        "store.url" => (
            "postgres://preflight@127.0.0.1:5432/preflight".into(),
            vec![("store.tls", "disable".into()), ("store.hmac_key_file", hmac_key(tmp))],
        ),
        "store.hmac_key_file" => (hmac_key(tmp), vec![]),
        "store.password_file" => (secret.into(), vec![]),
        "store.password_env" => ("DEPLOY_TEST_PASSWORD".into(), vec![]),
        "store.ca_file" => (pem.into(), vec![]),
        "kerberos.kdcs" => ("dc1.example.test:88,dc2.example.test:88".into(), vec![]),
        "kerberos.realm" => (
            "EXAMPLE.TEST".into(),
            vec![("kerberos.kdcs", "dc1.example.test:88".into())],
        ),
        "admin.listen" => ("127.0.0.1:9464".into(), vec![]),
        "sweep.metric_label" => ("site".into(), vec![]),
        "sweep.inventory" => {
            let p = tmp.join("inventory.csv");
            std::fs::write(
                &p,
                "host,port,expected_name,expected_computer,labels\nrdp1.example.test,3389,,,site=par\n",
            )
            .expect("inventory");
            (p.to_string_lossy().into_owned(), vec![])
        }
        "nla.auth" => ("ntlm".into(), vec![]),
        "kerberos.dns_servers" => ("127.0.0.1:53".into(), vec![("kerberos.realm", "EXAMPLE.TEST".into())]),
        "otel.endpoint" => ("http://127.0.0.1:4317".into(), vec![]),
        "otel.ca_file" => (
            pem.into(),
            vec![("otel.endpoint", "https://collector.example.test:4317".into())],
        ),
        "siem.syslog" => (
            "udp://127.0.0.1:514".into(),
            vec![("audit.dir", "/tmp/rdp-preflight-deploy-test-audit".into())],
        ),
        "siem.file" => (
            "/tmp/rdp-preflight-deploy-test-events.jsonl".into(),
            vec![("audit.dir", "/tmp/rdp-preflight-deploy-test-audit".into())],
        ),
        "siem.ca_file" => (
            pem.into(),
            vec![
                ("siem.syslog", "tls://siem.example.test:6514".into()),
                ("audit.dir", "/tmp/rdp-preflight-deploy-test-audit".into()),
            ],
        ),
        "siem.client_cert" | "siem.client_key" => {
            let (cert, key) = client_pair(tmp);
            let (value, other) = if key_name == "siem.client_cert" {
                (cert, ("siem.client_key", key))
            } else {
                (key, ("siem.client_cert", cert))
            };
            (
                value,
                vec![
                    other,
                    ("siem.ca_file", pem.into()),
                    ("siem.syslog", "tls://siem.example.test:6514".into()),
                    ("audit.dir", "/tmp/rdp-preflight-deploy-test-audit".into()),
                ],
            )
        }
        other => panic!("tests/tests/deploy.rs: add a sample value for {other} to sample()"),
    }
}

/// Keys a switch needs beside it to be valid when turned on.
fn requires(key: &str) -> Vec<(&'static str, String)> {
    match key {
        "otel.logs" => vec![("otel.endpoint", "http://127.0.0.1:4317".into())],
        _ => vec![],
    }
}

/// A client certificate and its key (PEM files), for the mutual TLS samples of `[siem]`.
fn client_pair(tmp: &Path) -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec!["deploy-test-client.example".to_owned()]).expect("certificate");
    let (cert, key) = (tmp.join("client.pem"), tmp.join("client.key"));
    std::fs::write(&cert, c.cert.pem()).expect("client cert");
    std::fs::write(&key, c.signing_key.serialize_pem()).expect("client key");
    (cert.to_string_lossy().into_owned(), key.to_string_lossy().into_owned())
}

/// A guard key file (32 bytes or more) for the `[store]` samples.
fn hmac_key(tmp: &Path) -> String {
    let p = tmp.join("hmac.key");
    std::fs::write(&p, "deploy-test-hmac-key-0123456789abcdef\n").expect("key");
    p.to_string_lossy().into_owned()
}

/// `v` as an environment variable's text: lists comma-separated.
fn env_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(a) => a.iter().map(env_text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// One variable to try.
struct EnvCase {
    /// `section.key`.
    key: String,
    /// The variable's value.
    value: String,
    /// Keys it needs beside it, set through their variables too.
    extra: Vec<(&'static str, String)>,
    /// Whether the docs say a variable sets it (else it must still fail).
    documented: bool,
}

#[test]
fn every_documented_variable_is_accepted_and_takes_effect() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pem = tmp.path().join("ca.pem");
    std::fs::write(&pem, ca_pem()).expect("pem");
    std::fs::write(
        tmp.path().join("server.key"),
        rcgen::KeyPair::generate().expect("key").serialize_pem(),
    )
    .expect("key");
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "deploy-test-secret-0123456789\n").expect("secret");
    let empty = tmp.path().join("empty.toml");
    std::fs::write(&empty, "").expect("empty config");
    let (pem, secret) = (
        pem.to_string_lossy().into_owned(),
        secret.to_string_lossy().into_owned(),
    );
    let model = model_keys();

    let mut cases: Vec<EnvCase> = Vec::new();
    for d in doc_keys() {
        let documented = !d.env.starts_with('—');
        if d.map && !documented {
            continue;
        }
        if d.map {
            // A table of free keys: one entry through the variable.
            assert_eq!(d.key, "severity", "{}: add a case for this table", d.key);
            cases.push(EnvCase {
                key: "severity.CERT_UNTRUSTED".into(),
                value: "deny".into(),
                extra: vec![],
                documented: true,
            });
            continue;
        }
        let (value, extra) = match &model[&d.key] {
            Json::Bool(b) => ((!b).to_string(), requires(&d.key)),
            Json::Number(n) => ((n.as_u64().expect("unsigned") + 1).to_string(), vec![]),
            Json::String(s) => (s.clone(), vec![]),
            Json::Array(a) if !a.is_empty() => (
                env_text(&toml::Value::try_from(Json::Array(a.clone())).expect("toml")),
                vec![],
            ),
            _ => sample(&d.key, &pem, &secret, tmp.path()),
        };
        cases.push(EnvCase {
            key: d.key.clone(),
            value,
            extra,
            documented,
        });
    }
    assert!(cases.len() > 40, "{} cases", cases.len());

    let mut failures = Vec::new();
    for EnvCase {
        key,
        value,
        extra,
        documented,
    } in &cases
    {
        let var = match key.split_once('.') {
            Some(("severity", free)) => format!("RDP_PREFLIGHT_SEVERITY__{free}"),
            _ => env_name(key),
        };
        let mut cmd = plugin_command();
        cmd.args(["config", "check"]).arg(&empty).env(&var, value);
        for (k, v) in extra {
            cmd.env(env_name(k), v);
        }
        let out = cmd.output().expect("run config check");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !documented {
            if out.status.success() {
                failures.push(format!(
                    "{var}={value} works now: name it in docs/operations.md's reference for {key}"
                ));
            }
            continue;
        }
        if !out.status.success() {
            failures.push(format!(
                "{var}={value}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            continue;
        }
        let effective: toml::Table = toml::from_str(&stdout).unwrap_or_else(|e| panic!("{var}: output: {e}\n{stdout}"));
        let (section, k) = key.split_once('.').expect("section.key");
        let got = effective
            .get(section)
            .and_then(|t| t.as_table())
            .and_then(|t| t.iter().find(|(name, _)| name.eq_ignore_ascii_case(k)).map(|(_, v)| v));
        match got.map(env_text) {
            Some(g) if g == *value => {}
            other => failures.push(format!("{var}={value}: effective {key} is {other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "documented variables that do not work:\n{}",
        failures.join("\n")
    );
}
