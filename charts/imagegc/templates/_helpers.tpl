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

{{/* Each preset: the runtime's socket, its image filesystem (root) and the agent's backend. */}}
{{- define "imagegc.presets" -}}
containerd: {socket: /run/containerd/containerd.sock, root: /var/lib/containerd, runtime: containerd}
k3s: {socket: /run/k3s/containerd/containerd.sock, root: /var/lib/rancher/k3s/agent/containerd, runtime: containerd}
rke2: {socket: /run/k3s/containerd/containerd.sock, root: /var/lib/rancher/rke2/agent/containerd, runtime: containerd}
microk8s: {socket: /var/snap/microk8s/common/run/containerd.sock, root: /var/snap/microk8s/common/var/lib/containerd, runtime: containerd}
k0s: {socket: /run/k0s/containerd.sock, root: /var/lib/k0s/containerd, runtime: containerd}
crio: {socket: /var/run/crio/crio.sock, root: /var/lib/containers/storage, runtime: cri}
{{- end }}

{{/* The preset named by containerd.preset, or a failure listing every preset. */}}
{{- define "imagegc.preset" -}}
{{- $presets := include "imagegc.presets" . | fromYaml }}
{{- $name := toString .Values.containerd.preset }}
{{- if not (hasKey $presets $name) }}
{{- fail (printf "containerd.preset %q is unknown: use containerd, k3s, rke2, microk8s, k0s or crio (CRI-O), or set containerd.socket, containerd.root and containerd.runtime to the runtime's on the node" $name) }}
{{- end }}
{{- get $presets $name | toYaml }}
{{- end }}

{{/* The runtime's socket on the node: containerd.socket, else the preset's path. */}}
{{- define "imagegc.socket" -}}
{{- if .Values.containerd.socket }}
{{- if not (hasPrefix "/" .Values.containerd.socket) }}
{{- fail (printf "containerd.socket must be an absolute path on the node, got %q" .Values.containerd.socket) }}
{{- end }}
{{- .Values.containerd.socket }}
{{- else }}
{{- (include "imagegc.preset" . | fromYaml).socket }}
{{- end }}
{{- end }}

{{/* The runtime's root on the node (its image filesystem): containerd.root, else the preset's. */}}
{{- define "imagegc.containerdRoot" -}}
{{- if .Values.containerd.root }}
{{- if not (hasPrefix "/" .Values.containerd.root) }}
{{- fail (printf "containerd.root must be an absolute path on the node, got %q" .Values.containerd.root) }}
{{- end }}
{{- .Values.containerd.root }}
{{- else }}
{{- (include "imagegc.preset" . | fromYaml).root }}
{{- end }}
{{- end }}

{{/* The agent's backend (--runtime): containerd.runtime, else the preset's. */}}
{{- define "imagegc.runtime" -}}
{{- $runtime := .Values.containerd.runtime | default (include "imagegc.preset" . | fromYaml).runtime }}
{{- if not (has $runtime (list "auto" "containerd" "cri")) }}
{{- fail (printf "containerd.runtime must be auto, containerd or cri, got %q" $runtime) }}
{{- end }}
{{- $runtime }}
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

{{/* The directory the agent reads its image filesystem's usage from: on containerd,
`tmpmounts` in its root, which containerd creates at start-up (1.x and 2.x) for the
short-lived mounts it makes while reading an image's files (it is empty otherwise); on other
runtimes (CRI-O), their root itself. */}}
{{- define "imagegc.imageFsPath" -}}
{{- if eq (include "imagegc.runtime" .) "cri" }}
{{- include "imagegc.containerdRoot" . }}
{{- else }}
{{- printf "%s/tmpmounts" (include "imagegc.containerdRoot" .) }}
{{- end }}
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
