//! Node binding of kvgpt (napi-rs). It converts, schedules work off the JS thread, forwards
//! aborts and maps errors; every decision about models and generation lives in the core crate.

mod error;
mod model;
mod options;
mod session;
mod tasks;
