//! Empty library target: it lets agent/build.rs declare this crate as a build dependency so
//! cargo rebuilds the agent when the eBPF sources change. The programs are in `main.rs`.
#![no_std]
