{{- define "nimbus.labels" -}}
app.kubernetes.io/name: nimbus
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "nimbus.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $eps = append $eps (printf "https://%s-etcd-%d.%s-etcd.%s.svc:2379" $.Release.Name $i $.Release.Name $.Release.Namespace) -}}
{{- end -}}
{{- join "," $eps -}}
{{- else -}}
{{- required "etcd.endpoints is required when etcd.enabled is false" (join "," .Values.etcd.endpoints) -}}
{{- end -}}
{{- end -}}

{{- define "nimbus.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "nimbus.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{- define "nimbus.etcdPeers" -}}
{{- $peers := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $peers = append $peers (printf "%s-etcd-%d=https://%s-etcd-%d.%s-etcd.%s.svc:2380" $.Release.Name $i $.Release.Name $i $.Release.Name $.Release.Namespace) -}}
{{- end -}}
{{- join "," $peers -}}
{{- end -}}

{{- /* Namespaces allowed to scrape metrics, as `key=value,...` for the operator. */ -}}
{{- define "nimbus.metricsNamespaces" -}}
{{- $pairs := list -}}
{{- range $k, $v := .Values.networkPolicy.metricsNamespaceSelector -}}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
