//! `QuotaAdmin` calls about open holds: listing them and releasing them at once.

use tonic::Status;

use super::Context;
use crate::proto;

pub fn list_reservations(
    context: &Context,
    request: proto::ListReservationsRequest,
) -> Result<proto::ListReservationsResponse, Status> {
    let _ = (context, request);
    Err(Status::unimplemented("ListReservations is not available yet"))
}

pub async fn release_all(
    context: &Context,
    request: proto::ReleaseAllRequest,
) -> Result<proto::ReleaseAllResponse, Status> {
    let _ = (context, request);
    Err(Status::unimplemented("ReleaseAll is not available yet"))
}
