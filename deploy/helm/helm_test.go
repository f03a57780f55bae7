package helm

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"go.yaml.in/yaml/v3"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	sigsyaml "sigs.k8s.io/yaml"

	"github.com/meridian-registry/meridian/gateway"
	"github.com/meridian-registry/meridian/node"
)

const (
	chart     = "meridian"
	namespace = "registry"
	release   = "reg"
)

// helmBinary is helm from MERIDIAN_HELM (make test sets it), else the
// pinned one in bin/tools.
func helmBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("MERIDIAN_HELM"); p != "" {
		return p
	}
	p, _ := filepath.Abs("../../bin/tools/helm")
	if _, err := os.Stat(p); err != nil {
		t.Skip("helm not found: set MERIDIAN_HELM or run make test (it installs helm into bin/tools)")
	}
	return p
}

// valueSets are the renderings checked: every shipped values file, and the
// switches that change what is rendered.
var valueSets = []struct {
	name string
	args []string
}{
	{"one-region", nil},
	{"one-region-https-monitored", []string{"--set", "secrets.httpTLS=meridian-https", "--set", "serviceMonitor.enabled=true",
		"--set", "bootstrap=false", "--set", "gateway.autoscaling.enabled=false"}},
	{"three-regions", []string{"-f", "meridian/values-three-regions.yaml"}},
	{"three-regions-joined", []string{"-f", "meridian/values-three-regions.yaml", "--set", "bootstrap=false",
		"--set", "serviceMonitor.enabled=true", "--set", "ports.http=8080", "--set", "ports.gossip=7946"}},
}

func TestChart(t *testing.T) {
	helm := helmBinary(t)
	if out, err := exec.Command(helm, "lint", chart, "-f", "meridian/values-three-regions.yaml").CombinedOutput(); err != nil {
		t.Fatalf("helm lint: %v\n%s", err, out)
	}
	for _, vs := range valueSets {
		t.Run(vs.name, func(t *testing.T) {
			if out, err := exec.Command(helm, append([]string{"lint", chart}, vs.args...)...).CombinedOutput(); err != nil {
				t.Fatalf("helm lint: %v\n%s", err, out)
			}
			r := render(t, helm, vs.args...)
			checkRendering(t, r)
		})
	}
}

// TestChartRefusesBadLayouts: layouts that could not form a safe cluster,
// or that would put secret material in values, fail to render.
func TestChartRefusesBadLayouts(t *testing.T) {
	helm := helmBinary(t)
	three := []string{"-f", "meridian/values-three-regions.yaml"}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"region with a deciding share", append(slices.Clone(three), "--set", "regions[0].replicas=3"), "losing it could lose the quorum"},
		{"fewer voters than regions", append(slices.Clone(three), "--set", "voters=2"), "use at least 3"},
		{"credentials in a store URL", []string{"--set-json", `regions=[{"name":"local","store":"s3://AK:SK@host:9000/b","replicas":1,"gateway":{"minReplicas":1,"maxReplicas":2}}]`}, "holds credentials"},
		{"no secret name", []string{"--set", "secrets.gossipKey="}, "secrets.gossipKey"},
		{"region name unfit for Kubernetes", []string{"--set-json", `regions=[{"name":"US_East","store":"s3://h/b","replicas":1,"gateway":{"minReplicas":1,"maxReplicas":2}}]`}, "lower-case"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := exec.Command(helm, append([]string{"template", release, chart}, tc.args...)...).CombinedOutput()
			if err == nil || !strings.Contains(string(out), tc.want) {
				t.Fatalf("want a refusal containing %q, got err=%v\n%s", tc.want, err, out)
			}
		})
	}
}

// rendering is one `helm template` output, decoded.
type rendering struct {
	values          map[string]any
	configMaps      []*corev1.ConfigMap
	services        []*corev1.Service
	statefulSets    []*appsv1.StatefulSet
	deployments     []*appsv1.Deployment
	pdbs            []*policyv1.PodDisruptionBudget
	hpas            []*autoscalingv2.HorizontalPodAutoscaler
	netpols         []*networkingv1.NetworkPolicy
	serviceMonitors []*monitoringv1.ServiceMonitor
	secrets         []*corev1.Secret
}

func render(t *testing.T, helm string, args ...string) *rendering {
	t.Helper()
	cmd := exec.Command(helm, append([]string{"template", release, chart, "--namespace", namespace}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helm template %v: %v\n%s", args, err, stderr.String())
	}
	r := &rendering{values: computedValues(t, helm, args)}
	for i, doc := range strings.Split(string(out), "\n---\n") {
		js, err := sigsyaml.YAMLToJSON([]byte(doc))
		if err != nil {
			t.Fatalf("document %d is not YAML: %v\n%s", i, err, doc)
		}
		if string(js) == "null" {
			continue
		}
		var tm metav1.TypeMeta
		if err := json.Unmarshal(js, &tm); err != nil {
			t.Fatal(err)
		}
		obj := r.add(t, tm)
		dec := json.NewDecoder(bytes.NewReader(js))
		dec.DisallowUnknownFields()
		if err := dec.Decode(obj); err != nil {
			t.Fatalf("%s/%s does not decode strictly: %v\n%s", tm.APIVersion, tm.Kind, err, doc)
		}
	}
	return r
}

// computedValues are the values helm rendered with (defaults and overrides).
func computedValues(t *testing.T, helm string, args []string) map[string]any {
	t.Helper()
	// `helm template` prints no values; render a one-off template of them.
	dir := t.TempDir()
	if err := os.CopyFS(dir, os.DirFS(chart)); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "templates", "zz-values.yaml"), []byte("{{ toJson .Values }}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var fixed []string
	for _, a := range args {
		fixed = append(fixed, strings.Replace(a, "meridian/", chart+"/", 1))
	}
	out, err := exec.Command(helm, append([]string{"template", release, dir, "--show-only", "templates/zz-values.yaml"}, fixed...)...).Output()
	if err != nil {
		t.Fatalf("values: %v", err)
	}
	_, body, _ := strings.Cut(string(out), "\n{")
	var v map[string]any
	if err := json.Unmarshal([]byte("{"+body), &v); err != nil {
		t.Fatalf("values: %v\n%s", err, out)
	}
	return v
}

// add makes room for an object of a kind the chart may render; any other
// kind fails the test, so a new kind must be added here (and checked).
func (r *rendering) add(t *testing.T, tm metav1.TypeMeta) any {
	switch tm.APIVersion + "/" + tm.Kind {
	case "v1/ConfigMap":
		cm := &corev1.ConfigMap{}
		r.configMaps = append(r.configMaps, cm)
		return cm
	case "v1/Service":
		s := &corev1.Service{}
		r.services = append(r.services, s)
		return s
	case "v1/Secret":
		s := &corev1.Secret{}
		r.secrets = append(r.secrets, s)
		return s
	case "apps/v1/StatefulSet":
		s := &appsv1.StatefulSet{}
		r.statefulSets = append(r.statefulSets, s)
		return s
	case "apps/v1/Deployment":
		d := &appsv1.Deployment{}
		r.deployments = append(r.deployments, d)
		return d
	case "policy/v1/PodDisruptionBudget":
		p := &policyv1.PodDisruptionBudget{}
		r.pdbs = append(r.pdbs, p)
		return p
	case "autoscaling/v2/HorizontalPodAutoscaler":
		h := &autoscalingv2.HorizontalPodAutoscaler{}
		r.hpas = append(r.hpas, h)
		return h
	case "networking.k8s.io/v1/NetworkPolicy":
		n := &networkingv1.NetworkPolicy{}
		r.netpols = append(r.netpols, n)
		return n
	case "monitoring.coreos.com/v1/ServiceMonitor":
		s := &monitoringv1.ServiceMonitor{}
		r.serviceMonitors = append(r.serviceMonitors, s)
		return s
	}
	t.Fatalf("the chart renders %s %s, which this test does not know", tm.APIVersion, tm.Kind)
	return nil
}

func (r *rendering) configMap(name string) *corev1.ConfigMap {
	for _, cm := range r.configMaps {
		if cm.Name == name {
			return cm
		}
	}
	return nil
}

// member is one pod template of the chart with its decoded config files.
type member struct {
	kind     string // "node" or "gateway"
	name     string // the workload
	template *corev1.PodTemplateSpec
	// configs by pod name (nodes) or "gateway" (every replica).
	configs map[string]node.Config
}

func checkRendering(t *testing.T, r *rendering) {
	if len(r.secrets) > 0 {
		t.Errorf("the chart renders %d Secret(s); it must only reference existing ones", len(r.secrets))
	}
	if len(r.statefulSets) == 0 {
		t.Fatal("no StatefulSet rendered")
	}
	members := r.members(t)
	ports := r.ports(t, members)
	for _, m := range members {
		checkSecurity(t, m)
		checkContainerPorts(t, m, ports)
		checkProbes(t, m, ports)
		checkSecretRefs(t, r, m)
	}
	r.checkDNSAndJoins(t, members, ports)
	r.checkServices(t, members)
	r.checkPDBs(t, members)
	r.checkHPAs(t)
	r.checkNetworkPolicies(t, members, ports)
	r.checkServiceMonitors(t)
	r.checkVoters(t, members)
}

// members decodes every workload's config files as meridian does (strict
// YAML over the defaults, then the MERIDIAN_* env of the pod) and
// validates them.
func (r *rendering) members(t *testing.T) []member {
	t.Helper()
	var ms []member
	for _, s := range r.statefulSets {
		m := member{kind: "node", name: s.Name, template: &s.Spec.Template, configs: map[string]node.Config{}}
		cm := r.mountedConfig(t, m)
		if want := "/etc/meridian/config/$(POD_NAME).yaml"; !slices.Contains(container(m).Args, want) {
			t.Errorf("%s: args %v do not read %s", s.Name, container(m).Args, want)
		}
		replicas := int(*s.Spec.Replicas)
		if len(cm.Data) != replicas {
			t.Errorf("%s: %d replicas but %d config files", s.Name, replicas, len(cm.Data))
		}
		for i := range replicas {
			pod := fmt.Sprintf("%s-%d", s.Name, i)
			body, ok := cm.Data[pod+".yaml"]
			if !ok {
				t.Errorf("%s: no config file for pod %s", cm.Name, pod)
				continue
			}
			c := decodeConfig(t, cm.Name+"/"+pod, body, node.DefaultConfig(), container(m), pod)
			if c.NodeID != pod {
				t.Errorf("%s: node_id %q, want the pod name", pod, c.NodeID)
			}
			if err := c.Validate(); err != nil {
				t.Errorf("%s: meridian serve would refuse its config: %v", pod, err)
			}
			m.configs[pod] = c
		}
		ms = append(ms, m)
	}
	for _, d := range r.deployments {
		m := member{kind: "gateway", name: d.Name, template: &d.Spec.Template, configs: map[string]node.Config{}}
		cm := r.mountedConfig(t, m)
		body, ok := cm.Data["gateway.yaml"]
		if !ok || !slices.Contains(container(m).Args, "/etc/meridian/config/gateway.yaml") {
			t.Fatalf("%s: does not run with %s's gateway.yaml (args %v)", d.Name, cm.Name, container(m).Args)
		}
		pod := d.Name + "-7d9f8c6b5-x2x9k"
		c := decodeConfig(t, cm.Name, body, node.DefaultConfig(), container(m), pod)
		// What meridian gateway checks before it starts.
		if err := c.Validate(); err != nil {
			t.Errorf("%s: config invalid: %v", d.Name, err)
		}
		if len(c.Join) == 0 {
			t.Errorf("%s: a gateway without join seeds", d.Name)
		}
		m.configs["gateway"] = c
		ms = append(ms, m)
	}
	return ms
}

func container(m member) *corev1.Container {
	return &m.template.Spec.Containers[0]
}

// mountedConfig is the ConfigMap mounted at /etc/meridian/config.
func (r *rendering) mountedConfig(t *testing.T, m member) *corev1.ConfigMap {
	t.Helper()
	if n := len(m.template.Spec.Containers); n != 1 {
		t.Fatalf("%s: %d containers, want 1", m.name, n)
	}
	var volume string
	for _, vm := range container(m).VolumeMounts {
		if vm.MountPath == "/etc/meridian/config" {
			volume = vm.Name
		}
	}
	for _, v := range m.template.Spec.Volumes {
		if v.Name == volume && v.ConfigMap != nil {
			if cm := r.configMap(v.ConfigMap.Name); cm != nil {
				return cm
			}
			t.Fatalf("%s: mounts ConfigMap %s, which the chart does not render", m.name, v.ConfigMap.Name)
		}
	}
	t.Fatalf("%s: no ConfigMap mounted at /etc/meridian/config", m.name)
	return nil
}

// decodeConfig reads a config file the way loadConfig does (strict YAML
// over defaults), then applies the container's MERIDIAN_* variables with
// the downward API values a pod named pod would see.
func decodeConfig(t *testing.T, what, body string, c node.Config, ctr *corev1.Container, pod string) node.Config {
	t.Helper()
	dec := yaml.NewDecoder(strings.NewReader(body))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		t.Fatalf("%s: meridian would refuse the config file: %v\n%s", what, err, body)
	}
	vars := map[string]string{"POD_NAME": pod, "POD_IP": "10.1.2.3"}
	for _, e := range ctr.Env {
		if e.ValueFrom != nil {
			continue
		}
		v := e.Value
		for k, x := range vars {
			v = strings.ReplaceAll(v, "$("+k+")", x)
		}
		vars[e.Name] = v
		switch e.Name {
		case "POD_NAME", "POD_IP":
		case "MERIDIAN_ADVERTISE_GOSSIP":
			c.AdvertiseGossip = v
		case "MERIDIAN_GATEWAY_ID":
			c.GatewayID = v
		default:
			t.Errorf("%s: env %s has a literal value the test does not know; settings belong in the config file and secrets in Secrets", what, e.Name)
		}
	}
	return c
}

func portOf(t *testing.T, addr string) int32 {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil || n <= 0 {
		t.Fatalf("address %q has no fixed port", addr)
	}
	return int32(n)
}

// memberPorts are the ports every member's config agrees on.
type memberPorts struct{ http, grpc, raft, gossip int32 }

// ports reads each port from the config files, requiring every member to
// listen and advertise on the same ones.
func (r *rendering) ports(t *testing.T, ms []member) memberPorts {
	t.Helper()
	var p memberPorts
	same := func(what string, have *int32, v int32) {
		if *have == 0 {
			*have = v
		} else if *have != v {
			t.Errorf("%s: port %d, another member uses %d", what, v, *have)
		}
	}
	for _, m := range ms {
		for pod, c := range m.configs {
			same(pod+" http_addr", &p.http, portOf(t, c.HTTPAddr))
			same(pod+" gossip_addr", &p.gossip, portOf(t, c.GossipAddr))
			same(pod+" advertise_gossip", &p.gossip, portOf(t, c.AdvertiseGossip))
			if m.kind == "node" {
				same(pod+" grpc_addr", &p.grpc, portOf(t, c.GRPCAddr))
				same(pod+" raft_addr", &p.raft, portOf(t, c.RaftAddr))
				same(pod+" advertise_http", &p.http, portOf(t, c.AdvertiseHTTP))
				same(pod+" advertise_grpc", &p.grpc, portOf(t, c.AdvertiseGRPC))
				same(pod+" advertise_raft", &p.raft, portOf(t, c.AdvertiseRaft))
			}
			for _, j := range c.Join {
				same(pod+" join "+j, &p.gossip, portOf(t, j))
			}
		}
	}
	return p
}

func checkContainerPorts(t *testing.T, m member, p memberPorts) {
	want := map[string]corev1.ContainerPort{
		"http":       {Name: "http", ContainerPort: p.http, Protocol: corev1.ProtocolTCP},
		"gossip-tcp": {Name: "gossip-tcp", ContainerPort: p.gossip, Protocol: corev1.ProtocolTCP},
		"gossip-udp": {Name: "gossip-udp", ContainerPort: p.gossip, Protocol: corev1.ProtocolUDP},
	}
	if m.kind == "node" {
		want["grpc"] = corev1.ContainerPort{Name: "grpc", ContainerPort: p.grpc, Protocol: corev1.ProtocolTCP}
		want["raft"] = corev1.ContainerPort{Name: "raft", ContainerPort: p.raft, Protocol: corev1.ProtocolTCP}
	}
	got := map[string]corev1.ContainerPort{}
	for _, cp := range container(m).Ports {
		got[cp.Name] = cp
	}
	for name, w := range want {
		if got[name] != w {
			t.Errorf("%s: container port %s is %+v, the config listens on %+v", m.name, name, got[name], w)
		}
	}
	if len(got) != len(want) {
		t.Errorf("%s: container ports %v, want exactly %v", m.name, got, want)
	}
}

func checkProbes(t *testing.T, m member, p memberPorts) {
	ctr := container(m)
	https := false
	for _, c := range m.configs {
		https = c.HTTPTLSCert != ""
	}
	scheme := corev1.URISchemeHTTP
	if https {
		scheme = corev1.URISchemeHTTPS
	}
	for name, pr := range map[string]*corev1.Probe{"startup": ctr.StartupProbe, "liveness": ctr.LivenessProbe, "readiness": ctr.ReadinessProbe} {
		if pr == nil || pr.HTTPGet == nil {
			t.Errorf("%s: no HTTP %s probe", m.name, name)
			continue
		}
		want := "/healthz"
		if name == "readiness" {
			want = "/readyz"
		}
		g := pr.HTTPGet
		if g.Path != want || g.Port.IntValue() != int(p.http) || g.Scheme != scheme {
			t.Errorf("%s: %s probe %s %s:%s, want %s on port %d over %s", m.name, name, g.Scheme, g.Path, g.Port.String(), want, p.http, scheme)
		}
	}
}

// checkSecurity: non-root, read-only root, no capabilities, RuntimeDefault
// seccomp, the meridian image, no service account token.
func checkSecurity(t *testing.T, m member) {
	ps := m.template.Spec.SecurityContext
	cs := container(m).SecurityContext
	if ps == nil || cs == nil {
		t.Fatalf("%s: no security context", m.name)
	}
	isTrue := func(b *bool) bool { return b != nil && *b }
	switch {
	case !isTrue(ps.RunAsNonRoot) || !isTrue(cs.RunAsNonRoot):
		t.Errorf("%s: runAsNonRoot not set", m.name)
	case ps.RunAsUser == nil || *ps.RunAsUser != 65532:
		t.Errorf("%s: runAsUser %v, the image's user is 65532", m.name, ps.RunAsUser)
	case !isTrue(cs.ReadOnlyRootFilesystem):
		t.Errorf("%s: root filesystem writable", m.name)
	case cs.AllowPrivilegeEscalation == nil || *cs.AllowPrivilegeEscalation:
		t.Errorf("%s: privilege escalation allowed", m.name)
	case cs.Capabilities == nil || !slices.Equal(cs.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(cs.Capabilities.Add) > 0:
		t.Errorf("%s: capabilities %+v, want drop ALL and none added", m.name, cs.Capabilities)
	case ps.SeccompProfile == nil || ps.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault ||
		cs.SeccompProfile == nil || cs.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault:
		t.Errorf("%s: seccomp profile not RuntimeDefault", m.name)
	case m.template.Spec.AutomountServiceAccountToken == nil || *m.template.Spec.AutomountServiceAccountToken:
		t.Errorf("%s: mounts a service account token it never uses", m.name)
	}
	if img := container(m).Image; !strings.HasPrefix(img, "meridian:") || strings.HasSuffix(img, ":") {
		t.Errorf("%s: image %q, want meridian:<tag>", m.name, img)
	}
	if m.kind == "node" {
		for _, c := range m.configs {
			if !strings.HasPrefix(c.DataDir, "/data/") {
				// meridian chmods its data dir to 0700; the volume's root
				// belongs to root (fsGroup), so it must be a subdirectory.
				t.Errorf("%s: data_dir %q, want a directory inside the /data volume", m.name, c.DataDir)
			}
		}
	}
}

// checkSecretRefs: secrets come from the Secrets named in values, nothing
// secret is in a config file.
func checkSecretRefs(t *testing.T, r *rendering, m member) {
	named := map[string]bool{}
	for _, v := range r.values["secrets"].(map[string]any) {
		if s, _ := v.(string); s != "" {
			named[s] = true
		}
	}
	for _, reg := range r.values["regions"].([]any) {
		if s, _ := reg.(map[string]any)["credentialsSecret"].(string); s != "" {
			named[s] = true
		}
	}
	for _, v := range m.template.Spec.Volumes {
		if v.Secret != nil && !named[v.Secret.SecretName] {
			t.Errorf("%s: volume %s mounts Secret %s, which values do not name", m.name, v.Name, v.Secret.SecretName)
		}
	}
	for _, e := range container(m).Env {
		if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil && !named[e.ValueFrom.SecretKeyRef.Name] {
			t.Errorf("%s: env %s reads Secret %s, which values do not name", m.name, e.Name, e.ValueFrom.SecretKeyRef.Name)
		}
		if strings.HasPrefix(e.Name, "MERIDIAN_REGION_") && (e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil) {
			t.Errorf("%s: store credentials %s not from a Secret", m.name, e.Name)
		}
	}
	mounted := map[string]string{}
	for _, vm := range container(m).VolumeMounts {
		mounted[vm.Name] = vm.MountPath
	}
	secretDirs := map[string]bool{}
	for _, v := range m.template.Spec.Volumes {
		if v.Secret != nil {
			secretDirs[mounted[v.Name]] = true
		}
	}
	for pod, c := range m.configs {
		files := map[string]string{"tls_ca": c.TLSCA, "tls_crl": c.TLSCRL, "tls_cert": c.TLSCert, "tls_key": c.TLSKey, "gossip_key_file": c.GossipKeyFile}
		if m.kind == "node" {
			files["admin_password_file"] = c.Auth.AdminPasswordFile
		}
		if c.HTTPTLSCert != "" {
			files["http_tls_cert"], files["http_tls_key"] = c.HTTPTLSCert, c.HTTPTLSKey
		}
		for key, path := range files {
			if !secretDirs[filepath.Dir(path)] {
				t.Errorf("%s: %s %q is not in a mounted Secret", pod, key, path)
			}
		}
		for _, reg := range c.Regions {
			if strings.Contains(strings.SplitN(strings.TrimPrefix(reg.Store, "s3://"), "/", 2)[0], "@") {
				t.Errorf("%s: store of region %s carries credentials", pod, reg.Name)
			}
		}
	}
}

// checkDNSAndJoins: nodes advertise their stable pod DNS names, which a
// headless Service that publishes not-ready pods provides; every node joins
// through the others' names, except the one bootstrap node of a new
// cluster; every member lists the same regions.
func (r *rendering) checkDNSAndJoins(t *testing.T, ms []member, p memberPorts) {
	gossipNames := map[string]bool{}
	var firstPod string
	for _, s := range r.statefulSets {
		svc := r.service(s.Spec.ServiceName)
		switch {
		case svc == nil:
			t.Errorf("%s: serviceName %s is not rendered", s.Name, s.Spec.ServiceName)
			continue
		case svc.Spec.ClusterIP != corev1.ClusterIPNone || !svc.Spec.PublishNotReadyAddresses:
			t.Errorf("%s: Service %s must be headless and publish not-ready addresses", s.Name, svc.Name)
		case !selects(svc.Spec.Selector, s.Spec.Template.Labels):
			t.Errorf("%s: Service %s does not select its pods", s.Name, svc.Name)
		}
		for i := range int(*s.Spec.Replicas) {
			gossipNames[fmt.Sprintf("%s-%d.%s.%s.svc.cluster.local:%d", s.Name, i, s.Spec.ServiceName, namespace, p.gossip)] = true
		}
		if firstPod == "" {
			firstPod = s.Name + "-0"
		}
	}
	bootstrap := r.values["bootstrap"].(bool)
	var regions string
	var noJoin []string
	for _, m := range ms {
		for pod, c := range m.configs {
			rs, _ := json.Marshal(c.Regions)
			if regions == "" {
				regions = string(rs)
			} else if regions != string(rs) {
				t.Errorf("%s: regions %s differ from another member's %s (it would be refused at join)", pod, rs, regions)
			}
			if m.kind == "gateway" {
				if len(c.Join) != len(gossipNames) {
					t.Errorf("%s: joins through %v, want every node", pod, c.Join)
				}
				if !gateway.CertificateCovers(r.values["gateway"].(map[string]any)["certificateID"].(string), c.GatewayID) {
					t.Errorf("%s: gateway id %q is not covered by its certificate", pod, c.GatewayID)
				}
			}
			for _, j := range c.Join {
				if !gossipNames[j] {
					t.Errorf("%s: join seed %s is no node's gossip name", pod, j)
				}
			}
			if m.kind != "node" {
				continue
			}
			host := fmt.Sprintf("%s.%s.%s.svc.cluster.local", pod, r.serviceNameOf(m.name), namespace)
			for key, a := range map[string]string{"advertise_http": c.AdvertiseHTTP, "advertise_grpc": c.AdvertiseGRPC, "advertise_raft": c.AdvertiseRaft} {
				if h, _, _ := net.SplitHostPort(a); h != host {
					t.Errorf("%s: %s %q, want the pod's DNS name %s", pod, key, a, host)
				}
			}
			self := fmt.Sprintf("%s:%d", host, p.gossip)
			if slices.Contains(c.Join, self) {
				t.Errorf("%s: joins through itself", pod)
			}
			if len(c.Join) == 0 {
				noJoin = append(noJoin, pod)
			} else if len(c.Join) != len(gossipNames)-1 {
				t.Errorf("%s: joins through %d nodes, want the other %d", pod, len(c.Join), len(gossipNames)-1)
			}
		}
	}
	want := []string(nil)
	if bootstrap || len(gossipNames) == 1 {
		want = []string{firstPod}
	}
	if !slices.Equal(noJoin, want) {
		t.Errorf("nodes without join seeds (they bootstrap a new cluster when empty): %v, want %v", noJoin, want)
	}
}

func (r *rendering) service(name string) *corev1.Service {
	for _, s := range r.services {
		if s.Name == name {
			return s
		}
	}
	return nil
}

func (r *rendering) serviceNameOf(statefulSet string) string {
	for _, s := range r.statefulSets {
		if s.Name == statefulSet {
			return s.Spec.ServiceName
		}
	}
	return ""
}

func selects(selector, podLabels map[string]string) bool {
	return len(selector) > 0 && labels.SelectorFromSet(selector).Matches(labels.Set(podLabels))
}

// checkServices: every Service selects some member pods, and each port's
// target is a container port of those pods with the same number the
// config uses.
func (r *rendering) checkServices(t *testing.T, ms []member) {
	for _, svc := range r.services {
		var matched []member
		for _, m := range ms {
			if selects(svc.Spec.Selector, m.template.Labels) {
				matched = append(matched, m)
			}
		}
		if len(matched) == 0 {
			t.Errorf("Service %s selects no pod of the chart", svc.Name)
		}
		for _, m := range matched {
			for _, sp := range svc.Spec.Ports {
				found := false
				for _, cp := range container(m).Ports {
					if (sp.TargetPort.String() == cp.Name || sp.TargetPort.IntValue() == int(cp.ContainerPort)) && cp.Protocol == sp.Protocol {
						found = true
						if svc.Spec.ClusterIP == corev1.ClusterIPNone && sp.Port != cp.ContainerPort {
							t.Errorf("Service %s: headless port %s is %d, the pods listen on %d", svc.Name, sp.Name, sp.Port, cp.ContainerPort)
						}
					}
				}
				if !found {
					t.Errorf("Service %s: port %s targets %s/%s, which %s does not expose", svc.Name, sp.Name, sp.TargetPort.String(), sp.Protocol, m.name)
				}
			}
		}
	}
	for _, d := range r.deployments {
		found := false
		for _, svc := range r.services {
			found = found || selects(svc.Spec.Selector, d.Spec.Template.Labels) && svc.Spec.ClusterIP != corev1.ClusterIPNone
		}
		if !found {
			t.Errorf("gateway %s has no Service", d.Name)
		}
	}
}

// checkPDBs: every StatefulSet and Deployment has exactly one PDB that
// selects its pods and no other workload's.
func (r *rendering) checkPDBs(t *testing.T, ms []member) {
	for _, m := range ms {
		var covering []string
		for _, p := range r.pdbs {
			sel, err := metav1.LabelSelectorAsSelector(p.Spec.Selector)
			if err != nil {
				t.Fatalf("PDB %s: %v", p.Name, err)
			}
			if !sel.Empty() && sel.Matches(labels.Set(m.template.Labels)) {
				covering = append(covering, p.Name)
			}
		}
		if len(covering) != 1 {
			t.Errorf("%s %s: covered by PDBs %v, want exactly one", m.kind, m.name, covering)
		}
	}
	for _, p := range r.pdbs {
		if p.Spec.MaxUnavailable == nil && p.Spec.MinAvailable == nil {
			t.Errorf("PDB %s sets neither maxUnavailable nor minAvailable", p.Name)
		}
	}
}

func (r *rendering) checkHPAs(t *testing.T) {
	autoscaled := r.values["gateway"].(map[string]any)["autoscaling"].(map[string]any)["enabled"].(bool)
	for _, d := range r.deployments {
		var hpa *autoscalingv2.HorizontalPodAutoscaler
		for _, h := range r.hpas {
			if h.Spec.ScaleTargetRef.Kind == "Deployment" && h.Spec.ScaleTargetRef.Name == d.Name && h.Spec.ScaleTargetRef.APIVersion == "apps/v1" {
				hpa = h
			}
		}
		switch {
		case !autoscaled && hpa != nil:
			t.Errorf("%s: an HPA with autoscaling off", d.Name)
		case !autoscaled:
			if d.Spec.Replicas == nil || *d.Spec.Replicas < 1 {
				t.Errorf("%s: no replicas without an HPA", d.Name)
			}
		case hpa == nil:
			t.Errorf("%s: no HorizontalPodAutoscaler", d.Name)
		case d.Spec.Replicas != nil:
			t.Errorf("%s: sets replicas that would fight its HPA", d.Name)
		case hpa.Spec.MinReplicas == nil || *hpa.Spec.MinReplicas < 1 || *hpa.Spec.MinReplicas > hpa.Spec.MaxReplicas || len(hpa.Spec.Metrics) == 0:
			t.Errorf("%s: HPA bounds %v..%d, metrics %v", d.Name, hpa.Spec.MinReplicas, hpa.Spec.MaxReplicas, hpa.Spec.Metrics)
		}
	}
}

// checkNetworkPolicies: every port a member listens on is open to whom it
// must be and no one else: HTTP to clients; gRPC and gossip to the
// release's members; Raft to nodes only.
func (r *rendering) checkNetworkPolicies(t *testing.T, ms []member, p memberPorts) {
	if !r.values["networkPolicy"].(map[string]any)["enabled"].(bool) {
		return
	}
	var nodeLabels, gatewayLabels []map[string]string
	for _, m := range ms {
		if m.kind == "node" {
			nodeLabels = append(nodeLabels, m.template.Labels)
		} else {
			gatewayLabels = append(gatewayLabels, m.template.Labels)
		}
	}
	// allowed lists who may reach (port, protocol) of a pod with podLabels:
	// "anyone", "nodes", "members", or "other" for an outside peer.
	allowed := func(podLabels map[string]string, port int32, proto corev1.Protocol) (who []string) {
		for _, np := range r.netpols {
			sel, _ := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
			if !sel.Matches(labels.Set(podLabels)) {
				continue
			}
			for _, rule := range np.Spec.Ingress {
				opens := false
				for _, rp := range rule.Ports {
					if rp.Port != nil && rp.Port.IntValue() == int(port) && (rp.Protocol == nil || *rp.Protocol == proto) {
						opens = true
					}
				}
				if !opens {
					continue
				}
				if len(rule.From) == 0 {
					who = append(who, "anyone")
				}
				for _, peer := range rule.From {
					who = append(who, peerKind(peer, nodeLabels, gatewayLabels))
				}
			}
		}
		return who
	}
	adminFrom := len(r.values["networkPolicy"].(map[string]any)["adminFrom"].([]any)) > 0
	for _, m := range ms {
		for _, np := range r.netpols {
			sel, _ := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
			if !sel.Matches(labels.Set(m.template.Labels)) {
				continue
			}
			for _, rule := range np.Spec.Ingress {
				for _, rp := range rule.Ports {
					used := false
					for _, cp := range container(m).Ports {
						used = used || rp.Port != nil && rp.Port.IntValue() == int(cp.ContainerPort) && rp.Protocol != nil && *rp.Protocol == cp.Protocol
					}
					if !used {
						t.Errorf("%s: NetworkPolicy %s opens %v/%s, which the pod does not listen on", m.name, np.Name, rp.Port, ptrString(rp.Protocol))
					}
				}
			}
		}
		check := func(what string, port int32, proto corev1.Protocol, want ...string) {
			got := allowed(m.template.Labels, port, proto)
			slices.Sort(got)
			got = slices.Compact(got)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Errorf("%s: %s port %d/%s reachable by %v, want %v", m.name, what, port, proto, got, want)
			}
		}
		check("http", p.http, corev1.ProtocolTCP, "anyone")
		check("gossip", p.gossip, corev1.ProtocolTCP, "members")
		check("gossip", p.gossip, corev1.ProtocolUDP, "members")
		if m.kind == "node" {
			check("raft", p.raft, corev1.ProtocolTCP, "nodes")
			if adminFrom {
				check("grpc", p.grpc, corev1.ProtocolTCP, "members", "other")
			} else {
				check("grpc", p.grpc, corev1.ProtocolTCP, "members")
			}
		} else {
			check("raft", p.raft, corev1.ProtocolTCP)
			check("grpc", p.grpc, corev1.ProtocolTCP)
		}
	}
}

// peerKind names what a NetworkPolicy peer admits: exactly the nodes,
// every member (nodes and gateways), or something else.
func peerKind(peer networkingv1.NetworkPolicyPeer, nodes, gateways []map[string]string) string {
	if peer.PodSelector == nil || peer.NamespaceSelector != nil || peer.IPBlock != nil {
		return "other"
	}
	sel, err := metav1.LabelSelectorAsSelector(peer.PodSelector)
	if err != nil || sel.Empty() {
		return "other"
	}
	all := func(ls []map[string]string) bool {
		for _, l := range ls {
			if !sel.Matches(labels.Set(l)) {
				return false
			}
		}
		return true
	}
	none := func(ls []map[string]string) bool {
		for _, l := range ls {
			if sel.Matches(labels.Set(l)) {
				return false
			}
		}
		return true
	}
	// The selector must name this release's members: it must not match a
	// pod that merely shares the component label.
	foreign := map[string]string{"app.kubernetes.io/component": "node", "app.kubernetes.io/instance": "another"}
	switch {
	case sel.Matches(labels.Set(foreign)):
		return "other"
	case all(nodes) && none(gateways):
		return "nodes"
	case all(nodes) && all(gateways):
		return "members"
	}
	return "other"
}

func (r *rendering) checkServiceMonitors(t *testing.T) {
	enabled := r.values["serviceMonitor"].(map[string]any)["enabled"].(bool)
	if enabled != (len(r.serviceMonitors) == 1) {
		t.Fatalf("serviceMonitor.enabled=%v but %d ServiceMonitors", enabled, len(r.serviceMonitors))
	}
	for _, sm := range r.serviceMonitors {
		sel, err := metav1.LabelSelectorAsSelector(&sm.Spec.Selector)
		if err != nil {
			t.Fatal(err)
		}
		scraped := map[string]bool{}
		for _, svc := range r.services {
			if !sel.Matches(labels.Set(svc.Labels)) {
				continue
			}
			for _, ep := range sm.Spec.Endpoints {
				ok := false
				for _, sp := range svc.Spec.Ports {
					ok = ok || sp.Name == ep.Port
				}
				if !ok || ep.Path != "/metrics" {
					t.Errorf("ServiceMonitor %s: Service %s has no port %q for %s", sm.Name, svc.Name, ep.Port, ep.Path)
				}
			}
			for _, s := range r.statefulSets {
				scraped[s.Name] = scraped[s.Name] || selects(svc.Spec.Selector, s.Spec.Template.Labels)
			}
			for _, d := range r.deployments {
				scraped[d.Name] = scraped[d.Name] || selects(svc.Spec.Selector, d.Spec.Template.Labels)
			}
		}
		for name, ok := range scraped {
			if !ok {
				t.Errorf("ServiceMonitor %s does not scrape %s", sm.Name, name)
			}
		}
		if len(scraped) != len(r.statefulSets)+len(r.deployments) {
			t.Errorf("ServiceMonitor %s scrapes %d workloads of %d", sm.Name, len(scraped), len(r.statefulSets)+len(r.deployments))
		}
	}
}

// checkVoters: from the rendered nodes, the voter layout the leader
// converges to (node/reconcile.go) loses no quorum with any one region.
func (r *rendering) checkVoters(t *testing.T, ms []member) {
	perRegion := map[string]int{}
	voters := -1
	for _, m := range ms {
		if m.kind != "node" {
			continue
		}
		for pod, c := range m.configs {
			if voters != -1 && c.Voters != voters {
				t.Errorf("%s: voters %d, another node says %d", pod, c.Voters, voters)
			}
			voters = c.Voters
			perRegion[c.Region]++
		}
	}
	if err := voterSpread(voters, perRegion); err != nil {
		t.Error(err)
	}
}

// voterSpread reports a layout where losing one region may cost the
// quorum. The leader keeps min(voters, nodes) voters and first gives every
// region one (spreadVoters); the rest may land anywhere, so a region's
// worst case is min(its nodes, voters - (regions-1)). Checked from three
// regions on (with two, one of them always holds at least half).
func voterSpread(voters int, nodesPerRegion map[string]int) error {
	total := 0
	for _, n := range nodesPerRegion {
		total += n
	}
	v := min(voters, total)
	regions := len(nodesPerRegion)
	if regions < 3 {
		return nil
	}
	if v < regions {
		return fmt.Errorf("%d voters over %d regions", v, regions)
	}
	for name, n := range nodesPerRegion {
		if worst := min(n, v-(regions-1)); 2*worst >= v {
			return fmt.Errorf("region %s may hold %d of %d voters: losing it loses the quorum", name, worst, v)
		}
	}
	return nil
}

func TestVoterSpread(t *testing.T) {
	for _, tc := range []struct {
		voters int
		nodes  map[string]int
		ok     bool
	}{
		{3, map[string]int{"a": 1, "b": 1, "c": 1}, true},
		{5, map[string]int{"a": 2, "b": 2, "c": 1}, true},
		{5, map[string]int{"a": 3, "b": 1, "c": 1}, false},
		{3, map[string]int{"a": 3, "b": 3, "c": 3}, true},
		{4, map[string]int{"a": 2, "b": 1, "c": 1}, false},
		{2, map[string]int{"a": 1, "b": 1, "c": 1}, false},
		{7, map[string]int{"a": 5, "b": 1, "c": 1}, false},
		{3, map[string]int{"a": 3}, true},
	} {
		if err := voterSpread(tc.voters, tc.nodes); (err == nil) != tc.ok {
			t.Errorf("voterSpread(%d, %v) = %v, want ok=%v", tc.voters, tc.nodes, err, tc.ok)
		}
	}
}

func ptrString[T ~string](p *T) string {
	if p == nil {
		return "<nil>"
	}
	return string(*p)
}
