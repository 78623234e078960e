//! Three namespaces in a line, left - router - right: the router forwards
//! between two veth links (IPv4 and IPv6), so what passes between left and
//! right is neither end of any of the router's own sockets.

use super::{Netns, sh};

pub struct Routed {
    pub left: Netns,
    pub router: Netns,
    pub right: Netns,
    /// Each end's address and the router's on its link: IPv4, then IPv6.
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
