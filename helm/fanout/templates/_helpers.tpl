{{/* helm/fanout/templates/_helpers.tpl: owns the chart's names, labels and the value checks shared by all templates. */}}

{{- define "fanout.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fanout.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Names of the derived objects; 54 characters leave room for the suffixes. */}}
{{- define "fanout.internalName" -}}
{{- printf "%s-internal" (include "fanout.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}
{{- define "fanout.redisName" -}}
{{- printf "%s-redis" (include "fanout.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "fanout.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fanout.commonLabels" -}}
helm.sh/chart: {{ include "fanout.chart" . }}
app.kubernetes.io/name: {{ include "fanout.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fanout
{{- end }}

{{- define "fanout.labels" -}}
{{ include "fanout.commonLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "fanout.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fanout.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "fanout.redisLabels" -}}
{{ include "fanout.commonLabels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "fanout.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "fanout.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "fanout.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fanout.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fanout.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
fanout.durationMillis: a humantime duration made of <integer><unit> parts
(units h, m, s, ms; e.g. "30s", "1m30s", "1500ms") in milliseconds.
*/}}
{{- define "fanout.durationMillis" -}}
{{- $s := toString . | trim }}
{{- if not (regexMatch "^([0-9]+(ms|h|m|s) *)+$" $s) }}
{{- fail (printf "fanout: cannot read the duration %q: write whole numbers with the units h, m, s or ms, e.g. \"30s\" or \"1m30s\"" $s) }}
{{- end }}
{{- $ms := 0 }}
{{- range regexFindAll "[0-9]+(ms|h|m|s)" $s -1 }}
{{- $n := regexFind "^[0-9]+" . | int }}
{{- $unit := regexReplaceAll "^[0-9]+" . "" }}
{{- if eq $unit "ms" }}{{ $ms = add $ms $n }}
{{- else if eq $unit "s" }}{{ $ms = add $ms (mul $n 1000) }}
{{- else if eq $unit "m" }}{{ $ms = add $ms (mul $n 60000) }}
{{- else }}{{ $ms = add $ms (mul $n 3600000) }}
{{- end }}
{{- end }}
{{- $ms }}
{{- end }}

{{/* fanout.durationSeconds: the same, rounded up to whole seconds. */}}
{{- define "fanout.durationSeconds" -}}
{{- div (add (include "fanout.durationMillis" . | int) 999) 1000 }}
{{- end }}

{{- define "fanout.preStopSeconds" -}}
{{- if eq .Values.lifecycle.preStop.mode "none" }}0{{ else }}{{ .Values.lifecycle.preStop.seconds | int }}{{ end }}
{{- end }}

{{/*
fanout.terminationGracePeriodSeconds: the pod must outlive preStop + drain,
otherwise the kubelet SIGKILLs connections the node is still draining.
*/}}
{{- define "fanout.terminationGracePeriodSeconds" -}}
{{- $drain := include "fanout.durationSeconds" .Values.config.drainTimeout | int }}
{{- $preStop := include "fanout.preStopSeconds" . | int }}
{{- $needed := add $drain $preStop }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed (.Values.terminationGraceMarginSeconds | int) }}
{{- else }}
{{- $grace := .Values.terminationGracePeriodSeconds | int }}
{{- if le $grace $needed }}
{{- fail (printf "fanout: terminationGracePeriodSeconds (%d) must be greater than config.drainTimeout (%ds) + lifecycle.preStop.seconds (%ds) = %ds, or the kubelet kills connections that are still draining; raise it or leave it empty to have it computed" $grace $drain $preStop $needed) }}
{{- end }}
{{- $grace }}
{{- end }}
{{- end }}

{{/* fanout.redisUrl: the broker the gateway uses; empty = embedded single-node broker. */}}
{{- define "fanout.redisUrl" -}}
{{- if .Values.redis.shards }}
{{- else if .Values.redis.url }}
{{- .Values.redis.url }}
{{- else if .Values.redis.enabled }}
{{- printf "redis://%s:6379" (include "fanout.redisName" .) }}
{{- end }}
{{- end }}

{{/* fanout.usesRedis: "true" when the gateway uses Redis (a URL, or redis.shards). */}}
{{- define "fanout.usesRedis" -}}
{{- if or (include "fanout.redisUrl" .) .Values.redis.shards }}true{{ end }}
{{- end }}

{{/* fanout.validate: value combinations the schema cannot express. */}}
{{- define "fanout.validate" -}}
{{- if and .Values.redis.enabled .Values.redis.url }}
{{- fail "fanout: set either redis.enabled (bundled Redis) or redis.url (existing Redis), not both" }}
{{- end }}
{{- if and .Values.redis.shards (or .Values.redis.enabled .Values.redis.url .Values.redis.cluster) }}
{{- fail "fanout: redis.shards replaces redis.url, redis.cluster and the bundled Redis: set redis.enabled=false and leave the others unset" }}
{{- end }}
{{- if and .Values.redis.cluster (not .Values.redis.url) }}
{{- fail "fanout: redis.cluster needs the cluster's seed nodes in redis.url" }}
{{- end }}
{{- if and (not (include "fanout.usesRedis" .)) (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}
{{- fail "fanout: more than one replica needs a shared Redis: set redis.url, or redis.enabled=true to try it out" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (kindIs "invalid" .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.connections.enabled) }}
{{- fail "fanout: autoscaling needs at least one metric: targetCPUUtilizationPercentage or connections.enabled" }}
{{- end }}
{{- if and .Values.httpRoute.enabled (not .Values.httpRoute.parentRefs) }}
{{- fail "fanout: httpRoute.enabled needs httpRoute.parentRefs (the Gateway to attach to)" }}
{{- end }}
{{- $c := .Values.config }}
{{- range list "drainTimeout" "handshakeTimeout" "pingInterval" "idleTimeout" "brokerTimeout" }}
{{- if eq (include "fanout.durationMillis" (index $c .) | int) 0 }}
{{- fail (printf "fanout: config.%s must be greater than zero" .) }}
{{- end }}
{{- end }}
{{- if le (include "fanout.durationMillis" $c.idleTimeout | int) (include "fanout.durationMillis" $c.pingInterval | int) }}
{{- fail (printf "fanout: config.idleTimeout (%s) must be longer than config.pingInterval (%s), or idle clients that answer pings are cut off" $c.idleTimeout $c.pingInterval) }}
{{- end }}
{{- if lt (int64 $c.outboundQueueBytes) (add (int64 $c.maxMessageSize) 1024) }}
{{- fail (printf "fanout: config.outboundQueueBytes (%d) must exceed config.maxMessageSize (%d) by at least 1024, or one large message overflows the queue" (int64 $c.outboundQueueBytes) (int64 $c.maxMessageSize)) }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if eq (toString .name) "FANOUT_DRAIN_TIMEOUT" }}
{{- fail "fanout: set config.drainTimeout instead of FANOUT_DRAIN_TIMEOUT in extraEnv: the chart sizes terminationGracePeriodSeconds from it" }}
{{- end }}
{{- end }}
{{- range .Values.extraArgs }}
{{- if hasPrefix "--drain-timeout" (toString .) }}
{{- fail "fanout: set config.drainTimeout instead of --drain-timeout in extraArgs: the chart sizes terminationGracePeriodSeconds from it" }}
{{- end }}
{{- end }}
{{- $_ := include "fanout.terminationGracePeriodSeconds" . }}
{{- include "fanout.validateAuth" . }}
{{- include "fanout.validateNamespaces" . }}
{{- include "fanout.validateExtraToml" . }}
{{- end }}

{{/* fanout.validateAuth: [auth] combinations the gateway would refuse at start-up (exit 64). */}}
{{- define "fanout.validateAuth" -}}
{{- $a := .Values.auth }}
{{- $s := .Values.secrets }}
{{- if and $a.publicKey.secretName $a.publicKey.configMapName }}
{{- fail "fanout: set auth.publicKey.secretName or auth.publicKey.configMapName, not both" }}
{{- end }}
{{- $hmacKnown := not $s.existingSecret }}
{{- $hmac := $s.jwtHmacSecret }}
{{- if and (include "fanout.authSettings" .) (not (include "fanout.authKeyFile" .)) $hmacKnown (not $hmac) }}
{{- fail "fanout: auth.* is set but no token key is configured: set secrets.jwtHmacSecret (or the jwt-hmac-secret key of secrets.existingSecret), auth.publicKey or auth.jwks; the gateway refuses an [auth] table without a key" }}
{{- end }}
{{- if $a.algorithms }}
{{- $hmacAlgs := list }}
{{- $keyAlgs := list }}
{{- range $a.algorithms }}
{{- if hasPrefix "HS" . }}{{ $hmacAlgs = append $hmacAlgs . }}{{ else }}{{ $keyAlgs = append $keyAlgs . }}{{ end }}
{{- end }}
{{- if and $hmacKnown $hmac (not $hmacAlgs) }}
{{- fail (printf "fanout: auth.algorithms %v has no HS256/HS384/HS512, but secrets.jwtHmacSecret configures an HMAC key; the gateway refuses a key no algorithm uses" $a.algorithms) }}
{{- end }}
{{- if and $hmacKnown (not $hmac) $hmacAlgs }}
{{- fail (printf "fanout: auth.algorithms lists %v, but no HMAC secret is configured (secrets.jwtHmacSecret); the gateway refuses an algorithm no key verifies" $hmacAlgs) }}
{{- end }}
{{- if and $keyAlgs (not (include "fanout.authKeyFile" .)) }}
{{- fail (printf "fanout: auth.algorithms lists %v, which need auth.publicKey or auth.jwks" $keyAlgs) }}
{{- end }}
{{- end }}
{{- with $a.leeway }}
{{- if gt (include "fanout.durationMillis" .  | int) 300000 }}
{{- fail (printf "fanout: auth.leeway (%s) must be at most 5m" .) }}
{{- end }}
{{- end }}
{{- with $a.jwks.reloadInterval }}
{{- if eq (include "fanout.durationMillis" . | int) 0 }}
{{- fail "fanout: auth.jwks.reloadInterval must be greater than zero" }}
{{- end }}
{{- end }}
{{- end }}

{{/* fanout.validateNamespaces: [namespaces.NAME] rules the gateway would refuse. */}}
{{- define "fanout.validateNamespaces" -}}
{{- $max := .Values.config.maxMessageSize | int64 }}
{{- range $name, $ns := .Values.namespaces }}
{{- if and (or (hasKey $ns "joinLeave") (hasKey $ns "presenceTtl")) (not $ns.presence) }}
{{- fail (printf "fanout: namespaces.%q sets joinLeave or presenceTtl without presence: true" $name) }}
{{- end }}
{{- if and (hasKey $ns "historyTtl") (not (gt (int64 (default 0 $ns.historySize)) 0)) }}
{{- fail (printf "fanout: namespaces.%q sets historyTtl without historySize" $name) }}
{{- end }}
{{- if and (hasKey $ns "publishBurst") (not (hasKey $ns "publishRate")) }}
{{- fail (printf "fanout: namespaces.%q sets publishBurst without publishRate" $name) }}
{{- end }}
{{- if and (hasKey $ns "publishRate") (le ($ns.publishRate | float64) 0.0) }}
{{- fail (printf "fanout: namespaces.%q publishRate must be above 0 (leave it out for no limit)" $name) }}
{{- end }}
{{- if and (hasKey $ns "maxMessageSize") (gt ($ns.maxMessageSize | int64) $max) }}
{{- fail (printf "fanout: namespaces.%q maxMessageSize (%d) must not exceed config.maxMessageSize (%d)" $name ($ns.maxMessageSize | int64) $max) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
fanout.validateExtraToml: config.extraToml must not repeat what the chart renders
(TOML refuses duplicate keys and tables, so the gateway would not start) nor carry
credentials (they belong in the Secret).
*/}}
{{- define "fanout.validateExtraToml" -}}
{{- $extra := .Values.config.extraToml | default "" }}
{{- if $extra }}
{{- $top := regexSplit `(?m)^[ \t]*\[` $extra 2 | first }}
{{- $owned := dict
  "public_addr" "config.listenHost and containerPorts.public"
  "internal_addr" "config.listenHost and containerPorts.internal"
  "redis_url" "redis.url"
  "redis_cluster" "redis.cluster"
  "redis_shards" "redis.shards"
  "redis_prefix" "config.redisPrefix"
  "log_level" "config.logLevel"
  "log_format" "config.logFormat"
  "drain_timeout" "config.drainTimeout"
  "max_connections" "config.maxConnections"
  "max_message_size" "config.maxMessageSize"
  "outbound_queue_bytes" "config.outboundQueueBytes"
  "max_subscriptions" "config.maxSubscriptions"
  "handshake_timeout" "config.handshakeTimeout"
  "ping_interval" "config.pingInterval"
  "idle_timeout" "config.idleTimeout"
  "max_http_body" "config.maxHttpBody"
  "max_pending_connections" "config.maxPendingConnections"
  "max_publication_size" "config.maxPublicationSize"
  "broker_backlog_bytes" "config.brokerBacklogBytes"
  "history_max_bytes" "config.historyMaxBytes"
  "demo" "config.demo"
  "broker_timeout" "config.brokerTimeout"
  "allowed_origins" "config.allowedOrigins"
  "max_connections_per_ip_per_second" "config.maxConnectionsPerIpPerSecond"
  "connection_rate_burst" "config.connectionRateBurst"
  "command_rate" "config.commandRate"
  "command_burst" "config.commandBurst"
  "trusted_proxies" "config.trustedProxies"
  "redis_password" "the Secret (secrets.redisPassword or secrets.existingSecret)"
  "api_key" "the Secret (secrets.apiKey or secrets.existingSecret)"
  "jwt_hmac_secret" "the Secret (secrets.jwtHmacSecret or secrets.existingSecret)" }}
{{- range $key := keys $owned | sortAlpha }}
{{- if regexMatch (printf `(?m)^[ \t]*%s[ \t]*=` $key) $top }}
{{- fail (printf "fanout: config.extraToml sets %s, which comes from %s: set that instead" $key (index $owned $key)) }}
{{- end }}
{{- end }}
{{- if and (include "fanout.authTable" .) (regexMatch `(?m)^[ \t]*\[[ \t]*auth[ \t]*\]` $extra) }}
{{- fail "fanout: config.extraToml has an [auth] table while auth.* values are set: use one or the other" }}
{{- end }}
{{- range $name, $_ := .Values.namespaces }}
{{- $q := regexQuoteMeta $name }}
{{- if regexMatch (printf `(?m)^[ \t]*\[[ \t]*namespaces[ \t]*\.[ \t]*("%s"|'%s'|%s)[ \t]*\]` $q $q $q) $extra }}
{{- fail (printf "fanout: config.extraToml has a [namespaces.%q] table while namespaces.%q is set: use one or the other" $name $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* fanout.hasSecretValues: true when the chart must create its own Secret. */}}
{{- define "fanout.hasSecretValues" -}}
{{- if and (not .Values.secrets.existingSecret) (or .Values.secrets.redisPassword .Values.secrets.apiKey .Values.secrets.jwtHmacSecret) }}true{{ end }}
{{- end }}

{{- define "fanout.secretName" -}}
{{- default (include "fanout.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/*
fanout.secretEnv: one env var per credential. With an existing Secret every
key is optional (a missing key = setting off); with chart values only the set
ones appear.
*/}}
{{- define "fanout.secretEnv" -}}
{{- $root := . }}
{{- $pairs := list (list "FANOUT_REDIS_PASSWORD" "redisPassword") (list "FANOUT_API_KEY" "apiKey") (list "FANOUT_JWT_HMAC_SECRET" "jwtHmacSecret") }}
{{- range $pairs }}
{{- $env := index . 0 }}
{{- $field := index . 1 }}
{{- $wanted := or $root.Values.secrets.existingSecret (index $root.Values.secrets $field) }}
{{- /* the gateway refuses a Redis password without a Redis URL */}}
{{- if and (eq $field "redisPassword") (not (include "fanout.usesRedis" $root)) }}{{ $wanted = false }}{{ end }}
{{- if $wanted }}
- name: {{ $env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "fanout.secretName" $root }}
      key: {{ index $root.Values.secrets.keys $field }}
      optional: {{ if $root.Values.secrets.existingSecret }}true{{ else }}false{{ end }}
{{- end }}
{{- end }}
{{- end }}
