//! Device counters declared once: each set's struct, its saved form ([`values`] /
//! [`load_values`]) and its names come from one list, so that none can be missing from one of
//! them.
//!
//! [`values`]: crate::devices::virtio::block::BlockCounters::values
//! [`load_values`]: crate::devices::virtio::block::BlockCounters::load_values

/// Declares a struct of monotonic counters (atomics, never reset on read) with `NAMES`,
/// `values()` and `load_values()`, all in declaration order.
macro_rules! counters {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $($(#[$fmeta:meta])* $field:ident),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        $vis struct $name {
            $($(#[$fmeta])* pub $field: std::sync::atomic::AtomicU64,)*
        }

        impl $name {
            /// The counters' names, in declaration order (the order of `values`).
            pub const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];

            /// The counters' values, in declaration order.
            pub fn values(&self) -> Vec<u64> {
                vec![$(self.$field.load(std::sync::atomic::Ordering::Relaxed)),*]
            }

            /// Sets the counters from saved values (untrusted: the count must match).
            pub fn load_values(&self, v: &[u64]) -> Result<(), crate::state::StateError> {
                if v.len() != Self::NAMES.len() {
                    return Err(crate::state::StateError::Invalid(concat!(
                        "wrong number of counters for ",
                        stringify!($name)
                    )));
                }
                let mut it = v.iter();
                $(self.$field.store(
                    *it.next().expect("length checked"),
                    std::sync::atomic::Ordering::Relaxed,
                );)*
                Ok(())
            }
        }
    };
}

pub(crate) use counters;

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    counters!(
        /// Two counters.
        struct Two {
            /// First.
            a,
            /// Second.
            b,
        }
    );

    #[test]
    fn values_round_trip_in_declaration_order_and_wrong_counts_are_refused() {
        let x = Two::default();
        x.a.store(3, Ordering::Relaxed);
        x.b.store(7, Ordering::Relaxed);
        assert_eq!(Two::NAMES, ["a", "b"]);
        assert_eq!(x.values(), [3, 7]);
        let y = Two::default();
        y.load_values(&x.values()).unwrap();
        assert_eq!(y.values(), [3, 7]);
        for bad in [&[1][..], &[1, 2, 3], &[]] {
            assert!(y.load_values(bad).is_err(), "{bad:?}");
            assert_eq!(y.values(), [3, 7], "a refused load changes nothing");
        }
    }
}
