{{/* The chart name, overridable. */}}
{{- define "imagegc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: the release name, unless it already holds the chart name. */}}
{{- define "imagegc.fullname" -}}
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

{{- define "imagegc.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "imagegc.labels" -}}
helm.sh/chart: {{ include "imagegc.chart" . }}
{{ include "imagegc.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: imagegc
{{- end }}

{{- define "imagegc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imagegc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Component labels: (dict "ctx" $ "component" "agent"). */}}
{{- define "imagegc.componentLabels" -}}
{{ include "imagegc.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "imagegc.componentSelectorLabels" -}}
{{ include "imagegc.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "imagegc.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "imagegc.agentServiceAccount" -}}
{{- required "agent.serviceAccount.name is required" .Values.agent.serviceAccount.name }}
{{- end }}

{{- define "imagegc.controllerServiceAccount" -}}
{{- required "controller.serviceAccount.name is required" .Values.controller.serviceAccount.name }}
{{- end }}

{{/* The containerd socket on the node: containerd.socket, else the preset's path. */}}
{{- define "imagegc.socket" -}}
{{- $presets := dict "containerd" "/run/containerd/containerd.sock" "k3s" "/run/k3s/containerd/containerd.sock" "microk8s" "/var/snap/microk8s/common/run/containerd.sock" }}
{{- if .Values.containerd.socket }}
{{- if not (hasPrefix "/" .Values.containerd.socket) }}
{{- fail (printf "containerd.socket must be an absolute path on the node, got %q" .Values.containerd.socket) }}
{{- end }}
{{- .Values.containerd.socket }}
{{- else if hasKey $presets (toString .Values.containerd.preset) }}
{{- get $presets (toString .Values.containerd.preset) }}
{{- else }}
{{- fail (printf "containerd.preset %q is unknown: use containerd (/run/containerd/containerd.sock), k3s (/run/k3s/containerd/containerd.sock) or microk8s (/var/snap/microk8s/common/run/containerd.sock), or set containerd.socket and containerd.root to their paths on the node" (toString .Values.containerd.preset)) }}
{{- end }}
{{- end }}

{{/* containerd's root on the node (its image filesystem): containerd.root, else the preset's. */}}
{{- define "imagegc.containerdRoot" -}}
{{- $presets := dict "containerd" "/var/lib/containerd" "k3s" "/var/lib/rancher/k3s/agent/containerd" "microk8s" "/var/snap/microk8s/common/var/lib/containerd" }}
{{- if .Values.containerd.root }}
{{- if not (hasPrefix "/" .Values.containerd.root) }}
{{- fail (printf "containerd.root must be an absolute path on the node, got %q" .Values.containerd.root) }}
{{- end }}
{{- .Values.containerd.root }}
{{- else if hasKey $presets (toString .Values.containerd.preset) }}
{{- get $presets (toString .Values.containerd.preset) }}
{{- else }}
{{- fail (printf "containerd.preset %q is unknown: use containerd (/var/lib/containerd), k3s (/var/lib/rancher/k3s/agent/containerd) or microk8s (/var/snap/microk8s/common/var/lib/containerd), or set containerd.root to containerd's root on the node" (toString .Values.containerd.preset)) }}
{{- end }}
{{- end }}

{{/* Hardening shared by both containers. */}}
{{- define "imagegc.containerSecurityContext" -}}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}
