//! ftvm's accounting model and Prometheus exporter. It depends on no other ftvm crate: the
//! VMM fills a [`VmSample`] from its counters (live on the primary, committed on the replica)
//! and [`render`] turns samples into the text exposition that [`server`] serves.

pub mod model;
pub mod server;

pub use model::{
    CONTENT_TYPE, ConsoleSample, DriveSample, IfaceSample, OutputSample, ReplicationSample,
    VcpuSample, VmSample, families, render,
};
pub use server::{Bound, Exporter, MetricsError, MetricsServer, Source, bind};
