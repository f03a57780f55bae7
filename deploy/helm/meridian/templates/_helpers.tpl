{{/* Names. Node ids are pod names, so they stay short and DNS-safe. */}}
{{- define "meridian.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" -}}
{{- else if contains (default .Chart.Name .Values.nameOverride) .Release.Name -}}
{{- .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (default .Chart.Name .Values.nameOverride) | trunc 30 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "meridian.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels every pod of the release carries: NetworkPolicies select members by them. */}}
{{- define "meridian.memberLabels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "meridian.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{/* The StatefulSet of a region: (dict "root" $ "region" $region). */}}
{{- define "meridian.nodeSet" -}}
{{ include "meridian.fullname" .root }}-{{ .region.name }}
{{- end -}}

{{/* The headless Service that gives a region's node pods their DNS names. */}}
{{- define "meridian.peers" -}}
{{ include "meridian.nodeSet" . }}-peers
{{- end -}}

{{- define "meridian.gatewayName" -}}
{{ include "meridian.fullname" .root }}-gw-{{ .region.name }}
{{- end -}}

{{/* A node's stable DNS name: (dict "root" $ "region" $region "index" i). */}}
{{- define "meridian.nodeHost" -}}
{{ include "meridian.nodeSet" . }}-{{ .index }}.{{ include "meridian.peers" . }}.{{ .root.Release.Namespace }}.svc.{{ .root.Values.clusterDomain }}
{{- end -}}

{{/* Every node's gossip address, as a JSON list (the join seeds). */}}
{{- define "meridian.gossipSeeds" -}}
{{- $root := . -}}
{{- $seeds := list -}}
{{- range $region := $root.Values.regions -}}
{{- range $i := until (int $region.replicas) -}}
{{- $seeds = append $seeds (printf "%s:%d" (include "meridian.nodeHost" (dict "root" $root "region" $region "index" $i)) (int $root.Values.ports.gossip)) -}}
{{- end -}}
{{- end -}}
{{- toJson $seeds -}}
{{- end -}}

{{/* The env name of a region's S3 credentials (replication.CredentialsFromEnv). */}}
{{- define "meridian.credentialEnv" -}}
MERIDIAN_REGION_{{ regexReplaceAll "[-.]" .name "_" | upper }}
{{- end -}}

{{/* What every member's config holds. */}}
{{- define "meridian.commonConfig" -}}
{{- $root := . -}}
{{- $regions := list -}}
{{- range $r := $root.Values.regions -}}
{{- $regions = append $regions (dict "name" $r.name "store" $r.store) -}}
{{- end -}}
{{- $c := dict
  "cluster_id" $root.Values.clusterID
  "regions" $regions
  "http_addr" (printf ":%d" (int $root.Values.ports.http))
  "gossip_addr" (printf ":%d" (int $root.Values.ports.gossip))
  "gossip_profile" $root.Values.gossipProfile
  "read_consistency" $root.Values.readConsistency
  "log_level" $root.Values.log.level
  "log_format" $root.Values.log.format
  "tls_ca" "/etc/meridian/ca/ca.crt"
  "tls_crl" "/etc/meridian/ca/ca.crl"
  "gossip_key_file" "/etc/meridian/gossip/gossip.key" -}}
{{- if $root.Values.secrets.httpTLS -}}
{{- $_ := set $c "http_tls_cert" "/etc/meridian/https/tls.crt" -}}
{{- $_ := set $c "http_tls_key" "/etc/meridian/https/tls.key" -}}
{{- end -}}
{{- toJson $c -}}
{{- end -}}

{{/* One node's config file: (dict "root" $ "region" $region "index" i). */}}
{{- define "meridian.nodeConfig" -}}
{{- $root := .root -}}
{{- $id := printf "%s-%d" (include "meridian.nodeSet" .) (int .index) -}}
{{- $host := include "meridian.nodeHost" . -}}
{{- $self := printf "%s:%d" $host (int $root.Values.ports.gossip) -}}
{{- $join := list -}}
{{- range $s := include "meridian.gossipSeeds" $root | fromJsonArray -}}
{{- if ne $s $self -}}{{- $join = append $join $s -}}{{- end -}}
{{- end -}}
{{- $first := index $root.Values.regions 0 -}}
{{- if and $root.Values.bootstrap (eq .region.name $first.name) (eq (int .index) 0) -}}
{{- $join = list -}}
{{- end -}}
{{- $c := include "meridian.commonConfig" $root | fromJson -}}
{{- $_ := set $c "node_id" $id -}}
{{- $_ := set $c "region" .region.name -}}
{{- if .region.zone -}}{{- $_ := set $c "zone" .region.zone -}}{{- end -}}
{{- $_ := set $c "data_dir" "/data/meridian" -}}
{{- $_ := set $c "grpc_addr" (printf ":%d" (int $root.Values.ports.grpc)) -}}
{{- $_ := set $c "raft_addr" (printf ":%d" (int $root.Values.ports.raft)) -}}
{{- $_ := set $c "advertise_http" (printf "%s:%d" $host (int $root.Values.ports.http)) -}}
{{- $_ := set $c "advertise_grpc" (printf "%s:%d" $host (int $root.Values.ports.grpc)) -}}
{{- $_ := set $c "advertise_raft" (printf "%s:%d" $host (int $root.Values.ports.raft)) -}}
{{- if $join -}}{{- $_ := set $c "join" $join -}}{{- end -}}
{{- $_ := set $c "voters" (int $root.Values.voters) -}}
{{- $_ := set $c "tls_cert" (printf "/etc/meridian/node/%s.crt" $id) -}}
{{- $_ := set $c "tls_key" (printf "/etc/meridian/node/%s.key" $id) -}}
{{- $_ := set $c "auth" (dict "admin_password_file" "/etc/meridian/admin/password") -}}
{{- mergeOverwrite (deepCopy $root.Values.config) $c | toYaml -}}
{{- end -}}

{{/* A region's gateway config file: (dict "root" $ "region" $region). */}}
{{- define "meridian.gatewayConfig" -}}
{{- $root := .root -}}
{{- $c := include "meridian.commonConfig" $root | fromJson -}}
{{- $_ := set $c "region" .region.name -}}
{{- if .region.zone -}}{{- $_ := set $c "zone" .region.zone -}}{{- end -}}
{{- $_ := set $c "join" (include "meridian.gossipSeeds" $root | fromJsonArray) -}}
{{- $_ := set $c "tls_cert" "/etc/meridian/gateway/tls.crt" -}}
{{- $_ := set $c "tls_key" "/etc/meridian/gateway/tls.key" -}}
{{- mergeOverwrite (deepCopy $root.Values.config) $c | toYaml -}}
{{- end -}}

{{/* Settings the pods share. */}}
{{- define "meridian.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "meridian.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The per-member env: pod name and IP (gossip advertises an IP), store credentials. */}}
{{- define "meridian.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: MERIDIAN_ADVERTISE_GOSSIP
  value: "$(POD_IP):{{ int .Values.ports.gossip }}"
{{- range $r := .Values.regions }}
{{- if $r.credentialsSecret }}
- name: {{ include "meridian.credentialEnv" $r }}_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $r.credentialsSecret }}
      key: accessKey
- name: {{ include "meridian.credentialEnv" $r }}_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $r.credentialsSecret }}
      key: secretKey
{{- end }}
{{- end }}
{{- end -}}

{{- define "meridian.probeScheme" -}}
{{ if .Values.secrets.httpTLS }}HTTPS{{ else }}HTTP{{ end }}
{{- end -}}

{{/* Trust volumes every member mounts. */}}
{{- define "meridian.trustVolumes" -}}
- name: ca
  secret:
    secretName: {{ .Values.secrets.ca }}
    defaultMode: 0440
    items:
      - {key: ca.crt, path: ca.crt}
      - {key: ca.crl, path: ca.crl}
- name: gossip
  secret:
    secretName: {{ .Values.secrets.gossipKey }}
    defaultMode: 0440
    items:
      - {key: gossip.key, path: gossip.key}
{{- if .Values.secrets.httpTLS }}
- name: https
  secret:
    secretName: {{ .Values.secrets.httpTLS }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- end }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "meridian.trustMounts" -}}
- {name: ca, mountPath: /etc/meridian/ca, readOnly: true}
- {name: gossip, mountPath: /etc/meridian/gossip, readOnly: true}
{{- if .Values.secrets.httpTLS }}
- {name: https, mountPath: /etc/meridian/https, readOnly: true}
{{- end }}
- {name: tmp, mountPath: /tmp}
{{- end -}}
