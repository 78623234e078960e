//! Three namespaces in a line, left - middle - right. The middle either
//! routes between two veth links (IPv4 and IPv6) or bridges them (one
//! subnet, a bridge with no address), so what passes between left and
//! right is neither end of any of the middle's own sockets.

use super::{Netns, sh};

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
        for (end, port, addr) in [
            (&b.left, "bp1", &b.left_addr),
            (&b.right, "bp2", &b.right_addr),
        ] {
            sh(&[
                "ip", "link", "add", "veth0", "netns", &end.name, "type", "veth", "peer", "name",
                port, "netns", mid,
            ]);
            sh(&["ip", "-n", mid, "link", "set", port, "master", "br0"]);
            sh(&["ip", "-n", mid, "link", "set", port, "up"]);
            sh(&[
                "ip",
                "-n",
                &end.name,
                "addr",
                "add",
                &format!("{}/24", addr[0]),
                "dev",
                "veth0",
            ]);
            sh(&[
                "ip",
                "-n",
                &end.name,
                "addr",
                "add",
                &format!("{}/64", addr[1]),
                "dev",
                "veth0",
                "nodad",
            ]);
            sh(&["ip", "-n", &end.name, "link", "set", "veth0", "up"]);
        }
        b
    }
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
            sh(&[
                "ip",
                "link",
                "add",
                "veth0",
                "netns",
                &end.name,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                &routed.router.name,
            ]);
            for (ns, dev, addr) in [
                (end, "veth0", end_addr),
                (&routed.router, port, router_addr),
            ] {
                sh(&[
                    "ip",
                    "-n",
                    &ns.name,
                    "addr",
                    "add",
                    &format!("{}/24", addr[0]),
                    "dev",
                    dev,
                ]);
                sh(&[
                    "ip",
                    "-n",
                    &ns.name,
                    "addr",
                    "add",
                    &format!("{}/64", addr[1]),
                    "dev",
                    dev,
                    "nodad",
                ]);
                sh(&["ip", "-n", &ns.name, "link", "set", dev, "up"]);
            }
            sh(&[
                "ip",
                "-n",
                &end.name,
                "route",
                "add",
                "default",
                "via",
                &router_addr[0],
            ]);
            sh(&[
                "ip",
                "-n",
                &end.name,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &router_addr[1],
            ]);
        }
        routed.router.sysctl("net.ipv4.ip_forward=1");
        routed.router.sysctl("net.ipv6.conf.all.forwarding=1");
        routed
    }
}
