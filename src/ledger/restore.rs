//! Rebuilding a ledger: exporting its state one object at a time for a snapshot, importing a snapshot,
//! and replaying the events logged after it.
//!
//! A snapshot is not a single instant: each tenant, environment and link is copied under its own lock
//! at a slightly different time, and records the sequence number of the last event applied to it.
//! Replay skips the events an object already holds, and the tenant counters that are sums over
//! environments are recomputed rather than restored, so the mix of instants adds up exactly.

use std::{collections::HashMap, sync::Arc, sync::atomic::Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{
    Books, EnvironmentId, Event, Ledger, LedgerError, Milli, Slot, Source, TenantId,
    account::{Environment, Tenant},
    new_cell,
};

/// One object of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SnapshotItem {
    Tenant { id: TenantId, tenant: Tenant },
    Environment { id: EnvironmentId, books: Environment },
    App { id: EnvironmentId, target: Option<EnvironmentId>, applied_seq: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("snapshot item for {id}: {reason}")]
    Item { id: String, reason: String },
    #[error("logged event {seq} does not fit the state: {reason}")]
    Event { seq: u64, reason: String },
    #[error("restored state breaks an invariant: {0}")]
    Invariant(String),
}

impl Ledger {
    /// Hands every tenant, then every capacity environment, then every app environment to `emit`,
    /// copying each under its own lock only, so requests to other objects never wait.
    pub fn export(&self, mut emit: impl FnMut(SnapshotItem)) {
        let tenants: Vec<_> = self.tenants.iter().map(|t| (t.key().clone(), t.value().clone())).collect();
        for (id, cell) in tenants {
            let tenant = cell.lock().clone();
            emit(SnapshotItem::Tenant { id, tenant });
        }
        let slots: Vec<_> = self.environments.iter().map(|s| (s.key().clone(), s.value().clone())).collect();
        let mut apps = Vec::new();
        for (id, slot) in slots {
            match slot {
                Slot::Capacity(cell) => {
                    let books = cell.books.lock().clone();
                    emit(SnapshotItem::Environment { id, books });
                }
                Slot::App { target, applied_seq } => apps.push(SnapshotItem::App { id, target, applied_seq }),
            }
        }
        apps.into_iter().for_each(emit);
    }

    /// Loads one snapshot item into a ledger being restored; tenants come before their environments.
    pub fn import(&self, item: SnapshotItem) -> Result<(), RestoreError> {
        match item {
            SnapshotItem::Tenant { id, tenant } => {
                self.tenants.insert(id, Arc::new(Mutex::new(tenant)));
            }
            SnapshotItem::Environment { id, books } => {
                let item_error = |reason: &str| RestoreError::Item { id: id.to_string(), reason: reason.to_owned() };
                let tenant_cell =
                    self.tenants.get(&books.tenant).map(|t| t.clone()).ok_or_else(|| item_error("unknown tenant"))?;
                for (seq, hold) in &books.open {
                    let reservation = super::ReservationId { environment: id.clone(), seq: *seq };
                    self.expiries.push(hold.expires_at_ms, reservation);
                }
                let cell = new_cell(&id, &books.tenant, tenant_cell);
                *cell.books.lock() = books;
                self.environments.insert(id, Slot::Capacity(cell));
            }
            SnapshotItem::App { id, target, applied_seq } => {
                self.environments.insert(id, Slot::App { target, applied_seq });
            }
        }
        Ok(())
    }

    /// Applies an event read from the log during recovery, unless the object it belongs to already
    /// holds it. Call [`Ledger::recompute_totals`] after the snapshot is imported and before replay.
    pub fn replay(&self, seq: u64, now: u64, event: &Event) -> Result<(), RestoreError> {
        let fail = |reason: String| RestoreError::Event { seq, reason };
        match event {
            Event::Purchased { tenant, .. } => {
                let cell = self.tenants.entry(tenant.clone()).or_default().clone();
                let mut books = cell.lock();
                if books.applied_seq < seq {
                    self.evolve_tenant(&mut books, event);
                    books.applied_seq = seq;
                }
            }
            Event::Linked { app_environment, environment } => {
                let applied = match self.environments.get(app_environment).map(|s| s.clone()) {
                    Some(Slot::Capacity(_)) => {
                        return Err(fail(format!("{app_environment} is a capacity environment")));
                    }
                    Some(Slot::App { applied_seq, .. }) => applied_seq,
                    None => 0,
                };
                if applied < seq {
                    let slot = Slot::App { target: environment.clone(), applied_seq: seq };
                    self.environments.insert(app_environment.clone(), slot);
                }
            }
            Event::Allocated { tenant, environment, .. } => {
                let cell = match self.environments.get(environment).map(|s| s.clone()) {
                    Some(Slot::Capacity(cell)) => cell,
                    Some(Slot::App { .. }) => return Err(fail(format!("{environment} is an app environment"))),
                    None => {
                        let tenant_cell = self
                            .tenants
                            .get(tenant)
                            .map(|t| t.clone())
                            .ok_or_else(|| fail(format!("unknown tenant {tenant}")))?;
                        let cell = new_cell(environment, tenant, tenant_cell);
                        self.environments.insert(environment.clone(), Slot::Capacity(cell.clone()));
                        cell
                    }
                };
                self.replay_on(&cell, seq, now, event).map_err(fail)?;
            }
            Event::PayAsYouGoSet { environment, .. } => {
                let cell = self.named_capacity_cell(environment).map_err(|e| fail(e.to_string()))?;
                self.replay_on(&cell, seq, now, event).map_err(fail)?;
            }
            Event::Reserved { reservation, .. }
            | Event::Committed { reservation, .. }
            | Event::Released { reservation }
            | Event::Expired { reservation } => {
                let cell = self.reservation_cell(reservation).map_err(|e: LedgerError| fail(e.to_string()))?;
                self.replay_on(&cell, seq, now, event).map_err(fail)?;
            }
        }
        Ok(())
    }

    fn replay_on(&self, cell: &super::CapacityCell, seq: u64, now: u64, event: &Event) -> Result<(), String> {
        let mut books = Books::lock_with_tenant(cell);
        if books.env.applied_seq >= seq {
            return Ok(());
        }
        self.evolve(&mut books, event, now)?;
        books.env.applied_seq = seq;
        Ok(())
    }

    /// Recomputes what is summed over environments (tenant allocations and pool use, the open-hold
    /// count) from the environments' books. Run it after importing a snapshot and again after replay.
    pub fn recompute_totals(&self) {
        let mut sums: HashMap<TenantId, (Milli, Milli, Milli)> = HashMap::new();
        let mut open = 0u64;
        for slot in self.environments.iter() {
            let Slot::Capacity(cell) = slot.value() else { continue };
            let env = cell.books.lock();
            let sum = sums.entry(env.tenant.clone()).or_default();
            sum.0 += env.allocated;
            sum.1 += env.used.get(Source::TenantPool);
            sum.2 += env.held.get(Source::TenantPool);
            open += env.open.len() as u64;
        }
        for entry in self.tenants.iter() {
            let (allocated, pool_used, pool_held) = sums.remove(entry.key()).unwrap_or_default();
            let mut tenant = entry.value().lock();
            tenant.allocated = allocated;
            tenant.pool_used = pool_used;
            tenant.pool_held = pool_held;
        }
        self.open_total.store(open, Ordering::Relaxed);
    }

    /// Ends a restore: recomputes the totals and checks every invariant and link.
    pub fn finish_restore(&self) -> Result<(), RestoreError> {
        self.recompute_totals();
        for slot in self.environments.iter() {
            if let Slot::App { target: Some(target), .. } = slot.value()
                && !matches!(self.environments.get(target).as_deref(), Some(Slot::Capacity(_)))
            {
                return Err(RestoreError::Invariant(format!(
                    "{} is linked to {target}, not a capacity environment",
                    slot.key()
                )));
            }
        }
        self.verify().map_err(RestoreError::Invariant)
    }

    /// The largest sequence number any object of this ledger has applied.
    pub fn applied_seq(&self) -> u64 {
        let tenants = self.tenants.iter().map(|t| t.value().lock().applied_seq).max().unwrap_or(0);
        let slots = self
            .environments
            .iter()
            .map(|s| match s.value() {
                Slot::Capacity(cell) => cell.books.lock().applied_seq,
                Slot::App { applied_seq, .. } => *applied_seq,
            })
            .max()
            .unwrap_or(0);
        tenants.max(slots)
    }
}
