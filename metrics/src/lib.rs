//! ftvm's accounting model and Prometheus exporter. It depends on no other ftvm crate: the
//! VMM fills a [`VmSample`] from its counters (live on the primary, committed on the replica)
//! and [`render`] turns samples into the text exposition that [`server`] serves.

pub mod histogram;
pub mod model;
pub mod server;

pub use histogram::{Histogram, HistogramSample, Unit};
pub use model::{
    CONTENT_TYPE, CheckpointSample, ConsoleSample, DriveSample, IfaceSample, OutputSample,
    ReplicationSample, VcpuSample, VmSample, families, render,
};
pub use server::{Bound, Exporter, MetricsError, MetricsServer, Source, bind};
