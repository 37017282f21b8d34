//! API keys: the tenant each key acts for and the environments it may use, the hash of its secret, and
//! how many open holds it has. Keys are ledger state, created and revoked by logged events and kept in
//! snapshots; a revoked key is deleted, so the keys kept are bounded by the tenants' key caps.
//!
//! The ledger never sees a secret: only its SHA-256 hash, computed at the edge. The hash is compared
//! in constant time. When a key was last used is kept in memory only, to the second.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    ops::Bound,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::{
    ApiKeyId, CapacityCell, EnvironmentId, Event, Ledger, LedgerError, OpenReservationScope, ReservationId, Slot,
    TenantId,
    account::{Ending, Environment, Hold, Tenant},
};

/// API keys one tenant may have at once.
pub const DEFAULT_MAX_API_KEYS_PER_TENANT: usize = 1_000;
/// Open holds made with one API key, so that one runtime cannot take every hold the server allows.
pub const DEFAULT_MAX_OPEN_RESERVATIONS_PER_API_KEY: u64 = 100_000;
/// When a key was last used is recorded to this resolution, so that a busy key writes its time about
/// once a second rather than on every call.
const LAST_USED_RESOLUTION_MS: u64 = 1_000;

/// The SHA-256 hash of an API key's random secret. Compared in constant time; never printed.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretHash(pub [u8; 32]);

impl SecretHash {
    /// Whether `presented` is this hash, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &SecretHash) -> bool {
        self.0.ct_eq(&presented.0).into()
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(..)")
    }
}

/// What is durable about a key: logged when it is created, kept in snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: ApiKeyId,
    pub tenant: TenantId,
    /// The environments the key may use, as the admin named them; empty: every environment of the tenant.
    pub environments: Vec<EnvironmentId>,
    pub description: String,
    pub created_at_ms: u64,
    pub secret_hash: SecretHash,
}

/// A key as the ledger keeps it.
#[derive(Debug)]
pub struct ApiKey {
    record: ApiKeyRecord,
    /// In memory only: 0 until the key is first used after a start.
    last_used_ms: AtomicU64,
    /// Invariant: the number of open holds made with this key (outside a restore).
    open_holds: AtomicU64,
}

impl ApiKey {
    fn new(record: ApiKeyRecord) -> Self {
        Self { record, last_used_ms: AtomicU64::new(0), open_holds: AtomicU64::new(0) }
    }

    pub fn id(&self) -> &ApiKeyId {
        &self.record.id
    }

    pub fn tenant(&self) -> &TenantId {
        &self.record.tenant
    }

    pub fn record(&self) -> &ApiKeyRecord {
        &self.record
    }

    /// Whether `presented` is the hash of this key's secret.
    pub fn verify(&self, presented: &SecretHash) -> bool {
        self.record.secret_hash.matches(presented)
    }

    /// Records a use at `now`, coarsely: at most one write per [`LAST_USED_RESOLUTION_MS`].
    pub fn mark_used(&self, now: u64) {
        if now >= self.last_used_ms.load(Ordering::Relaxed).saturating_add(LAST_USED_RESOLUTION_MS) {
            self.last_used_ms.store(now, Ordering::Relaxed);
        }
    }

    pub fn view(&self) -> ApiKeyView {
        let record = &self.record;
        ApiKeyView {
            id: record.id.clone(),
            tenant: record.tenant.clone(),
            environments: record.environments.clone(),
            description: record.description.clone(),
            created_at_ms: record.created_at_ms,
            last_used_ms: self.last_used_ms.load(Ordering::Relaxed),
            open_reservations: self.open_holds.load(Ordering::Relaxed),
        }
    }
}

/// A key as an admin sees it: never its secret or hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyView {
    pub id: ApiKeyId,
    pub tenant: TenantId,
    pub environments: Vec<EnvironmentId>,
    pub description: String,
    pub created_at_ms: u64,
    /// 0: not used since the server started.
    pub last_used_ms: u64,
    pub open_reservations: u64,
}

/// One page of a tenant's keys, ordered by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyPage {
    pub keys: Vec<ApiKeyView>,
    /// The last id of this page when more keys follow it.
    pub next_after: Option<ApiKeyId>,
}

impl Ledger {
    /// The key with id `id`, for authenticating a request.
    pub fn api_key(&self, id: &str) -> Option<Arc<ApiKey>> {
        self.api_keys.get(id).map(|key| key.clone())
    }

    /// Up to `max` keys of `tenant` with ids after `after`, ordered by id.
    pub fn api_keys(&self, tenant: &TenantId, after: Option<&ApiKeyId>, max: usize) -> Result<ApiKeyPage, LedgerError> {
        assert!(max > 0, "a page of no keys");
        if !self.tenants.contains_key(tenant) {
            return Err(LedgerError::UnknownTenant(tenant.clone()));
        }
        let from: Bound<&ApiKeyId> = after.map_or(Bound::Unbounded, Bound::Excluded);
        // Collected first: no dashmap guard is held while the key map is read.
        let ids: Vec<ApiKeyId> = self
            .api_keys_by_tenant
            .get(tenant)
            .map(|ids| {
                ids.range::<ApiKeyId, _>((from, Bound::Unbounded)).take(max.saturating_add(1)).cloned().collect()
            })
            .unwrap_or_default();
        let more = ids.len() > max;
        // A key revoked since the ids were read is left out.
        let keys: Vec<ApiKeyView> =
            ids.iter().take(max).filter_map(|id| self.api_key(id.as_str())).map(|k| k.view()).collect();
        let next_after = more.then(|| ids[max - 1].clone());
        Ok(ApiKeyPage { keys, next_after })
    }

    /// Decides and applies the creation of `record`'s key: its tenant must exist and have room for
    /// another key, and each environment it lists must exist and draw on an environment of the tenant.
    pub(super) fn create_api_key(&self, record: ApiKeyRecord, now: u64) -> Result<ApiKeyView, LedgerError> {
        let _admin = self.admin.lock();
        if !self.tenants.contains_key(&record.tenant) {
            return Err(LedgerError::UnknownTenant(record.tenant));
        }
        for environment in &record.environments {
            let owner = self.capacity_cell(environment)?.owner.clone();
            if owner != record.tenant {
                return Err(LedgerError::EnvironmentOfAnotherTenant { environment: environment.clone(), owner });
            }
        }
        let limit = self.limits.max_api_keys_per_tenant;
        if self.api_keys_by_tenant.get(&record.tenant).is_some_and(|ids| ids.len() >= limit) {
            return Err(LedgerError::TooManyApiKeys { tenant: record.tenant, limit });
        }
        if self.api_keys.contains_key(&record.id) {
            return Err(LedgerError::ApiKeyIdTaken(record.id));
        }
        self.sink.record(now, &Event::ApiKeyCreated { key: record.clone() }, None);
        Ok(self.insert_api_key(record).view())
    }

    /// Decides and applies a revocation: the key is deleted, so the next request that sends it fails.
    pub(super) fn revoke_api_key(&self, id: &ApiKeyId, now: u64) -> Result<ApiKeyView, LedgerError> {
        let _admin = self.admin.lock();
        let key = self.api_key(id.as_str()).ok_or_else(|| LedgerError::UnknownApiKey(id.clone()))?;
        self.sink.record(now, &Event::ApiKeyRevoked { id: id.clone() }, None);
        self.remove_api_key(id);
        Ok(key.view())
    }

    /// Publishes a key; one already there (restored from the snapshot, then replayed) is kept.
    pub(super) fn insert_api_key(&self, record: ApiKeyRecord) -> Arc<ApiKey> {
        if let Some(existing) = self.api_key(record.id.as_str()) {
            return existing;
        }
        self.api_keys_by_tenant.entry(record.tenant.clone()).or_default().insert(record.id.clone());
        let key = Arc::new(ApiKey::new(record));
        self.api_keys.insert(key.id().clone(), key.clone());
        key
    }

    pub(super) fn remove_api_key(&self, id: &ApiKeyId) {
        let Some((_, key)) = self.api_keys.remove(id) else { return };
        let emptied = self.api_keys_by_tenant.get_mut(key.tenant()).is_some_and(|mut ids| {
            ids.remove(id);
            ids.is_empty()
        });
        if emptied {
            self.api_keys_by_tenant.remove_if(key.tenant(), |_, ids: &BTreeSet<ApiKeyId>| ids.is_empty());
        }
    }

    /// The capacity environment `environment` names, and the key the request came with, if the key
    /// may use it. For a key, an environment that does not exist, is not linked, is another tenant's or
    /// is outside the key's list is refused with one and the same error, which says nothing about
    /// other tenants.
    pub(super) fn scoped_cell(
        &self,
        environment: &EnvironmentId,
        api_key: Option<&ApiKeyId>,
    ) -> Result<(Arc<CapacityCell>, Option<Arc<ApiKey>>), LedgerError> {
        let Some(id) = api_key else { return Ok((self.capacity_cell(environment)?, None)) };
        let key = self.valid_key(id)?;
        match self.capacity_cell(environment) {
            Ok(cell) if self.in_scope(&key, &cell) => Ok((cell, Some(key))),
            _ => Err(LedgerError::EnvironmentOutsideKeyScope(environment.clone())),
        }
    }

    /// The capacity environment of `reservation`, if the key the request came with may use it; see
    /// [`Ledger::scoped_cell`].
    pub(super) fn scoped_reservation_cell(
        &self,
        reservation: &ReservationId,
        api_key: Option<&ApiKeyId>,
    ) -> Result<Arc<CapacityCell>, LedgerError> {
        let Some(id) = api_key else { return self.reservation_cell(reservation) };
        let key = self.valid_key(id)?;
        match self.reservation_cell(reservation) {
            Ok(cell) if self.in_scope(&key, &cell) => Ok(cell),
            _ => Err(LedgerError::ReservationOutsideKeyScope(reservation.clone())),
        }
    }

    /// The key a request was authenticated with; revoked since, it is refused like a wrong secret.
    fn valid_key(&self, id: &ApiKeyId) -> Result<Arc<ApiKey>, LedgerError> {
        self.api_key(id.as_str()).ok_or(LedgerError::ApiKeyNoLongerValid)
    }

    /// Whether `key` may use the capacity environment `cell`: it is the key's tenant's, and the key has
    /// no list or lists it or an app environment now linked to it.
    fn in_scope(&self, key: &ApiKey, cell: &CapacityCell) -> bool {
        if cell.owner != *key.tenant() {
            return false;
        }
        let listed = &key.record.environments;
        listed.is_empty()
            || listed.contains(&cell.id)
            || listed.iter().any(|environment| self.links_to(environment, &cell.id))
    }

    /// Whether `app` is an app environment linked to `capacity` now.
    fn links_to(&self, app: &EnvironmentId, capacity: &EnvironmentId) -> bool {
        let slot = self.environments.get(app);
        matches!(slot.as_deref(), Some(Slot::App(link)) if link.target.as_ref() == Some(capacity))
    }

    /// Counts a new hold against `key`, or refuses it at the key's cap. Taken under the environment's
    /// lock, like the server-wide count; [`Ledger::give_back_key_hold`] undoes it for a refusal after.
    pub(super) fn take_key_hold(&self, key: &ApiKey) -> Result<(), LedgerError> {
        if key.open_holds.fetch_add(1, Ordering::Relaxed) >= self.limits.max_open_reservations_per_api_key {
            key.open_holds.fetch_sub(1, Ordering::Relaxed);
            return Err(self.key_cap_reached());
        }
        Ok(())
    }

    pub(super) fn give_back_key_hold(&self, key: &ApiKey) {
        key.open_holds.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether a new hold of `key` would be refused at its cap; for dry runs.
    pub(super) fn check_key_cap(&self, key: &ApiKey) -> Result<(), LedgerError> {
        if key.open_holds.load(Ordering::Relaxed) >= self.limits.max_open_reservations_per_api_key {
            return Err(self.key_cap_reached());
        }
        Ok(())
    }

    fn key_cap_reached(&self) -> LedgerError {
        LedgerError::TooManyOpenReservations {
            scope: OpenReservationScope::ApiKey,
            limit: self.limits.max_open_reservations_per_api_key,
        }
    }

    /// Counts a resolved hold off the key that made it. A revoked key is no longer counted; during a
    /// restore the counts are recomputed at the end, so the count stops at zero rather than wrap.
    pub(super) fn key_hold_resolved(&self, api_key: Option<&ApiKeyId>) {
        if let Some(key) = api_key.and_then(|id| self.api_key(id.as_str())) {
            let _ = key.open_holds.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// Sets every key's open-hold count from the open holds of every environment.
    pub(super) fn recount_key_holds(&self) {
        let counts = self.open_holds_by_key();
        for entry in self.api_keys.iter() {
            let count = counts.get(entry.key()).copied().unwrap_or(0);
            entry.value().open_holds.store(count, Ordering::Relaxed);
        }
    }

    /// Checks that every key's open-hold count is the number of its open holds.
    pub(super) fn verify_key_holds(&self) -> Result<(), String> {
        let counts = self.open_holds_by_key();
        for entry in self.api_keys.iter() {
            let (counted, actual) =
                (entry.value().open_holds.load(Ordering::Relaxed), counts.get(entry.key()).copied().unwrap_or(0));
            if counted != actual {
                return Err(format!("API key {} counts {counted} open holds, but has {actual}", entry.key()));
            }
            if !self.api_keys_by_tenant.get(entry.value().tenant()).is_some_and(|ids| ids.contains(entry.key())) {
                return Err(format!("API key {} is missing from its tenant's keys", entry.key()));
            }
        }
        let indexed: usize = self.api_keys_by_tenant.iter().map(|ids| ids.len()).sum();
        if indexed != self.api_keys.len() {
            return Err(format!("{indexed} API keys by tenant, {} in all", self.api_keys.len()));
        }
        Ok(())
    }

    fn open_holds_by_key(&self) -> HashMap<ApiKeyId, u64> {
        let mut counts = HashMap::new();
        // Collected first: no dashmap guard is held while an environment is locked.
        let cells: Vec<Arc<CapacityCell>> = self
            .environments
            .iter()
            .filter_map(|slot| match slot.value() {
                Slot::Capacity(cell) => Some(cell.clone()),
                Slot::App(_) => None,
            })
            .collect();
        for cell in cells {
            let env = cell.books.lock();
            for api_key in env.open.values().filter_map(|hold| hold.api_key.as_ref()) {
                *counts.entry(api_key.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Ends the open hold `seq` as a Release or an expiry does, and counts it off the server and its
    /// key; false if it is not open.
    pub(super) fn end_open_hold(
        &self,
        env: &mut Environment,
        tenant: Option<&mut Tenant>,
        seq: u64,
        ending: Ending,
        now: u64,
    ) -> bool {
        let Some(hold) = env.open.remove(&seq) else { return false };
        self.end_taken_hold(env, tenant, seq, hold, ending, now);
        true
    }

    /// Ends a hold already taken out of `env.open`, as [`Self::end_open_hold`] does.
    pub(super) fn end_taken_hold(
        &self,
        env: &mut Environment,
        tenant: Option<&mut Tenant>,
        seq: u64,
        hold: Box<Hold>,
        ending: Ending,
        now: u64,
    ) {
        self.key_hold_resolved(hold.api_key.as_ref());
        self.open_total.fetch_sub(1, Ordering::Relaxed);
        let retention = (self.limits.resolved_retention_ms, self.limits.max_resolved_per_environment);
        env.end_taken(tenant, seq, hold, ending, now, retention);
    }
}

#[cfg(test)]
mod tests {
    use parking_lot::Mutex;

    use super::*;
    use crate::ledger::{Command, EventSink, Levels, Limits, Outcome, Usage};

    /// Counts the events it is given.
    #[derive(Default)]
    struct Count(Mutex<u64>);

    impl EventSink for Count {
        fn record(&self, _now: u64, _event: &Event, _levels: Option<Levels>) -> u64 {
            let mut count = self.0.lock();
            *count += 1;
            *count
        }
    }

    fn id(text: &str) -> ApiKeyId {
        ApiKeyId::new(text).unwrap()
    }

    fn create(key: &str) -> Command {
        Command::CreateApiKey {
            id: id(key),
            tenant: TenantId::new("t").unwrap(),
            environments: Vec::new(),
            description: String::new(),
            secret_hash: SecretHash([7; 32]),
        }
    }

    fn ledger(sink: Arc<Count>) -> Ledger {
        ledger_with(Limits::default(), sink)
    }

    fn ledger_with(limits: Limits, sink: Arc<Count>) -> Ledger {
        let ledger = Ledger::with_sink(limits, sink);
        let tenant = TenantId::new("t").unwrap();
        let environment = EnvironmentId::new("e").unwrap();
        for command in [
            Command::PurchaseCapacity { tenant: tenant.clone(), amount_milli: 10_000, idempotency_key: None },
            Command::AllocateCapacity { tenant, environment, amount_milli: 10_000, draw_from_tenant_pool: false },
        ] {
            ledger.apply(&command, 0).unwrap();
        }
        ledger
    }

    /// A second key with a taken id is refused before anything is logged, and the first key is untouched.
    #[test]
    fn a_taken_key_id_is_refused_and_logs_nothing() {
        let sink = Arc::new(Count::default());
        let ledger = ledger(sink.clone());
        let Ok(Outcome::ApiKey(first)) = ledger.apply(&create("k"), 5) else { panic!("created") };
        assert_eq!((first.created_at_ms, first.open_reservations), (5, 0));
        let logged = *sink.0.lock();
        assert_eq!(ledger.apply(&create("k"), 6), Err(LedgerError::ApiKeyIdTaken(id("k"))));
        assert_eq!(*sink.0.lock(), logged);
        assert_eq!(ledger.api_key("k").unwrap().view(), first);
        assert_eq!(ledger.verify(), Ok(()));
    }

    /// In a batch made with a key, a reservation that finds the environment full of a due hold of that
    /// key expires it (giving the key its count back) and is granted; the next one, with nothing due
    /// left, is refused; the key counts the one open hold.
    #[test]
    fn a_batch_reservation_expires_its_keys_overdue_hold_and_the_key_counts_it_off() {
        let ledger = ledger(Arc::new(Count::default()));
        ledger.apply(&create("k"), 0).unwrap();
        let reserve = |milli, now: u64| Command::Reserve {
            environment: EnvironmentId::new("e").unwrap(),
            agent: crate::ledger::AgentId::new("a").unwrap(),
            usage: Usage::Milli(milli),
            idempotency_key: None,
            expires_at_ms: now + 60_000,
            api_key: Some(id("k")),
        };
        ledger.apply(&reserve(10_000, 0), 0).unwrap();
        let results = ledger.apply_batch(&[reserve(10_000, 60_000), reserve(1, 60_000)], 60_000);
        assert!(matches!(results[0], Ok(Outcome::Reserved(_))), "{results:?}");
        assert!(matches!(results[1], Err(LedgerError::QuotaDepleted { .. })), "{results:?}");
        assert_eq!((ledger.open_reservations(), ledger.api_key("k").unwrap().view().open_reservations), (1, 1));
        assert_eq!(ledger.verify(), Ok(()));
    }

    /// At the API key's cap, and at the server's, a reservation first expires its environment's overdue
    /// holds, as at the environment's own cap, and is granted; a dry run answers alike. While no hold
    /// is due the refusal stands and logs nothing.
    #[test]
    fn a_reservation_at_the_keys_or_the_servers_cap_first_expires_overdue_holds() {
        let (environment, agent) = (EnvironmentId::new("e").unwrap(), crate::ledger::AgentId::new("a").unwrap());
        let reserve = |now: u64| Command::Reserve {
            environment: environment.clone(),
            agent: agent.clone(),
            usage: Usage::Milli(1),
            idempotency_key: None,
            expires_at_ms: now + 60_000,
            api_key: Some(id("k")),
        };
        let key_cap = Limits { max_open_reservations_per_api_key: 1, ..Limits::default() };
        let server_cap = Limits { max_open_reservations_total: 1, ..Limits::default() };
        for (limits, scope) in [(key_cap, OpenReservationScope::ApiKey), (server_cap, OpenReservationScope::Server)] {
            // A ledger at the cap, with one hold due at 60,000 ms, and how many events it has logged.
            let at_cap = || {
                let sink = Arc::new(Count::default());
                let ledger = ledger_with(limits, sink.clone());
                ledger.apply(&create("k"), 0).unwrap();
                ledger.apply(&reserve(0), 0).unwrap();
                let logged = *sink.0.lock();
                (ledger, sink, logged)
            };
            let (ledger, sink, logged) = at_cap();
            let refused = ledger.apply(&reserve(59_999), 59_999);
            assert!(
                matches!(refused, Err(LedgerError::TooManyOpenReservations { scope: s, .. }) if s == scope),
                "{refused:?}"
            );
            assert_eq!(*sink.0.lock(), logged, "{scope:?}: a refusal with nothing due logs nothing");
            let granted = ledger.apply(&reserve(60_000), 60_000);
            assert!(matches!(granted, Ok(Outcome::Reserved(_))), "{scope:?}: {granted:?}");
            assert_eq!(*sink.0.lock(), logged + 2, "{scope:?}: the expiry, then the grant");
            assert_eq!((ledger.open_reservations(), ledger.api_key("k").unwrap().view().open_reservations), (1, 1));
            assert_eq!(ledger.verify(), Ok(()));

            let (ledger, sink, logged) = at_cap();
            let quote = ledger.dry_run(&environment, &agent, &Usage::Milli(1), Some(&id("k")), 60_000);
            assert!(quote.is_ok(), "{scope:?}: {quote:?}");
            assert_eq!(*sink.0.lock(), logged + 1, "{scope:?}: the dry run's expiry");
            assert_eq!((ledger.open_reservations(), ledger.api_key("k").unwrap().view().open_reservations), (0, 0));
        }
    }

    /// A request authenticated with a key that is revoked before the ledger applies it is refused as a
    /// wrong secret is, and the key's hash matches only itself.
    #[test]
    fn a_key_revoked_after_authentication_is_no_longer_valid() {
        let ledger = ledger(Arc::new(Count::default()));
        ledger.apply(&create("k"), 0).unwrap();
        let key = ledger.api_key("k").unwrap();
        assert!(key.verify(&SecretHash([7; 32])) && !key.verify(&SecretHash([8; 32])));
        ledger.apply(&Command::RevokeApiKey { id: id("k") }, 0).unwrap();
        let reserve = Command::Reserve {
            environment: EnvironmentId::new("e").unwrap(),
            agent: crate::ledger::AgentId::new("a").unwrap(),
            usage: Usage::Milli(1_000),
            idempotency_key: None,
            expires_at_ms: 60_000,
            api_key: Some(id("k")),
        };
        assert_eq!(ledger.apply(&reserve, 0), Err(LedgerError::ApiKeyNoLongerValid));
        assert_eq!(ledger.open_reservations(), 0);
        assert_eq!(ledger.apply(&Command::RevokeApiKey { id: id("k") }, 0), Err(LedgerError::UnknownApiKey(id("k"))));
        assert_eq!(ledger.verify(), Ok(()));
    }
}
