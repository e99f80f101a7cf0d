{{/* helm/fanout/templates/_config.tpl: owns the rendering of values into fanout.toml. */}}
{{- define "fanout.tomlHostPort" -}}
{{- $host := .host }}
{{- if contains ":" $host }}{{ printf "[%s]:%d" $host (int .port) }}{{ else }}{{ printf "%s:%d" $host (int .port) }}{{ end }}
{{- end }}

{{- define "fanout.toml" -}}
{{- $c := .Values.config -}}
# Rendered by the fanout Helm chart (release {{ .Release.Name }}); edit the values, not this file.
# Credentials come from environment variables (FANOUT_REDIS_PASSWORD, FANOUT_API_KEY,
# FANOUT_JWT_HMAC_SECRET), never from this file.
public_addr = {{ include "fanout.tomlHostPort" (dict "host" $c.listenHost "port" .Values.containerPorts.public) | toJson }}
internal_addr = {{ include "fanout.tomlHostPort" (dict "host" $c.listenHost "port" .Values.containerPorts.internal) | toJson }}
{{- with include "fanout.redisUrl" . }}
redis_url = {{ . | toJson }}
{{- end }}
redis_cluster = {{ .Values.redis.cluster }}
{{- with .Values.redis.shards }}
redis_shards = {{ . | toJson }}
{{- end }}
redis_prefix = {{ $c.redisPrefix | toJson }}
log_level = {{ $c.logLevel | toJson }}
log_format = {{ $c.logFormat | toJson }}
drain_timeout = {{ $c.drainTimeout | toString | toJson }}
max_connections = {{ $c.maxConnections | int64 }}
max_message_size = {{ $c.maxMessageSize | int64 }}
outbound_queue_bytes = {{ $c.outboundQueueBytes | int64 }}
max_subscriptions = {{ $c.maxSubscriptions | int64 }}
handshake_timeout = {{ $c.handshakeTimeout | toString | toJson }}
ping_interval = {{ $c.pingInterval | toString | toJson }}
idle_timeout = {{ $c.idleTimeout | toString | toJson }}
max_http_body = {{ $c.maxHttpBody | int64 }}
max_pending_connections = {{ $c.maxPendingConnections | int64 }}
broker_backlog_bytes = {{ $c.brokerBacklogBytes | int64 }}
{{- with $c.maxPublicationSize }}
max_publication_size = {{ . | int64 }}
{{- end }}
history_max_bytes = {{ $c.historyMaxBytes | int64 }}
demo = {{ $c.demo }}
broker_timeout = {{ $c.brokerTimeout | toString | toJson }}
allowed_origins = {{ $c.allowedOrigins | default list | toJson }}
max_connections_per_ip_per_second = {{ $c.maxConnectionsPerIpPerSecond | float64 | toJson }}
connection_rate_burst = {{ $c.connectionRateBurst | int64 }}
command_rate = {{ $c.commandRate | float64 | toJson }}
command_burst = {{ $c.commandBurst | int64 }}
trusted_proxies = {{ $c.trustedProxies | default list | toJson }}
{{- with $c.extraToml }}

# config.extraToml
{{ . | trimSuffix "\n" }}
{{- end }}
{{- /* Tables come after extraToml, so top-level keys in extraToml stay top-level. */}}
{{- if include "fanout.authTable" . }}

# auth.*
[auth]
{{- $a := .Values.auth }}
{{- with $a.algorithms }}
algorithms = {{ . | toJson }}
{{- end }}
{{- if include "fanout.publicKeySource" . }}
public_key_file = {{ include "fanout.publicKeyFile" . | toJson }}
{{- end }}
{{- if $a.jwks.configMapName }}
jwks_file = {{ include "fanout.jwksFile" . | toJson }}
{{- end }}
{{- with $a.jwks.reloadInterval }}
jwks_reload_interval = {{ . | toString | toJson }}
{{- end }}
{{- if not (kindIs "invalid" $a.required) }}
required = {{ $a.required }}
{{- end }}
{{- with $a.leeway }}
leeway = {{ . | toString | toJson }}
{{- end }}
{{- with $a.audience }}
audience = {{ . | toJson }}
{{- end }}
{{- with $a.issuer }}
issuer = {{ . | toJson }}
{{- end }}
{{- end }}
{{- range $name, $ns := .Values.namespaces }}

# namespaces.{{ $name | toJson }}
[namespaces.{{ $name | toJson }}]
{{- if hasKey $ns "anonymousSubscribe" }}
anonymous_subscribe = {{ $ns.anonymousSubscribe }}
{{- end }}
{{- if hasKey $ns "clientPublish" }}
client_publish = {{ $ns.clientPublish }}
{{- end }}
{{- if hasKey $ns "maxMessageSize" }}
max_message_size = {{ $ns.maxMessageSize | int64 }}
{{- end }}
{{- if hasKey $ns "publishRate" }}
publish_rate = {{ $ns.publishRate | float64 | toJson }}
{{- end }}
{{- if hasKey $ns "publishBurst" }}
publish_burst = {{ $ns.publishBurst | int64 }}
{{- end }}
{{- if hasKey $ns "historySize" }}
history_size = {{ $ns.historySize | int64 }}
{{- end }}
{{- if hasKey $ns "historyTtl" }}
history_ttl = {{ $ns.historyTtl | toString | toJson }}
{{- end }}
{{- if hasKey $ns "presence" }}
presence = {{ $ns.presence }}
{{- end }}
{{- if hasKey $ns "joinLeave" }}
join_leave = {{ $ns.joinLeave }}
{{- end }}
{{- if hasKey $ns "presenceTtl" }}
presence_ttl = {{ $ns.presenceTtl | toString | toJson }}
{{- end }}
{{- end }}
{{- end }}

{{/* Where the [auth] key files are mounted; kept out of /etc/fanout (the ConfigMap volume). */}}
{{- define "fanout.publicKeyFile" -}}/etc/fanout-auth/public-key/public-key.pem{{- end }}
{{- define "fanout.jwksFile" -}}/etc/fanout-auth/jwks/jwks.json{{- end }}

{{/* fanout.publicKeySource: "secret" or "configMap" when auth.publicKey names one, else empty. */}}
{{- define "fanout.publicKeySource" -}}
{{- if .Values.auth.publicKey.secretName }}secret{{ else if .Values.auth.publicKey.configMapName }}configMap{{ end }}
{{- end }}

{{/* fanout.authKeyFile: true when auth.publicKey or auth.jwks configures a key file. */}}
{{- define "fanout.authKeyFile" -}}
{{- if or (include "fanout.publicKeySource" .) .Values.auth.jwks.configMapName }}true{{ end }}
{{- end }}

{{/* fanout.authSettings: true when an [auth] setting other than a key is given. */}}
{{- define "fanout.authSettings" -}}
{{- $a := .Values.auth }}
{{- if or $a.algorithms $a.jwks.reloadInterval (not (kindIs "invalid" $a.required)) $a.leeway $a.audience $a.issuer }}true{{ end }}
{{- end }}

{{/* fanout.authTable: true when the chart renders an [auth] table. */}}
{{- define "fanout.authTable" -}}
{{- if or (include "fanout.authKeyFile" .) (include "fanout.authSettings" .) }}true{{ end }}
{{- end }}

{{/*
fanout.authVolumes / fanout.authVolumeMounts: the key files of [auth], each a
whole-volume mount (no subPath) so ConfigMap and Secret updates reach the pod.
*/}}
{{- define "fanout.authVolumes" -}}
{{- $a := .Values.auth }}
{{- $src := include "fanout.publicKeySource" . }}
{{- if eq $src "secret" }}
- name: auth-public-key
  secret:
    secretName: {{ $a.publicKey.secretName }}
    items:
      - key: {{ $a.publicKey.key }}
        path: {{ include "fanout.publicKeyFile" . | base }}
{{- else if eq $src "configMap" }}
- name: auth-public-key
  configMap:
    name: {{ $a.publicKey.configMapName }}
    items:
      - key: {{ $a.publicKey.key }}
        path: {{ include "fanout.publicKeyFile" . | base }}
{{- end }}
{{- if $a.jwks.configMapName }}
- name: auth-jwks
  configMap:
    name: {{ $a.jwks.configMapName }}
    items:
      - key: {{ $a.jwks.key }}
        path: {{ include "fanout.jwksFile" . | base }}
{{- end }}
{{- end }}

{{- define "fanout.authVolumeMounts" -}}
{{- if include "fanout.publicKeySource" . }}
- name: auth-public-key
  mountPath: {{ include "fanout.publicKeyFile" . | dir }}
  readOnly: true
{{- end }}
{{- if .Values.auth.jwks.configMapName }}
- name: auth-jwks
  mountPath: {{ include "fanout.jwksFile" . | dir }}
  readOnly: true
{{- end }}
{{- end }}
