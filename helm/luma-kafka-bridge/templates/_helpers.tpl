{{/* Names, labels and the settings every bridge pod (and the topics Job) receives. */}}

{{- define "luma-kafka-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "luma-kafka-bridge.fullname" -}}
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

{{- define "luma-kafka-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "luma-kafka-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "luma-kafka-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "luma-kafka-bridge.labels" -}}
helm.sh/chart: {{ include "luma-kafka-bridge.chart" . }}
{{ include "luma-kafka-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: luma-kafka-bridge
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The bridge pods only, not the topics Job: what the Service, PDB and HPA select. */}}
{{- define "luma-kafka-bridge.podSelectorLabels" -}}
{{ include "luma-kafka-bridge.selectorLabels" . }}
app.kubernetes.io/component: bridge
{{- end }}

{{- define "luma-kafka-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "luma-kafka-bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "luma-kafka-bridge.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret holding the callback tokens, and its key. */}}
{{- define "luma-kafka-bridge.authSecretName" -}}
{{- default (include "luma-kafka-bridge.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{- define "luma-kafka-bridge.authSecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}auth-tokens{{ end }}
{{- end }}

{{- define "luma-kafka-bridge.saslEnabled" -}}
{{- if hasPrefix "SASL" .Values.kafka.securityProtocol }}true{{ end }}
{{- end }}

{{- define "luma-kafka-bridge.saslSecretName" -}}
{{- default (include "luma-kafka-bridge.fullname" .) .Values.kafka.sasl.existingSecret }}
{{- end }}

{{- define "luma-kafka-bridge.saslSecretKey" -}}
{{- if .Values.kafka.sasl.existingSecret }}{{ .Values.kafka.sasl.existingSecretPasswordKey }}{{ else }}kafka-sasl-password{{ end }}
{{- end }}

{{/* Whether the chart writes a Secret of its own (tokens, HMAC secrets, SASL password). */}}
{{- define "luma-kafka-bridge.ownSecret" -}}
{{- if or (not .Values.auth.existingSecret) (and (include "luma-kafka-bridge.saslEnabled" .) (not .Values.kafka.sasl.existingSecret)) (and .Values.auth.hmacSecrets (not .Values.auth.hmacExistingSecret)) }}true{{ end }}
{{- end }}

{{- define "luma-kafka-bridge.hmacEnabled" -}}
{{- if or .Values.auth.hmacSecrets .Values.auth.hmacExistingSecret }}true{{ end }}
{{- end }}

{{- define "luma-kafka-bridge.hmacSecretName" -}}
{{- default (include "luma-kafka-bridge.fullname" .) .Values.auth.hmacExistingSecret }}
{{- end }}

{{- define "luma-kafka-bridge.hmacSecretKey" -}}
{{- if .Values.auth.hmacExistingSecret }}{{ .Values.auth.hmacExistingSecretKey }}{{ else }}hmac-secrets{{ end }}
{{- end }}

{{- define "luma-kafka-bridge.authMountPath" -}}/etc/luma-bridge/auth{{- end }}
{{- define "luma-kafka-bridge.serverTlsMountPath" -}}/etc/luma-bridge/tls{{- end }}

{{- define "luma-kafka-bridge.tlsMountPath" -}}/etc/luma-bridge/kafka-tls{{- end }}

{{/* "true" when settings.verify asks the bridge to check callbacks with Luma's API. */}}
{{- define "luma-kafka-bridge.verifyEnabled" -}}
{{- if has (toString (.Values.settings.verify | default "off")) (list "tag" "enforce") }}true{{- end }}
{{- end }}

{{/* Checks across values that JSON Schema cannot express. */}}
{{- define "luma-kafka-bridge.validate" -}}
{{- if include "luma-kafka-bridge.verifyEnabled" . }}
{{- if not .Values.reconciler.apiKeySecret.name }}
{{- fail "settings.verify needs the Luma API key: set reconciler.apiKeySecret.name to a Secret holding it (the bridge pods read it from there too)" }}
{{- end }}
{{- $verifyTimeout := float64 (.Values.settings.verifyTimeout | default 1) }}
{{- $ackTimeout := float64 (.Values.settings.kafkaAckTimeout | default 4) }}
{{- if ge (addf $verifyTimeout $ackTimeout) 5.0 }}
{{- fail "settings.verifyTimeout (default 1) plus settings.kafkaAckTimeout (default 4) must stay below Luma's 5 s: e.g. settings.kafkaAckTimeout: 3" }}
{{- end }}
{{- end }}
{{- if not .Values.kafka.bootstrapServers }}
{{- fail "kafka.bootstrapServers is required, e.g. --set kafka.bootstrapServers=kafka-0.kafka:9092" }}
{{- end }}
{{- if ge (float64 .Values.lifecycle.drainDelaySeconds) (float64 .Values.lifecycle.shutdownTimeoutSeconds) }}
{{- fail "lifecycle.drainDelaySeconds must be below lifecycle.shutdownTimeoutSeconds (the timeout includes the drain)" }}
{{- end }}
{{- if eq (int .Values.server.port) (int .Values.server.adminPort) }}
{{- fail "server.port and server.adminPort must differ" }}
{{- end }}
{{- if and (include "luma-kafka-bridge.saslEnabled" .) (not .Values.kafka.sasl.mechanism) }}
{{- fail "kafka.sasl.mechanism is required when kafka.securityProtocol is SASL_*" }}
{{- end }}
{{- if and (include "luma-kafka-bridge.saslEnabled" .) (not .Values.kafka.sasl.username) }}
{{- fail "kafka.sasl.username is required when kafka.securityProtocol is SASL_*" }}
{{- end }}
{{- if and (include "luma-kafka-bridge.saslEnabled" .) (not .Values.kafka.sasl.password) (not .Values.kafka.sasl.existingSecret) }}
{{- fail "kafka.sasl.password or kafka.sasl.existingSecret is required when kafka.securityProtocol is SASL_*" }}
{{- end }}
{{- if and .Values.kafka.tls.clientSecret.name (not (hasSuffix "SSL" .Values.kafka.securityProtocol)) }}
{{- fail "kafka.tls.clientSecret needs kafka.securityProtocol SSL or SASL_SSL" }}
{{- end }}
{{- if and .Values.topics.strimzi.enabled (not .Values.topics.strimzi.clusterName) }}
{{- fail "topics.strimzi.clusterName is required when topics.strimzi.enabled" }}
{{- end }}
{{- if and (not (kindIs "invalid" .Values.topics.minInsyncReplicas)) (gt (int .Values.topics.minInsyncReplicas) (int .Values.topics.replicationFactor)) }}
{{- fail "topics.minInsyncReplicas must not exceed topics.replicationFactor: acks=all could never be met" }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.spool.enabled (ne .Values.workload.kind "StatefulSet") }}
{{- fail "autoscaling a Deployment deletes a scaled-away pod's spool with the callbacks it holds: use workload.kind=StatefulSet (the default), or autoscaling.enabled=false" }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.spool.enabled (eq .Values.workload.kind "StatefulSet") (eq .Values.spool.persistence.retentionPolicy.whenScaled "Delete") }}
{{- fail "autoscaling with spool.persistence.retentionPolicy.whenScaled=Delete deletes a scaled-away pod's spool with the callbacks it holds: set whenScaled=Retain" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set only one of minAvailable and maxUnavailable (null the other)" }}
{{- end }}
{{- range $key, $_ := .Values.settings }}
{{- if has ($key | snakecase) (list "host" "port" "admin_port" "callback_path" "auth_tokens" "kafka_bootstrap_servers" "kafka_security_protocol" "kafka_sasl_mechanism" "kafka_sasl_username" "kafka_sasl_password" "kafka_ssl_cafile" "kafka_ssl_certfile" "kafka_ssl_keyfile" "topic_prefix" "topic_partitions" "topic_replication_factor" "topic_min_insync_replicas" "topic_configs" "spool_enabled" "spool_dir" "drain_delay" "shutdown_timeout" "auth_tokens_file" "hmac_secrets" "tls_cert_file" "tls_key_file") }}
{{- fail (printf "settings.%s is set by a dedicated chart value; see values.yaml" $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The non-secret LUMA_BRIDGE_* variables, as a YAML map. The ConfigMap holds them for the
bridge pods; the pre-install topics Job (which runs before the ConfigMap exists) gets
them inline.
*/}}
{{- define "luma-kafka-bridge.configData" -}}
LUMA_BRIDGE_HOST: "0.0.0.0"
LUMA_BRIDGE_PORT: {{ .Values.server.port | quote }}
LUMA_BRIDGE_ADMIN_PORT: {{ .Values.server.adminPort | quote }}
LUMA_BRIDGE_CALLBACK_PATH: {{ .Values.server.callbackPath | quote }}
{{- if .Values.auth.tokensFromFile }}
LUMA_BRIDGE_AUTH_TOKENS_FILE: {{ printf "%s/tokens" (include "luma-kafka-bridge.authMountPath" .) | quote }}
{{- end }}
{{- if .Values.server.tlsSecret }}
LUMA_BRIDGE_TLS_CERT_FILE: {{ printf "%s/tls.crt" (include "luma-kafka-bridge.serverTlsMountPath" .) | quote }}
LUMA_BRIDGE_TLS_KEY_FILE: {{ printf "%s/tls.key" (include "luma-kafka-bridge.serverTlsMountPath" .) | quote }}
{{- end }}
LUMA_BRIDGE_KAFKA_BOOTSTRAP_SERVERS: {{ .Values.kafka.bootstrapServers | quote }}
LUMA_BRIDGE_KAFKA_SECURITY_PROTOCOL: {{ .Values.kafka.securityProtocol | quote }}
{{- if include "luma-kafka-bridge.saslEnabled" . }}
LUMA_BRIDGE_KAFKA_SASL_MECHANISM: {{ .Values.kafka.sasl.mechanism | quote }}
LUMA_BRIDGE_KAFKA_SASL_USERNAME: {{ .Values.kafka.sasl.username | quote }}
{{- end }}
{{- with .Values.kafka.tls.caSecret.name }}
LUMA_BRIDGE_KAFKA_SSL_CAFILE: {{ printf "%s/ca/%s" (include "luma-kafka-bridge.tlsMountPath" $) $.Values.kafka.tls.caSecret.key | quote }}
{{- end }}
{{- with .Values.kafka.tls.clientSecret.name }}
LUMA_BRIDGE_KAFKA_SSL_CERTFILE: {{ printf "%s/client/%s" (include "luma-kafka-bridge.tlsMountPath" $) $.Values.kafka.tls.clientSecret.certKey | quote }}
LUMA_BRIDGE_KAFKA_SSL_KEYFILE: {{ printf "%s/client/%s" (include "luma-kafka-bridge.tlsMountPath" $) $.Values.kafka.tls.clientSecret.keyKey | quote }}
{{- end }}
LUMA_BRIDGE_TOPIC_PREFIX: {{ .Values.topics.prefix | quote }}
LUMA_BRIDGE_TOPIC_PARTITIONS: {{ .Values.topics.partitions | quote }}
LUMA_BRIDGE_TOPIC_REPLICATION_FACTOR: {{ .Values.topics.replicationFactor | quote }}
{{- if not (kindIs "invalid" .Values.topics.minInsyncReplicas) }}
LUMA_BRIDGE_TOPIC_MIN_INSYNC_REPLICAS: {{ .Values.topics.minInsyncReplicas | quote }}
{{- end }}
{{- with .Values.topics.config }}
LUMA_BRIDGE_TOPIC_CONFIGS: {{ include "luma-kafka-bridge.pairs" . | quote }}
{{- end }}
LUMA_BRIDGE_SPOOL_ENABLED: {{ .Values.spool.enabled | quote }}
LUMA_BRIDGE_SPOOL_DIR: {{ .Values.spool.mountPath | quote }}
LUMA_BRIDGE_DRAIN_DELAY: {{ .Values.lifecycle.drainDelaySeconds | quote }}
LUMA_BRIDGE_SHUTDOWN_TIMEOUT: {{ .Values.lifecycle.shutdownTimeoutSeconds | quote }}
{{- range $key, $value := .Values.settings }}
{{ printf "LUMA_BRIDGE_%s" ($key | snakecase | upper) }}: {{ include "luma-kafka-bridge.settingValue" $value | quote }}
{{- end }}
{{- end }}

{{/* key=value,key=value, sorted, as the bridge reads topic configs. */}}
{{- define "luma-kafka-bridge.pairs" -}}
{{- $pairs := list }}
{{- range $key, $value := . }}
{{- $pairs = append $pairs (printf "%s=%s" $key (include "luma-kafka-bridge.settingValue" $value)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* A setting as the environment gives it: lists comma-separated, maps as key=value pairs. */}}
{{- define "luma-kafka-bridge.settingValue" -}}
{{- if kindIs "slice" . }}{{ join "," . }}
{{- else if kindIs "map" . }}{{ include "luma-kafka-bridge.pairs" . }}
{{- else if kindIs "float64" . }}{{ if eq (float64 (int64 .)) . }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}{{ . }}
{{- end }}
{{- end }}

{{/* The secret variables, as container env entries. */}}
{{- define "luma-kafka-bridge.secretEnv" -}}
{{- if not .Values.auth.tokensFromFile }}
- name: LUMA_BRIDGE_AUTH_TOKENS
  valueFrom:
    secretKeyRef:
      name: {{ include "luma-kafka-bridge.authSecretName" . }}
      key: {{ include "luma-kafka-bridge.authSecretKey" . }}
{{- end }}
{{- if include "luma-kafka-bridge.hmacEnabled" . }}
- name: LUMA_BRIDGE_HMAC_SECRETS
  valueFrom:
    secretKeyRef:
      name: {{ include "luma-kafka-bridge.hmacSecretName" . }}
      key: {{ include "luma-kafka-bridge.hmacSecretKey" . }}
{{- end }}
{{- if include "luma-kafka-bridge.saslEnabled" . }}
- name: LUMA_BRIDGE_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "luma-kafka-bridge.saslSecretName" . }}
      key: {{ include "luma-kafka-bridge.saslSecretKey" . }}
{{- end }}
{{- if include "luma-kafka-bridge.verifyEnabled" . }}
{{- /* Verification reads Luma's API with the reconciler's key and base URL. */}}
- name: LUMA_BRIDGE_LUMA_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.reconciler.apiKeySecret.name }}
      key: {{ .Values.reconciler.apiKeySecret.key }}
{{- with .Values.reconciler.lumaBaseUrl }}
- name: LUMA_BRIDGE_LUMA_BASE_URL
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes and mounts for the Kafka TLS material, shared by the bridge and the topics Job. */}}
{{- define "luma-kafka-bridge.tlsVolumes" -}}
{{- with .Values.kafka.tls.caSecret.name }}
- name: kafka-ca
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- with .Values.kafka.tls.clientSecret.name }}
- name: kafka-client
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "luma-kafka-bridge.tlsMounts" -}}
{{- if .Values.kafka.tls.caSecret.name }}
- name: kafka-ca
  mountPath: {{ include "luma-kafka-bridge.tlsMountPath" . }}/ca
  readOnly: true
{{- end }}
{{- if .Values.kafka.tls.clientSecret.name }}
- name: kafka-client
  mountPath: {{ include "luma-kafka-bridge.tlsMountPath" . }}/client
  readOnly: true
{{- end }}
{{- end }}

{{/* The bridge pods' own secret files: the tokens file and the HTTPS certificate. */}}
{{- define "luma-kafka-bridge.bridgeVolumes" -}}
{{- if .Values.auth.tokensFromFile }}
- name: auth-tokens
  secret:
    secretName: {{ include "luma-kafka-bridge.authSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ include "luma-kafka-bridge.authSecretKey" . }}
        path: tokens
{{- end }}
{{- with .Values.server.tlsSecret }}
- name: server-tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "luma-kafka-bridge.bridgeMounts" -}}
{{- if .Values.auth.tokensFromFile }}
- name: auth-tokens
  mountPath: {{ include "luma-kafka-bridge.authMountPath" . }}
  readOnly: true
{{- end }}
{{- if .Values.server.tlsSecret }}
- name: server-tls
  mountPath: {{ include "luma-kafka-bridge.serverTlsMountPath" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The topics the bridge writes; keep in step with bridge.contract.callback.Topics.all(). */}}
{{- define "luma-kafka-bridge.topicNames" -}}
{{- $prefix := .Values.topics.prefix }}
{{- $names := list }}
{{- range list "queued" "dreaming" "completed" "failed" "unknown" }}
{{- $names = append $names (printf "%s.%s" $prefix .) }}
{{- end }}
{{- if ne (toString (dig "lifecycleTopic" true .Values.settings)) "false" }}
{{- $names = append $names (printf "%s.lifecycle" $prefix) }}
{{- end }}
{{- $names = append $names (printf "%s.deadletter" $prefix) }}
{{- toJson $names }}
{{- end }}

{{/*
The configs every topic is created with, as `topics create` sets them: min.insync.replicas
(topics.minInsyncReplicas, else the smaller of 2 and the replication factor) and a
max.message.bytes that fits the largest body with its key and headers; topics.config wins.
*/}}
{{- define "luma-kafka-bridge.topicConfigs" -}}
{{- $minInsync := .Values.topics.minInsyncReplicas -}}
{{- if kindIs "invalid" $minInsync }}{{ $minInsync = min 2 (int .Values.topics.replicationFactor) }}{{ end -}}
{{- $maxBody := 1048576 -}}
{{- if hasKey .Values.settings "maxBodyBytes" }}{{ $maxBody = int .Values.settings.maxBodyBytes }}{{ end -}}
{{- $configs := dict "min.insync.replicas" (toString (int $minInsync)) "max.message.bytes" (toString (add $maxBody 65536)) -}}
{{- range $key, $value := .Values.topics.config }}{{ $_ := set $configs $key (include "luma-kafka-bridge.settingValue" $value) }}{{ end -}}
{{- toJson $configs -}}
{{- end }}
