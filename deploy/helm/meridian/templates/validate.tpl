{{/*
Checks that fail the render with a reason instead of a cluster that cannot
form. Included by nodes.yaml.
*/}}
{{- define "meridian.validate" -}}
{{- $root := . -}}
{{- if not .Values.regions -}}{{- fail "regions: list at least one region" -}}{{- end -}}
{{- range $k, $v := .Values.secrets -}}
{{- if and (ne $k "httpTLS") (not $v) -}}{{- fail (printf "secrets.%s: name the existing Secret (docs/deploy.md)" $k) -}}{{- end -}}
{{- end -}}
{{- $seen := dict -}}
{{- $total := 0 -}}
{{- range $r := .Values.regions -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" (toString $r.name)) -}}
{{- fail (printf "regions: name %q: use lower-case letters, digits and '-' (it names Kubernetes objects)" (toString $r.name)) -}}
{{- end -}}
{{- if hasKey $seen $r.name -}}{{- fail (printf "regions: %s is listed twice" $r.name) -}}{{- end -}}
{{- $_ := set $seen $r.name true -}}
{{- if not $r.store -}}{{- fail (printf "regions[%s].store is required" $r.name) -}}{{- end -}}
{{- if regexMatch "^s3://[^/]*@" $r.store -}}
{{- fail (printf "regions[%s].store holds credentials: put them in the Secret named by credentialsSecret (keys accessKey, secretKey)" $r.name) -}}
{{- end -}}
{{- if lt (int $r.replicas) 1 -}}{{- fail (printf "regions[%s].replicas: a region needs at least one node (its nodes replicate into its store)" $r.name) -}}{{- end -}}
{{- $total = add $total (int $r.replicas) -}}
{{- $last := printf "%s-%d" (include "meridian.nodeSet" (dict "root" $root "region" $r)) (sub (int $r.replicas) 1) -}}
{{- if gt (len $last) 63 -}}{{- fail (printf "node id %s is longer than 63 characters: shorten the release or region name" $last) -}}{{- end -}}
{{- if $root.Values.gateway.enabled -}}
{{- $gwID := add (len $root.Values.gateway.certificateID) 1 (len (include "meridian.gatewayName" (dict "root" $root "region" $r))) 17 -}}
{{- if gt $gwID 63 -}}{{- fail (printf "gateway ids (%s-<pod name>) of region %s would pass 63 characters: shorten gateway.certificateID, the release or the region name" $root.Values.gateway.certificateID $r.name) -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- /* The leader keeps min(voters, nodes) voters and gives every region
  one before any gets a second; the rest may land anywhere. Losing a
  region must leave a quorum: its worst-case share below half. */ -}}
{{- $voters := min (int .Values.voters) $total -}}
{{- $n := len .Values.regions -}}
{{- if lt (int .Values.voters) 1 -}}{{- fail "voters must be at least 1" -}}{{- end -}}
{{- if ge $n 3 -}}
{{- if lt $voters $n -}}
{{- fail (printf "voters: %d voters over %d regions leave some region without a voter and one with the deciding vote; use at least %d" $voters $n $n) -}}
{{- end -}}
{{- range $r := .Values.regions -}}
{{- $worst := min (int $r.replicas) (sub $voters (sub $n 1)) -}}
{{- if ge (mul 2 $worst) $voters -}}
{{- fail (printf "voters: region %s may hold %d of the %d voters, so losing it could lose the quorum; give it fewer nodes or the others more" $r.name $worst $voters) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
