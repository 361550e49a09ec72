//! The binary's only raw system calls.
#![allow(unsafe_code)]

/// Sends SIGKILL to `pid`.
pub fn kill(pid: u32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill(2) takes plain integers and has no memory effects in this process.
    let r = unsafe { libc::kill(pid, libc::SIGKILL) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Raises the soft limit of open files to the hard limit: every flow is one or two sockets, and
/// the usual soft limit of 1024 would cap the node far below its flow limit. Returns the limit in
/// force afterwards.
pub fn raise_nofile() -> libc::rlim_t {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the rlimit struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    r.rlim_cur
}

/// Returns the objects this thread's allocator cache holds to the shared arenas (jemalloc's
/// `thread.tcache.flush`). Freed objects a thread keeps for reuse each pin a page of their size
/// class; a runtime worker that served a burst and then went idle kept megabytes resident that way.
pub fn flush_thread_cache() -> bool {
    // SAFETY: `thread.tcache.flush` is an action: it reads and writes nothing through the null
    // pointers passed, and the name is a NUL-terminated static string.
    let r = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.tcache.flush".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    r == 0
}
