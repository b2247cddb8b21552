//! Legacy PC devices on the port I/O bus; `persist.rs` saves and restores them.

pub mod boot_timer;
pub mod i8042;
mod persist;
pub mod serial;

pub use boot_timer::BootTimer;
pub use i8042::I8042;
pub use persist::{
    BootCompletePortState, I8042State, SerialDeviceState, SerialRestoreArgs, SerialRestoreError,
};
pub use serial::{ConsoleInput, SerialDevice};
