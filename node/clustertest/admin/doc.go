// Package admin holds the credentials of the first admin in clusters that
// Meridian's test harnesses start, and an HTTP transport that logs in with
// them. It imports nothing of Meridian, so every test package can use it.
package admin
