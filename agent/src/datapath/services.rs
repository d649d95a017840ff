//! `SERVICES` and `ENDPOINTS`, made to say what the node state says, all or nothing.
//!
//! The agent keeps a mirror of what it wrote ([`Written`]). A change is checked against
//! the maps' capacities first, then written in an order that keeps every intermediate
//! state valid for a concurrent connect (endpoints before the count that exposes them,
//! trimmed after it). Should a write still fail half-way, the previous contents are put
//! back from the mirror; should that fail too, the mirror knows exactly what is in the
//! maps and the next sync starts from there.

use std::collections::{HashMap, HashSet};

use weft_common::{maps, EndpointKey, ServiceKey, ServiceValue, SockAddr4, PROTO_TCP, PROTO_UDP};

use super::{raw_ip, DatapathError};
use crate::{config::Protocol, state::NodeState};

/// What the maps should hold: each service address and its endpoints, in order.
pub type Desired = HashMap<ServiceKey, Vec<SockAddr4>>;

/// The two maps, behind a trait so the transaction is tested without a kernel.
pub trait ServiceTables {
    fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), DatapathError>;
    fn drop_service(&mut self, k: &ServiceKey);
    fn put_endpoint(&mut self, k: &EndpointKey, v: &SockAddr4) -> Result<(), DatapathError>;
    fn drop_endpoint(&mut self, k: &EndpointKey);
}

/// How many entries the maps hold at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub endpoints: u32,
}

/// What one service address has in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// As written to `SERVICES`.
    value: ServiceValue,
    /// The `ENDPOINTS` entries present for `value.id`, from index 0 (at least `count`).
    endpoints: Vec<SockAddr4>,
}

/// The agent's mirror of `SERVICES` and `ENDPOINTS`.
#[derive(Clone, Debug, Default)]
pub struct Written {
    entries: HashMap<ServiceKey, Entry>,
}

pub fn service_key(vip: std::net::SocketAddrV4, protocol: Protocol) -> ServiceKey {
    ServiceKey {
        ip: raw_ip(*vip.ip()),
        port: vip.port(),
        proto: match protocol {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        },
        _pad: 0,
    }
}

/// The maps' contents for `state`.
pub fn desired(state: &NodeState) -> Desired {
    state.services.values().map(|svc| entry_of(svc)).collect()
}

/// What the maps hold for the services at `addrs` (those `state` has).
pub fn desired_of(state: &NodeState, addrs: &[crate::state::ServiceAddr]) -> Desired {
    addrs
        .iter()
        .filter_map(|a| state.services.get(a))
        .map(|svc| entry_of(svc))
        .collect()
}

/// One service as the maps hold it: its key and its endpoints.
fn entry_of(svc: &crate::state::ServiceEntry) -> (ServiceKey, Vec<SockAddr4>) {
    let eps = svc
        .endpoints
        .iter()
        .map(|e| SockAddr4::new(raw_ip(*e.addr.ip()), e.addr.port()))
        .collect();
    (service_key(svc.addr.vip, svc.addr.protocol), eps)
}

/// Refuse `peak` endpoints when the map cannot hold them.
fn endpoints_fit(peak: usize, cap: Capacity) -> Result<(), DatapathError> {
    if peak > cap.endpoints as usize {
        return Err(DatapathError::Capacity {
            map: maps::ENDPOINTS,
            needed: peak,
            max: cap.endpoints,
            flag: "--max-endpoints",
        });
    }
    Ok(())
}

impl Written {
    /// The mirror of maps a previous agent filled: each service and its counted endpoints.
    pub fn read(
        services: impl Iterator<Item = (ServiceKey, ServiceValue)>,
        endpoint: impl Fn(&EndpointKey) -> Option<SockAddr4>,
    ) -> Self {
        let entries = services
            .map(|(k, value)| {
                let endpoints = (0..value.count)
                    .map_while(|index| {
                        endpoint(&EndpointKey {
                            service: value.id,
                            index,
                        })
                    })
                    .collect::<Vec<_>>();
                let value = ServiceValue {
                    count: value.count.min(endpoints.len() as u32),
                    ..value
                };
                (k, Entry { value, endpoints })
            })
            .collect();
        Self { entries }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The mirror as a desired state: what putting things back means (entries that never
    /// reached `SERVICES` are not part of it).
    fn as_desired(&self) -> Desired {
        self.entries
            .iter()
            .filter(|(_, e)| e.value.count != u32::MAX)
            .map(|(k, e)| {
                let n = (e.value.count as usize).min(e.endpoints.len());
                (*k, e.endpoints[..n].to_vec())
            })
            .collect()
    }

    /// Refuse a change the maps cannot hold, naming the map. Stale services are removed
    /// first, and a service's endpoint list grows before it shrinks, so the peak is each
    /// remaining service's larger list.
    pub fn check(&self, desired: &Desired, cap: Capacity) -> Result<(), DatapathError> {
        if desired.len() > cap.services as usize {
            return Err(DatapathError::Capacity {
                map: maps::SERVICES,
                needed: desired.len(),
                max: cap.services,
                flag: "--max-services",
            });
        }
        let peak: usize = desired
            .iter()
            .map(|(k, eps)| {
                let old = self.entries.get(k).map_or(0, |e| e.endpoints.len());
                eps.len().max(old)
            })
            .sum();
        endpoints_fit(peak, cap)
    }

    /// Make the maps say `desired`, or leave them as they were.
    pub fn sync(
        &mut self,
        t: &mut impl ServiceTables,
        desired: &Desired,
        cap: Capacity,
    ) -> Result<(), DatapathError> {
        self.check(desired, cap)?;
        let before = self.as_desired();
        self.or_back(t, desired, &before, Self::apply)
    }

    /// Write `change` with `write`; should that fail, write `before` back the same way.
    fn or_back<T: ServiceTables>(
        &mut self,
        t: &mut T,
        change: &Desired,
        before: &Desired,
        write: fn(&mut Self, &mut T, &Desired) -> Result<(), DatapathError>,
    ) -> Result<(), DatapathError> {
        match write(self, t, change) {
            Ok(()) => Ok(()),
            Err(e) => match write(self, t, before) {
                Ok(()) => Err(e),
                Err(again) => Err(DatapathError::RollbackFailed {
                    first: Box::new(e),
                    rollback: Box::new(again),
                }),
            },
        }
    }

    /// Make the maps say `subset` for those services only, all of which the maps already
    /// hold (endpoints changed, nothing added or removed): the cost of a change in
    /// proportion to it. Checked and rolled back like [`Written::sync`].
    pub fn sync_some(
        &mut self,
        t: &mut impl ServiceTables,
        subset: &Desired,
        cap: Capacity,
    ) -> Result<(), DatapathError> {
        if let Some(k) = subset.keys().find(|k| !self.entries.contains_key(k)) {
            return Err(DatapathError::NotWritten(format!("{k:?}")));
        }
        let peak: usize = self
            .entries
            .iter()
            .map(|(k, e)| match subset.get(k) {
                Some(eps) => eps.len().max(e.endpoints.len()),
                None => e.endpoints.len(),
            })
            .sum();
        endpoints_fit(peak, cap)?;
        let before: Desired = subset
            .keys()
            .map(|k| {
                let e = &self.entries[k];
                let n = (e.value.count as usize).min(e.endpoints.len());
                (*k, e.endpoints[..n].to_vec())
            })
            .collect();
        self.or_back(t, subset, &before, Self::apply_some)
    }

    /// Write `subset`'s endpoints over services the mirror holds.
    fn apply_some(
        &mut self,
        t: &mut impl ServiceTables,
        subset: &Desired,
    ) -> Result<(), DatapathError> {
        for (key, eps) in subset {
            let entry = self.entries.get_mut(key).expect("checked by sync_some");
            entry.put_endpoints(t, eps)?;
            let value = ServiceValue {
                id: entry.value.id,
                count: eps.len() as u32,
            };
            if entry.value != value {
                t.put_service(key, &value)?;
                entry.value = value;
            }
            entry.trim(t, eps.len());
        }
        Ok(())
    }

    /// Write the differences between the mirror and `desired`, keeping the mirror true
    /// after every single write.
    fn apply(
        &mut self,
        t: &mut impl ServiceTables,
        desired: &Desired,
    ) -> Result<(), DatapathError> {
        let stale: Vec<ServiceKey> = self
            .entries
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            let old = self.entries.remove(&key).expect("listed from the mirror");
            t.drop_service(&key);
            for index in 0..old.endpoints.len() as u32 {
                t.drop_endpoint(&EndpointKey {
                    service: old.value.id,
                    index,
                });
            }
        }
        let mut used: HashSet<u32> = self.entries.values().map(|e| e.value.id).collect();
        let mut next_id = 0u32;
        for (key, eps) in desired {
            let entry = match self.entries.get_mut(key) {
                Some(e) => e,
                None => {
                    while used.contains(&next_id) {
                        next_id += 1;
                    }
                    used.insert(next_id);
                    self.entries.entry(*key).or_insert(Entry {
                        value: ServiceValue {
                            id: next_id,
                            count: u32::MAX, // not in SERVICES yet
                        },
                        endpoints: vec![],
                    })
                }
            };
            let id = entry.value.id;
            entry.put_endpoints(t, eps)?;
            let value = ServiceValue {
                id,
                count: eps.len() as u32,
            };
            if entry.value != value {
                if let Err(e) = t.put_service(key, &value) {
                    if entry.value.count == u32::MAX {
                        // Never made it into SERVICES: forget its endpoints too.
                        for index in 0..entry.endpoints.len() as u32 {
                            t.drop_endpoint(&EndpointKey { service: id, index });
                        }
                        self.entries.remove(key);
                    }
                    return Err(e);
                }
                entry.value = value;
            }
            entry.trim(t, eps.len());
        }
        Ok(())
    }
}

impl Entry {
    /// Write the endpoints that differ from what the mirror says is there.
    fn put_endpoints(
        &mut self,
        t: &mut impl ServiceTables,
        eps: &[SockAddr4],
    ) -> Result<(), DatapathError> {
        for (i, ep) in eps.iter().enumerate() {
            if self.endpoints.get(i) == Some(ep) {
                continue;
            }
            let k = EndpointKey {
                service: self.value.id,
                index: i as u32,
            };
            t.put_endpoint(&k, ep)?;
            if i < self.endpoints.len() {
                self.endpoints[i] = *ep;
            } else {
                self.endpoints.push(*ep);
            }
        }
        Ok(())
    }

    /// Drop the endpoints past `len` (after the count that hid them was written).
    fn trim(&mut self, t: &mut impl ServiceTables, len: usize) {
        for index in len as u32..self.endpoints.len() as u32 {
            t.drop_endpoint(&EndpointKey {
                service: self.value.id,
                index,
            });
        }
        self.endpoints.truncate(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Maps in memory with a size, and a write that fails on demand.
    #[derive(Default)]
    struct Fake {
        services: HashMap<ServiceKey, ServiceValue>,
        endpoints: HashMap<EndpointKey, SockAddr4>,
        /// Fail the n-th write from now (1 = the next one).
        fail_in: usize,
    }

    impl Fake {
        fn write(&mut self) -> Result<(), DatapathError> {
            if self.fail_in > 0 {
                self.fail_in -= 1;
                if self.fail_in == 0 {
                    return Err(DatapathError::Injected);
                }
            }
            Ok(())
        }

        /// What a connect would see: each service and its counted endpoints.
        fn view(&self) -> Desired {
            self.services
                .iter()
                .map(|(k, v)| {
                    let eps = (0..v.count)
                        .map(|index| {
                            self.endpoints[&EndpointKey {
                                service: v.id,
                                index,
                            }]
                        })
                        .collect();
                    (*k, eps)
                })
                .collect()
        }
    }

    impl ServiceTables for Fake {
        fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), DatapathError> {
            self.write()?;
            self.services.insert(*k, *v);
            Ok(())
        }
        fn drop_service(&mut self, k: &ServiceKey) {
            self.services.remove(k);
        }
        fn put_endpoint(&mut self, k: &EndpointKey, v: &SockAddr4) -> Result<(), DatapathError> {
            self.write()?;
            self.endpoints.insert(*k, *v);
            Ok(())
        }
        fn drop_endpoint(&mut self, k: &EndpointKey) {
            self.endpoints.remove(k);
        }
    }

    fn svc(n: u8) -> ServiceKey {
        ServiceKey {
            ip: u32::from(n),
            port: 80,
            proto: PROTO_TCP,
            _pad: 0,
        }
    }

    fn eps(ports: &[u16]) -> Vec<SockAddr4> {
        ports.iter().map(|p| SockAddr4::new(7, *p)).collect()
    }

    const ROOMY: Capacity = Capacity {
        services: 100,
        endpoints: 100,
    };

    #[test]
    fn a_change_is_written_and_trimmed() {
        let (mut w, mut t) = (Written::default(), Fake::default());
        let a: Desired = [(svc(1), eps(&[1, 2, 3])), (svc(2), eps(&[4]))].into();
        w.sync(&mut t, &a, ROOMY).unwrap();
        assert_eq!(t.view(), a);
        let b: Desired = [(svc(1), eps(&[3])), (svc(3), eps(&[5, 6]))].into();
        w.sync(&mut t, &b, ROOMY).unwrap();
        assert_eq!(t.view(), b);
        assert_eq!(t.endpoints.len(), 3, "no endpoint left behind");
    }

    #[test]
    fn some_services_are_written_alone_and_rolled_back_alone() {
        let (mut w, mut t) = (Written::default(), Fake::default());
        let a: Desired = [(svc(1), eps(&[1, 2, 3])), (svc(2), eps(&[4]))].into();
        w.sync(&mut t, &a, ROOMY).unwrap();
        let change: Desired = [(svc(1), eps(&[2, 5]))].into();
        w.sync_some(&mut t, &change, ROOMY).unwrap();
        let want: Desired = [(svc(1), eps(&[2, 5])), (svc(2), eps(&[4]))].into();
        assert_eq!(t.view(), want);
        assert_eq!(t.endpoints.len(), 3, "the trimmed endpoint is gone");
        // A failing write puts the service back as it was; the others were not touched.
        for fail_at in 1..4 {
            t.fail_in = fail_at;
            let grow: Desired = [(svc(2), eps(&[6, 7, 8]))].into();
            match w.sync_some(&mut t, &grow, ROOMY) {
                Ok(()) => {}
                Err(DatapathError::Injected) => assert_eq!(t.view(), want, "write {fail_at}"),
                Err(e) => panic!("{e}"),
            }
            t.fail_in = 0;
            w.sync_some(&mut t, &[(svc(2), eps(&[4]))].into(), ROOMY)
                .unwrap();
        }
        // Only services already written; and the endpoint map's room is checked.
        let new: Desired = [(svc(9), eps(&[1]))].into();
        assert!(matches!(
            w.sync_some(&mut t, &new, ROOMY),
            Err(DatapathError::NotWritten(_))
        ));
        let tight = Capacity {
            services: 100,
            endpoints: 4,
        };
        let big: Desired = [(svc(2), eps(&[1, 2, 3]))].into();
        assert!(matches!(
            w.sync_some(&mut t, &big, tight),
            Err(DatapathError::Capacity { .. })
        ));
        assert_eq!(t.view(), want);
    }

    #[test]
    fn a_failed_write_at_any_point_leaves_the_previous_contents() {
        let a: Desired = [(svc(1), eps(&[1, 2])), (svc(2), eps(&[3]))].into();
        let b: Desired = [
            (svc(1), eps(&[9, 8, 7])),
            (svc(3), eps(&[4, 5])),
            (svc(4), eps(&[6])),
        ]
        .into();
        for fail_at in 1..12 {
            let (mut w, mut t) = (Written::default(), Fake::default());
            w.sync(&mut t, &a, ROOMY).unwrap();
            t.fail_in = fail_at;
            match w.sync(&mut t, &b, ROOMY) {
                Ok(()) => assert_eq!(t.view(), b, "failing write {fail_at} came after the end"),
                Err(DatapathError::Injected) => {
                    assert_eq!(t.view(), a, "write {fail_at} failed: rolled back");
                    assert_eq!(t.endpoints.len(), 3, "write {fail_at}: nothing left behind");
                    // And the next attempt starts from what is there.
                    w.sync(&mut t, &b, ROOMY).unwrap();
                    assert_eq!(t.view(), b);
                }
                Err(e) => panic!("write {fail_at}: {e}"),
            }
        }
    }

    #[test]
    fn a_change_that_does_not_fit_is_refused_before_any_write() {
        let (mut w, mut t) = (Written::default(), Fake::default());
        let cap = Capacity {
            services: 2,
            endpoints: 4,
        };
        let a: Desired = [(svc(1), eps(&[1, 2])), (svc(2), eps(&[3]))].into();
        w.sync(&mut t, &a, cap).unwrap();
        let three: Desired = [
            (svc(1), eps(&[1])),
            (svc(2), eps(&[2])),
            (svc(3), eps(&[3])),
        ]
        .into();
        let e = w.sync(&mut t, &three, cap).unwrap_err().to_string();
        assert!(
            e.contains("SERVICES") && e.contains("--max-services"),
            "{e}"
        );
        let wide: Desired = [(svc(1), eps(&[1, 2, 3, 4])), (svc(2), eps(&[5]))].into();
        let e = w.sync(&mut t, &wide, cap).unwrap_err().to_string();
        assert!(e.contains("ENDPOINTS") && e.contains("5"), "{e}");
        assert_eq!(t.view(), a, "nothing was written");
    }

    #[test]
    fn the_mirror_of_a_previous_agents_maps_resumes_with_its_ids() {
        let (mut w, mut t) = (Written::default(), Fake::default());
        let a: Desired = [(svc(1), eps(&[1, 2])), (svc(2), eps(&[3]))].into();
        w.sync(&mut t, &a, ROOMY).unwrap();
        let read = Written::read(t.services.clone().into_iter(), |k| {
            t.endpoints.get(k).copied()
        });
        assert_eq!(read.entries, w.entries);
    }
}
