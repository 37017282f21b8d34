//! The request body of one call as it travels in HTTP/2 (`--grpc-body`), for load tools that post a
//! fixed body, such as h2load. Encoded with the same prost types as the load itself, so the body can
//! never drift from the proto.

use prost::Message;
use quotad::proto::{CheckAndReserveRequest, GetBalanceRequest};
use tonic_health::pb::HealthCheckRequest;

use crate::cli::{Plan, Scenario, agent_id, environment_id};

/// The gRPC message prefix: the compressed flag (0, not compressed), then the length as a big-endian
/// `u32`.
const PREFIX_BYTES: usize = 5;

/// The HTTP/2 path and the framed body of the plan's call, for environment and agent 0. `None` for a
/// scenario of two calls, whose second needs the first one's answer.
pub fn request(plan: &Plan) -> Option<(&'static str, Vec<u8>)> {
    let environment_id = environment_id(&plan.tenant, 0);
    match plan.scenario {
        Scenario::Reserve => {
            let request = CheckAndReserveRequest {
                environment_id,
                agent_id: agent_id(0),
                messages: Some(1),
                usage: Vec::new(),
                idempotency_key: String::new(),
                ttl_seconds: plan.ttl_seconds,
                dry_run: false,
            };
            Some(("/quota.v1.Quota/CheckAndReserve", framed(&request)))
        }
        Scenario::Balance => Some(("/quota.v1.Quota/GetBalance", framed(&GetBalanceRequest { environment_id }))),
        Scenario::Health => {
            Some(("/grpc.health.v1.Health/Check", framed(&HealthCheckRequest { service: String::new() })))
        }
        Scenario::ReserveCommit | Scenario::ReserveRelease => None,
    }
}

/// `message` behind its gRPC prefix.
pub fn framed(message: &impl Message) -> Vec<u8> {
    let len = message.encoded_len();
    let mut body = Vec::with_capacity(PREFIX_BYTES + len);
    body.push(0);
    body.extend_from_slice(&u32::try_from(len).expect("a request far below 4 GiB").to_be_bytes());
    message.encode(&mut body).expect("a Vec grows as needed");
    body
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Args;

    fn plan(args: &[&str]) -> Plan {
        Args::try_parse_from(std::iter::once("quotad-bench").chain(args.iter().copied())).unwrap().into_plan().unwrap()
    }

    #[test]
    fn a_reserve_body_is_the_prefix_then_the_request_of_environment_and_agent_zero() {
        let (path, body) = request(&plan(&["--scenario", "reserve", "--tenant", "t", "--ttl-seconds", "7"])).unwrap();
        assert_eq!(path, "/quota.v1.Quota/CheckAndReserve");
        assert_eq!(body[0], 0, "not compressed");
        assert_eq!(u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize, body.len() - 5);
        let decoded = CheckAndReserveRequest::decode(&body[5..]).unwrap();
        assert_eq!(decoded.environment_id, "t-env-0000000");
        assert_eq!(decoded.agent_id, "agent-000000");
        assert_eq!((decoded.messages, decoded.ttl_seconds, decoded.dry_run), (Some(1), 7, false));
    }

    #[test]
    fn a_health_check_of_the_whole_server_is_an_empty_message() {
        let (path, body) = request(&plan(&["--scenario", "health"])).unwrap();
        assert_eq!((path, body.as_slice()), ("/grpc.health.v1.Health/Check", [0, 0, 0, 0, 0].as_slice()));
    }

    #[test]
    fn a_balance_body_names_environment_zero() {
        let (path, body) = request(&plan(&["--scenario", "balance"])).unwrap();
        assert_eq!(path, "/quota.v1.Quota/GetBalance");
        assert_eq!(GetBalanceRequest::decode(&body[5..]).unwrap().environment_id, "bench-env-0000000");
    }

    #[test]
    fn pairs_have_no_fixed_body() {
        assert!(request(&plan(&["--scenario", "reserve+commit"])).is_none());
        assert!(request(&plan(&["--scenario", "reserve+release"])).is_none());
    }
}
