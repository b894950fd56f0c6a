//! The guest agent: PID 1 in each `-B qemu` VM (see `agentkernel_guest`).

fn main() {
    agentkernel_guest::agent::main()
}
