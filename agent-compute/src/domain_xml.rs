//! What the agent reads from a domain's XML: disks, vNICs and the Nova metadata element.

/// Nova's libvirt metadata namespaces, newest first, as Ceilometer tries them: 1.1 (current
/// Nova releases; adds `<nova:ports>`) and 1.0 (before).
pub const NOVA_NS: [&str; 2] = [
    "http://openstack.org/xmlns/libvirt/nova/1.1",
    "http://openstack.org/xmlns/libvirt/nova/1.0",
];

/// One disk with a source (empty CD-ROMs and config drives without source are skipped).
#[derive(Debug, Clone, PartialEq)]
pub struct Disk {
    pub target: String,
}

/// One vNIC that has both a target device and a MAC.
#[derive(Debug, Clone, PartialEq)]
pub struct Nic {
    pub target: String,
    pub mac: String,
    pub filterref: Option<String>,
}

/// A Neutron port from the Nova metadata (`<nova:port uuid>`, 1.1 only), with its fixed
/// addresses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Port {
    pub uuid: String,
    pub fixed_ips: Vec<String>,
}

/// Flavor from the Nova metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Flavor {
    pub name: Option<String>,
    pub vcpus: Option<i64>,
    pub ram_mb: Option<i64>,
    pub disk_gb: Option<i64>,
    pub ephemeral_gb: Option<i64>,
    pub swap_mb: Option<i64>,
}

/// The parsed parts of a domain XML.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DomainXml {
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    /// `<nova:name>`: the instance's display name.
    pub display_name: Option<String>,
    pub flavor: Option<Flavor>,
    pub user_id: Option<String>,
    pub project_id: Option<String>,
    pub image_ref: Option<String>,
    pub ports: Vec<Port>,
}

impl DomainXml {
    /// The port behind a vNIC: Nova names a port's tap device `tap` + the first 11
    /// characters of the port's uuid.
    pub fn port_of(&self, target: &str) -> Option<&Port> {
        let prefix = target.strip_prefix("tap")?;
        if prefix.len() < 11 {
            return None;
        }
        self.ports.iter().find(|p| p.uuid.starts_with(prefix))
    }
}

/// Parses a domain XML document.
pub fn parse(xml: &str) -> Result<DomainXml, roxmltree::Error> {
    let doc = roxmltree::Document::parse(xml)?;
    let root = doc.root_element();
    let mut out = DomainXml::default();
    if let Some(devices) = root.children().find(|n| n.has_tag_name("devices")) {
        for d in devices.children().filter(|n| n.has_tag_name("disk")) {
            let has_source = d.children().any(|c| c.has_tag_name("source"));
            let target = d
                .children()
                .find(|c| c.has_tag_name("target"))
                .and_then(|t| t.attribute("dev"));
            if let (true, Some(t)) = (has_source, target) {
                out.disks.push(Disk {
                    target: t.to_string(),
                });
            }
        }
        for i in devices.children().filter(|n| n.has_tag_name("interface")) {
            let target = i
                .children()
                .find(|c| c.has_tag_name("target"))
                .and_then(|t| t.attribute("dev"));
            let mac = i
                .children()
                .find(|c| c.has_tag_name("mac"))
                .and_then(|t| t.attribute("address"));
            if let (Some(t), Some(m)) = (target, mac) {
                let filterref = i
                    .children()
                    .find(|c| c.has_tag_name("filterref"))
                    .and_then(|f| f.attribute("filter"))
                    .map(str::to_string);
                out.nics.push(Nic {
                    target: t.to_string(),
                    mac: m.to_string(),
                    filterref,
                });
            }
        }
    }
    // The newest namespace present wins (a domain carries one).
    let nova = NOVA_NS.iter().find_map(|ns| {
        root.descendants()
            .find(|n| n.has_tag_name((*ns, "instance")))
            .map(|n| (*ns, n))
    });
    if let Some((ns, nova)) = nova {
        let child = |name: &str| nova.children().find(|c| c.has_tag_name((ns, name)));
        out.display_name = child("name").and_then(|n| n.text()).map(str::to_string);
        if let Some(f) = child("flavor") {
            let num = |name: &str| {
                f.children()
                    .find(|c| c.has_tag_name((ns, name)))
                    .and_then(|n| n.text())
                    .and_then(|t| t.trim().parse().ok())
            };
            out.flavor = Some(Flavor {
                name: f.attribute("name").map(str::to_string),
                vcpus: num("vcpus"),
                ram_mb: num("memory"),
                disk_gb: num("disk"),
                ephemeral_gb: num("ephemeral"),
                swap_mb: num("swap"),
            });
        }
        if let Some(owner) = child("owner") {
            let uuid = |name: &str| {
                owner
                    .children()
                    .find(|c| c.has_tag_name((ns, name)))
                    .and_then(|n| n.attribute("uuid"))
                    .map(str::to_string)
            };
            out.user_id = uuid("user");
            out.project_id = uuid("project");
        }
        out.image_ref = child("root")
            .filter(|r| r.attribute("type") == Some("image"))
            .and_then(|r| r.attribute("uuid"))
            .map(str::to_string);
        if let Some(ports) = child("ports") {
            for p in ports.children().filter(|c| c.has_tag_name((ns, "port"))) {
                let Some(uuid) = p.attribute("uuid") else {
                    continue;
                };
                out.ports.push(Port {
                    uuid: uuid.to_string(),
                    fixed_ips: p
                        .children()
                        .filter(|c| {
                            c.has_tag_name((ns, "ip")) && c.attribute("type") == Some("fixed")
                        })
                        .filter_map(|c| c.attribute("address").map(str::to_string))
                        .collect(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_demo_node_domain() {
        let node = include_str!("../../deploy/demo-node.xml");
        let doc = roxmltree::Document::parse(node).unwrap();
        let dom = doc
            .root_element()
            .children()
            .filter(|n| n.has_tag_name("domain"))
            .nth(1)
            .unwrap();
        let xml = &node[dom.range()];
        let d = parse(xml).unwrap();
        assert_eq!(
            d.disks
                .iter()
                .map(|x| x.target.as_str())
                .collect::<Vec<_>>(),
            ["vda", "vdb"],
            "the CD-ROM without source is skipped"
        );
        assert_eq!(d.nics.len(), 2);
        assert_eq!(d.display_name.as_deref(), Some("db-1"));
        let f = d.flavor.unwrap();
        assert_eq!(
            (f.name.as_deref(), f.vcpus, f.ram_mb),
            (Some("m1.medium"), Some(2), Some(4096))
        );
        assert!(d.user_id.is_some() && d.project_id.is_some() && d.image_ref.is_some());
    }

    #[test]
    fn reads_the_nova_1_1_namespace_current_nova_writes() {
        let d = parse(include_str!("../testdata/nova-1.1-domain.xml")).unwrap();
        assert_eq!(d.display_name.as_deref(), Some("billing-db-2"));
        assert_eq!(
            d.flavor,
            Some(Flavor {
                name: Some("m1.large".into()),
                vcpus: Some(4),
                ram_mb: Some(8192),
                disk_gb: Some(80),
                ephemeral_gb: Some(10),
                swap_mb: Some(512),
            })
        );
        assert_eq!(
            d.user_id.as_deref(),
            Some("ff627ad39ed94479b9c5033bc462cf78")
        );
        assert_eq!(
            d.project_id.as_deref(),
            Some("512866f9994f4ad8916d8539a7cdeec9")
        );
        assert_eq!(
            d.image_ref.as_deref(),
            Some("9e58cb69-316a-4093-9f23-c1d1bd8edffe")
        );
        assert_eq!(
            d.disks
                .iter()
                .map(|x| x.target.as_str())
                .collect::<Vec<_>>(),
            ["vda", "hda"],
            "the config drive has a source: it is a disk too"
        );
        assert_eq!(d.ports.len(), 2);
        let p = d.port_of("tap77c1dc00-af").expect("the vNIC's port");
        assert_eq!(p.uuid, "77c1dc00-af39-4463-bea0-12808f4bc340");
        assert_eq!(p.fixed_ips, ["172.1.1.43", "fd00:1::43"]);
        assert_eq!(
            d.port_of("tap0be3a1f2-1c").unwrap().fixed_ips,
            ["10.20.0.7"]
        );
        assert_eq!(d.port_of("vnet0"), None);
        assert_eq!(
            d.port_of("tap0be3"),
            None,
            "too short a prefix names no port"
        );
    }

    #[test]
    fn the_1_0_namespace_still_reads() {
        let xml = include_str!("../testdata/nova-1.1-domain.xml")
            .replace("libvirt/nova/1.1", "libvirt/nova/1.0");
        let d = parse(&xml).unwrap();
        assert_eq!(d.display_name.as_deref(), Some("billing-db-2"));
        assert_eq!(d.flavor.unwrap().vcpus, Some(4));
        assert_eq!(
            d.project_id.as_deref(),
            Some("512866f9994f4ad8916d8539a7cdeec9")
        );
        // An unknown namespace is not Nova's: nothing is read from it.
        let other = include_str!("../testdata/nova-1.1-domain.xml")
            .replace("libvirt/nova/1.1", "libvirt/nova/9.9");
        let d = parse(&other).unwrap();
        assert_eq!((d.display_name, d.user_id, d.flavor), (None, None, None));
    }

    #[test]
    fn domain_without_nova_metadata() {
        let d = parse("<domain><name>i-376-1733-VM</name><devices><interface><mac address='a'/><target dev='t'/><filterref filter='f1'/></interface></devices></domain>").unwrap();
        assert_eq!(d.display_name, None);
        assert_eq!(d.nics[0].filterref.as_deref(), Some("f1"));
    }
}
