//! Bootstraps the benchmark's tenant through `QuotaAdmin`: buys enough packs, then gives every
//! environment its allocation and pay-as-you-go with no budget cap, so that reservations never run dry
//! and a refusal in the results means something.
//!
//! Setting an allocation replaces it, so running setup again on the same server is safe; it buys only
//! what is missing.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use quotad::proto::{
    AllocateCapacityRequest, GetTenantRequest, PurchaseCapacityRequest, SetPayAsYouGoRequest,
    quota_admin_client::QuotaAdminClient,
};
use tonic::{Code, Status};

use crate::{Connection, cli::environment_id};

/// quotad's default `max_packs_per_purchase`: larger purchases are split.
const MAX_PACKS_PER_PURCHASE: u64 = 1_000_000;
const MILLI_PER_MESSAGE: u64 = 1_000;

#[derive(Debug, Clone)]
pub struct SetupPlan {
    pub tenant: String,
    pub environments: usize,
    pub allocation_messages: u64,
    pub concurrency: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct SetupReport {
    pub tenant: String,
    pub environments: usize,
    pub packs_bought: u64,
    pub admin_calls: u64,
    pub elapsed_s: f64,
    pub admin_calls_per_s: f64,
}

/// Buys capacity, then allocates every environment with `concurrency` tasks spread over `channels`.
pub async fn run(plan: &SetupPlan, channels: &[Connection]) -> Result<SetupReport, String> {
    let started = Instant::now();
    let mut admin = QuotaAdminClient::new(channels[0].clone());
    let (packs_bought, purchase_calls) =
        buy_capacity(&mut admin, plan).await.map_err(|s| describe("buying capacity", &s))?;
    let next = Arc::new(AtomicUsize::new(0));
    let plan = Arc::new(plan.clone());
    let tasks: Vec<_> = (0..plan.concurrency.min(plan.environments))
        .map(|task| {
            let admin = QuotaAdminClient::new(channels[task % channels.len()].clone());
            tokio::spawn(allocate_environments(admin, plan.clone(), next.clone()))
        })
        .collect();
    for task in tasks {
        task.await.map_err(|e| format!("setup task failed: {e}"))??;
    }
    let elapsed = started.elapsed();
    let admin_calls = 2 * plan.environments as u64 + purchase_calls;
    Ok(SetupReport {
        tenant: plan.tenant.clone(),
        environments: plan.environments,
        packs_bought,
        admin_calls,
        elapsed_s: elapsed.as_secs_f64(),
        admin_calls_per_s: admin_calls as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
    })
}

/// Buys what the allocations need beyond what the tenant already has. Returns the packs bought and
/// the admin calls made.
async fn buy_capacity(admin: &mut QuotaAdminClient<Connection>, plan: &SetupPlan) -> Result<(u64, u64), Status> {
    let needed_milli =
        (plan.environments as u128) * u128::from(plan.allocation_messages) * u128::from(MILLI_PER_MESSAGE);
    let have_milli = match admin.get_tenant(GetTenantRequest { tenant_id: plan.tenant.clone() }).await {
        Ok(tenant) => u128::from(tenant.get_ref().purchased_milli),
        Err(status) if status.code() == Code::NotFound => 0,
        Err(status) => return Err(status),
    };
    if have_milli >= needed_milli && have_milli > 0 {
        return Ok((0, 1));
    }
    // One pack first: it creates the tenant and tells the pack size, which the server configures.
    let after_first = u128::from(purchase(admin, &plan.tenant, 1).await?);
    let pack_milli = after_first.saturating_sub(have_milli).max(1);
    let missing = needed_milli.saturating_sub(after_first).div_ceil(pack_milli);
    let mut missing = u64::try_from(missing).map_err(|_| Status::out_of_range("too many packs needed"))?;
    let (mut packs, mut calls) = (1, 2);
    while missing > 0 {
        let chunk = missing.min(MAX_PACKS_PER_PURCHASE);
        purchase(admin, &plan.tenant, chunk).await?;
        (missing, packs, calls) = (missing - chunk, packs + chunk, calls + 1);
    }
    Ok((packs, calls))
}

/// Returns the tenant's purchased capacity after the purchase.
async fn purchase(admin: &mut QuotaAdminClient<Connection>, tenant: &str, packs: u64) -> Result<u64, Status> {
    let request = PurchaseCapacityRequest { tenant_id: tenant.to_owned(), packs, idempotency_key: String::new() };
    Ok(admin.purchase_capacity(request).await?.get_ref().purchased_milli)
}

/// Allocates environments taken from the shared counter until all are done.
async fn allocate_environments(
    mut admin: QuotaAdminClient<Connection>,
    plan: Arc<SetupPlan>,
    next: Arc<AtomicUsize>,
) -> Result<(), String> {
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        if index >= plan.environments {
            return Ok(());
        }
        let environment = environment_id(&plan.tenant, index);
        let allocate = AllocateCapacityRequest {
            tenant_id: plan.tenant.clone(),
            environment_id: environment.clone(),
            messages: plan.allocation_messages,
            draw_from_tenant_pool: false,
        };
        admin.allocate_capacity(allocate).await.map_err(|s| describe(&environment, &s))?;
        let payg =
            SetPayAsYouGoRequest { environment_id: environment.clone(), enabled: true, monthly_budget_messages: 0 };
        admin.set_pay_as_you_go(payg).await.map_err(|s| describe(&environment, &s))?;
    }
}

fn describe(what: &str, status: &Status) -> String {
    format!("setup of {what}: {:?}: {}", status.code(), status.message())
}
