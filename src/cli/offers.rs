//! `gpu-trainer offers`: search the Vast.ai marketplace with the operator's settings.

use std::io::Write;

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::provider::config::ProviderConfig;
use crate::provider::vastai::VastClient;
use crate::provider::{GpuProvider, Offer, OfferOrder, OfferQuery};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Order {
    Price,
    Score,
    Reliability,
}

/// Search offers (uses VASTAI_API_KEY and VASTAI_API_BASE_URL).
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  gpu-trainer offers --gpu 'RTX 4090' --max-price 0.6\n  \
    gpu-trainer offers --gpu 'A100 SXM4,H100 PCIE' --num-gpus 2 --region US --json")]
pub struct OffersArgs {
    /// GPU model names as the marketplace spells them (repeatable or comma-separated).
    #[arg(long = "gpu", value_name = "NAME", value_delimiter = ',')]
    gpus: Vec<String>,
    /// Exact number of GPUs.
    #[arg(long, value_name = "N")]
    num_gpus: Option<u32>,
    /// Minimum memory per GPU in GB.
    #[arg(long, value_name = "GB")]
    min_vram_gb: Option<f64>,
    /// Highest price in US dollars per hour.
    #[arg(long, value_name = "USD")]
    max_price: Option<f64>,
    /// Lowest host reliability (0 to 1).
    #[arg(long, value_name = "R")]
    min_reliability: Option<f64>,
    /// Two-letter country codes (repeatable or comma-separated).
    #[arg(long = "region", value_name = "CC", value_delimiter = ',')]
    regions: Vec<String>,
    /// Minimum disk in GB (also the disk size prices include).
    #[arg(long, value_name = "GB")]
    disk_gb: Option<f64>,
    /// Include machines the marketplace has not verified.
    #[arg(long)]
    include_unverified: bool,
    /// Sort order.
    #[arg(long, value_enum, default_value = "price")]
    order: Order,
    /// At most this many offers.
    #[arg(long, value_name = "N", default_value_t = 20)]
    limit: u32,
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: OffersArgs) -> anyhow::Result<()> {
    let config = ProviderConfig::from_env()?;
    let client = VastClient::from_config(&config)?;
    let query = OfferQuery {
        gpu_names: args.gpus,
        num_gpus: args.num_gpus,
        min_vram_gb: args.min_vram_gb,
        max_price_per_hour: args.max_price,
        min_reliability: args.min_reliability,
        verified_only: !args.include_unverified,
        regions: args.regions,
        min_disk_gb: args.disk_gb,
        order: match args.order {
            Order::Price => OfferOrder::PriceAsc,
            Order::Score => OfferOrder::ScoreDesc,
            Order::Reliability => OfferOrder::ReliabilityDesc,
        },
        limit: Some(args.limit),
        ..OfferQuery::default()
    };
    let runtime = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
    let offers = runtime.block_on(client.search_offers(&query)).context("failed to search offers")?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &offers).context("failed to write JSON")?;
        writeln!(out).context("failed to write to stdout")?;
    } else {
        write_table(&mut out, &offers).context("failed to write to stdout")?;
    }
    Ok(())
}

/// A fixed-width table: GPU, VRAM, $/H, RELIABILITY, LOCATION, OFFER.
fn write_table(out: &mut impl Write, offers: &[Offer]) -> std::io::Result<()> {
    if offers.is_empty() {
        return writeln!(out, "no offers match");
    }
    let gpu = |o: &Offer| format!("{}x {}", o.num_gpus, o.gpu_name);
    let gpu_width = offers.iter().map(|o| gpu(o).len()).max().unwrap_or(3).max(3);
    let loc = |o: &Offer| o.geolocation.clone().unwrap_or_else(|| "-".into());
    let loc_width = offers.iter().map(|o| loc(o).len()).max().unwrap_or(8).max(8);
    writeln!(
        out,
        "{:<gpu_width$}  {:>8}  {:>7}  {:>11}  {:<loc_width$}  {:>10}",
        "GPU", "VRAM", "$/H", "RELIABILITY", "LOCATION", "OFFER"
    )?;
    for o in offers {
        writeln!(
            out,
            "{:<gpu_width$}  {:>5.1} GB  {:>7.3}  {:>11.3}  {:<loc_width$}  {:>10}",
            gpu(o),
            o.vram_gb,
            o.price_per_hour,
            o.reliability,
            loc(o),
            o.id
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_one_aligned_row_per_offer() {
        let offer = Offer {
            machine_id: 1,
            reliability: 0.9912,
            ..crate::provider::sample_offer(4000017, "RTX 4090", 0.4123, 24.564)
        };
        let mut out = Vec::new();
        write_table(&mut out, &[offer]).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], "GPU              VRAM      $/H  RELIABILITY  LOCATION        OFFER");
        assert_eq!(lines[1], "1x RTX 4090   24.6 GB    0.412        0.991  Texas, US     4000017");
    }
}
