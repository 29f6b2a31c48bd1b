//! What a refused or lost rent call means, once for both front ends. Pure.

use crate::api::Reason;
use crate::provider::{Error, InstanceId};

/// What to do after the provider's answer to a rent call was an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RentFailure {
    /// The rent failed but left a billing contract: destroy it, never rent that machine again
    /// for this job, try another offer.
    LeftContract(InstanceId),
    /// Someone else rented the offer first: try another.
    OfferTaken,
    /// The answer was lost (the provider was busy or unreachable), so the rent may have
    /// happened: keep the pending mark and look for the machine by its label.
    MaybeRented,
    /// Refused for good: the instance (or job) fails with this reason.
    Refused(Reason),
}

/// Triage of a rent call's error.
pub fn triage_rent_error(err: &Error) -> RentFailure {
    if let Some(contract) = err.left_contract() {
        return RentFailure::LeftContract(contract);
    }
    match err {
        Error::OfferUnavailable { .. } => RentFailure::OfferTaken,
        err if err.is_retryable() => RentFailure::MaybeRented,
        Error::Unauthorized { .. } => RentFailure::Refused(Reason::Unauthorized),
        _ => RentFailure::Refused(Reason::ProviderError),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn each_rent_error_has_one_meaning() {
        let taken = Error::OfferUnavailable { offer_id: 1, message: "no_such_ask".into() };
        assert_eq!(triage_rent_error(&taken), RentFailure::OfferTaken);
        let busy =
            Error::RateLimited { endpoint: "create_instance", retry_after: Some(Duration::from_secs(1)) };
        assert_eq!(triage_rent_error(&busy), RentFailure::MaybeRented);
        let left = Error::ContractLeftBehind { instance_id: InstanceId(9), source: Box::new(busy) };
        assert_eq!(triage_rent_error(&left), RentFailure::LeftContract(InstanceId(9)));
        let denied = Error::Unauthorized { message: "bad key".into() };
        assert_eq!(triage_rent_error(&denied), RentFailure::Refused(Reason::Unauthorized));
        let invalid = Error::InvalidRequest { endpoint: "create_instance", message: "disk".into() };
        assert_eq!(triage_rent_error(&invalid), RentFailure::Refused(Reason::ProviderError));
    }
}
