//! Where a request comes from: the address that throttling and in-flight
//! limits count against.
//!
//! By default that is the TCP peer. Behind a load balancer or an ingress
//! every peer is the proxy, so the operator names the proxies
//! (`TRUSTED_PROXIES`, a CIDR list) and the header they write
//! (`CLIENT_ADDRESS_HEADER`, `x-forwarded-for` by default). The header is
//! believed only when the peer is one of those proxies, and it is read from
//! the right: each trusted proxy appends the address it saw, so the first
//! address from the right that is not a trusted proxy is the client as the
//! outermost trusted proxy saw it. Anything further left was written by the
//! client and proves nothing.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use tonic::metadata::MetadataMap;

/// A block of addresses, `10.0.0.0/8` or `fd00::/8`; a bare address is a
/// block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, canonical(address)) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(network) & mask == u32::from(address) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(network) & mask == u128::from(address) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let value = value.trim();
        let (address, prefix) = match value.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (value, None),
        };
        let network = canonical(
            address
                .parse::<IpAddr>()
                .map_err(|_| format!("{value:?} is not an address or CIDR block"))?,
        );
        let longest = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => longest,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|prefix| *prefix <= longest)
                .ok_or_else(|| format!("{value:?} has a prefix length above {longest}"))?,
        };
        Ok(Self { network, prefix })
    }
}

/// The source of a request, as throttling counts it: an IPv4 address, or
/// the /64 network of an IPv6 address (one subscriber usually holds a whole
/// /64, so counting single IPv6 addresses would count nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Source(IpAddr);

impl Source {
    pub(crate) fn of(address: IpAddr) -> Self {
        match canonical(address) {
            IpAddr::V6(v6) => {
                let network = u128::from(v6) & (u128::MAX << 64);
                Self(IpAddr::V6(Ipv6Addr::from(network)))
            }
            v4 => Self(v4),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// How to find a request's source: see the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct ClientAddresses {
    header: String,
    trusted_proxies: Vec<Cidr>,
}

impl ClientAddresses {
    pub(crate) fn new(header: &str, trusted_proxies: Vec<Cidr>) -> Self {
        Self {
            header: header.to_ascii_lowercase(),
            trusted_proxies,
        }
    }

    fn is_trusted(&self, address: IpAddr) -> bool {
        self.trusted_proxies
            .iter()
            .any(|proxy| proxy.contains(address))
    }

    /// The source of a request from `peer` carrying `metadata`. Without a
    /// peer (not a TCP connection: never in this server) every such request
    /// counts as one source, the unspecified address.
    pub(crate) fn source(&self, peer: Option<SocketAddr>, metadata: &MetadataMap) -> Source {
        let peer = peer.map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |peer| {
            peer.ip()
        });
        Source::of(self.client_address(peer, metadata))
    }

    fn client_address(&self, peer: IpAddr, metadata: &MetadataMap) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        // Every copy of the header, in order, as one list: proxies may
        // append a header of their own instead of extending the last one.
        let hops: Vec<&str> = metadata
            .get_all(self.header.as_str())
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .collect();
        let mut nearest = peer;
        for hop in hops.iter().rev() {
            // An entry that is no address was written by a trusted proxy
            // (or the list would have ended already): stop at the last
            // address we could read.
            let Some(address) = parse_hop(hop) else {
                return nearest;
            };
            if !self.is_trusted(address) {
                return address;
            }
            nearest = address;
        }
        nearest
    }
}

/// One entry of a forwarding header: `203.0.113.7`, `203.0.113.7:4711`,
/// `2001:db8::1`, `[2001:db8::1]:4711`, or RFC 7239's
/// `for="[2001:db8::1]:4711";proto=https`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    let hop = hop
        .split(';')
        .map(str::trim)
        .find_map(|pair| {
            pair.split_once('=')
                .filter(|(name, _)| name.trim().eq_ignore_ascii_case("for"))
                .map(|(_, value)| value.trim())
        })
        .unwrap_or(hop)
        .trim_matches('"');
    if let Ok(address) = hop.parse::<IpAddr>() {
        return Some(canonical(address));
    }
    if let Ok(address) = hop.parse::<SocketAddr>() {
        return Some(canonical(address.ip()));
    }
    let unbracketed = hop.strip_prefix('[')?.strip_suffix(']')?;
    unbracketed.parse::<IpAddr>().ok().map(canonical)
}

/// IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`, what a dual-stack
/// socket reports) as the IPv4 address they are.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(header: &str, values: &[&str]) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        for value in values {
            metadata.append(
                tonic::metadata::MetadataKey::from_bytes(header.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        metadata
    }

    fn addresses(trusted: &[&str]) -> ClientAddresses {
        ClientAddresses::new(
            "X-Forwarded-For",
            trusted.iter().map(|cidr| cidr.parse().unwrap()).collect(),
        )
    }

    fn peer(address: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(address.parse().unwrap(), 40_000))
    }

    fn source(address: &str) -> Source {
        Source::of(address.parse().unwrap())
    }

    #[test]
    fn cidr_blocks_parse_and_contain() {
        let private: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(private.contains("10.1.2.3".parse().unwrap()));
        assert!(private.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!private.contains("11.0.0.1".parse().unwrap()));
        let one: Cidr = "192.0.2.1".parse().unwrap();
        assert!(one.contains("192.0.2.1".parse().unwrap()));
        assert!(!one.contains("192.0.2.2".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        let everything: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(everything.contains("203.0.113.9".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "::/129", "example.com", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_source_whatever_the_header_says() {
        let metadata = metadata("x-forwarded-for", &["198.51.100.1"]);
        assert_eq!(
            addresses(&[]).source(peer("203.0.113.7"), &metadata),
            source("203.0.113.7")
        );
        assert_eq!(
            addresses(&["10.0.0.0/8"]).source(peer("203.0.113.7"), &metadata),
            source("203.0.113.7"),
            "a peer that is not a trusted proxy cannot choose its source"
        );
    }

    #[test]
    fn behind_trusted_proxies_the_rightmost_untrusted_hop_is_the_source() {
        let addresses = addresses(&["10.0.0.0/8"]);
        // The client forged the first entry; the proxies appended the rest.
        let metadata = metadata("x-forwarded-for", &["192.0.2.66, 203.0.113.7", "10.0.0.5"]);
        assert_eq!(
            addresses.source(peer("10.0.0.9"), &metadata),
            source("203.0.113.7")
        );
        // No header: the proxy itself is all we know.
        assert_eq!(
            addresses.source(peer("10.0.0.9"), &MetadataMap::new()),
            source("10.0.0.9")
        );
        // Garbage at the right end: the nearest readable hop.
        let garbage = metadata_with_garbage();
        assert_eq!(
            addresses.source(peer("10.0.0.9"), &garbage),
            source("10.0.0.9")
        );
    }

    fn metadata_with_garbage() -> MetadataMap {
        metadata("x-forwarded-for", &["203.0.113.7, not-an-address"])
    }

    #[test]
    fn hops_may_carry_ports_brackets_and_rfc_7239_syntax() {
        for (hop, address) in [
            ("203.0.113.7:4711", "203.0.113.7"),
            ("[2001:db8::1]:4711", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("for=\"[2001:db8::1]:4711\";proto=https", "2001:db8::1"),
            ("proto=http; For=192.0.2.60", "192.0.2.60"),
            ("::ffff:192.0.2.1", "192.0.2.1"),
        ] {
            assert_eq!(parse_hop(hop), Some(address.parse().unwrap()), "{hop}");
        }
        assert_eq!(parse_hop("unknown"), None);
        assert_eq!(parse_hop("for=_hidden"), None);
    }

    #[test]
    fn ipv6_sources_are_their_64_bit_networks() {
        assert_eq!(
            source("2001:db8:1:2:aaaa::1"),
            source("2001:db8:1:2:bbbb::9")
        );
        assert_ne!(source("2001:db8:1:2::1"), source("2001:db8:1:3::1"));
        assert_eq!(
            source("2001:db8:1:2:aaaa::1").to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(source("::ffff:192.0.2.1").to_string(), "192.0.2.1");
    }
}
