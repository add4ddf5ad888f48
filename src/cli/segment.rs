//! `attend segment` (being written; see issue).

/// Arguments of `attend segment`.
#[derive(Debug, clap::Args)]
pub struct SegmentArgs {}

/// Run `attend segment`.
pub fn run(_args: &SegmentArgs) -> anyhow::Result<()> {
    anyhow::bail!("attend segment is not available yet")
}
