//! `QuotaAdmin` alert calls: the recent-alerts log and live watches.

use tonic::Status;

use super::Context;
use crate::proto;

pub type AlertStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::Alert, Status>> + Send>>;

pub fn list_alerts(context: &Context, request: proto::ListAlertsRequest) -> Result<proto::ListAlertsResponse, Status> {
    let _ = (context, request);
    Err(Status::unimplemented("ListAlerts is not available yet"))
}

pub fn watch_alerts(context: &Context, request: proto::WatchAlertsRequest) -> Result<AlertStream, Status> {
    let _ = (context, request);
    Err(Status::unimplemented("WatchAlerts is not available yet"))
}
