//! The calls `quotad admin` makes: one connection, one request per subcommand (several for
//! `reservations --all`, a stream for `watch-alerts`), each bounded by `--timeout` and carrying the
//! bearer token when one is given; over TLS when `--tls-ca` is given.

use std::{future::Future, io::Write, time::Duration};

use tonic::{
    Code, Request, Response, Status,
    metadata::{AsciiMetadataValue, MetadataKey},
    transport::{Channel, Endpoint},
};

use super::{
    Failure,
    args::{ApiKeyCommand, Command, ListApiKeysArgs, PageArgs, ReservationsArgs, WatchAlertsArgs},
    records,
    render::{Format, Output, Record, RowStream},
};
use crate::{
    proto::{self, quota_admin_client::QuotaAdminClient, quota_client::QuotaClient},
    transport::tls::ClientTls,
};

/// The largest page `ListReservations` serves; `--all` asks for it unless told otherwise.
const MAX_PAGE_SIZE: u32 = 1_000;
/// `reservations --all` stops here rather than loop forever on a server that keeps returning a token:
/// 100 million holds at the largest page, far beyond the server's open-hold limits.
const MAX_PAGES_FOLLOWED: usize = 100_000;

/// A connection to one quotad, with what every request carries.
pub struct Client {
    channel: Channel,
    server: String,
    tls: bool,
    /// `Bearer <token>`, marked sensitive so that it is never printed by a `Debug` of the request.
    authorization: Option<AsciiMetadataValue>,
    timeout: Duration,
}

impl Client {
    /// Connects, within `timeout`. A server that does not answer is [`Failure::Unreachable`].
    pub async fn connect(
        server: &str,
        tls: Option<ClientTls>,
        authorization: Option<AsciiMetadataValue>,
        timeout: Duration,
    ) -> Result<Self, Failure> {
        let mut endpoint = Endpoint::from_shared(server.to_owned())
            .map_err(|e| Failure::Usage(format!("--server {server}: {e}")))?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        let tls = match tls {
            None => false,
            Some(tls) => {
                endpoint = endpoint
                    .tls_config(tls.config())
                    .map_err(|e| Failure::Usage(format!("--tls-ca: {}", chain(&e))))?;
                true
            }
        };
        let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(error)) => return Err(Failure::Unreachable(format!("cannot reach {server}: {}", chain(&error)))),
            Err(_) => {
                let waited = humantime::format_duration(timeout);
                return Err(Failure::Unreachable(format!("cannot reach {server}: no connection within {waited}")));
            }
        };
        Ok(Self { channel, server: server.to_owned(), tls, authorization, timeout })
    }

    fn admin(&self) -> QuotaAdminClient<Channel> {
        QuotaAdminClient::new(self.channel.clone())
    }

    fn quota(&self) -> QuotaClient<Channel> {
        QuotaClient::new(self.channel.clone())
    }

    /// The request message built from the subcommand's flags, with the token.
    fn request<T>(&self, message: impl Into<T>) -> Request<T> {
        let mut request = Request::new(message.into());
        if let Some(authorization) = &self.authorization {
            request.metadata_mut().insert(MetadataKey::from_static("authorization"), authorization.clone());
        }
        request
    }

    /// Awaits one answer within `--timeout`. Only the wait for the answer is bounded: the messages of
    /// a stream may come at any time after it.
    async fn call<T>(&self, call: impl Future<Output = Result<Response<T>, Status>>) -> Result<T, Failure> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(self.failure(status)),
            Err(_) => {
                let waited = humantime::format_duration(self.timeout);
                Err(Failure::Status(Status::deadline_exceeded(format!("no answer within {waited}"))))
            }
        }
    }

    /// A status the transport made up because the connection failed (it carries the transport error
    /// as its source) means the server is out of reach: UNAVAILABLE, or, when TLS refused the
    /// connection after its handshake, UNKNOWN or CANCELLED (a connection closed under the call). Any
    /// other status is the server's answer.
    fn failure(&self, status: Status) -> Failure {
        let hint = if self.tls {
            " (a server with mutual TLS closes the connection of a client without an accepted certificate: \
             --tls-cert, --tls-key)"
        } else {
            ""
        };
        match std::error::Error::source(&status) {
            Some(cause) if matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled) => {
                Failure::Unreachable(format!("lost {}: {}: {}{hint}", self.server, status.message(), chain(cause)))
            }
            _ => Failure::Status(status),
        }
    }
}

/// Makes the subcommand's calls and writes what they answered to `out` in `format`.
pub async fn run(client: &Client, command: Command, format: Format, out: &mut impl Write) -> Result<(), Failure> {
    let (mut admin, mut quota) = (client.admin(), client.quota());
    let output = match command {
        Command::Purchase(args) => {
            Output::Record(records::tenant(&client.call(admin.purchase_capacity(client.request(args))).await?))
        }
        Command::Allocate(args) => {
            Output::Record(records::balance(&client.call(admin.allocate_capacity(client.request(args))).await?))
        }
        Command::SetPayg(args) => {
            Output::Record(records::balance(&client.call(admin.set_pay_as_you_go(client.request(args))).await?))
        }
        Command::Link(args) => {
            Output::Record(records::link(&client.call(admin.link_environment(client.request(args))).await?))
        }
        Command::Tenant(args) => {
            Output::Record(records::tenant(&client.call(admin.get_tenant(client.request(args))).await?))
        }
        Command::Balance(args) => {
            Output::Record(records::balance(&client.call(quota.get_balance(client.request(args))).await?))
        }
        Command::SetTenantPolicy(args) => {
            Output::Record(records::tenant(&client.call(admin.set_tenant_policy(client.request(args))).await?))
        }
        Command::SetEnvironmentAlerts(args) => {
            Output::Record(records::balance(&client.call(admin.set_environment_alerts(client.request(args))).await?))
        }
        Command::SetAgentLimit(args) => {
            Output::Record(records::agent_limit(&client.call(admin.set_agent_limit(client.request(args))).await?))
        }
        Command::AgentLimits(args) => {
            let list = client.call(admin.list_agent_limits(client.request(args))).await?;
            let template = records::agent_limit(&proto::AgentLimit::default());
            Output::Rows { template, rows: list.agents.iter().map(records::agent_limit).collect() }
        }
        Command::Usage(args) => {
            let usage = client.call(admin.get_usage(client.request(args))).await?;
            let template = records::usage_row(&proto::UsageRow::default());
            Output::Rows { template, rows: usage.rows.iter().map(records::usage_row).collect() }
        }
        Command::RateCard(args) => rate_card(&client.call(admin.get_rate_card(client.request(args))).await?),
        Command::SetRateCard(args) => rate_card(&client.call(admin.set_rate_card(client.request(args))).await?),
        Command::Reservations(args) => reservations(client, args).await?,
        Command::ReleaseAll(args) => {
            Output::Record(records::release_all(&client.call(admin.release_all(client.request(args))).await?))
        }
        Command::Alerts(args) => {
            let list = client.call(admin.list_alerts(client.request(args))).await?;
            let template = records::alert(&proto::Alert::default());
            Output::Rows { template, rows: list.alerts.iter().map(records::alert).collect() }
        }
        Command::WatchAlerts(args) => return watch_alerts(client, args, format, out).await,
        Command::ApiKey(ApiKeyCommand::Create(args)) => {
            Output::Record(records::api_key(&client.call(admin.create_api_key(client.request(args))).await?))
        }
        Command::ApiKey(ApiKeyCommand::Revoke(args)) => {
            Output::Record(records::api_key(&client.call(admin.revoke_api_key(client.request(args))).await?))
        }
        Command::ApiKey(ApiKeyCommand::List(args)) => api_keys(client, args).await?,
    };
    write(out, &output.render(format))
}

fn rate_card(card: &proto::RateCard) -> Output {
    let template = records::rate_row(&proto::RateCard::default(), &proto::ScenarioRate::default());
    Output::Rows { template, rows: records::rate_card_rows(card) }
}

/// One page, or with `--all` every page from `--page-token` on. When a single page has more after it,
/// the token of the next one goes to stderr, so that stdout stays one clean list.
async fn reservations(client: &Client, args: ReservationsArgs) -> Result<Output, Failure> {
    let page_size = page_size(&args.page);
    let template = records::reservation(&proto::Reservation::default());
    let mut rows = Vec::new();
    let mut page_token = args.page.page_token;
    for _ in 0..MAX_PAGES_FOLLOWED {
        let request = proto::ListReservationsRequest {
            environment_id: args.environment_id.clone(),
            agent_id: args.agent_id.clone(),
            page_size,
            page_token,
        };
        let page = client.call(client.admin().list_reservations(client.request(request))).await?;
        rows.extend(page.reservations.iter().map(records::reservation));
        if page.next_page_token.is_empty() {
            return Ok(Output::Rows { template, rows });
        }
        if !args.page.all {
            eprintln!("quotad admin: reservations: more holds follow: --page-token {}", page.next_page_token);
            return Ok(Output::Rows { template, rows });
        }
        page_token = page.next_page_token;
    }
    Err(Failure::Status(Status::out_of_range(format!(
        "more than {MAX_PAGES_FOLLOWED} pages; page with --page-token instead of --all"
    ))))
}

/// `--page-size`, or with `--all` and no size the largest page.
fn page_size(page: &PageArgs) -> u32 {
    if page.all && page.page_size == 0 { MAX_PAGE_SIZE } else { page.page_size }
}

/// One page of a tenant's keys, or with `--all` every page from `--page-token` on, as `reservations` does.
async fn api_keys(client: &Client, args: ListApiKeysArgs) -> Result<Output, Failure> {
    let page_size = page_size(&args.page);
    let template = records::api_key(&proto::ApiKey::default());
    let mut rows = Vec::new();
    let mut page_token = args.page.page_token;
    for _ in 0..MAX_PAGES_FOLLOWED {
        let request = proto::ListApiKeysRequest { tenant_id: args.tenant_id.clone(), page_size, page_token };
        let page = client.call(client.admin().list_api_keys(client.request(request))).await?;
        rows.extend(page.api_keys.iter().map(records::api_key));
        if page.next_page_token.is_empty() {
            return Ok(Output::Rows { template, rows });
        }
        if !args.page.all {
            eprintln!("quotad admin: api-key: more keys follow: --page-token {}", page.next_page_token);
            return Ok(Output::Rows { template, rows });
        }
        page_token = page.next_page_token;
    }
    Err(Failure::Status(Status::out_of_range(format!(
        "more than {MAX_PAGES_FOLLOWED} pages; page with --page-token instead of --all"
    ))))
}

/// Prints each alert as one line as soon as it arrives, until the server ends the stream or Ctrl-C.
async fn watch_alerts(
    client: &Client,
    args: WatchAlertsArgs,
    format: Format,
    out: &mut impl Write,
) -> Result<(), Failure> {
    let mut alerts = client.call(client.admin().watch_alerts(client.request(args))).await?;
    let template: Record = records::alert(&proto::Alert::default());
    let stream = RowStream::new(format, &template);
    if let Some(header) = stream.header(&template) {
        write(out, &header)?;
    }
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            _ = &mut interrupted => return Ok(()),
            next = alerts.message() => match next {
                Ok(Some(alert)) => write(out, &stream.row(&records::alert(&alert)))?,
                Ok(None) => return Ok(()),
                Err(status) => return Err(client.failure(status)),
            },
        }
    }
}

/// Writes and flushes, so that a reader on a pipe sees each line as it is printed.
fn write(out: &mut impl Write, text: &str) -> Result<(), Failure> {
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(Failure::Output)
}

/// An error with its causes: a transport error alone says only "transport error".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Layers often repeat their cause's text; once is enough.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
