//! `fanout-loadtest`: the command line of the load generator.

fn main() -> anyhow::Result<()> {
    Ok(())
}
