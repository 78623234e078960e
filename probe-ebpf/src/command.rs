//! `tcpstate_command`: never attached; the agent runs it with
//! BPF_PROG_TEST_RUN to change an entry (expire a kernel timer, delete a dead
//! entry, seed a socket) through the same compare-and-swap and counter update
//! as the data path. The "packet" is a [`Command`]. It runs in the agent's
//! process context, where a packet may interrupt it on the same CPU: it
//! counts in the process slot ([`process_slot`]).

use aya_ebpf::{macros::xdp, programs::XdpContext};
use aya_log_ebpf::debug;
use tcpstate_common::{
    Command, EndSeq, FlowEntry, Side, TcpState, Word,
    command::{op, outcome},
    outcome::Cause,
    services::Ends,
};

use crate::{
    counts::{Atomic, Change, Tally, account, move_counts, process_slot},
    track::{
        EEXIST, FLOWS4, FLOWS6, insert_entry, note_flows, now_stamp, read_stamp, read_word,
        swap_word,
    },
};

#[xdp]
pub fn tcpstate_command(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + core::mem::size_of::<Command>() > end {
        return outcome::MISSING;
    }
    if clock(start) {
        return outcome::DONE;
    }
    // SAFETY: bounds checked just above; read in place (a copy of the whole
    // struct would become a call to `memmove`).
    let cmd = unsafe { &*(start as *const Command) };
    let code = match try_command(cmd) {
        Ok(code) | Err(code) => code,
    };
    // Each change the agent makes, at debug level (`RUST_LOG=debug`).
    let (op, family, expect, new) = (cmd.op, cmd.family, cmd.expect, cmd.new);
    debug!(
        &ctx,
        "command op={} family={} word {:x} -> {:x}: outcome {}", op, family, expect, new, code
    );
    code
}

/// [`op::CLOCK`]: the kernel's two clocks, read back to back, written into
/// the command. True when the command was one.
#[inline(always)]
fn clock(start: usize) -> bool {
    let cmd = start as *mut Command;
    // SAFETY: the caller checked that a whole command lies at `start`; the
    // helpers take no arguments.
    unsafe {
        if (*cmd).op != op::CLOCK {
            return false;
        }
        let jiffies = aya_ebpf::helpers::bpf_jiffies64();
        (*cmd).changed_ns = aya_ebpf::helpers::bpf_ktime_get_ns();
        (*cmd).expect = jiffies as u32;
        (*cmd).new = (jiffies >> 32) as u32;
    }
    true
}

fn try_command(cmd: &Command) -> Result<u32, u32> {
    let netns = if cmd.family == 6 {
        cmd.key6.netns
    } else {
        cmd.key4.netns
    };
    let mut c = process_slot(netns).ok_or(outcome::MISSING)?;
    if cmd.op == op::SEED {
        return seed(cmd, netns, &mut c);
    }
    if cmd.op == op::LISTEN {
        // The agent's correction of the namespace's LISTEN count.
        c.state(TcpState::Listen, cmd.new as i32 as i64);
        return Ok(outcome::DONE);
    }
    let p = if cmd.family == 6 {
        FLOWS6.get_ptr_mut(&cmd.key6)
    } else {
        FLOWS4.get_ptr_mut(&cmd.key4)
    };
    let p = p.ok_or(outcome::MISSING)?;
    let (old, new) = (Word(cmd.expect), Word(cmd.new));
    let since = read_stamp(p);
    if !swap_word(p, old, new) {
        return Err(outcome::CHANGED);
    }
    let now = if cmd.changed_ns != 0 {
        let at = FlowEntry::stamp(cmd.changed_ns);
        // SAFETY: `p` is a live map value.
        unsafe { (*p).changed = at };
        at
    } else {
        now_stamp()
    };
    move_counts(&mut c, old, new);
    // A correction is the agent's: what it ends was not seen ending, and
    // how long it lasted is not known.
    if cmd.op != op::CORRECT {
        let mut ch = Change::of(old, new, now.wrapping_sub(since), Cause::Other);
        ch.ends = if cmd.family == 6 {
            Ends::of6(&cmd.key6)
        } else {
            Ends::of4(&cmd.key4)
        };
        account(&mut c, netns, &ch);
    }
    if new.is_reaping() {
        // Nothing else writes a reaping entry, so deleting it loses nothing.
        let gone = if cmd.family == 6 {
            FLOWS6.remove(&cmd.key6)
        } else {
            FLOWS4.remove(&cmd.key4)
        };
        if gone.is_ok() {
            note_flows(netns, u32::MAX);
        }
    }
    Ok(outcome::DONE)
}

/// Creates an entry for a connection the socket table has and the flow maps
/// lack. If packets created it first, fills in only the endpoints they have
/// shown nothing of: the packets are newer than the table read, but an
/// endpoint they left without a state (a SYN-ACK that arrived before its SYN
/// was seen) is the table's to tell.
#[inline(always)]
fn seed(cmd: &Command, netns: u32, c: &mut Atomic) -> Result<u32, u32> {
    let entry = FlowEntry {
        word: cmd.new,
        changed: FlowEntry::stamp(cmd.changed_ns),
        ends: [EndSeq::default(); 2],
    };
    let res = if cmd.family == 6 {
        insert_entry(&FLOWS6, &cmd.key6, &entry, netns, c)
    } else {
        insert_entry(&FLOWS4, &cmd.key4, &entry, netns, c)
    };
    match res {
        Ok(()) => {
            move_counts(c, Word::EMPTY, Word(cmd.new));
            Ok(outcome::DONE)
        }
        Err(e) if e == -EEXIST => fill(cmd, c),
        // Counted (map full, or the namespace's share used up).
        Err(_) => Err(outcome::MISSING),
    }
}

#[inline(always)]
fn fill(cmd: &Command, c: &mut Atomic) -> Result<u32, u32> {
    let p = if cmd.family == 6 {
        FLOWS6.get_ptr_mut(&cmd.key6)
    } else {
        FLOWS4.get_ptr_mut(&cmd.key4)
    };
    let p = p.ok_or(outcome::CHANGED)?;
    let old = read_word(p);
    if old.is_dead() || old.is_reaping() {
        return Err(outcome::CHANGED);
    }
    let seeded = Word(cmd.new);
    let mut new = old;
    for side in [Side::A, Side::B] {
        if seeded.is_local(side) && old.state(side) == TcpState::None {
            new = new.with_state(side, seeded.state(side)).with_local(side);
        }
    }
    let new = new.settle();
    if new == old || !swap_word(p, old, new) {
        return Err(outcome::CHANGED);
    }
    move_counts(c, old, new);
    Ok(outcome::DONE)
}
