//! Legacy PC devices on the port-I/O bus.

mod debug_ports;
mod fw_cfg;
mod i8042;
mod serial;
mod socket;
mod testdev;

pub use debug_ports::{BootTimer, IsaDebugExit, TestExit};
pub use fw_cfg::{keys as fw_cfg_keys, FwCfg};
pub use i8042::I8042;
pub use serial::{SerialDevice, SerialOutput, SerialPortState, INPUT_BACKLOG_LIMIT};
pub use socket::{SocketClient, SocketOutput};
pub use testdev::{
    TestDevData, TestDevFlush, TestDevHost, TestDevIoMem, TestDevIrq,
    IOMEM_LEN as TESTDEV_IOMEM_LEN, IRQ_LINES as TESTDEV_IRQ_LINES,
};
