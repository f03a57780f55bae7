package clustertest

import "net/http"

// Clusters the harness starts run with authentication on: node 0 creates
// the first admin with admin.AdminPassword, and Transport logs in as it.

// baseTransport is net/http's default transport as the process started
// with, before any test wrapped http.DefaultTransport.
var baseTransport = http.DefaultTransport.(*http.Transport)
