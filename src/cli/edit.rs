//! `attend edit` (being written; see issue).

/// Arguments of `attend edit`.
#[derive(Debug, clap::Args)]
pub struct EditArgs {}

/// Run `attend edit`.
pub fn run(_args: &EditArgs) -> anyhow::Result<()> {
    anyhow::bail!("attend edit is not available yet")
}
