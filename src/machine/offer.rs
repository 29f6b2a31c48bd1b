//! A rented offer as status records it and as people read it.

use crate::api::{OfferStatus, describe_gpu};
use crate::provider::Offer;

/// What status keeps of the offer a machine was rented from.
pub fn offer_status(offer: &Offer) -> OfferStatus {
    OfferStatus {
        id: offer.id,
        machine_id: offer.machine_id,
        gpu_name: offer.gpu_name.clone(),
        num_gpus: offer.num_gpus,
        vram_gb: offer.vram_gb,
        price_per_hour: offer.price_per_hour,
        reliability: offer.reliability,
        geolocation: offer.geolocation.clone(),
    }
}

/// The offer in one line: GPU, memory, price, reliability, location.
pub fn describe_offer(o: &Offer) -> String {
    format!(
        "{}, {:.0} GB, ${:.3}/h, reliability {:.3}, {} (offer {}, machine {})",
        describe_gpu(o.num_gpus, &o.gpu_name),
        o.vram_gb,
        o.price_per_hour,
        o.reliability,
        o.geolocation.as_deref().unwrap_or("unknown location"),
        o.id,
        o.machine_id
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_are_described_with_price_reliability_and_place() {
        let text = describe_offer(&crate::provider::sample_offer(4000017, "RTX 4090", 0.4123, 24.4));
        assert_eq!(
            text,
            "RTX 4090, 24 GB, $0.412/h, reliability 0.990, Texas, US (offer 4000017, machine 4000018)"
        );
    }
}
