//! The guest agent: PID 1 in each `-B qemu` VM (see `agentkernel_guest`).

fn main() {
    // The kept VM's warm-up exec (see `agent::warm_up`): nothing to do.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == agentkernel_guest::agent::WARM_UP)
    {
        std::process::exit(0);
    }
    agentkernel_guest::agent::main()
}
