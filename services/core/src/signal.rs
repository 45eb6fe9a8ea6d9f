//! POSIX signals to one process by pid: the crash failpoints, the supervisor and the test
//! harness stop, freeze and kill processes through here, so the workspace has a single
//! `kill(2)` call. A pid of 0 or one that does not fit `pid_t` is refused, never read as
//! "my process group" or "every process".

use std::io;

/// The signals sieve sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: stop gracefully.
    Term,
    /// SIGKILL: stop now, no destructors, no flushes.
    Kill,
    /// SIGSTOP: freeze (a process that stops answering without closing its sockets).
    Stop,
    /// SIGCONT: go on after [`Signal::Stop`].
    Cont,
}

impl Signal {
    fn number(self) -> libc::c_int {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
        }
    }
}

/// Sends `signal` to the process `pid`.
pub fn send(pid: u32, signal: Signal) -> io::Result<()> {
    kill(pid, signal.number())
}

/// Whether a process `pid` exists (signal 0: the permission and existence check only).
pub fn alive(pid: u32) -> bool {
    kill(pid, 0).is_ok()
}

#[allow(unsafe_code)]
fn kill(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("pid {pid}")))?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours; a positive pid
    // addresses exactly one process.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_group_pid_is_refused() {
        assert!(alive(std::process::id()));
        assert!(!alive(0));
        assert!(send(u32::MAX, Signal::Term).is_err());
    }
}
