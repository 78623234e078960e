//! What the kernel's answer about one socket (an exact sock_diag lookup)
//! means for its endpoint in the flow maps. The agent asks when only the
//! kernel can tell: whether a FIN_WAIT2 socket is still held by its
//! application (it then has no timer at all) or orphaned on a time-wait
//! timer, whether a request was kept, completed or dropped, whether a
//! connect is still trying, whether a closed socket went on as a TIME_WAIT.
//!
//! One lookup is one moment of the kernel's table, read after the entry's
//! word: the change is made by compare-and-swap from that word, so a segment
//! that moved the entry meanwhile wins, and the next deadline asks again.

use std::time::Duration;

use tcpstate_common::{Side, TcpState, Word, machine::expire};

use crate::{
    kernel::sockdiag::SockInfo,
    tracking::timers::{Action, Timeouts, Why},
};

/// What to do with an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Swap this word in (stamping the entry `changed_ns`, when not 0).
    Set {
        word: Word,
        changed_ns: u64,
    },
    /// Nothing changes now; the next thing is due then.
    Later(u64, Action),
    Nothing,
}

/// Time for the kernel to act once its timer is due (its wheel may fire a
/// short timer a few jiffies late).
const KERNEL_LAG: Duration = Duration::from_millis(50);

/// The state `why` was asked about is still the endpoint's.
pub fn still_asked(word: Word, side: Side, why: Why) -> bool {
    if word.is_dead() || word.is_reaping() || !word.is_local(side) {
        return false;
    }
    let s = word.state(side);
    match why {
        Why::FinWait2 => s == TcpState::FinWait2,
        Why::Request => s == TcpState::SynRecv,
        Why::Connect => s == TcpState::SynSent,
        // TIME_WAIT too: the segments show it, the kernel may have had no
        // room for it (`tcp_max_tw_buckets`).
        Why::Closed => matches!(
            s,
            TcpState::FinWait2 | TcpState::Closing | TcpState::TimeWait
        ),
        // The states a retransmission timeout can end.
        Why::TimedOut => matches!(
            s,
            TcpState::Established
                | TcpState::CloseWait
                | TcpState::FinWait1
                | TcpState::Closing
                | TcpState::LastAck
        ),
    }
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

/// What `info` (the kernel's socket for `side`'s tuple, `None`: there is
/// none) means at `now_ns` for an entry whose word is `word`.
pub fn decide(
    word: Word,
    side: Side,
    why: Why,
    info: Option<&SockInfo>,
    now_ns: u64,
    t: &Timeouts,
) -> Answer {
    let Some(s) = info else {
        // Gone: the kernel ended it (a FIN_WAIT2 or request timer, a closed
        // listener's request, an orphan's time-wait timer).
        return Answer::Set {
            word: expire(word, side),
            changed_ns: 0,
        };
    };
    let ours = word.state(side);
    let kernel = TcpState::from_bits(s.state);
    let left = ns(s.expires);
    if s.is_timewait() {
        // A socket of the TIME_WAIT table: its timer was armed for `full`
        // and has `left` to go; the wheel rounds it as it rounds ours.
        let full = match kernel {
            TcpState::TimeWait => t.time_wait,
            _ => t.fin_wait2,
        };
        let armed = now_ns.saturating_sub(ns(full).saturating_sub(left));
        let fires = if left <= ns(full) {
            t.wheel(kernel, armed, full)
        } else {
            now_ns + left
        };
        return match kernel {
            TcpState::FinWait2 | TcpState::TimeWait if kernel == ours => {
                Answer::Later(fires, Action::Fire)
            }
            TcpState::FinWait2 | TcpState::TimeWait => Answer::Set {
                word: word.with_state(side, kernel),
                changed_ns: armed,
            },
            _ => Answer::Nothing,
        };
    }
    let connection = !matches!(
        kernel,
        TcpState::None | TcpState::Close | TcpState::Listen | TcpState::TimeWait
    );
    if connection && kernel != ours {
        // Something the segments did not show (or not yet): the kernel's
        // state wins.
        return Answer::Set {
            word: word.with_state(side, kernel).settle(),
            changed_ns: now_ns,
        };
    }
    let next = now_ns + left + ns(KERNEL_LAG);
    match (why, kernel) {
        // Held by its application: no timer until it closes, and then the
        // timer starts with tcp_fin_timeout. Look again before that could
        // end. An orphan whose tcp_fin_timeout is over 60 s waits on its
        // keepalive timer first.
        (Why::FinWait2, TcpState::FinWait2) => {
            let at = if s.timer == 2 {
                next
            } else {
                now_ns + ns(t.fin_wait2)
            };
            Answer::Later(at, Action::Ask(side, Why::FinWait2))
        }
        // A request (or a connect) still retrying: its timer says when
        // the kernel decides again.
        (Why::Request, TcpState::SynRecv) => Answer::Later(next, Action::Ask(side, Why::Request)),
        (Why::Connect, TcpState::SynSent) => Answer::Later(next, Action::Ask(side, Why::Connect)),
        // Given up on, still held by its application: closed.
        (Why::TimedOut, TcpState::Close) => Answer::Set {
            word: expire(word, side),
            changed_ns: 0,
        },
        _ => Answer::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn word(state: TcpState) -> Word {
        Word::EMPTY
            .with_state(Side::A, state)
            .with_state(Side::B, TcpState::CloseWait)
            .with_local(Side::A)
    }

    fn sock(state: TcpState, timer: u8, left_ms: u64) -> SockInfo {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        SockInfo {
            state: state as u8,
            local: ip,
            local_port: 1,
            remote: ip,
            remote_port: 2,
            timewait_left: (timer == 3).then(|| Duration::from_millis(left_ms)),
            timer,
            expires: Duration::from_millis(left_ms),
            recv_queue: 0,
            send_queue: 0,
            inode: 0,
        }
    }

    #[test]
    fn a_socket_the_kernel_no_longer_has_is_closed() {
        let w = word(TcpState::FinWait2);
        let Answer::Set { word: new, .. } = decide(
            w,
            Side::A,
            Why::FinWait2,
            None,
            5 * SEC,
            &Timeouts::default(),
        ) else {
            panic!("closed")
        };
        assert_eq!(new.counted(Side::A), TcpState::None);
    }

    /// After the kernel gave up on some connection: one it still has open
    /// stays; one it closed (held by its application, or gone) closes.
    #[test]
    fn a_connection_the_kernel_gave_up_on_closes() {
        let t = Timeouts::default();
        let w = word(TcpState::Established);
        assert!(still_asked(w, Side::A, Why::TimedOut));
        let open = sock(TcpState::Established, 1, 200);
        assert_eq!(
            decide(w, Side::A, Why::TimedOut, Some(&open), SEC, &t),
            Answer::Nothing
        );
        for info in [Some(sock(TcpState::Close, 0, 0)), None] {
            let Answer::Set { word: new, .. } =
                decide(w, Side::A, Why::TimedOut, info.as_ref(), SEC, &t)
            else {
                panic!("closed: {info:?}");
            };
            assert_eq!(new.state(Side::A), TcpState::Close);
        }
        // Not a state a timeout ends.
        assert!(!still_asked(
            word(TcpState::TimeWait),
            Side::A,
            Why::TimedOut
        ));
    }

    #[test]
    fn a_held_fin_wait2_is_looked_at_again_a_fin_timeout_later() {
        let t = Timeouts {
            fin_wait2: Duration::from_secs(5),
            ..Timeouts::default()
        };
        let w = word(TcpState::FinWait2);
        let held = sock(TcpState::FinWait2, 0, 0);
        assert_eq!(
            decide(w, Side::A, Why::FinWait2, Some(&held), 100 * SEC, &t),
            Answer::Later(105 * SEC, Action::Ask(Side::A, Why::FinWait2))
        );
    }

    #[test]
    fn an_orphaned_fin_wait2_closes_when_its_time_wait_timer_fires() {
        let t = Timeouts {
            fin_wait2: Duration::from_secs(5),
            ..Timeouts::default()
        };
        let w = word(TcpState::FinWait2);
        let orphan = sock(TcpState::FinWait2, 3, 2000);
        assert_eq!(
            decide(w, Side::A, Why::Closed, Some(&orphan), 100 * SEC, &t),
            Answer::Later(102 * SEC, Action::Fire)
        );
        // The peer's FIN already made it a TIME_WAIT: set it, dated back.
        let tw = sock(TcpState::TimeWait, 3, 59_000);
        let Answer::Set {
            word: new,
            changed_ns,
        } = decide(w, Side::A, Why::Closed, Some(&tw), 100 * SEC, &t)
        else {
            panic!("set")
        };
        assert_eq!(new.counted(Side::A), TcpState::TimeWait);
        assert_eq!(changed_ns, 99 * SEC);
    }

    #[test]
    fn a_request_is_followed_until_the_kernel_keeps_completes_or_drops_it() {
        let t = Timeouts::default();
        let w = word(TcpState::SynRecv);
        let kept = sock(TcpState::SynRecv, 1, 2000);
        assert_eq!(
            decide(w, Side::A, Why::Request, Some(&kept), 10 * SEC, &t),
            Answer::Later(
                12 * SEC + ns(KERNEL_LAG),
                Action::Ask(Side::A, Why::Request)
            )
        );
        let done = sock(TcpState::Established, 0, 0);
        let Answer::Set { word: new, .. } =
            decide(w, Side::A, Why::Request, Some(&done), 10 * SEC, &t)
        else {
            panic!("set")
        };
        assert_eq!(new.counted(Side::A), TcpState::Established);
        assert!(still_asked(w, Side::A, Why::Request));
        assert!(!still_asked(new, Side::A, Why::Request));
    }

    #[test]
    fn a_listener_is_no_answer() {
        let t = Timeouts::default();
        let w = word(TcpState::SynRecv);
        let l = sock(TcpState::Listen, 0, 0);
        assert_eq!(
            decide(w, Side::A, Why::Request, Some(&l), SEC, &t),
            Answer::Nothing
        );
    }
}
