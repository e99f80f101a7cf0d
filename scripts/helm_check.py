# scripts/helm_check.py: owns the offline checks of the Helm chart, the alert rules, the dashboard and deploy/ (run by scripts/helm-check.sh).
"""Every check prints one PASS/FAIL line; the last line is `helm-check: N passed, M failed`.

Tools come from scripts/helm-check.sh: helm (--helm), promtool (--promtool), the
compose-spec JSON schema (--compose-schema), and this interpreter's venv with
kubernetes-validate, promql-parser and PyYAML.
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
}
HISTOGRAMS = {"fanout_delivery_latency_seconds", "fanout_broadcast_duration_seconds",
              "fanout_broker_resubscribe_duration_seconds"}
ALLOWED_METRICS = COUNTERS_AND_GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
TOML_KEYS = {"public_addr", "internal_addr", "redis_url", "redis_password", "redis_prefix", "log_level",
             "log_format", "drain_timeout", "max_connections", "max_message_size", "outbound_queue_bytes",
             "max_subscriptions", "handshake_timeout", "ping_interval", "idle_timeout", "max_http_body",
             "broker_timeout", "api_key", "jwt_hmac_secret", "allowed_origins"}

SCENARIOS = {
    # name: values files (relative to the chart); None = chart defaults
    "default": [],
    "all-features": ["ci/all-features-values.yaml"],
    "external-redis": ["ci/external-redis-values.yaml"],
    "single-node": ["ci/single-node-values.yaml"],
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
        unknown = {k for k, v in cfg.items() if not isinstance(v, dict)} - TOML_KEYS
        assert not unknown, "unknown TOML keys %s" % sorted(unknown)
        for k in ("public_addr", "internal_addr", "drain_timeout"):
            assert k in cfg, "%s missing from fanout.toml" % k
        assert cfg["internal_addr"].endswith(":%d" % ports()["internal"]), "internal_addr does not match the port"
        assert cfg["public_addr"].endswith(":%d" % ports()["ws"]), "public_addr does not match the port"
        return "%d keys, --config %s" % (len(cfg), path)
    c.check(p + "fanout.toml is valid TOML with known keys, mounted and passed with --config", config_file)

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
        if redis.get("url"):
            assert cfg.get("redis_url") == redis["url"], "redis_url %r" % cfg.get("redis_url")
            assert not redis_deps, "bundled Redis rendered although redis.url is set"
            return "external " + cfg["redis_url"]
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

    for name, files in SCENARIOS.items():
        def accepts(files=files):
            r = helm_template(helm, files, EXTRA_SET)
            docs = [d for d in yaml.safe_load_all(r.stdout) if d]
            _, text = rendered_toml(docs)
            secrets = {}
            for e in gateway_container(docs).get("env", []):
                if "secretKeyRef" in e.get("valueFrom", {}):
                    secrets[e["name"]] = "ci-" + e["name"].lower()
            node = Node(binary, text, secrets)
            try:
                assert node.public, "did not start listening: %s" % node.output()[-800:]
                status = node.get("/healthz")
                assert status == 200, "/healthz answered %s" % status
            finally:
                code = node.stop(timeout=seconds(tomllib.loads(text)["drain_timeout"]) + 5)
            assert code == 0, "exit code %s after SIGTERM: %s" % (code, node.output()[-800:])
            return "listened, /healthz 200, exit 0 on SIGTERM"
        c.check("[%s] the gateway accepts the rendered fanout.toml" % name, accepts)

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
