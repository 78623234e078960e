//! Host tests of the state machine.

mod answers;
mod conversations;
mod sim;
