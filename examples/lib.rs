//! Shared pieces of the examples, so that tests can run them in-process.

pub mod demo;
#[path = "kafka_worker/mod.rs"]
pub mod kafka_worker;
#[path = "outbox_producer/mod.rs"]
pub mod outbox_producer;
#[path = "rabbitmq_worker/mod.rs"]
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
