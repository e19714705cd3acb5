//! Histograms as the model carries them: integer observations (nanoseconds, pages) counted
//! into fixed buckets, with their exact sum, rendered as Prometheus histograms in base units.

/// What a histogram's integers count, and so the factor to the exposition's base unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Unit {
    /// Plain counts (pages); rendered as they are.
    #[default]
    Count,
    /// Nanoseconds; rendered in seconds.
    Nanoseconds,
}

impl Unit {
    /// `v` in the base unit (divided, not multiplied by a factor: 2000 ns is 0.000002 s,
    /// not 0.0000020000000000000003).
    pub fn to_base(self, v: u64) -> f64 {
        match self {
            Unit::Count => v as f64,
            Unit::Nanoseconds => v as f64 / 1e9,
        }
    }
}

/// A histogram at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistogramSample {
    /// What the values are.
    pub unit: Unit,
    /// (upper bound inclusive, observations ≤ it), bounds ascending, counts cumulative; the
    /// +Inf bucket is `count` and is not listed.
    pub buckets: Vec<(u64, u64)>,
    /// Observations.
    pub count: u64,
    /// Their sum.
    pub sum: u64,
}

/// Counts observations into fixed buckets.
#[derive(Clone, Debug)]
pub struct Histogram {
    unit: Unit,
    bounds: &'static [u64],
    /// Per bound, observations in (previous bound, bound]; then those above the last.
    counts: Vec<u64>,
    sum: u64,
}

impl Histogram {
    /// An empty histogram with these ascending upper bounds.
    pub fn new(unit: Unit, bounds: &'static [u64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "ascending bounds");
        Self {
            unit,
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0,
        }
    }

    /// Counts one observation (the sum saturates rather than wraps).
    pub fn observe(&mut self, v: u64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i] += 1;
        self.sum = self.sum.saturating_add(v);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The histogram now.
    pub fn sample(&self) -> HistogramSample {
        let mut total = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(&b, &n)| {
                total += n;
                (b, total)
            })
            .collect();
        HistogramSample {
            unit: self.unit,
            buckets,
            count: self.count(),
            sum: self.sum,
        }
    }
}

/// Bounds for pauses: 50 µs to 1 s.
pub const PAUSE_NS: &[u64] = &[
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
];

/// Bounds for acknowledgement latency: 250 µs to 5 s.
pub const ACK_NS: &[u64] = &[
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
    5_000_000_000,
];

/// Bounds for pages per checkpoint: powers of 4 from 1 to 4 Mi pages (16 GiB).
pub const PAGES: &[u64] = &[
    0, 1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262_144, 1_048_576, 4_194_304,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_holds_them() {
        let mut h = Histogram::new(Unit::Count, &[1, 4, 16]);
        // At, below and above each bound.
        for v in [0, 1, 2, 3, 4, 5, 15, 16, 17, u64::MAX] {
            h.observe(v);
        }
        let s = h.sample();
        assert_eq!(s.buckets, [(1, 2), (4, 5), (16, 8)]);
        assert_eq!(s.count, 10);
        assert_eq!(s.sum, u64::MAX, "saturates");
        let empty = Histogram::new(Unit::Nanoseconds, PAUSE_NS).sample();
        assert_eq!(empty.count, 0);
        assert_eq!(empty.buckets.len(), PAUSE_NS.len());
        assert!(empty.buckets.iter().all(|&(_, n)| n == 0));
    }
}
