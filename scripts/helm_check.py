# scripts/helm_check.py: owns the offline checks of the Helm chart, the alert rules, the dashboard and deploy/ (run by scripts/helm-check.sh).
"""Every check prints one PASS/FAIL line; the last line is `helm-check: N passed, M failed`.

Tools come from scripts/helm-check.sh: helm (--helm), promtool (--promtool), the
compose-spec JSON schema (--compose-schema), and this interpreter's venv with
kubernetes-validate, promql-parser and PyYAML. The real-binary checks also need
`openssl` (throw-away keys for the mounted [auth] files and signed test tokens).
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "helm", "fanout")
DEPLOY = os.path.join(ROOT, "deploy")

# Kubernetes versions the rendered manifests are validated against (chart kubeVersion >= 1.29).
KUBE_VERSIONS = ["1.29", "1.30", "1.31", "1.32", "1.33"]
# Custom resources kubernetes-validate has no schema for: skipped on purpose (checked by
# the assertions below instead). Any other kind without a schema is a failure.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "HTTPRoute"}

# The metrics the gateway exports (docs: the brief / docs/operations.md). Histograms
# also expose _bucket, _sum and _count.
COUNTERS_AND_GAUGES = {
    "fanout_connections", "fanout_connections_opened_total", "fanout_connections_closed_total",
    "fanout_upgrade_rejections_total", "fanout_subscriptions", "fanout_broker_channels",
    "fanout_publications_total", "fanout_broker_publications_received_total", "fanout_deliveries_total",
    "fanout_sent_bytes_total", "fanout_publications_dropped_total", "fanout_slow_consumer_disconnects_total",
    "fanout_command_errors_total", "fanout_broker_up", "fanout_broker_reconnects_total",
    "fanout_broker_errors_total", "fanout_ready", "fanout_build_info",
    "process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
    "fanout_recoveries_total", "fanout_publications_replayed_total", "fanout_resyncs_total",
    "fanout_broker_catch_up_publications_total", "fanout_history_unstored_publications_total",
    "fanout_presence_entries", "fanout_presence_events_total", "fanout_presence_events_dropped_total",
    "fanout_server_api_calls_total", "fanout_listener_accept_errors_total",
}
HISTOGRAMS = {"fanout_delivery_latency_seconds", "fanout_broadcast_duration_seconds",
              "fanout_broker_resubscribe_duration_seconds"}
ALLOWED_METRICS = COUNTERS_AND_GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
# What the gateway's fanout.toml may hold: one key per `fanout serve` flag (the settings are
# declared once, in crates/server/src/config.rs), read from the built binary's --help.
def toml_keys():
    """None when no binary is built (the check then only looks at tables)."""
    binary = find_binary()
    if not binary:
        return None
    out = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    return {m.replace("-", "_") for m in re.findall(r"^\s+--([a-z-]+) \[?<", out, re.M)} - {"config"}


AUTH_KEYS = {"algorithms", "public_key_file", "jwks_file", "jwks_reload_interval", "required", "leeway",
             "audience", "issuer"}
NAMESPACE_KEYS = {"anonymous_subscribe", "client_publish", "max_message_size", "publish_rate", "publish_burst"}
# Chart value -> fanout.toml key of the limits (config.*).
LIMIT_VALUES = {"maxConnectionsPerIpPerSecond": "max_connections_per_ip_per_second",
                "connectionRateBurst": "connection_rate_burst", "commandRate": "command_rate",
                "commandBurst": "command_burst", "trustedProxies": "trusted_proxies"}
AUTH_VALUES = {"algorithms": "algorithms", "required": "required", "leeway": "leeway",
               "audience": "audience", "issuer": "issuer"}
NAMESPACE_VALUES = {"anonymousSubscribe": "anonymous_subscribe", "clientPublish": "client_publish",
                    "maxMessageSize": "max_message_size", "publishRate": "publish_rate",
                    "publishBurst": "publish_burst"}
# The NOTES.txt warning about the per-IP limit behind a proxy.
PER_IP_WARNING = "WARNING: the per-IP connection limit will throttle all clients together"

SCENARIOS = {
    # name: values files (relative to the chart); None = chart defaults
    "default": [],
    "all-features": ["ci/all-features-values.yaml"],
    "external-redis": ["ci/external-redis-values.yaml"],
    "single-node": ["ci/single-node-values.yaml"],
    "redis-shards": ["ci/redis-shards-values.yaml"],
}

# Value combinations the chart must refuse (helm template must fail, with this text in the error).
MUST_FAIL = [
    ("grace period not above drain + preStop",
     ["--set", "terminationGracePeriodSeconds=30", "--set", "config.drainTimeout=30s"], "terminationGracePeriodSeconds"),
    ("drain timeout above an explicit grace period",
     ["--set", "terminationGracePeriodSeconds=60", "--set", "config.drainTimeout=2m"], "terminationGracePeriodSeconds"),
    ("drain timeout set behind the chart's back",
     ["--set", "extraEnv[0].name=FANOUT_DRAIN_TIMEOUT", "--set", "extraEnv[0].value=5m"], "drainTimeout"),
    ("bundled Redis and redis.url together",
     ["--set", "redis.url=redis://elsewhere:6379"], "not both"),
    ("redis.shards next to the bundled Redis",
     ["--set", "redis.shards[0]=redis://a:6379"], "redis.shards replaces"),
    ("redis.shards next to redis.url",
     ["--set", "redis.enabled=false", "--set", "redis.url=redis://a:6379", "--set", "redis.shards[0]=redis://b:6379"],
     "redis.shards replaces"),
    ("redis.cluster without seed nodes",
     ["--set", "redis.enabled=false", "--set", "redis.cluster=true", "--set", "replicaCount=1"], "seed nodes"),
    ("a shard that is not a Redis URL (schema)",
     ["--set", "redis.enabled=false", "--set", "redis.shards[0]=http://a"], "shards"),
    ("several replicas without Redis",
     ["--set", "redis.enabled=false"], "shared Redis"),
    ("unreadable drain timeout (schema)",
     ["--set", "config.drainTimeout=thirty"], "drainTimeout"),
    ("container as root (schema)",
     ["--set", "securityContext.runAsNonRoot=false"], "runAsNonRoot"),
    ("writable root filesystem (schema)",
     ["--set", "securityContext.readOnlyRootFilesystem=false"], "readOnlyRootFilesystem"),
    ("unknown top-level value (schema)",
     ["--set", "replicas=5"], "replicas"),
    ("idle timeout not above the ping interval",
     ["--set", "config.idleTimeout=20s"], "idleTimeout"),
    ("outbound queue smaller than one message + 1 KiB",
     ["--set", "config.outboundQueueBytes=65536"], "outboundQueueBytes"),
    ("HTTPRoute without a Gateway",
     ["--set", "httpRoute.enabled=true"], "parentRefs"),
    ("negative command rate (schema)",
     ["--set", "config.commandRate=-1"], "commandRate"),
    ("connection burst 0 (schema)",
     ["--set", "config.connectionRateBurst=0"], "connectionRateBurst"),
    ("trusted proxy that is not an address or CIDR (schema)",
     ["--set", "config.trustedProxies={10.0.0.0/8,proxy.example.com}"], "trustedProxies"),
    ("namespace name with ':' (schema)",
     ["--set", "namespaces.a:b.publishRate=1"], "a:b"),
    ("unknown namespace rule (schema)",
     ["--set", "namespaces.chat.publishRates=1"], "publishRates"),
    ("namespace publishBurst without publishRate",
     ["--set", "namespaces.chat.publishBurst=3"], "publishBurst without publishRate"),
    ("namespace maxMessageSize above config.maxMessageSize",
     ["--set", "namespaces.chat.maxMessageSize=100000"], "config.maxMessageSize"),
    ("auth settings without any token key",
     ["--set", "auth.audience=fanout"], "no token key"),
    ("public key from both a Secret and a ConfigMap",
     ["--set", "auth.publicKey.secretName=k", "--set", "auth.publicKey.configMapName=k"], "not both"),
    ("auth.algorithms leaving the HMAC secret unused",
     ["--set", "auth.algorithms={RS256}", "--set", "auth.jwks.configMapName=jwks",
      "--set", "secrets.jwtHmacSecret=s"], "auth.algorithms"),
    ("auth.algorithms naming a family without a key",
     ["--set", "auth.algorithms={HS256,ES256}", "--set", "secrets.jwtHmacSecret=s"], "need auth.publicKey or auth.jwks"),
    ("auth.algorithms unknown (schema)",
     ["--set", "auth.algorithms={none}", "--set", "secrets.jwtHmacSecret=s"], "auth.algorithms"),
    ("leeway over 5 minutes",
     ["--set", "auth.leeway=6m", "--set", "secrets.jwtHmacSecret=s"], "auth.leeway"),
    ("extraToml repeating a key the chart renders",
     ["--set-string", "config.extraToml=trusted_proxies = []"], "config.trustedProxies"),
    ("extraToml carrying a credential",
     ["--set-string", "config.extraToml=jwt_hmac_secret = \"s\""], "Secret"),
    ("extraToml [auth] next to auth.* values",
     ["--set", "auth.jwks.configMapName=jwks", "--set-string", "config.extraToml=[auth]"], "[auth]"),
    ("extraToml [namespaces.chat] next to namespaces.chat",
     ["--set", "namespaces.chat.publishRate=1", "--set-string", "config.extraToml=[namespaces.chat]"],
     "namespaces"),
]

# Renders of NOTES.txt: (title, values files, extra args, whether the per-IP warning must appear).
NOTES_CASES = [
    ("defaults: no proxy, no warning", [], [], False),
    ("ingress on without trustedProxies: warning", [], ["--set", "ingress.enabled=true"], True),
    ("HTTPRoute on without trustedProxies: warning", [],
     ["--set", "httpRoute.enabled=true", "--set", "httpRoute.parentRefs[0].name=gw"], True),
    ("ingress on with trustedProxies: no warning", [],
     ["--set", "ingress.enabled=true", "--set", "config.trustedProxies={10.244.0.0/16}"], False),
    ("ingress on with the per-IP limit off: no warning", [],
     ["--set", "ingress.enabled=true", "--set", "config.maxConnectionsPerIpPerSecond=0"], False),
    ("all-features (ingress, trustedProxies set): no warning", ["ci/all-features-values.yaml"], [], False),
]


class Checker:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, fn):
        try:
            detail = fn()
        except AssertionError as e:
            self.failed += 1
            print("FAIL %s: %s" % (name, e), flush=True)
            return False
        except Exception as e:  # a crash in a check is a failed check, not a crashed run
            self.failed += 1
            print("FAIL %s: %s: %s" % (name, type(e).__name__, e), flush=True)
            return False
        self.passed += 1
        print("PASS %s%s" % (name, (" (%s)" % detail) if detail else ""), flush=True)
        return True


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def seconds(duration):
    """humantime subset used by the chart: 1h2m3s4ms -> seconds (float)."""
    total, pos = 0.0, 0
    for m in re.finditer(r"\s*([0-9]+)(ms|h|m|s)", duration):
        assert m.start() == pos, "cannot read duration %r" % duration
        n, unit = int(m.group(1)), m.group(2)
        total += n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
        pos = m.end()
    assert pos == len(duration) and pos > 0, "cannot read duration %r" % duration
    return total


# ---------------------------------------------------------------------------- chart
def helm_template(helm, files, extra=()):
    cmd = [helm, "template", "fanout-ci", CHART, "--namespace", "fanout-ci"]
    for f in files:
        cmd += ["-f", os.path.join(CHART, f)]
    cmd += list(extra)
    return run(cmd)


def render_notes(helm, files, extra=()):
    """NOTES.txt as `helm install` would print it. `helm template` skips NOTES.txt and
    `helm install --dry-run` needs a cluster, so a copy of the chart gets a template
    that renders the same text into a ConfigMap."""
    import shutil
    with tempfile.TemporaryDirectory() as tmp:
        chart = os.path.join(tmp, "fanout")
        shutil.copytree(CHART, chart, ignore=shutil.ignore_patterns("ci"))
        with open(os.path.join(CHART, "templates", "NOTES.txt")) as f:
            notes = f.read()
        assert "{{- define" not in notes and "{{ define" not in notes, "NOTES.txt defines templates"
        with open(os.path.join(chart, "templates", "zz-notes-check.yaml"), "w") as f:
            f.write('{{- define "fanout.notesCheck" }}' + notes + '{{- end }}\n'
                    'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-check\n'
                    'data:\n  NOTES.txt: {{ include "fanout.notesCheck" . | toJson }}\n')
        cmd = [helm, "template", "fanout-ci", chart, "--namespace", "fanout-ci",
               "--show-only", "templates/zz-notes-check.yaml"]
        for name in files:
            cmd += ["-f", os.path.join(CHART, name)]
        r = run(cmd + list(extra))
        assert r.returncode == 0, r.stderr.strip()[-1500:]
        return yaml.safe_load(r.stdout)["data"]["NOTES.txt"]


def pod_specs(docs):
    """(kind/name, pod spec) of every workload in the rendered docs."""
    for d in docs:
        if d["kind"] == "Pod":
            yield "Pod/" + d["metadata"]["name"], d["spec"]
        elif d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield d["kind"] + "/" + d["metadata"]["name"], d["spec"]["template"]["spec"]


def effective(pod, container, key):
    c = (container.get("securityContext") or {})
    if key in c:
        return c[key]
    return (pod.get("securityContext") or {}).get(key)


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, pred=lambda d: True):
    found = [d for d in by_kind(docs, kind) if pred(d)]
    assert len(found) == 1, "expected one %s, found %d" % (kind, len(found))
    return found[0]


def gateway(docs):
    return one(docs, "Deployment", lambda d: d["metadata"]["labels"].get("app.kubernetes.io/component") == "gateway")


def gateway_container(docs):
    cs = [c for c in gateway(docs)["spec"]["template"]["spec"]["containers"] if c["name"] == "fanout"]
    assert len(cs) == 1, "no container named fanout"
    return cs[0]


def rendered_toml(docs):
    dep = gateway(docs)
    vol = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"][0]
    cm = one(docs, "ConfigMap", lambda d: d["metadata"]["name"] == vol["configMap"]["name"])
    return cm, cm["data"]["fanout.toml"]


def deep_merge(base, over):
    out = dict(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def effective_values(files):
    """values.yaml with the scenario's files merged over it, as Helm does."""
    with open(os.path.join(CHART, "values.yaml")) as f:
        vals = yaml.safe_load(f)
    for name in files:
        with open(os.path.join(CHART, name)) as f:
            vals = deep_merge(vals, yaml.safe_load(f))
    return vals


def mounted_file(docs, path):
    """(volume, projected item or None) that puts `path` into the gateway container."""
    pod = gateway(docs)["spec"]["template"]["spec"]
    mounts = [m for m in gateway_container(docs)["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, "%s is on %d mounted volumes" % (path, len(mounts))
    assert "subPath" not in mounts[0], "%s is mounted with subPath: updates would never reach the pod" % path
    vol = [v for v in pod["volumes"] if v["name"] == mounts[0]["name"]][0]
    rel = path[len(mounts[0]["mountPath"].rstrip("/")) + 1:]
    src = vol.get("configMap") or vol.get("secret") or {}
    items = [i for i in src.get("items", []) if i["path"] == rel]
    return vol, (items[0] if items else None)


def chart_assertions(c, scenario, docs, values):
    """Assertions on one rendered scenario."""
    p = "[%s] " % scenario
    container = lambda: gateway_container(docs)

    def ports():
        named = {pt["name"]: pt["containerPort"] for pt in container()["ports"]}
        assert set(named) == {"ws", "internal"}, "container ports %r" % named
        return named

    def probes_internal():
        named = ports()
        ct = container()
        want = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
        for probe, path in want.items():
            assert probe in ct, "%s missing" % probe
            get = ct[probe]["httpGet"]
            port = named.get(get["port"], get["port"])
            assert port == named["internal"], "%s targets port %r, not the internal port" % (probe, get["port"])
            assert port != named["ws"], "%s targets the public port" % probe
            assert get["path"] == path, "%s path %s, want %s" % (probe, get["path"], path)
        return "liveness /healthz, readiness /readyz, startup /healthz on port %d" % named["internal"]
    c.check(p + "probes target the internal port", probes_internal)

    def config_file():
        ct = container()
        args = ct.get("args", [])
        assert args[:1] == ["serve"], "args do not start with serve: %r" % args
        i = args.index("--config")
        path = args[i + 1]
        mounts = {m["mountPath"]: m for m in ct["volumeMounts"]}
        assert os.path.dirname(path) in mounts, "%s is not on a mounted volume" % path
        cm, text = rendered_toml(docs)
        cfg = tomllib.loads(text)
        known = toml_keys()
        if known is not None:
            unknown = {k for k, v in cfg.items() if not isinstance(v, dict)} - known
            assert not unknown, "unknown TOML keys %s" % sorted(unknown)
        tables = {k for k, v in cfg.items() if isinstance(v, dict)}
        assert tables <= {"auth", "namespaces"}, "unknown TOML tables %s" % sorted(tables - {"auth", "namespaces"})
        bad_auth = set(cfg.get("auth", {})) - AUTH_KEYS
        assert not bad_auth, "unknown [auth] keys %s" % sorted(bad_auth)
        for name, rule in cfg.get("namespaces", {}).items():
            assert isinstance(rule, dict), "namespaces.%s is not a table" % name
            bad = set(rule) - NAMESPACE_KEYS
            assert not bad, "unknown [namespaces.%s] keys %s" % (json.dumps(name), sorted(bad))
        for k in ("public_addr", "internal_addr", "drain_timeout"):
            assert k in cfg, "%s missing from fanout.toml" % k
        assert cfg["internal_addr"].endswith(":%d" % ports()["internal"]), "internal_addr does not match the port"
        assert cfg["public_addr"].endswith(":%d" % ports()["ws"]), "public_addr does not match the port"
        return "%d keys, tables %s, --config %s" % (len(cfg) - len(tables), sorted(tables) or "none", path)
    c.check(p + "fanout.toml is valid TOML with known keys and tables, mounted and passed with --config", config_file)

    eff = effective_values(SCENARIOS[scenario])

    def limits():
        cfg = tomllib.loads(rendered_toml(docs)[1])
        for value, key in LIMIT_VALUES.items():
            want = eff["config"][value]
            if key == "trusted_proxies":
                want = list(want or [])
            else:
                want = float(want)
            assert cfg.get(key) == want, "%s = %r, want %r (config.%s)" % (key, cfg.get(key), want, value)
        return ", ".join("%s=%s" % (k, json.dumps(cfg[k])) for k in LIMIT_VALUES.values())
    c.check(p + "rate limits and trusted proxies rendered from config.*", limits)

    def auth_and_namespaces():
        cfg = tomllib.loads(rendered_toml(docs)[1])
        a, got = eff["auth"], cfg.get("auth")
        structured = bool(a["publicKey"]["secretName"] or a["publicKey"]["configMapName"] or a["jwks"]["configMapName"]
                          or a["algorithms"] or a["required"] is not None or a["leeway"] or a["jwks"]["reloadInterval"]
                          or a["audience"] or a["issuer"])
        extra = tomllib.loads(eff["config"].get("extraToml") or "")
        if not structured:
            assert got == extra.get("auth"), "[auth] %r although auth.* is empty (extraToml gives %r)" % (got, extra.get("auth"))
        else:
            assert got is not None, "auth.* is set but fanout.toml has no [auth]"
            for value, key in AUTH_VALUES.items():
                want = a[value]
                if want in (None, "", []):
                    assert key not in got, "[auth] %s rendered although auth.%s is empty" % (key, value)
                else:
                    assert got.get(key) == want, "[auth] %s = %r, want %r" % (key, got.get(key), want)
            if a["jwks"]["reloadInterval"]:
                assert got.get("jwks_reload_interval") == a["jwks"]["reloadInterval"], "jwks_reload_interval"
            sources = (("public_key_file", a["publicKey"]["secretName"] and ("secret", a["publicKey"]["secretName"])
                        or a["publicKey"]["configMapName"] and ("configMap", a["publicKey"]["configMapName"]),
                        a["publicKey"]["key"]),
                       ("jwks_file", a["jwks"]["configMapName"] and ("configMap", a["jwks"]["configMapName"]),
                        a["jwks"]["key"]))
            for key, src, item_key in sources:
                if not src:
                    assert key not in got, "[auth] %s without a source" % key
                    continue
                kind, name = src
                vol, item = mounted_file(docs, got.get(key, ""))
                assert kind in vol and vol[kind].get("name", vol[kind].get("secretName")) == name, \
                    "%s is not mounted from %s %s: %r" % (key, kind, name, vol)
                assert item and item["key"] == item_key, "%s: volume item %r, want key %s" % (key, item, item_key)
        want_ns = {}
        for name, rule in (eff.get("namespaces") or {}).items():
            want_ns[name] = {NAMESPACE_VALUES[k]: (float(v) if k == "publishRate" else v) for k, v in rule.items()}
        for name, rule in extra.get("namespaces", {}).items():
            want_ns[name] = rule
        assert cfg.get("namespaces", {}) == want_ns, "[namespaces] %r, want %r" % (cfg.get("namespaces"), want_ns)
        return "[auth] %s; namespaces %s" % (
            "from auth.*" if structured else ("from extraToml" if got else "none"),
            sorted(want_ns) or "none")
    c.check(p + "[auth] and [namespaces] tables match auth.*, namespaces and extraToml; key files mounted", auth_and_namespaces)

    def no_secrets_in_configmap():
        _, text = rendered_toml(docs)
        sec = values.get("secrets", {})
        for k in ("redisPassword", "apiKey", "jwtHmacSecret"):
            if sec.get(k):
                assert sec[k] not in text, "secrets.%s leaks into the ConfigMap" % k
        for k in ("redis_password", "api_key", "jwt_hmac_secret"):
            assert k not in tomllib.loads(text), "%s must come from the Secret, not the ConfigMap" % k
        env = {e["name"]: e for e in container().get("env", [])}
        for name in ("FANOUT_REDIS_PASSWORD", "FANOUT_API_KEY", "FANOUT_JWT_HMAC_SECRET"):
            if name in env:
                assert "secretKeyRef" in env[name].get("valueFrom", {}), "%s is not read from a Secret" % name
        return "credential env from Secret: %s" % (sorted(n for n in env if n.startswith("FANOUT_")) or "none set")
    c.check(p + "credentials only through Secret env vars", no_secrets_in_configmap)

    def grace():
        pod = gateway(docs)["spec"]["template"]["spec"]
        _, text = rendered_toml(docs)
        drain = seconds(tomllib.loads(text)["drain_timeout"])
        ct = container()
        # a flag or env var would override the file: take the effective value
        for e in ct.get("env", []):
            if e["name"] == "FANOUT_DRAIN_TIMEOUT":
                drain = seconds(e["value"])
        args = ct.get("args", [])
        for i, a in enumerate(args):
            if a == "--drain-timeout":
                drain = seconds(args[i + 1])
            elif a.startswith("--drain-timeout="):
                drain = seconds(a.split("=", 1)[1])
        pre = ct.get("lifecycle", {}).get("preStop", {})
        pre_s = 0
        if "sleep" in pre:
            pre_s = pre["sleep"]["seconds"]
        elif "exec" in pre:
            nums = [int(x) for x in pre["exec"]["command"] if str(x).isdigit()]
            pre_s = max(nums) if nums else 0
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        assert tgps > drain + pre_s, "terminationGracePeriodSeconds %s <= drain %ss + preStop %ss" % (tgps, drain, pre_s)
        return "%ss > drain %ss + preStop %ss" % (tgps, drain, pre_s)
    c.check(p + "terminationGracePeriodSeconds > drain timeout + preStop", grace)

    def prestop():
        mode = values.get("lifecycle", {}).get("preStop", {}).get("mode", "sleep")
        pre = container().get("lifecycle", {}).get("preStop")
        if mode == "none":
            assert pre is None, "preStop rendered although mode is none"
            return "none, as configured"
        assert pre and ("sleep" in pre or "exec" in pre), "no preStop sleep"
        return "preStop " + ("sleep action" if "sleep" in pre else "exec sleep")
    c.check(p + "preStop hook delays the drain", prestop)

    def checksum():
        ann = gateway(docs)["spec"]["template"]["metadata"].get("annotations", {})
        assert "checksum/config" in ann, "checksum/config annotation missing"
        _, text = rendered_toml(docs)
        want = hashlib.sha256(text.rstrip("\n").encode()).hexdigest()
        assert ann["checksum/config"] == want, "checksum/config does not match the ConfigMap content"
        return ann["checksum/config"][:12]
    c.check(p + "checksum/config annotation matches fanout.toml", checksum)

    def pod_security():
        seen = 0
        for name, pod in pod_specs(docs):
            assert pod.get("automountServiceAccountToken") is False, "%s mounts a service account token" % name
            for ct in pod.get("initContainers", []) + pod["containers"]:
                where = "%s container %s" % (name, ct["name"])
                assert effective(pod, ct, "runAsNonRoot") is True, where + ": runAsNonRoot is not true"
                assert effective(pod, ct, "runAsUser") not in (0, "0"), where + ": runs as uid 0"
                sc = ct.get("securityContext") or {}
                assert sc.get("readOnlyRootFilesystem") is True, where + ": root filesystem writable"
                assert sc.get("allowPrivilegeEscalation") is False, where + ": privilege escalation allowed"
                assert sc.get("privileged") in (None, False), where + ": privileged"
                assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), where + ": capabilities not dropped"
                sp = effective(pod, ct, "seccompProfile") or {}
                assert sp.get("type") == "RuntimeDefault", where + ": no RuntimeDefault seccomp profile"
                seen += 1
        assert seen >= 2, "expected the gateway and the test pod at least"
        return "%d containers: non-root, read-only root fs, no escalation, drop ALL, seccomp" % seen
    c.check(p + "no container runs as root; hardened security contexts", pod_security)

    def services():
        svcs = {d["metadata"]["name"]: d for d in by_kind(docs, "Service")}
        dep = gateway(docs)
        sel = dep["spec"]["selector"]["matchLabels"]
        pub = [s for s in svcs.values() if any(pt["name"] == "ws" for pt in s["spec"]["ports"])]
        internal = [s for s in svcs.values() if any(pt["name"] == "internal" for pt in s["spec"]["ports"])]
        assert len(pub) == 1 and len(internal) == 1, "want one public and one internal Service"
        pub, internal = pub[0], internal[0]
        assert [pt["targetPort"] for pt in pub["spec"]["ports"]] == ["ws"], "public Service exposes more than ws"
        assert [pt["targetPort"] for pt in internal["spec"]["ports"]] == ["internal"], "internal Service exposes more"
        assert internal["spec"]["type"] == "ClusterIP", "internal Service is not ClusterIP"
        for s in (pub, internal):
            assert s["spec"]["selector"] == sel, "%s does not select the gateway pods" % s["metadata"]["name"]
        return "%s:%d (ws), %s:%d (internal)" % (pub["metadata"]["name"], pub["spec"]["ports"][0]["port"],
                                                 internal["metadata"]["name"], internal["spec"]["ports"][0]["port"])
    c.check(p + "public Service (ws) and internal ClusterIP Service", services)

    def service_account():
        sa_name = gateway(docs)["spec"]["template"]["spec"]["serviceAccountName"]
        sa = one(docs, "ServiceAccount", lambda d: d["metadata"]["name"] == sa_name)
        assert sa.get("automountServiceAccountToken") is False, "ServiceAccount automounts its token"
        return sa_name
    c.check(p + "ServiceAccount without token automount", service_account)

    def helm_test_pod():
        pods = [d for d in by_kind(docs, "Pod") if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
        assert len(pods) == 1, "expected one helm test pod"
        ct = pods[0]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in ct["env"]}
        svcs = {d["metadata"]["name"]: d for d in by_kind(docs, "Service")}
        pub = [s for s in svcs.values() if any(pt["name"] == "ws" for pt in s["spec"]["ports"])][0]
        internal = [s for s in svcs.values() if any(pt["name"] == "internal" for pt in s["spec"]["ports"])][0]
        assert env["WS_URL"].startswith("ws://%s." % pub["metadata"]["name"]), env["WS_URL"]
        assert env["WS_URL"].endswith(":%d/ws" % pub["spec"]["ports"][0]["port"]), env["WS_URL"]
        assert env["API_URL"].startswith("http://%s." % internal["metadata"]["name"]), env["API_URL"]
        script = ct["args"][0]
        compile(script, "ws-smoke-test.py", "exec")
        assert '"op": "subscribe"' in script and "/api/publish" in script, "test script does not do the round trip"
        with open(os.path.join(CHART, "files", "ws-smoke-test.py")) as f:
            assert script == f.read(), "test pod script differs from files/ws-smoke-test.py"
        return env["WS_URL"]
    c.check(p + "helm test pod subscribes on the public and publishes on the internal Service", helm_test_pod)

    if values.get("defaultTopologySpread", True) or values.get("topologySpreadConstraints"):
        def spread():
            tsc = gateway(docs)["spec"]["template"]["spec"].get("topologySpreadConstraints")
            assert tsc, "no topologySpreadConstraints"
            return ", ".join(t["topologyKey"] for t in tsc)
        c.check(p + "topology spread constraints", spread)

    redis = values.get("redis", {})
    bundled = redis.get("enabled", True)

    def broker():
        cfg = tomllib.loads(rendered_toml(docs)[1])
        redis_deps = [d for d in by_kind(docs, "Deployment") if d["metadata"]["labels"].get("app.kubernetes.io/component") == "redis"]
        assert cfg.get("redis_cluster") == bool(redis.get("cluster")), "redis_cluster %r" % cfg.get("redis_cluster")
        if redis.get("shards"):
            assert cfg.get("redis_shards") == redis["shards"], "redis_shards %r" % cfg.get("redis_shards")
            assert "redis_url" not in cfg and not redis_deps, "redis_url or the bundled Redis next to redis.shards"
            return "%d shards" % len(cfg["redis_shards"])
        if redis.get("url"):
            assert cfg.get("redis_url") == redis["url"], "redis_url %r" % cfg.get("redis_url")
            assert not redis_deps, "bundled Redis rendered although redis.url is set"
            return "external " + cfg["redis_url"] + (" (cluster)" if cfg["redis_cluster"] else "")
        if bundled:
            assert len(redis_deps) == 1, "bundled Redis missing"
            svc = one(docs, "Service", lambda d: d["metadata"]["labels"].get("app.kubernetes.io/component") == "redis")
            assert cfg.get("redis_url") == "redis://%s:6379" % svc["metadata"]["name"], cfg.get("redis_url")
            return "bundled " + cfg["redis_url"]
        assert "redis_url" not in cfg and not redis_deps, "expected the embedded broker"
        assert gateway(docs)["spec"].get("replicas") == 1, "embedded broker with more than one replica"
        return "embedded broker, 1 replica"
    c.check(p + "broker wiring", broker)

    pdb_on = values.get("podDisruptionBudget", {}).get("enabled", True)
    if pdb_on:
        def pdb():
            d = one(docs, "PodDisruptionBudget")
            assert d["spec"]["selector"]["matchLabels"] == gateway(docs)["spec"]["selector"]["matchLabels"]
            return "minAvailable %s" % d["spec"]["minAvailable"] if "minAvailable" in d["spec"] else \
                "maxUnavailable %s" % d["spec"]["maxUnavailable"]
        c.check(p + "PodDisruptionBudget selects the gateway", pdb)


def all_features_assertions(c, docs):
    p = "[all-features] "

    def kinds():
        have = {d["kind"] for d in docs}
        want = {"Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount", "HorizontalPodAutoscaler",
                "PodDisruptionBudget", "Ingress", "HTTPRoute", "ServiceMonitor", "PrometheusRule",
                "NetworkPolicy", "Pod"}
        assert want <= have, "missing kinds %s" % sorted(want - have)
        return ", ".join(sorted(have))
    c.check(p + "every optional object rendered", kinds)

    def hpa():
        h = one(docs, "HorizontalPodAutoscaler")
        assert h["spec"]["scaleTargetRef"]["name"] == gateway(docs)["metadata"]["name"]
        assert "replicas" not in gateway(docs)["spec"], "Deployment sets replicas while the HPA owns them"
        types = {m["type"]: m for m in h["spec"]["metrics"]}
        assert types["Resource"]["resource"]["name"] == "cpu"
        assert types["Pods"]["pods"]["metric"]["name"] == "fanout_connections"
        return "cpu + Pods fanout_connections, %d..%d" % (h["spec"]["minReplicas"], h["spec"]["maxReplicas"])
    c.check(p + "HPA on CPU and fanout_connections", hpa)

    def routes():
        pub = [s for s in by_kind(docs, "Service") if any(pt["name"] == "ws" for pt in s["spec"]["ports"])][0]
        ing = one(docs, "Ingress")
        backends = [pth["backend"]["service"] for r in ing["spec"]["rules"] for pth in r["http"]["paths"]]
        assert all(b["name"] == pub["metadata"]["name"] and b["port"] == {"name": "ws"} for b in backends), backends
        route = one(docs, "HTTPRoute")
        refs = [b for r in route["spec"]["rules"] for b in r["backendRefs"]]
        assert refs == [{"name": pub["metadata"]["name"], "port": pub["spec"]["ports"][0]["port"]}], refs
        assert route["spec"]["parentRefs"], "HTTPRoute without parentRefs"
        return "Ingress + HTTPRoute -> %s" % pub["metadata"]["name"]
    c.check(p + "Ingress and HTTPRoute point at the public Service", routes)

    def monitoring():
        sm = one(docs, "ServiceMonitor")
        internal = [s for s in by_kind(docs, "Service") if any(pt["name"] == "internal" for pt in s["spec"]["ports"])][0]
        labels = internal["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()), \
            "ServiceMonitor does not select the internal Service"
        public = [s for s in by_kind(docs, "Service") if any(pt["name"] == "ws" for pt in s["spec"]["ports"])][0]
        assert not all(public["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()), \
            "ServiceMonitor also selects the public Service"
        assert [e["port"] for e in sm["spec"]["endpoints"]] == ["internal"]
        assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
        with open(os.path.join(CHART, "files", "alerts.yml")) as f:
            rules = yaml.safe_load(f)
        pr = one(docs, "PrometheusRule")
        assert pr["spec"] == rules, "PrometheusRule differs from files/alerts.yml"
        cm = one(docs, "ConfigMap", lambda d: "fanout-dashboard.json" in d.get("data", {}))
        assert cm["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboard ConfigMap lacks grafana_dashboard=1"
        with open(os.path.join(CHART, "files", "fanout-dashboard.json")) as f:
            assert json.loads(cm["data"]["fanout-dashboard.json"]) == json.load(f), "dashboard differs from the file"
        return "ServiceMonitor(internal /metrics), PrometheusRule(%d groups), dashboard ConfigMap" % len(rules["groups"])
    c.check(p + "ServiceMonitor, PrometheusRule and dashboard reuse the chart files", monitoring)

    def netpol():
        pols = by_kind(docs, "NetworkPolicy")
        gw = [p for p in pols if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "gateway"]
        assert len(gw) == 1, "no NetworkPolicy for the gateway"
        rules = gw[0]["spec"]["ingress"]
        internal = [r for r in rules if r["ports"][0]["port"] == "internal"][0]
        assert internal.get("from"), "internal port open to everyone"
        return "%d policies" % len(pols)
    c.check(p + "NetworkPolicy restricts the internal port", netpol)

    def secret():
        s = one(docs, "Secret")
        env = {e["name"]: e for e in gateway_container(docs)["env"]}
        for name in ("FANOUT_REDIS_PASSWORD", "FANOUT_API_KEY", "FANOUT_JWT_HMAC_SECRET"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == s["metadata"]["name"] and ref["key"] in s["data"], name
        ann = gateway(docs)["spec"]["template"]["metadata"]["annotations"]
        assert "checksum/secret" in ann, "pods do not roll when the chart's Secret changes"
        return "3 keys, checksum/secret"
    c.check(p + "chart-created Secret feeds the env vars", secret)


def check_chart(c, helm, kv):
    for name, files in SCENARIOS.items():
        args = [helm, "lint", CHART, "--strict"]
        for f in files:
            args += ["-f", os.path.join(CHART, f)]
        args += EXTRA_SET

        def lint(args=args):
            r = run(args)
            assert r.returncode == 0, (r.stdout + r.stderr).strip()[-1500:]
            return "0 chart(s) failed" if "0 chart(s) failed" in r.stdout else None
        c.check("[%s] helm lint --strict" % name, lint)

    rendered = {}
    for name, files in SCENARIOS.items():
        def template(name=name, files=files):
            r = helm_template(helm, files, EXTRA_SET)
            assert r.returncode == 0, r.stderr.strip()[-1500:]
            docs = [d for d in yaml.safe_load_all(r.stdout) if d]
            assert docs, "nothing rendered"
            rendered[name] = docs
            return "%d objects" % len(docs)
        c.check("[%s] helm template" % name, template)

    for name, docs in rendered.items():
        for version in KUBE_VERSIONS:
            def validate(docs=docs, version=version):
                skipped, ok = [], 0
                for d in docs:
                    if d["kind"] in CRD_KINDS:
                        skipped.append(d["kind"])
                        continue
                    try:
                        kv.validate(d, version, strict=True)
                    except kv.ValidationError as e:
                        path = ".".join(str(x) for x in e.path)
                        raise AssertionError("%s/%s: %s: %s" % (d["kind"], d["metadata"]["name"], path, e.message))
                    except kv.SchemaNotFoundError as e:
                        raise AssertionError(e.message)
                    ok += 1
                return "%d objects valid%s" % (ok, ", skipped CRDs " + ",".join(sorted(skipped)) if skipped else "")
            c.check("[%s] kubernetes-validate --strict %s" % (name, version), validate)

    for name, docs in rendered.items():
        values = {}
        for f in SCENARIOS[name]:
            with open(os.path.join(CHART, f)) as fh:
                values.update(yaml.safe_load(fh) or {})
        chart_assertions(c, name, docs, values)
    if "all-features" in rendered:
        all_features_assertions(c, rendered["all-features"])

    for title, args, needle in MUST_FAIL:
        def refuse(args=args, needle=needle):
            r = helm_template(helm, [], args)
            assert r.returncode != 0, "helm template accepted it"
            assert needle in r.stderr, "refused, but without mentioning %s: %s" % (needle, r.stderr.strip()[-300:])
            return [l for l in r.stderr.splitlines() if needle in l][0].strip()[:160]
        c.check("chart refuses: " + title, refuse)

    for title, files, args, warned in NOTES_CASES:
        def notes(files=files, args=args, warned=warned):
            text = render_notes(helm, files, args)
            if warned:
                assert PER_IP_WARNING in text, "no per-IP warning in NOTES.txt:\n" + text
                block = text[text.index(PER_IP_WARNING):]
                for must in ("config.trustedProxies", "config.maxConnectionsPerIpPerSecond=0", "429"):
                    assert must in block, "the warning does not mention %s" % must
                return "warns, names trustedProxies and maxConnectionsPerIpPerSecond=0"
            assert "WARNING" not in text, "unexpected warning in NOTES.txt:\n" + text
            return "no warning"
        c.check("NOTES.txt: " + title, notes)

    def packaged():
        with tempfile.TemporaryDirectory() as tmp:
            r = run([helm, "package", CHART, "-d", tmp])
            assert r.returncode == 0, r.stderr
            tgz = [f for f in os.listdir(tmp) if f.endswith(".tgz")][0]
            r = run(["tar", "tzf", os.path.join(tmp, tgz)])
            names = set(r.stdout.split())
            for f in ("fanout/files/alerts.yml", "fanout/files/fanout-dashboard.json", "fanout/files/ws-smoke-test.py",
                      "fanout/values.schema.json", "fanout/README.md"):
                assert f in names, "%s missing from the package" % f
            assert not any(n.startswith("fanout/ci/") for n in names), "ci/ files packaged"
            return tgz
    c.check("helm package carries files/, schema and README, not ci/", packaged)

    def readme_documents_values():
        with open(os.path.join(CHART, "values.yaml")) as f:
            vals = yaml.safe_load(f)
        with open(os.path.join(CHART, "README.md")) as f:
            readme = f.read()
        with open(os.path.join(CHART, "values.schema.json")) as f:
            schema = json.load(f)
        missing_doc, missing_schema = [], []

        def walk(v, path, sch):
            for k, sub in v.items():
                key = path + k
                props = (sch or {}).get("properties", {})
                if k not in props:
                    missing_schema.append(key)
                if isinstance(sub, dict) and sub and props.get(k, {}).get("properties") \
                        and props[k].get("additionalProperties") is False:
                    walk(sub, key + ".", props[k])
                elif "`%s`" % key not in readme:
                    missing_doc.append(key)
        walk(vals, "", schema)
        assert not missing_schema, "not in values.schema.json: %s" % missing_schema
        assert not missing_doc, "not in README.md: %s" % missing_doc
        return "every value in README.md and values.schema.json"
    c.check("values documented in README.md and typed in values.schema.json", readme_documents_values)


# ---------------------------------------------------------------------------- PromQL
def promql_metrics(expr):
    import promql_parser
    names = set()

    def walk(node):
        if node is None:
            return
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in getattr(node.matchers, "matchers", []) or []:
                if m.name == "__name__":
                    names.add(m.value)
            return
        if isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector if hasattr(node, "vector_selector") else node.vs)
            return
        for attr in ("expr", "lhs", "rhs", "param"):
            walk(getattr(node, attr, None))
        for arg in getattr(node, "args", None) or []:
            walk(arg)
    walk(promql_parser.parse(expr))
    return names


def grafana_to_promql(expr):
    """Replaces Grafana variables so the expression parses as PromQL."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def check_monitoring(c, promtool):
    alerts_path = os.path.join(CHART, "files", "alerts.yml")
    dash_path = os.path.join(CHART, "files", "fanout-dashboard.json")

    def rules_structure():
        with open(alerts_path) as f:
            doc = yaml.safe_load(f)
        assert list(doc) == ["groups"], "top level must be groups only (it becomes a PrometheusRule spec)"
        names = []
        for g in doc["groups"]:
            assert g.get("name") and g.get("rules"), "group without name or rules"
            for r in g["rules"]:
                assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r.keys()
                assert r.get("alert") and r.get("expr"), "rule without alert/expr"
                assert r["labels"].get("severity") in ("critical", "warning", "info"), r["alert"] + ": severity"
                assert r["annotations"].get("summary") and r["annotations"].get("description"), r["alert"]
                names.append(r["alert"])
        assert len(names) == len(set(names)), "duplicate alert names"
        with open(os.path.join(ROOT, "docs", "operations.md")) as f:
            ops = f.read()
        undocumented = [n for n in names if n not in ops]
        assert not undocumented, "alerts not explained in docs/operations.md: %s" % undocumented
        return "%d alerts, all explained in docs/operations.md" % len(names)
    c.check("alerts.yml structure (groups, severity, summary, description, documented)", rules_structure)

    def rules_metrics():
        with open(alerts_path) as f:
            doc = yaml.safe_load(f)
        used = set()
        for g in doc["groups"]:
            for r in g["rules"]:
                names = promql_metrics(r["expr"])
                bad = names - ALLOWED_METRICS
                assert not bad, "%s uses unknown metrics %s" % (r["alert"], sorted(bad))
                used |= names
        return "%d distinct metrics" % len(used)
    c.check("alert expressions parse and use only exported metrics", rules_metrics)

    if promtool:
        def promtool_rules():
            r = run([promtool, "check", "rules", alerts_path])
            assert r.returncode == 0, (r.stdout + r.stderr)[-1500:]
            return r.stdout.strip().splitlines()[-1].strip()
        c.check("promtool check rules", promtool_rules)

        def promtool_tests():
            r = run([promtool, "test", "rules", os.path.join(CHART, "ci", "alerts.test.yml")])
            assert r.returncode == 0, (r.stdout + r.stderr)[-2500:]
            return "unit tests pass"
        c.check("promtool test rules (alert unit tests)", promtool_tests)

        def promtool_config():
            r = run([promtool, "check", "config", os.path.join(DEPLOY, "prometheus", "prometheus.yml")])
            assert r.returncode == 0, (r.stdout + r.stderr)[-1500:]
            return "valid, rule file found"
        c.check("promtool check config deploy/prometheus/prometheus.yml", promtool_config)

    def dashboard():
        with open(dash_path) as f:
            d = json.load(f)
        ids, exprs, titles = set(), [], []
        occupied = set()
        for p in d["panels"]:
            assert p["id"] not in ids, "duplicate panel id %s" % p["id"]
            ids.add(p["id"])
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, "panel %r wider than the grid" % p["title"]
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in occupied, "panel %r overlaps another" % p["title"]
                    occupied.add((x, y))
            titles.append(p["title"])
            if p["type"] != "row":
                assert p.get("datasource", {}).get("uid") == "${datasource}", "%r: datasource not templated" % p["title"]
                assert p.get("targets"), "%r has no query" % p["title"]
                exprs += [(p["title"], t["expr"]) for t in p["targets"]]
        kinds = {p["type"] for p in d["panels"]}
        assert "heatmap" in kinds, "no heatmap panel"
        used = set()
        for title, e in exprs:
            names = promql_metrics(grafana_to_promql(e))
            bad = names - ALLOWED_METRICS
            assert not bad, "%r uses unknown metrics %s" % (title, sorted(bad))
            used |= names
        needed = {"fanout_connections", "fanout_subscriptions", "fanout_deliveries_total",
                  "fanout_delivery_latency_seconds_bucket", "fanout_slow_consumer_disconnects_total",
                  "fanout_broker_up", "fanout_broker_reconnects_total", "fanout_publications_total",
                  "fanout_publications_dropped_total", "process_resident_memory_bytes", "process_cpu_seconds_total"}
        assert needed <= used, "dashboard lacks %s" % sorted(needed - used)
        return "%d panels, %d queries, %d metrics" % (len(d["panels"]), len(exprs), len(used))
    c.check("dashboard JSON: layout, templated datasource, PromQL with exported metrics only", dashboard)


# ---------------------------------------------------------------------------- deploy/
def check_deploy(c, compose_schema):
    def single_copies():
        for link, target in (("grafana/fanout-dashboard.json", "files/fanout-dashboard.json"),
                             ("prometheus/alerts.yml", "files/alerts.yml")):
            path = os.path.join(DEPLOY, link)
            assert os.path.islink(path), "deploy/%s is not a symlink" % link
            assert os.path.realpath(path) == os.path.realpath(os.path.join(CHART, target)), \
                "deploy/%s does not point at helm/fanout/%s" % (link, target)
        return "deploy/ links to helm/fanout/files/"
    c.check("dashboard and alert rules exist once (deploy/ symlinks into the chart)", single_copies)

    def compose():
        with open(os.path.join(DEPLOY, "compose.yaml")) as f:
            doc = yaml.safe_load(f)
        svcs = doc["services"]
        nodes = ["fanout-1", "fanout-2", "fanout-3"]
        for want in ["redis", "lb", "prometheus", "grafana"] + nodes:
            assert want in svcs, "service %s missing" % want
        for n in nodes:
            s = svcs[n]
            assert s["command"] == ["serve", "--redis-url", "redis://redis:6379"], "%s command %r" % (n, s["command"])
            assert s["build"]["dockerfile"] == "deploy/Dockerfile"
            assert os.path.exists(os.path.join(DEPLOY, s["build"]["context"], s["build"]["dockerfile"]))
            assert "/readyz" in " ".join(s["healthcheck"]["test"]), "%s healthcheck is not readiness" % n
            grace = seconds(s["stop_grace_period"])
            drain = seconds(s.get("environment", {}).get("FANOUT_DRAIN_TIMEOUT", "30s"))
            assert grace > drain, "%s stop_grace_period %s <= drain %s" % (n, grace, drain)
        for name, s in svcs.items():
            for v in s.get("volumes", []):
                src = v.split(":")[0]
                if src.startswith("."):
                    assert os.path.exists(os.path.join(DEPLOY, src)), "%s mounts missing %s" % (name, src)
        with open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")) as f:
            prom = yaml.safe_load(f)
        targets = {t for sc in prom["scrape_configs"] for st in sc["static_configs"] for t in st["targets"]}
        assert targets == {n + ":9090" for n in nodes}, "Prometheus targets %s" % sorted(targets)
        assert all(sc.get("metrics_path", "/metrics") == "/metrics" for sc in prom["scrape_configs"])
        with open(os.path.join(DEPLOY, "haproxy", "haproxy.cfg")) as f:
            lb = f.read()
        for n in nodes:
            assert re.search(r"server %s %s:8080\b" % (n, n), lb), "LB does not proxy to %s:8080" % n
        assert "check port 9090" in lb and "uri /readyz" in lb, "LB does not health-check /readyz on 9090"
        assert re.search(r"timeout tunnel", lb), "no tunnel timeout for WebSockets"
        assert re.search(r"path /ws", lb), "LB does not route /ws"
        return "%d services; nodes, LB, Prometheus targets consistent" % len(svcs)
    c.check("deploy/compose.yaml structure, LB and scrape config", compose)

    if compose_schema:
        def compose_schema_check():
            import jsonschema
            with open(compose_schema) as f:
                schema = json.load(f)
            with open(os.path.join(DEPLOY, "compose.yaml")) as f:
                doc = yaml.safe_load(f)
            # This schema predates the top-level `name` key; check it by hand.
            assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", doc.pop("name", "fanout")), "bad project name"
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
            assert not errors, "; ".join("%s: %s" % ("/".join(map(str, e.path)), e.message[:160]) for e in errors[:5])
            return "valid against the compose-spec JSON schema"
        c.check("deploy/compose.yaml against the compose-spec schema", compose_schema_check)

    def dockerfile():
        with open(os.path.join(DEPLOY, "Dockerfile")) as f:
            text = re.sub(r"\\\n", " ", f.read())
        lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
        stages, cur = [], None
        for l in lines:
            op, _, rest = l.partition(" ")
            if op.upper() == "FROM":
                cur = {"from": rest, "lines": []}
                stages.append(cur)
            elif cur is not None:
                cur["lines"].append((op.upper(), rest.strip()))
        assert len(stages) >= 2, "not multi-stage"
        build = [r for s in stages for op, r in s["lines"] if op == "RUN" and "cargo build" in r]
        assert build and all(x in build[0] for x in ("--release", "--locked", "-p fanout-server")), "cargo build line"
        final = stages[-1]
        ops = dict((op, r) for op, r in final["lines"])
        user = ops.get("USER", "root").split(":")[0]
        assert user not in ("", "root", "0"), "final stage runs as root"
        assert set(ops.get("EXPOSE", "").split()) == {"8080", "9090"}, "EXPOSE %r" % ops.get("EXPOSE")
        assert "HEALTHCHECK" in ops and "/healthz" in ops["HEALTHCHECK"], "no HEALTHCHECK on /healthz"
        entry = json.loads(ops["ENTRYPOINT"])[0]
        copies = [r for op, r in final["lines"] if op == "COPY"]
        assert any(r.endswith(" " + entry) for r in copies), "ENTRYPOINT %s is not the copied binary" % entry
        for s in stages[1:]:
            if not any(op == "USER" for op, _ in s["lines"]):
                raise AssertionError("stage %s has no USER" % s["from"])
        with open(os.path.join(ROOT, ".dockerignore")) as f:
            ignored = f.read().split()
        assert "target/" in ignored and ".git/" in ignored, ".dockerignore lacks target/ or .git/"
        return "%d stages, final %s as %s" % (len(stages), final["from"].split()[0], ops["USER"])
    c.check("deploy/Dockerfile: locked release build, non-root runtime, ports, HEALTHCHECK", dockerfile)

    def build_context():
        """Copies what `docker build .` would send (honouring .dockerignore) and asks
        cargo whether the workspace is complete in it."""
        import fnmatch
        import shutil
        cargo = shutil.which("cargo")
        with open(os.path.join(ROOT, ".dockerignore")) as f:
            patterns = [l.strip().rstrip("/") for l in f if l.strip() and not l.startswith("#")]

        def ignored(rel):
            for pat in patterns:
                if fnmatch.fnmatch(rel, pat) or (pat.startswith("**/") and fnmatch.fnmatch(os.path.basename(rel), pat[3:])):
                    return True
            return False
        with open(os.path.join(ROOT, "Cargo.toml"), "rb") as f:
            ws = tomllib.load(f)["workspace"]
        import glob
        members = [m for pat in ws.get("members", []) for m in glob.glob(os.path.join(ROOT, pat))]
        for m in members:
            rel = os.path.relpath(m, ROOT)
            assert not ignored(rel), ".dockerignore drops workspace member %s" % rel
        if not cargo:
            return "%d workspace members kept (cargo not found, metadata not checked)" % len(members)
        with tempfile.TemporaryDirectory() as tmp:
            for dirpath, dirnames, filenames in os.walk(ROOT):
                rel_dir = os.path.relpath(dirpath, ROOT)
                dirnames[:] = [d for d in dirnames
                               if not ignored(os.path.normpath(os.path.join(rel_dir, d)))]
                for fn in filenames:
                    rel = os.path.normpath(os.path.join(rel_dir, fn))
                    if ignored(rel) or os.path.islink(os.path.join(dirpath, fn)):
                        continue
                    os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
                    shutil.copy2(os.path.join(dirpath, fn), os.path.join(tmp, rel))
            r = run([cargo, "metadata", "--no-deps", "--format-version", "1", "--offline"], cwd=tmp)
            assert r.returncode == 0, "cargo cannot load the workspace from the build context: " + r.stderr[-600:]
            pkgs = [p["name"] for p in json.loads(r.stdout)["packages"]]
            assert "fanout-server" in pkgs, "fanout-server not in the build context's workspace"
            return "%d packages load from the context" % len(pkgs)
    c.check("docker build context (.dockerignore) keeps the whole Cargo workspace", build_context)


# ---------------------------------------------------------------------------- real binary
def find_binary():
    """The gateway binary to run the rendered config through: $FANOUT_BIN, else the
    newest of target/{release,debug}/fanout; None when nothing is built."""
    if os.environ.get("FANOUT_BIN"):
        return os.environ["FANOUT_BIN"]
    found = [p for p in (os.path.join(ROOT, "target", d, "fanout") for d in ("release", "debug"))
             if os.access(p, os.X_OK)]
    return max(found, key=os.path.getmtime) if found else None


class Node:
    """One `fanout serve` process on loopback ports 0."""

    def __init__(self, binary, config_text, env=None, extra=()):
        import time
        self.tmp = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        self.tmp.write(config_text)
        self.tmp.close()
        self.log = tempfile.TemporaryFile("w+")
        clean = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
        clean.update(env or {})
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", self.tmp.name, "--public-addr", "127.0.0.1:0",
             "--internal-addr", "127.0.0.1:0", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=clean)
        self.public = self.internal = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.proc.poll() is None:
            m = re.search(r"listening public=(\S+?) internal=(\S+?)(?:\"|\s|$)", self.output())
            if m:
                self.public, self.internal = m.group(1), m.group(2)
                break
            time.sleep(0.1)

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def get(self, path):
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen("http://%s%s" % (self.internal, path), timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def wait_ready(self, seconds=15):
        import time
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.get("/readyz") == 200:
                return True
            time.sleep(0.2)
        return False

    def stop(self, timeout):
        """SIGTERM; returns the exit code (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            os.unlink(self.tmp.name)


def check_binary(c, helm):
    binary = find_binary()
    if not binary:
        print("SKIP real-binary checks: no fanout binary (build it, or set FANOUT_BIN)", flush=True)
        return
    print("note: real-binary checks use %s" % binary, flush=True)

    keys_dir = tempfile.TemporaryDirectory()
    material = {}

    def key_material():
        """A throw-away RSA key (its JWKS stands in for auth.jwks' ConfigMap) and an EC
        P-256 public key (for auth.publicKey's Secret), made with openssl."""
        if not material:
            d = keys_dir.name
            rsa, ec = os.path.join(d, "rsa.pem"), os.path.join(d, "ec.pem")
            for cmd in (["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", rsa],
                        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", ec]):
                r = run(cmd)
                assert r.returncode == 0, "openssl is needed for the [auth] key files: %s" % r.stderr[-300:]
            mod = run(["openssl", "rsa", "-in", rsa, "-noout", "-modulus"]).stdout.strip().split("=", 1)[1]
            material["rsa_key"] = rsa
            material["jwks_file"] = json.dumps({"keys": [{"kty": "RSA", "kid": "ci-rsa", "use": "sig", "alg": "RS256",
                                                          "n": b64url(bytes.fromhex(mod)), "e": "AQAB"}]})
            material["public_key_file"] = run(["openssl", "ec", "-in", ec, "-pubout"]).stdout
            assert "BEGIN PUBLIC KEY" in material["public_key_file"], "openssl ec -pubout failed"
        return material

    def node_inputs(files, extra=(), embedded=False):
        """The rendered fanout.toml with its [auth] key files replaced by local copies
        holding test keys (after checking the chart mounts them), and the Secret env
        vars with test values. embedded: drop redis_url (and the Redis password)."""
        r = helm_template(helm, files, EXTRA_SET + list(extra))
        assert r.returncode == 0, r.stderr.strip()[-800:]
        docs = [d for d in yaml.safe_load_all(r.stdout) if d]
        _, text = rendered_toml(docs)
        auth = tomllib.loads(text).get("auth", {})
        for key in ("public_key_file", "jwks_file"):
            if key in auth:
                vol, item = mounted_file(docs, auth[key])
                assert ("configMap" in vol or "secret" in vol) and item, \
                    "%s (%s) is not a projected ConfigMap/Secret item: %r" % (key, auth[key], vol)
                local = os.path.join(keys_dir.name, key)
                with open(local, "w") as f:
                    f.write(key_material()[key])
                assert json.dumps(auth[key]) in text
                text = text.replace(json.dumps(auth[key]), json.dumps(local))
        env = {}
        for e in gateway_container(docs).get("env", []):
            if "secretKeyRef" in e.get("valueFrom", {}):
                env[e["name"]] = "ci-" + e["name"].lower()
        if embedded:
            text = "\n".join(l for l in text.splitlines() if not l.startswith("redis_url"))
            env.pop("FANOUT_REDIS_PASSWORD", None)
        return text, env

    for name, files in SCENARIOS.items():
        def accepts(files=files):
            text, secrets = node_inputs(files)
            node = Node(binary, text, secrets)
            try:
                assert node.public, "did not start listening: %s" % node.output()[-800:]
                status = node.get("/healthz")
                assert status == 200, "/healthz answered %s" % status
            finally:
                code = node.stop(timeout=seconds(tomllib.loads(text)["drain_timeout"]) + 5)
            assert code == 0, "exit code %s after SIGTERM: %s" % (code, node.output()[-800:])
            tables = sorted(k for k, v in tomllib.loads(text).items() if isinstance(v, dict))
            return "listened, /healthz 200, exit 0 on SIGTERM; tables %s" % (", ".join(tables) or "none")
        c.check("[%s] the gateway accepts the rendered fanout.toml" % name, accepts)

    def auth_enforced():
        """all-features: the rendered [auth] (JWKS from the ConfigMap, audience, issuer)
        and [namespaces."chat"/"public"] rules are what a real node applies."""
        import time
        values = effective_values(SCENARIOS["all-features"])
        text, env = node_inputs(SCENARIOS["all-features"], embedded=True)
        now = int(time.time())
        claims = {"sub": "alice", "exp": now + 300, "aud": values["auth"]["audience"],
                  "iss": values["auth"]["issuer"], "subscribe": ["chat:*", "public:*"], "publish": ["chat:*", "public:*"]}
        rs = lambda c: jwt_rs256(c, key_material()["rsa_key"], "ci-rsa")
        node = Node(binary, text, env)
        try:
            assert node.public, "did not start: %s" % node.output()[-800:]
            statuses = {
                "no token": upgrade_status(node.public),
                "RS256 (JWKS)": upgrade_status(node.public, token=rs(claims)),
                "HS256 (secret)": upgrade_status(node.public, token=jwt_hs256(claims, env["FANOUT_JWT_HMAC_SECRET"])),
                "wrong aud": upgrade_status(node.public, token=rs(dict(claims, aud="someone-else"))),
                "wrong iss": upgrade_status(node.public, token=rs(dict(claims, iss="https://evil.example"))),
            }
            want = {"no token": 401, "RS256 (JWKS)": 101, "HS256 (secret)": 101, "wrong aud": 401, "wrong iss": 401}
            assert statuses == want, "upgrade statuses %s, want %s: %s" % (statuses, want, node.output()[-600:])
            ws_mod = smoke_module()
            ws = ws_mod.WebSocket("ws://%s/ws?token=%s" % (node.public, rs(claims)))
            replies = {}
            for i, (channel, data) in enumerate([("chat:room", "x" * 5000), ("public:news", "hi"), ("chat:room", "hi")], 1):
                ws.send_json({"op": "publish", "channel": channel, "data": data, "id": i})
                replies[i] = ws_mod.wait_for(ws, 5, lambda m, i=i: m.get("id") == i)
            got = [(r or {}).get("code", (r or {}).get("op")) for r in replies.values()]
            assert got == ["message_too_large", "forbidden", "published"], "publish replies %s" % replies
            ws.send(0x8, b"\x03\xe8")
            # The helm test pod, with its environment as rendered, signs its own token.
            docs = [d for d in yaml.safe_load_all(helm_template(helm, SCENARIOS["all-features"], EXTRA_SET).stdout) if d]
            pod = [d for d in by_kind(docs, "Pod") if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"][0]
            test_env = dict(os.environ, WS_URL="ws://%s/ws" % node.public, API_URL="http://%s" % node.internal,
                            TIMEOUT_SECONDS="20")
            for e in pod["spec"]["containers"][0]["env"]:
                if e["name"].startswith("JWT_"):
                    test_env[e["name"]] = e["value"]
                elif "secretKeyRef" in e.get("valueFrom", {}):
                    test_env[e["name"]] = env[e["name"]]
            t = run([sys.executable, os.path.join(CHART, "files", "ws-smoke-test.py")], env=test_env, timeout=60)
            assert t.returncode == 0 and "with a HS256 token" in t.stdout, "helm test script: " + (t.stdout + t.stderr)[-800:]
        finally:
            node.stop(timeout=10)
        return "upgrades %s; chat 5000 B -> message_too_large, public -> forbidden, chat -> published; " \
            "helm test script signs its token and round-trips" % ", ".join("%s %s" % kv for kv in statuses.items())
    c.check("[all-features] real node enforces the rendered [auth] and [namespaces] tables; helm test signs a token",
            auth_enforced)

    def per_ip_limit():
        """all-features (50/s, burst 100): a peer outside trustedProxies is limited whatever
        X-Forwarded-For it sends; with the peer trusted, each forwarded client has its own budget."""
        results = {}
        for label, extra in (("untrusted", []), ("trusted", ["--set", "config.trustedProxies={127.0.0.1}"])):
            text, env = node_inputs(SCENARIOS["all-features"], extra, embedded=True)
            node = Node(binary, text, env)
            try:
                assert node.public, "did not start: %s" % node.output()[-800:]
                codes = [upgrade_status(node.public, xff="198.51.100.%d" % (i % 250 + 1)) for i in range(200)]
            finally:
                node.stop(timeout=10)
            results[label] = {code: codes.count(code) for code in set(codes)}
        assert results["untrusted"].get(429), "no 429 from an untrusted peer after the burst: %s" % results
        assert set(results["trusted"]) == {401}, "forwarded clients were limited together: %s" % results
        return "200 upgrades from 127.0.0.1: untrusted %s, trusted %s" % (results["untrusted"], results["trusted"])
    c.check("[all-features] per-IP limit: X-Forwarded-For counts only from trustedProxies", per_ip_limit)

    redis_server = subprocess.run(["sh", "-c", "command -v redis-server"], capture_output=True, text=True).stdout.strip()

    def round_trip():
        import socket
        r = helm_template(helm, [], EXTRA_SET)
        docs = [d for d in yaml.safe_load_all(r.stdout) if d]
        _, text = rendered_toml(docs)
        env = {"FANOUT_API_KEY": "ci-round-trip-key"}
        procs, nodes = [], []
        try:
            extra = ()
            how = "embedded broker, one node"
            if redis_server:
                with socket.socket() as sk:
                    sk.bind(("127.0.0.1", 0))
                    port = sk.getsockname()[1]
                procs.append(subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1",
                                               "--save", "", "--appendonly", "no"],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                extra = ("--redis-url", "redis://127.0.0.1:%d" % port)
                how = "two nodes through redis-server"
            else:
                text = "\n".join(l for l in text.splitlines() if not l.startswith("redis_url"))
            for _ in range(2 if redis_server else 1):
                nodes.append(Node(binary, text, env, extra))
            for n in nodes:
                assert n.public, "node did not start: %s" % n.output()[-800:]
                assert n.wait_ready(), "node never became ready: %s" % n.output()[-800:]
            sub, pub = nodes[0], nodes[-1]
            test_env = dict(os.environ, WS_URL="ws://%s/ws" % sub.public, API_URL="http://%s" % pub.internal,
                            FANOUT_API_KEY=env["FANOUT_API_KEY"], TIMEOUT_SECONDS="20")
            t = subprocess.run([sys.executable, os.path.join(CHART, "files", "ws-smoke-test.py")],
                               capture_output=True, text=True, env=test_env, timeout=60)
            assert t.returncode == 0, (t.stdout + t.stderr)[-1200:]
            bad = run([sys.executable, os.path.join(CHART, "files", "ws-smoke-test.py")],
                      env=dict(test_env, FANOUT_API_KEY="wrong-key", TIMEOUT_SECONDS="10"), timeout=60)
            assert bad.returncode != 0 and "401" in bad.stdout, "a wrong API key was not refused: " + bad.stdout[-400:]
            # Informational: metrics the rules/dashboard expect that this build does not export
            # (series appear lazily, so a quiet node may lack some; not a failure).
            import urllib.request
            with urllib.request.urlopen("http://%s/metrics" % sub.internal, timeout=5) as resp:
                exported = {l.split("{")[0].split(" ")[0] for l in resp.read().decode().splitlines()
                            if l and not l.startswith("#")}
            missing = sorted(ALLOWED_METRICS - exported - {h + "_sum" for h in HISTOGRAMS} - {h + "_count" for h in HISTOGRAMS})
            if missing:
                print("note: this gateway build does not (yet) export: %s" % ", ".join(missing), flush=True)
            codes = [n.stop(timeout=35) for n in nodes]
            assert codes == [0] * len(nodes), "exit codes after SIGTERM %s" % codes
            return "%s: %s" % (how, t.stdout.strip().splitlines()[-1].replace("ws-smoke-test: ", ""))
        finally:
            for n in nodes:
                if n.proc.poll() is None:
                    n.proc.kill()
            for p in procs:
                p.terminate()
                p.wait(10)
    c.check("helm test script round trip against real nodes (API key on, wrong key refused)", round_trip)


def b64url(data):
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_hs256(claims, secret):
    import hmac
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64url(json.dumps(claims).encode())
    return head + "." + b64url(hmac.new(secret.encode(), head.encode(), hashlib.sha256).digest())


def jwt_rs256(claims, key_file, kid):
    head = b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid}).encode()) + "." + \
        b64url(json.dumps(claims).encode())
    r = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key_file], input=head.encode(), capture_output=True)
    assert r.returncode == 0, "openssl dgst -sign failed: %s" % r.stderr[-300:]
    return head + "." + b64url(r.stdout)


def upgrade_status(addr, token=None, xff=None):
    """HTTP status of one WebSocket upgrade request to `addr` (host:port)."""
    import socket
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=5) as sk:
        req = ("GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" % addr)
        if token:
            req += "Authorization: Bearer %s\r\n" % token
        if xff:
            req += "X-Forwarded-For: %s\r\n" % xff
        sk.sendall((req + "\r\n").encode())
        buf = b""
        while b"\r\n" not in buf:
            chunk = sk.recv(4096)
            if not chunk:
                break
            buf += chunk
    return int(buf.split(b" ", 2)[1]) if buf.startswith(b"HTTP/") else None


def smoke_module():
    """files/ws-smoke-test.py as a module (its WebSocket client)."""
    import importlib.util
    import time
    spec = importlib.util.spec_from_file_location("ws_smoke_test", os.path.join(CHART, "files", "ws-smoke-test.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.DEADLINE = time.monotonic() + 30
    return mod


EXTRA_SET = []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--helm", required=True)
    ap.add_argument("--promtool", default="")
    ap.add_argument("--compose-schema", default="")
    args = ap.parse_args()
    # HELM_CHECK_SET="key=value,..." adds --set to every lint and render of the
    # positive scenarios: a way to see a broken value make the checks fail.
    global EXTRA_SET
    if os.environ.get("HELM_CHECK_SET"):
        EXTRA_SET = ["--set", os.environ["HELM_CHECK_SET"]]
        print("note: HELM_CHECK_SET adds --set %s" % os.environ["HELM_CHECK_SET"])
    import kubernetes_validate.utils as kv
    c = Checker()
    check_chart(c, args.helm, kv)
    check_monitoring(c, args.promtool)
    check_deploy(c, args.compose_schema)
    check_binary(c, args.helm)
    print("helm-check: %d passed, %d failed" % (c.passed, c.failed))
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
