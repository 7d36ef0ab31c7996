//! Every meter agent-compute produces: name, type and unit (Ceilometer's), in one table.
//!
//! The inspector refers to meters by [`Meter`], so that per cycle a meter's selection by
//! the polling sources is looked up, not matched, and its name, type and unit are encoded
//! once per process ([`vmeter_core::wire::MeterHead`]), not once per sample.

use vmeter_core::SampleType::{self, Cumulative, Gauge};

macro_rules! meters {
    ($($v:ident = $name:literal, $kind:ident, $unit:literal;)*) => {
        /// A meter of the compute agent.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Meter { $($v,)* }

        impl Meter {
            /// Every meter, in table order (`Meter::X as usize` is its index).
            pub const ALL: &[Meter] = &[$(Meter::$v,)*];

            /// Name, type and unit.
            pub const fn def(self) -> (&'static str, SampleType, &'static str) {
                match self { $(Meter::$v => ($name, $kind, $unit),)* }
            }
        }
    };
}

meters! {
    NodeCpuKernel = "compute.node.cpu.kernel.time", Cumulative, "ns";
    NodeCpuIdle = "compute.node.cpu.idle.time", Cumulative, "ns";
    NodeCpuUser = "compute.node.cpu.user.time", Cumulative, "ns";
    NodeCpuIowait = "compute.node.cpu.iowait.time", Cumulative, "ns";
    NodeMemoryTotal = "compute.node.memory.total", Gauge, "MiB";
    NodeMemoryFree = "compute.node.memory.free", Gauge, "MiB";
    PowerState = "power.state", Gauge, "";
    Vcpus = "vcpus", Gauge, "vcpu";
    Memory = "memory", Gauge, "MiB";
    Cpu = "cpu", Cumulative, "ns";
    MemoryAvailable = "memory.available", Gauge, "MiB";
    MemoryUsage = "memory.usage", Gauge, "MiB";
    MemoryResident = "memory.resident", Gauge, "MiB";
    MemorySwapIn = "memory.swap.in", Cumulative, "MiB";
    MemorySwapOut = "memory.swap.out", Cumulative, "MiB";
    DiskReadBytes = "disk.device.read.bytes", Cumulative, "B";
    DiskWriteBytes = "disk.device.write.bytes", Cumulative, "B";
    DiskReadRequests = "disk.device.read.requests", Cumulative, "request";
    DiskWriteRequests = "disk.device.write.requests", Cumulative, "request";
    DiskReadLatency = "disk.device.read.latency", Cumulative, "ns";
    DiskWriteLatency = "disk.device.write.latency", Cumulative, "ns";
    DiskCapacity = "disk.device.capacity", Gauge, "B";
    DiskAllocation = "disk.device.allocation", Gauge, "B";
    DiskUsage = "disk.device.usage", Gauge, "B";
    NetInBytes = "network.incoming.bytes", Cumulative, "B";
    NetOutBytes = "network.outgoing.bytes", Cumulative, "B";
    NetInPackets = "network.incoming.packets", Cumulative, "packet";
    NetOutPackets = "network.outgoing.packets", Cumulative, "packet";
    NetInDrop = "network.incoming.packets.drop", Cumulative, "packet";
    NetOutDrop = "network.outgoing.packets.drop", Cumulative, "packet";
    NetInError = "network.incoming.packets.error", Cumulative, "packet";
    NetOutError = "network.outgoing.packets.error", Cumulative, "packet";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_order_is_the_index() {
        for (i, m) in Meter::ALL.iter().enumerate() {
            assert_eq!(*m as usize, i);
        }
        let mut names: Vec<_> = Meter::ALL.iter().map(|m| m.def().0).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Meter::ALL.len(), "names are distinct");
    }
}
