//! The orchestrator's side of networking (`docs/networking.md`): an address from the pool,
//! a namespace and the published ports for each environment, and their cleanup. The
//! namespaces are made by the [`Backend`]; the ports are proxied by this daemon
//! ([`PortProxy`]).
//!
//! Order, as for files: the pool slot (a row) is allocated before the namespace is made,
//! and the namespace is removed after the row is gone; [`Orchestrator::recover_network`]
//! removes namespaces whose environment no longer exists.

use std::collections::HashSet;
use std::net::SocketAddr;

use super::Orchestrator;
use crate::backend::Backend;
use crate::error::ApiError;
use crate::model::{CreateEnvironment, PublishedPort};
use crate::network::{EnvNetwork, PortProxy};
use crate::service::Result;
use crate::store::{EnvRow, PortRow};

/// Most ports one environment may publish.
pub const MAX_PUBLISHED_PORTS: usize = 32;

impl<B: Backend> Orchestrator<B> {
    /// Checks a create request's `publish` and `allow_outbound` before anything is made.
    pub(super) fn check_network_request(&self, req: &CreateEnvironment) -> Result<()> {
        if self.net.is_none() && (!req.publish.is_empty() || req.allow_outbound.is_some()) {
            return Err(ApiError::bad_request(
                "this daemon does not network environments (start groved with --network); \
                 leave out publish and allow_outbound",
            ));
        }
        if req.publish.len() > MAX_PUBLISHED_PORTS {
            return Err(ApiError::bad_request(format!(
                "at most {MAX_PUBLISHED_PORTS} ports can be published"
            )));
        }
        let mut seen = HashSet::new();
        for &port in &req.publish {
            if port == 0 {
                return Err(ApiError::bad_request("port 0 cannot be published"));
            }
            if !seen.insert(port) {
                return Err(ApiError::bad_request(format!(
                    "port {port} is listed twice in publish"
                )));
            }
        }
        Ok(())
    }

    /// The network of environment `env_id`, if it has one and the daemon networks.
    pub(super) fn env_network(&self, env_id: i64) -> Result<Option<EnvNetwork>> {
        let (Some(config), Some(row)) = (&self.net, self.store.network(env_id)?) else {
            return Ok(None);
        };
        config
            .env_network(env_id, row.slot, row.allow_outbound)
            .map(Some)
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// Gives the reserved environment `row` an address and a namespace, and publishes
    /// `ports`; returns the namespace's name (`None` when the daemon does not network).
    pub(super) async fn create_network(
        &self,
        row: &EnvRow,
        allow_outbound: bool,
        ports: &[u16],
    ) -> Result<Option<String>> {
        let Some(config) = &self.net else {
            return Ok(None);
        };
        let slots = config.pool.slots();
        self.store
            .allocate_network(row.id, slots, allow_outbound)
            .map_err(|e| ApiError::conflict(format!("cannot network {}: {e}", row.name)))?;
        let net = self
            .env_network(row.id)?
            .ok_or_else(|| ApiError::internal("the network row vanished"))?;
        let backend = self.backend.clone();
        let made = net.clone();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || backend.setup_network(&made))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| {
                ApiError::internal(format!("cannot set up the network of {}: {e}", row.name))
            })?;
        log::info!(
            "environment {}: network namespace {} at {} (outbound {}) in {:.1} ms",
            row.name,
            net.netns,
            net.ns_addr,
            if allow_outbound { "allowed" } else { "denied" },
            started.elapsed().as_secs_f64() * 1000.0
        );
        for &port in ports {
            self.publish(row.id, &net, port, None)
                .map_err(|e| ApiError::internal(format!("cannot publish port {port}: {e}")))?;
        }
        Ok(Some(net.netns))
    }

    /// Listens for the environment's `guest_port` (on `at` if given and free, else on a new
    /// port) and records where.
    fn publish(
        &self,
        env_id: i64,
        net: &EnvNetwork,
        guest_port: u16,
        at: Option<SocketAddr>,
    ) -> std::result::Result<SocketAddr, String> {
        let config = self.net.as_ref().ok_or("networking is off")?;
        let target = SocketAddr::from((net.ns_addr, guest_port));
        let fresh = SocketAddr::new(config.publish_addr, 0);
        let range = config.publish_ports.as_ref();
        let proxy = match at {
            Some(addr) => PortProxy::start(addr, None, target).or_else(|e| {
                log::warn!("cannot listen on {addr} again ({e}); publishing elsewhere");
                PortProxy::start(fresh, range, target)
            }),
            None => PortProxy::start(fresh, range, target),
        }
        .map_err(|e| e.to_string())?;
        let host_addr = proxy.host_addr();
        self.store
            .set_port(&PortRow {
                env_id,
                guest_port,
                host_addr: host_addr.to_string(),
            })
            .map_err(|e| e.to_string())?;
        self.proxies.insert(env_id, guest_port, proxy);
        Ok(host_addr)
    }

    /// Closes the environment's ports and removes its namespace (best effort: what cannot
    /// be removed now, [`Self::recover_network`] removes at the next start). Call after its
    /// row is gone.
    pub(super) async fn remove_network(&self, env_id: i64) {
        self.proxies.remove(env_id);
        let Some(config) = &self.net else { return };
        // Only the names matter for removal.
        let Ok(net) = config.env_network(env_id, 0, false) else {
            return;
        };
        let backend = self.backend.clone();
        let result = tokio::task::spawn_blocking(move || backend.teardown_network(&net)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::warn!("cannot remove the network of environment {env_id}: {e}"),
            Err(e) => log::warn!("cannot remove the network of environment {env_id}: {e}"),
        }
    }

    /// The network fields of the environment's public view: address, outbound choice, ports.
    pub(super) fn network_view(
        &self,
        env_id: i64,
    ) -> (Option<String>, Option<bool>, Vec<PublishedPort>) {
        let net = self.env_network(env_id).ok().flatten();
        let ports = self
            .store
            .ports()
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.env_id == env_id)
            .map(|p| PublishedPort {
                guest_port: p.guest_port,
                host_addr: p.host_addr,
            })
            .collect();
        (
            net.as_ref().map(|n| n.ns_addr.to_string()),
            net.map(|n| n.allow_outbound),
            ports,
        )
    }

    /// After a start: publishes the recorded ports again (on the same host addresses where
    /// they are free) and removes namespaces of environments that no longer exist.
    pub(super) fn recover_network(&self) -> anyhow::Result<()> {
        let Some(config) = &self.net else {
            if !self.store.ports()?.is_empty() {
                log::warn!("networking is off: published ports are not served");
            }
            return Ok(());
        };
        let networked: HashSet<i64> = self.store.networks()?.iter().map(|n| n.env_id).collect();
        for port in self.store.ports()? {
            if self.proxies.contains(port.env_id, port.guest_port) {
                continue;
            }
            let Some(net) = self
                .env_network(port.env_id)
                .map_err(|e| anyhow::anyhow!("{e}"))?
            else {
                continue;
            };
            let at = port.host_addr.parse().ok();
            match self.publish(port.env_id, &net, port.guest_port, at) {
                Ok(addr) => log::info!(
                    "environment {}: port {} published on {addr}",
                    port.env_id,
                    port.guest_port
                ),
                Err(e) => log::warn!(
                    "environment {}: cannot publish port {}: {e}",
                    port.env_id,
                    port.guest_port
                ),
            }
        }
        for name in self.backend.network_namespaces(&config.netns_prefix) {
            let Some(id) = config.env_id_of(&name) else {
                continue;
            };
            if networked.contains(&id) {
                continue;
            }
            log::info!("removing network namespace {name} (no environment uses it)");
            if let Ok(net) = config.env_network(id, 0, false) {
                if let Err(e) = self.backend.teardown_network(&net) {
                    log::warn!("cannot remove network namespace {name}: {e}");
                }
            }
        }
        Ok(())
    }
}
