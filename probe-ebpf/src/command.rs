//! `tcpstate_command`: never attached; the agent runs it with
//! BPF_PROG_TEST_RUN to change an entry (expire a kernel timer, delete a dead
//! entry) through the same compare-and-swap and counter update as the data
//! path. The "packet" is a [`Command`].

use aya_ebpf::{macros::xdp, programs::XdpContext};
use tcpstate_common::{Command, Word, command::outcome};

use crate::track::{FLOWS, counters, move_counts, swap_word};

#[xdp]
pub fn tcpstate_command(ctx: XdpContext) -> u32 {
    match try_command(&ctx) {
        Ok(code) | Err(code) => code,
    }
}

fn try_command(ctx: &XdpContext) -> Result<u32, u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + core::mem::size_of::<Command>() > end {
        return Err(outcome::MISSING);
    }
    // SAFETY: bounds checked just above. Fields are copied one by one: a
    // whole-struct copy would become a call to `memmove`.
    let cmd = unsafe {
        let src = &*(start as *const Command);
        Command {
            key: src.key,
            _pad: 0,
            expect: src.expect,
            new: src.new,
        }
    };
    let c = counters().ok_or(outcome::MISSING)?;
    let p = FLOWS.get_ptr_mut(&cmd.key).ok_or(outcome::MISSING)?;
    let (old, new) = (Word(cmd.expect), Word(cmd.new));
    if !swap_word(p, old, new) {
        return Err(outcome::CHANGED);
    }
    move_counts(c, old, new);
    if new.is_reaping() {
        // Nothing else writes a reaping entry, so deleting it loses nothing.
        let _ = FLOWS.remove(&cmd.key);
    }
    Ok(outcome::DONE)
}
