//! `QuotaAdmin` calls about usage and prices: usage reports and the versioned rate card.

use tonic::Status;

use super::Context;
use crate::proto;

pub fn get_usage(context: &Context, request: proto::GetUsageRequest) -> Result<proto::GetUsageResponse, Status> {
    let _ = (context, request);
    Err(Status::unimplemented("GetUsage is not available yet"))
}

pub fn get_rate_card(context: &Context, request: proto::GetRateCardRequest) -> Result<proto::RateCard, Status> {
    let _ = (context, request);
    Err(Status::unimplemented("GetRateCard is not available yet"))
}

pub async fn set_rate_card(context: &Context, request: proto::SetRateCardRequest) -> Result<proto::RateCard, Status> {
    let _ = (context, request);
    Err(Status::unimplemented("SetRateCard is not available yet"))
}
