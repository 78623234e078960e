//! Three namespaces in a line, left - middle - right. The middle either
//! routes between two veth links (IPv4 and IPv6) or bridges them (one
//! subnet, a bridge with no address), so what passes between left and
//! right is neither end of any of the middle's own sockets.

use super::{Netns, sh, veth_between};

pub struct Routed {
    pub left: Netns,
    pub router: Netns,
    pub right: Netns,
    /// Each end's address and the router's on its link: IPv4, then IPv6
    /// (a bridge has none: empty).
    pub left_addr: [String; 2],
    pub right_addr: [String; 2],
    pub router_left: [String; 2],
    pub router_right: [String; 2],
}

impl Routed {
    pub fn new() -> Routed {
        let left = Netns::new("tol");
        let router = Netns::new("tor");
        let right = Netns::new("toR");
        let net = std::process::id() % 200 + 20;
        let v4 = |link: u32, host: u32| format!("10.{net}.{link}.{host}");
        let v6 = |link: u32, host: u32| format!("fd{net:02x}:{link}::{host:x}");
        let routed = Routed {
            left_addr: [v4(1, 1), v6(1, 1)],
            router_left: [v4(1, 254), v6(1, 254)],
            router_right: [v4(2, 254), v6(2, 254)],
            right_addr: [v4(2, 1), v6(2, 1)],
            left,
            router,
            right,
        };
        let links = [
            (&routed.left, "rl", &routed.left_addr, &routed.router_left),
            (
                &routed.right,
                "rr",
                &routed.right_addr,
                &routed.router_right,
            ),
        ];
        for (end, port, end_addr, router_addr) in links {
            veth_between(end, "veth0", &routed.router, port);
            end.address("veth0", &end_addr[0], &end_addr[1]);
            routed
                .router
                .address(port, &router_addr[0], &router_addr[1]);
            let via = |fam: usize| ["route", "add", "default", "via", &router_addr[fam]];
            sh(&[&["ip", "-n", &end.name][..], &via(0)].concat());
            sh(&[&["ip", "-n", &end.name, "-6"][..], &via(1)].concat());
        }
        routed.router.sysctl("net.ipv4.ip_forward=1");
        routed.router.sysctl("net.ipv6.conf.all.forwarding=1");
        routed
    }

    /// The middle as a bridge: `br0` joins its two ports, left and right
    /// share one subnet, and the bridge has no address of its own.
    pub fn bridged() -> Routed {
        let left = Netns::new("tbl");
        let router = Netns::new("tbb");
        let right = Netns::new("tbR");
        let net = std::process::id() % 200 + 20;
        let v4 = |host: u32| format!("10.{net}.3.{host}");
        let v6 = |host: u32| format!("fd{net:02x}:3::{host:x}");
        let none = [String::new(), String::new()];
        let b = Routed {
            left_addr: [v4(1), v6(1)],
            right_addr: [v4(2), v6(2)],
            router_left: none.clone(),
            router_right: none,
            left,
            router,
            right,
        };
        let mid = &b.router.name;
        sh(&["ip", "-n", mid, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", mid, "link", "set", "br0", "up"]);
        let ends = [
            (&b.left, "bp1", &b.left_addr),
            (&b.right, "bp2", &b.right_addr),
        ];
        for (end, port, addr) in ends {
            veth_between(end, "veth0", &b.router, port);
            sh(&["ip", "-n", mid, "link", "set", port, "master", "br0"]);
            sh(&["ip", "-n", mid, "link", "set", port, "up"]);
            end.address("veth0", &addr[0], &addr[1]);
        }
        b
    }
}
