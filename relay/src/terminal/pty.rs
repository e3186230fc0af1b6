//! A pseudo-terminal pair: the master end, read and written asynchronously by the relay,
//! and the slave end, which becomes a shell's stdin, stdout, stderr and controlling
//! terminal (see [`attach`]).
//!
//! Both ends are opened close-on-exec (the master must never leak into the shell or into
//! an agent started later, or the terminal would not hang up when the relay lets it go),
//! and the master is non-blocking, driven by tokio's reactor. This module knows nothing
//! of sessions or sockets.

use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use cloud_protocol::terminal::WindowSize;
use tokio::io::unix::AsyncFd;

/// The master end of a pseudo-terminal.
#[derive(Debug)]
pub struct Master {
    /// The non-blocking master descriptor, registered with the reactor.
    fd: AsyncFd<OwnedFd>,
}

/// Opens a pseudo-terminal of `size`: its master, and its slave for [`attach`].
pub fn open(size: WindowSize) -> io::Result<(Master, OwnedFd)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let mut winsize = to_winsize(size);
    // SAFETY: openpty writes two descriptors into the pointed-to ints; no name buffer and
    // no termios are passed (the defaults), and the winsize outlives the call.
    let opened = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            // A `*mut`, which macOS's signature takes and Linux's `*const` accepts.
            std::ptr::addr_of_mut!(winsize),
        )
    };
    if opened != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded, so both are open descriptors this process owns alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    set_flag(master.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC)?;
    set_flag(slave.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC)?;
    set_flag(master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK)?;
    // SAFETY: an `OwnedFd` keeps its one descriptor open, unchanged, until it is dropped
    // with the `AsyncFd`.
    let fd = unsafe { AsyncFd::register(master) }?;
    Ok((Master { fd }, slave))
}

/// Makes the terminal `slave` the calling process's controlling terminal, in a new
/// session (so the shell leads its own process group and gets job control and
/// SIGWINCH). For `pre_exec`, once the slave is on fd 0: only async-signal-safe calls.
pub fn attach() -> io::Result<()> {
    // SAFETY: setsid and ioctl are async-signal-safe and act on the child being set up.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        #[allow(clippy::useless_conversion)] // the request's type differs by platform
        if libc::ioctl(0, libc::TIOCSCTTY.into(), 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Master {
    /// Reads what the terminal wrote; `Ok(0)` once nothing holds the slave end any more
    /// (Linux answers EIO then, which is the same thing).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| read_fd(fd.as_raw_fd(), buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads what is there without waiting: `Ok(None)` when nothing is.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match read_fd(self.fd.as_raw_fd(), buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            result => result.map(Some),
        }
    }

    /// Writes some of `bytes` (typed input) once the terminal takes any; returns how many.
    pub async fn write(&self, bytes: &[u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                // SAFETY: writes from a live slice to a descriptor this struct owns.
                let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Sets the terminal's size; the shell's foreground process group gets SIGWINCH.
    pub fn resize(&self, size: WindowSize) -> io::Result<()> {
        let winsize = to_winsize(size);
        // SAFETY: TIOCSWINSZ reads a winsize that outlives the call.
        #[allow(clippy::useless_conversion)] // the request's type differs by platform
        let result = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TIOCSWINSZ.into(), &winsize) };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reads into a live, writable slice from an open descriptor.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n >= 0 {
        return Ok(n as usize);
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EIO) {
        // The slave's last holder closed it: the terminal hung up.
        return Ok(0);
    }
    Err(error)
}

fn set_flag(fd: RawFd, set: libc::c_int, flag: libc::c_int) -> io::Result<()> {
    let get = if set == libc::F_SETFD {
        libc::F_GETFD
    } else {
        libc::F_GETFL
    };
    // SAFETY: fcntl on a descriptor this module just opened.
    unsafe {
        let flags = libc::fcntl(fd, get);
        if flags < 0 || libc::fcntl(fd, set, flags | flag) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn to_winsize(size: WindowSize) -> libc::winsize {
    let size = size.or_default();
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}
