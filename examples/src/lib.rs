//! The examples' workings (each example's `main` is its `examples/*.rs`
//! file; what it runs is here, so that the integration tests run the same
//! code in process).

pub mod demo;
pub mod kafka_worker;
pub mod outbox_producer;
pub mod rabbitmq_worker;

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// `--help` shows `[env: BACKSTOP_AMQP_URL=<value>]` for an argument read
    /// from the environment unless told not to: the URL holds a password.
    #[test]
    fn help_never_prints_the_amqp_url_from_the_environment() {
        for command in [
            crate::rabbitmq_worker::Args::command(),
            crate::outbox_producer::Args::command(),
        ] {
            let arg = command
                .get_arguments()
                .find(|a| a.get_id() == "amqp_url")
                .expect("an --amqp-url argument");
            assert!(
                arg.is_hide_env_values_set(),
                "{}: --help would print the URL",
                command.get_name()
            );
        }
    }
}
