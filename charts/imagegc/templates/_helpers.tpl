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

{{/* The agent DaemonSet's name. */}}
{{- define "imagegc.agentDaemonSet" -}}
{{- printf "%s-agent" (include "imagegc.fullname" .) }}
{{- end }}

{{/* What the names of the agent DaemonSet's pods start with: the DaemonSet controller asks for
`<DaemonSet name>-` plus 5 generated characters, and the API server cuts the prefix to 58. */}}
{{- define "imagegc.agentPodPrefix" -}}
{{- printf "%s-" (include "imagegc.agentDaemonSet" .) | trunc 58 }}
{{- end }}

{{/* The directory the agent reads its image filesystem's usage from: `tmpmounts` in
containerd's root, which containerd creates at start-up (1.x and 2.x) for the short-lived
mounts it makes while reading an image's files; it is empty otherwise. */}}
{{- define "imagegc.imageFsPath" -}}
{{- printf "%s/tmpmounts" (include "imagegc.containerdRoot" .) }}
{{- end }}

{{/* Options of the agent's hostPath mounts: read-only, recursively where supported, and no
mount propagation (which recursive read-only requires). */}}
{{- define "imagegc.hostMountOptions" -}}
readOnly: true
{{- if ne .Values.agent.recursiveReadOnly "Disabled" }}
recursiveReadOnly: {{ .Values.agent.recursiveReadOnly }}
{{- end }}
mountPropagation: None
{{- end }}
