//! The harness itself, where it has to cope with the machine: a relay restarted on its
//! port while another socket holds that port for a moment still comes up.

use std::os::fd::{FromRawFd as _, OwnedFd};

use cloudd_e2e::{wait_for, Relay, DEADLINE};

/// A TCP socket bound to 127.0.0.1:`port` that neither listens nor connects, as another
/// test's outgoing connection holds its local port.
fn hold_port(port: u16) -> OwnedFd {
    // SAFETY: plain socket calls on a descriptor owned here; the address is a valid
    // `sockaddr_in` of the size given.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let owned = OwnedFd::from_raw_fd(fd);
        let address = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let bound = libc::bind(
            fd,
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
        owned
    }
}

#[test]
fn a_relay_restarted_while_its_port_is_taken_for_a_moment_still_starts() {
    let mut relay = Relay::start();
    relay.kill();
    let held = hold_port(relay.port);
    let log = relay.log_path();
    let before = std::fs::read_to_string(&log).unwrap_or_default().len();
    let freeing = std::thread::spawn(move || {
        wait_for("the relay to find its port taken", DEADLINE, || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.get(before..)
                .is_some_and(|new| new.contains("Address already in use"))
        });
        drop(held);
    });
    relay.restart();
    freeing.join().unwrap();
    // The relay that listens is the last one started, and it serves.
    assert!(relay
        .child
        .as_mut()
        .is_some_and(|child| child.try_wait().unwrap().is_none()));
    assert!(relay.log().contains("Address already in use"));
    assert!(!relay.token("ann", "acme").is_empty());
}
