//! Virtio transports. Only PCI: the Debian guest kernel has virtio-pci built in while
//! virtio-mmio is a module and cannot be described on its command line.

pub mod pci;
