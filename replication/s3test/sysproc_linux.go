package s3test

import "syscall"

// sysProcAttr makes the kernel kill the server when the test binary dies,
// so that a test killed by its timeout leaves no server behind.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
