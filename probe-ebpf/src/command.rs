//! `tcpstate_command`: never attached; the agent runs it with
//! BPF_PROG_TEST_RUN to change an entry (expire a kernel timer, delete a dead
//! entry) through the same compare-and-swap and counter update as the data
//! path. The "packet" is a [`Command`].

use aya_ebpf::{bindings::BPF_NOEXIST, macros::xdp, programs::XdpContext};
use aya_log_ebpf::debug;
use tcpstate_common::{
    Command, Counters, EndSeq, Event, FlowEntry, Word,
    command::{op, outcome},
};

use crate::track::{EEXIST, FLOWS4, FLOWS6, count, cpu_slot, move_counts, swap_word};

#[xdp]
pub fn tcpstate_command(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + core::mem::size_of::<Command>() > end {
        return outcome::MISSING;
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

fn try_command(cmd: &Command) -> Result<u32, u32> {
    let (c, _) = cpu_slot().ok_or(outcome::MISSING)?;
    if cmd.op == op::SEED {
        return seed(cmd, c);
    }
    let p = if cmd.family == 6 {
        FLOWS6.get_ptr_mut(&cmd.key6)
    } else {
        FLOWS4.get_ptr_mut(&cmd.key4)
    };
    let p = p.ok_or(outcome::MISSING)?;
    let (old, new) = (Word(cmd.expect), Word(cmd.new));
    if !swap_word(p, old, new) {
        return Err(outcome::CHANGED);
    }
    move_counts(c, old, new);
    if new.is_reaping() {
        // Nothing else writes a reaping entry, so deleting it loses nothing.
        let _ = if cmd.family == 6 {
            FLOWS6.remove(&cmd.key6)
        } else {
            FLOWS4.remove(&cmd.key4)
        };
    }
    Ok(outcome::DONE)
}

/// Creates an entry for a connection that existed before the probe was
/// attached; packets that created it first win.
#[inline(always)]
fn seed(cmd: &Command, c: &mut Counters) -> Result<u32, u32> {
    let entry = FlowEntry {
        word: cmd.new,
        changed: FlowEntry::stamp(cmd.changed_ns),
        ends: [EndSeq::default(); 2],
    };
    let res = if cmd.family == 6 {
        FLOWS6.insert(&cmd.key6, &entry, BPF_NOEXIST as u64)
    } else {
        FLOWS4.insert(&cmd.key4, &entry, BPF_NOEXIST as u64)
    };
    match res {
        Ok(()) => {
            move_counts(c, Word::EMPTY, Word(cmd.new));
            Ok(outcome::DONE)
        }
        Err(e) if e == -EEXIST => Err(outcome::CHANGED),
        Err(_) => {
            count(c, Event::MapFull);
            Err(outcome::MISSING)
        }
    }
}
