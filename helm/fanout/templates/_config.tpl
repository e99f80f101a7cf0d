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
broker_timeout = {{ $c.brokerTimeout | toString | toJson }}
allowed_origins = {{ $c.allowedOrigins | default list | toJson }}
{{- with $c.extraToml }}

# config.extraToml
{{ . | trimSuffix "\n" }}
{{- end }}
{{- end }}
